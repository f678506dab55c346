//! Shared harness for the agent's kernel integration tests: a real agent process with its
//! own socket, pin directory, state and policy directories; real cgroup v2 directories;
//! real processes exec'ing real binaries.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use rthooks_api::tetragon::CreateContainer;

pub mod cluster;
// Each test binary and the bench use a different part of this module.
#[allow(unused_imports)]
pub use rthooks_testkit::{unique, wait_for, Agent, AgentSpec};

/// Root, a cgroup v2 mount and a working BPF syscall are needed; without them the test
/// says why and passes vacuously (CI runs as root, where they must run).
pub fn kernel_tests_possible() -> bool {
    if !nix::unistd::geteuid().is_root() {
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

/// The agent as these tests run it: the shared launcher ([`rthooks_testkit`]) with this
/// build's binary, fast policy polling and reconciling, debug logs, and `extra` flags.
pub trait AgentExt {
    /// Starts an agent (panics with its log when it does not come up).
    fn start(extra: &[&str]) -> Agent;
    /// Starts it again after [`Agent::kill`], with the same flags.
    fn spawn(&mut self);
    /// A Deny as this agent's mode carries it out: EPERM in lsm mode, SIGKILL otherwise.
    fn denied(&self, outcome: &Outcome) -> bool;
    /// The action events report for a Deny in this mode.
    fn deny_action(&self) -> &'static str;
}

impl AgentExt for Agent {
    fn start(extra: &[&str]) -> Agent {
        AgentSpec::new(env!("CARGO_BIN_EXE_rthooks-agent"))
            .args([
                "--policy-poll=50ms",
                "--reconcile-interval=1s",
                "--log-level=debug",
            ])
            .args(extra)
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn spawn(&mut self) {
        self.respawn().unwrap_or_else(|e| panic!("{e}"));
    }

    fn denied(&self, outcome: &Outcome) -> bool {
        match self.mode().as_str() {
            "lsm" => matches!(outcome, Outcome::ExecDenied),
            _ => matches!(outcome, Outcome::Killed),
        }
    }

    fn deny_action(&self) -> &'static str {
        if self.mode() == "lsm" {
            "deny"
        } else {
            "kill"
        }
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
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    let procs = CString::new(cgroup.path.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: between fork and exec only open(2), write(2) and close(2), through nix
    // wrappers that allocate nothing for a `CStr` path (other test threads may hold the
    // allocator's lock at the fork).
    unsafe {
        cmd.pre_exec(move || {
            let fd = open(
                procs.as_c_str(),
                OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            // SAFETY: a descriptor just opened, owned (and closed on drop) here only.
            let fd = OwnedFd::from_raw_fd(fd);
            match nix::unistd::write(&fd, b"0")? {
                1 => Ok(()),
                _ => Err(std::io::ErrorKind::WriteZero.into()),
            }
        });
    }
}

/// Runs `cmd` to the end, output discarded, and classifies what became of its exec.
pub fn outcome_of(cmd: &mut Command) -> Outcome {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    match cmd.status() {
        Ok(status) if status.signal() == Some(Signal::SIGKILL as i32) => Outcome::Killed,
        Ok(status) => Outcome::Ran(status),
        Err(e) if e.raw_os_error() == Some(Errno::EPERM as i32) => Outcome::ExecDenied,
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

/// A loopback address with a port nothing listens on at the moment (for `--metrics-address`).
pub fn free_address() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `(status line, body)` of GET `path`, or None when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// `$var`, or `default` (benches: fewer execs, registrations or pods in slow guests).
pub fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}
