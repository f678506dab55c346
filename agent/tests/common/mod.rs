//! Shared harness for the agent's kernel integration tests: a real agent process with its
//! own socket, pin directory, state and policy directories; real cgroup v2 directories;
//! real processes exec'ing real binaries.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rthooks_api::tetragon::fine_guidance_sensors_client::FineGuidanceSensorsClient;
use rthooks_api::tetragon::{runtime_hook_request, CreateContainer, RuntimeHookRequest};
use rthooks_api::v1;
use rthooks_api::v1::agent_client::AgentClient;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Root, a cgroup v2 mount and a working BPF syscall are needed; without them the test
/// says why and passes vacuously (CI runs as root, where they must run).
pub fn kernel_tests_possible() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: kernel integration tests need root");
        return false;
    }
    if rthooks_agent::cgroup::detect_root().is_err() {
        eprintln!("SKIPPED: no cgroup v2 mount");
        return false;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("SKIPPED: kernel has no BTF");
        return false;
    }
    true
}

pub fn cgroup_root() -> PathBuf {
    rthooks_agent::cgroup::detect_root().unwrap()
}

/// Polls `f` until it returns Some, failing the test after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Agent {
    pub dir: tempfile::TempDir,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub args: Vec<String>,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("rthooks-test"));
        let socket = dir.path().join("agent.sock");
        let mut args: Vec<String> = vec![
            format!("--grpc-address=unix://{}", socket.display()),
            format!("--bpf-pin-dir={}", pin_dir.display()),
            format!("--policy-dir={}", dir.path().join("policies").display()),
            format!("--state-dir={}", dir.path().join("state").display()),
            format!(
                "--events-file={}",
                dir.path().join("events.jsonl").display()
            ),
            "--policy-poll=50ms".into(),
            "--reconcile-interval=1s".into(),
            "--log-level=debug".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut agent = Agent {
            dir,
            pin_dir,
            socket,
            args,
            child: None,
            rt,
        };
        agent.spawn();
        agent
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rthooks-agent"))
            .args(&self.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            if self.socket.exists() && self.rt.block_on(self.try_status()).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no clean-up of any kind, like a crash or an OOM kill.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then the exit status (None if it is still running after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn try_status(&self) -> Option<v1::StatusResponse> {
        let ch = rthooks_api::client::connect_unix(self.socket.to_str()?, Duration::from_secs(1))
            .await
            .ok()?;
        AgentClient::new(ch)
            .status(v1::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    fn channel(&self) -> tonic::transport::Channel {
        self.rt
            .block_on(rthooks_api::client::connect_unix(
                self.socket.to_str().unwrap(),
                Duration::from_secs(5),
            ))
            .unwrap()
    }

    fn api(&self) -> AgentClient<tonic::transport::Channel> {
        AgentClient::new(self.channel())
    }

    pub fn status(&self) -> v1::StatusResponse {
        self.rt.block_on(self.try_status()).expect("status")
    }

    pub fn containers(&self) -> Vec<v1::Container> {
        let mut api = self.api();
        self.rt
            .block_on(api.list_containers(v1::ListContainersRequest {}))
            .unwrap()
            .into_inner()
            .containers
    }

    pub fn policies(&self) -> Vec<v1::Policy> {
        let mut api = self.api();
        self.rt
            .block_on(api.list_policies(v1::ListPoliciesRequest {}))
            .unwrap()
            .into_inner()
            .policies
    }

    /// "lsm" or "sigkill".
    pub fn mode(&self) -> String {
        self.status().enforcement_mode
    }

    /// A Deny as this agent's mode carries it out: EPERM in lsm mode, SIGKILL otherwise.
    pub fn denied(&self, outcome: &Outcome) -> bool {
        match self.mode().as_str() {
            "lsm" => matches!(outcome, Outcome::ExecDenied),
            _ => matches!(outcome, Outcome::Killed),
        }
    }

    /// The action events report for a Deny in this mode.
    pub fn deny_action(&self) -> &'static str {
        if self.mode() == "lsm" {
            "deny"
        } else {
            "kill"
        }
    }

    pub fn map_entries(&self, name: &str) -> u64 {
        self.status()
            .maps
            .iter()
            .find(|m| m.name == name)
            .unwrap()
            .entries
    }

    pub fn add_policy(&self, yaml: &str) -> Result<v1::Policy, tonic::Status> {
        let mut api = self.api();
        self.rt
            .block_on(api.add_policy(v1::AddPolicyRequest { yaml: yaml.into() }))
            .map(|r| r.into_inner().policy.unwrap())
    }

    pub fn delete_policy(&self, name: &str) -> Result<(), tonic::Status> {
        let mut api = self.api();
        self.rt
            .block_on(api.delete_policy(v1::DeletePolicyRequest {
                name: name.into(),
                namespace: String::new(),
            }))
            .map(|_| ())
    }

    pub fn check_policy(&self, yaml: &str) -> Vec<v1::Container> {
        let mut api = self.api();
        self.rt
            .block_on(api.check_policy(v1::CheckPolicyRequest { yaml: yaml.into() }))
            .unwrap()
            .into_inner()
            .selected
    }

    /// What the OCI hook sends, through the same gRPC method.
    pub fn runtime_hook(&self, req: CreateContainer) -> Result<(), tonic::Status> {
        let mut client = FineGuidanceSensorsClient::new(self.channel());
        self.rt
            .block_on(client.runtime_hook(RuntimeHookRequest {
                event: Some(runtime_hook_request::Event::CreateContainer(req)),
            }))
            .map(|_| ())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        // Unpinning detaches this agent's programs.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// A cgroup v2 directory removed (with its children) on drop.
pub struct Cgroup {
    pub path: PathBuf,
    pub relative: String,
}

impl Cgroup {
    pub fn new(name: &str) -> Cgroup {
        let relative = unique(name);
        let path = cgroup_root().join(&relative);
        std::fs::create_dir(&path).unwrap();
        Cgroup {
            path,
            relative: format!("/{relative}"),
        }
    }

    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap();
        Cgroup {
            path,
            relative: format!("{}/{name}", self.relative),
        }
    }

    pub fn id(&self) -> u64 {
        rthooks_agent::cgroup::cgroup_id(&self.path).unwrap()
    }

    pub fn remove(&self) {
        remove_cgroup(&self.path);
    }
}

fn remove_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// What became of an exec.
#[derive(Debug)]
pub enum Outcome {
    /// The program ran and exited (or was killed by something else).
    Ran(ExitStatus),
    /// SIGKILL before or while running (sigkill mode, or a Kill rule).
    Killed,
    /// execve failed with EPERM (lsm mode Deny): nothing of the binary ran.
    ExecDenied,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Outcome::Ran(s) if s.success())
    }

    pub fn stopped(&self) -> bool {
        matches!(self, Outcome::Killed | Outcome::ExecDenied)
    }
}

/// Runs `program args` with the child moved into `cgroup` before it execs, in `cwd`.
pub fn run_in(cgroup: &Cgroup, cwd: &Path, program: &str, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    join_before_exec(&mut cmd, cgroup);
    outcome_of(&mut cmd)
}

/// Makes `cmd`'s child move itself into `cgroup` between fork and exec. `pre_exec` steps
/// added after this one run inside the cgroup, so an exec they make is covered too.
pub fn join_before_exec(cmd: &mut Command, cgroup: &Cgroup) {
    let procs = CString::new(cgroup.path.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: only async-signal-safe calls (open/write/close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr() as *const _, 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Runs `cmd` to the end, output discarded, and classifies what became of its exec.
pub fn outcome_of(cmd: &mut Command) -> Outcome {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    match cmd.status() {
        Ok(status) if status.signal() == Some(libc::SIGKILL) => Outcome::Killed,
        Ok(status) => Outcome::Ran(status),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Outcome::ExecDenied,
        Err(e) => panic!("running {:?}: {e}", cmd.get_program()),
    }
}

/// A copy of `touch` at a path of its own: running it creates the file named by its
/// argument, so a missing file proves it never ran a line of its own.
pub struct Victim {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Victim {
    pub fn new() -> Victim {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let path = bin.join("victim");
        let touch = ["/usr/bin/touch", "/bin/touch"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap();
        std::fs::copy(touch, &path).unwrap();
        // The kernel reports the resolved path: resolve /tmp symlinks the same way.
        let path = path.canonicalize().unwrap();
        std::os::unix::fs::symlink(&path, dir.path().join("victim-link")).unwrap();
        Victim { dir, path }
    }

    pub fn marker(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the victim in `cgroup`; returns the outcome and whether it wrote its file.
    pub fn run(&self, cgroup: &Cgroup, how: &str) -> (Outcome, bool) {
        let marker = self.marker(&unique("ran"));
        let marker_s = marker.to_str().unwrap().to_string();
        let outcome = match how {
            "absolute" => run_in(
                cgroup,
                self.dir.path(),
                self.path.to_str().unwrap(),
                &[&marker_s],
            ),
            "symlink" => run_in(
                cgroup,
                self.dir.path(),
                self.dir.path().join("victim-link").to_str().unwrap(),
                &[&marker_s],
            ),
            "relative" => run_in(
                cgroup,
                &self.dir.path().join("bin"),
                "./victim",
                &[&marker_s],
            ),
            other => panic!("unknown way {other}"),
        };
        (outcome, marker.exists())
    }
}

pub fn policy_yaml(name: &str, app: &str, binary: &Path, action: &str) -> String {
    format!(
        "apiVersion: rthooks.io/v1alpha1\nkind: RuntimePolicy\nmetadata:\n  name: {name}\nspec:\n  podSelector:\n    matchLabels: {{app: {app}}}\n  rules:\n    - binaries: [{}]\n      action: {action}\n",
        binary.display()
    )
}

pub fn hook_request(cgroup: &Cgroup, id: &str, labels: &str) -> CreateContainer {
    let annotations: HashMap<String, String> = [
        ("io.kubernetes.cri.container-name", "app"),
        ("io.kubernetes.cri.sandbox-name", "web-0"),
        ("io.kubernetes.cri.sandbox-namespace", "shop"),
        ("io.kubernetes.cri.sandbox-uid", "0000-1111"),
        ("io.kubernetes.cri.image-name", "localhost/web:1"),
        (rthooks_api::POD_LABELS_ANNOTATION, labels),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    CreateContainer {
        cgroups_path: cgroup.relative.clone(),
        container_id: id.into(),
        annotations,
        ..Default::default()
    }
}
