//! Shared harness for the root integration tests: the real agent process, OCI bundles
//! with a busybox-static rootfs, runc, cgroup ids.
#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub use rthooks_testkit::{unique, Agent, AgentSpec};

pub const BUSYBOX: &str = "/bin/busybox";

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Checks what a root test needs; prints why and returns false when it cannot run.
pub fn root_prereqs(tools: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (runs a real container runtime and the agent)");
        return false;
    }
    for t in tools {
        if which(t).is_none() {
            eprintln!("SKIPPED: `{t}` is not installed (Debian package {t})");
            return false;
        }
    }
    if !Path::new(BUSYBOX).is_file() {
        eprintln!("SKIPPED: {BUSYBOX} missing (Debian busybox-static)");
        return false;
    }
    if cgroup2_mount().is_none() {
        eprintln!("SKIPPED: no cgroup v2 mount");
        return false;
    }
    true
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(pre.split_whitespace().nth(4)?))
    })
}

/// The cgroup id of a process's cgroup v2 directory (its inode on cgroup v2).
pub fn cgroup_id_of_pid(pid: u32) -> (String, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let rel = rthooks_oci_hook::container::cgroup::unified_path(&text)
        .expect("0:: line")
        .to_owned();
    let dir = cgroup2_mount().unwrap().join(rel.trim_start_matches('/'));
    (rel, std::fs::metadata(dir).unwrap().ino())
}

pub fn hook_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rthooks-oci-hook"))
}

/// The agent binary: `RTHOOKS_AGENT_BIN`, else beside this build's binaries (`cargo xtask
/// test` builds every binary first), else another profile's.
pub fn agent_exe() -> PathBuf {
    rthooks_testkit::find_agent_exe(&hook_exe()).unwrap_or_else(|e| panic!("{e}"))
}

/// The installers' binary, found as [`agent_exe`] finds the agent (`RTHOOKS_SETUP_BIN`).
pub fn setup_exe() -> PathBuf {
    rthooks_testkit::find_binary("rthooks-setup", "RTHOOKS_SETUP_BIN", &hook_exe())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The agent as the hook's tests run it: the shared launcher ([`rthooks_testkit`]),
/// trusting the label annotation the bundles carry.
pub trait HookTestAgent {
    /// Starts an agent (panics with its log when it does not come up).
    fn start() -> Agent;
    /// Kills it (its socket file stays behind, as after a crash).
    fn stop(&mut self);
    /// `rthooksctl --address … containers -o json`, when `rthooksctl` was built beside
    /// the agent.
    fn rthooksctl_containers(&self) -> Option<Vec<serde_json::Value>>;
}

impl HookTestAgent for Agent {
    fn start() -> Agent {
        AgentSpec::new(agent_exe())
            .arg("--trust-label-annotation")
            .start()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn stop(&mut self) {
        self.kill();
    }

    fn rthooksctl_containers(&self) -> Option<Vec<serde_json::Value>> {
        let ctl = agent_exe().with_file_name("rthooksctl");
        if !ctl.is_file() {
            eprintln!("note: no rthooksctl beside the agent; checked through the API only");
            return None;
        }
        let out = Command::new(ctl)
            .args(["--address", &self.address(), "containers", "-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "rthooksctl: {out:?}");
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }
}

/// A minimal rootfs: busybox-static and the applet links the tests use.
pub fn make_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "true", "cat"] {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
}

/// A runc container in its own bundle, deleted on drop.
pub struct RuncContainer {
    pub id: String,
    pub bundle: PathBuf,
    pub runc_root: PathBuf,
    pub cgroup_parent: String,
}

pub struct BundleSpec<'a> {
    pub namespace: Option<&'a str>,
    pub hook_args: Vec<String>,
    pub labels: Option<&'a str>,
    /// Also run the hook at poststop (RemoveContainer).
    pub poststop: bool,
}

impl RuncContainer {
    /// Writes a bundle (spec from `runc spec`, detached `sleep`, cgroupfs path, the
    /// hook as createRuntime) under `dir`.
    pub fn new(dir: &Path, spec: BundleSpec) -> RuncContainer {
        let id = unique("rthooks-hook");
        let bundle = dir.join(&id);
        make_rootfs(&bundle.join("rootfs"));
        let out = Command::new(which("runc").expect("runc"))
            .args(["spec"])
            .current_dir(&bundle)
            .output()
            .unwrap();
        assert!(out.status.success(), "runc spec: {out:?}");
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let cgroup_parent = format!("/{}", unique("rthooks-hooktest"));
        cfg["process"]["terminal"] = false.into();
        cfg["process"]["args"] = serde_json::json!(["/bin/busybox", "sleep", "60"]);
        cfg["linux"]["cgroupsPath"] = format!("{cgroup_parent}/{id}").into();
        let mut ann = serde_json::Map::new();
        ann.insert("io.kubernetes.cri.container-name".into(), "sleeper".into());
        ann.insert("io.kubernetes.cri.sandbox-name".into(), "pod-0".into());
        ann.insert(
            "io.kubernetes.cri.sandbox-uid".into(),
            "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f".into(),
        );
        ann.insert(
            "io.kubernetes.cri.image-name".into(),
            "localhost/bb:1".into(),
        );
        if let Some(ns) = spec.namespace {
            ann.insert("io.kubernetes.cri.sandbox-namespace".into(), ns.into());
        }
        if let Some(l) = spec.labels {
            ann.insert("rthooks.io/pod-labels".into(), l.into());
        }
        cfg["annotations"] = ann.into();
        let argv = |stage: &str| {
            let mut a = vec!["rthooks-oci-hook".to_owned(), stage.to_owned()];
            a.extend(spec.hook_args.iter().cloned());
            a
        };
        cfg["hooks"] = serde_json::json!({
            "createRuntime": [{"path": hook_exe(), "args": argv("createRuntime"), "timeout": 10}]
        });
        if spec.poststop {
            cfg["hooks"]["poststop"] =
                serde_json::json!([{"path": hook_exe(), "args": argv("poststop"), "timeout": 10}]);
        }
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&cfg).unwrap(),
        )
        .unwrap();
        RuncContainer {
            id,
            runc_root: dir.join("runc-root"),
            bundle,
            cgroup_parent,
        }
    }

    fn runc(&self) -> Command {
        let mut c = Command::new(which("runc").expect("runc"));
        c.arg("--root").arg(&self.runc_root);
        c
    }

    /// `runc run -d`: returns runc's output (fails when a createRuntime hook fails).
    /// A detached container inherits runc's stdio, so pipes would stay open for its whole
    /// life: stderr goes through a file instead.
    pub fn run(&self) -> Output {
        let err_path = self.bundle.join("runc.stderr");
        let err = std::fs::File::create(&err_path).unwrap();
        let status = self
            .runc()
            .args(["run", "-d", "--bundle"])
            .arg(&self.bundle)
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .unwrap();
        Output {
            status,
            stdout: Vec::new(),
            stderr: std::fs::read(&err_path).unwrap(),
        }
    }

    /// `runc delete -f` (runs poststop hooks).
    pub fn delete(&self) -> Output {
        self.runc()
            .args(["delete", "-f", &self.id])
            .output()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        let out = self.runc().args(["state", &self.id]).output().unwrap();
        assert!(out.status.success(), "runc state: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = self.runc().args(["delete", "-f", &self.id]).output();
        // runc removes the container's cgroups; the parent we invented is ours to remove,
        // in every hierarchy of the hybrid layout.
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                let _ =
                    std::fs::remove_dir(e.path().join(self.cgroup_parent.trim_start_matches('/')));
            }
        }
    }
}

/// The log lines the hook wrote.
pub fn log_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
