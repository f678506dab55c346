//! The processes of a runtime under test (containerd, CRI-O): one [`Daemon`] type that
//! both harnesses own, for what they share: the temporary directory everything lives
//! in, the process with its output in a log, the wait until it serves CRI, stop,
//! restart, and the clean-up after it.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cri::Cri;

/// A runtime daemon in its own temporary directory: `<dir>/<name>.sock` is its CRI socket,
/// `<dir>/<name>.log` its output, `<dir>/logs` the pods' logs. Dropping it stops the
/// process and cleans up after it ([`tear_down`]), then removes the directory.
pub(crate) struct Daemon {
    /// `containerd`, `crio`: file names and error messages.
    name: &'static str,
    /// What the runtime's leftover processes have in their command line (see [`tear_down`]).
    monitor: &'static str,
    /// The program and its arguments, run again on restart.
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    child: Option<Child>,
    /// Pod cgroups created through [`Daemon::cri`] clients, removed on drop.
    pod_cgroups: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// A new directory `<prefix>XXXX` below `$RTHOOKS_TMP` (else `/tmp`), not started yet.
    /// `monitor` names the runtime's per-container processes (containerd's shims, CRI-O's
    /// conmons), killed on drop when a test left them behind.
    pub(crate) fn new(name: &'static str, prefix: &str, monitor: &'static str) -> Result<Self> {
        // Short paths: UNIX socket paths are limited to 108 bytes. The runtime's root must
        // allow overlayfs and be a file system of the guest's own (a tmpfs in the VM
        // guests), hence RTHOOKS_TMP.
        let base =
            std::env::var_os("RTHOOKS_TMP").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(base)?;
        fs::create_dir_all(dir.path().join("logs"))?;
        Ok(Daemon {
            name,
            monitor,
            argv: Vec::new(),
            env: Vec::new(),
            child: None,
            pod_cgroups: Arc::default(),
            dir,
        })
    }

    /// The command [`Daemon::start`] runs: `program args…` with `env` added.
    pub(crate) fn set_command(&mut self, program: &Path, args: &[&OsStr], env: &[(&str, &str)]) {
        self.argv = std::iter::once(program.as_os_str())
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        self.env = env.iter().map(|(k, v)| (k.into(), v.into())).collect();
    }

    /// Everything lives here.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CRI socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir().join(format!("{}.sock", self.name))
    }

    /// The daemon's log file (stdout and stderr, appended across restarts).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir().join(format!("{}.log", self.name))
    }

    /// The directory pods log to.
    pub(crate) fn pod_log_root(&self) -> PathBuf {
        self.dir().join("logs")
    }

    /// The last `n` lines of the daemon's log.
    pub(crate) fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log_path(), n)
    }

    /// Starts the process with its output appended to the log.
    pub(crate) fn start(&mut self) -> Result<()> {
        let (program, args) = self.argv.split_first().context("no command set")?;
        let mut cmd = Command::new(program);
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn_logged(&mut cmd, &self.log_path())?);
        Ok(())
    }

    /// Its exit status, when it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the daemon serves CRI and reports RuntimeReady: its socket exists and
    /// accepts connections, by `deadline` at the latest; fails with the log's tail when
    /// the process exits first or the deadline passes.
    pub(crate) async fn wait_ready(&mut self, deadline: Instant) -> Result<()> {
        let socket = self.socket();
        while !socket.exists() {
            let failure = match self.exited() {
                Some(st) => format!("it exited ({st})"),
                None if Instant::now() > deadline => format!("{} did not appear", socket.display()),
                None => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            bail!("{}: {failure}:\n{}", self.name, self.log_tail(40));
        }
        // The socket file exists from bind(); connections are refused until listen().
        let mut cri = loop {
            match self.cri().await {
                Ok(cri) => break cri,
                Err(e) if Instant::now() > deadline => return Err(e.context(self.log_tail(40))),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        // Asked in short rounds: a daemon that exits after opening its socket (a fatal
        // configuration error) is reported at once, with its log.
        loop {
            if let Some(st) = self.exited() {
                bail!("{} exited ({st}):\n{}", self.name, self.log_tail(40));
            }
            match cri.wait_ready(Duration::from_secs(1)).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.context(self.log_tail(40))),
                Err(_) => {}
            }
        }
    }

    /// A CRI client for this daemon, whose pods are cleaned up on drop.
    pub(crate) async fn cri(&self) -> Result<Cri> {
        Ok(Cri::connect(&self.socket(), &self.pod_log_root())
            .await?
            .tracking(self.pod_cgroups.clone()))
    }

    /// Stops the process (SIGTERM, then SIGKILL after 10 s). Containers keep running under
    /// their monitors, as on a real node.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Stops it and starts it again with the same directory (then [`Daemon::wait_ready`]).
    pub(crate) fn restart(&mut self) -> Result<()> {
        self.stop();
        let _ = fs::remove_file(self.socket());
        self.start()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        tear_down(&self.pod_cgroups, self.dir.path(), self.monitor);
    }
}

/// Starts `cmd` with stdout and stderr appended to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

/// Stops our own child: SIGTERM, SIGKILL after 10 s, reaped either way.
pub(crate) fn terminate(child: &mut Child) {
    // Our own, unreaped child: the pid cannot have been reused.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

/// The last `n` lines of a log file.
fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// After a runtime rooted at `dir` stopped: kills the processes of the pods a failed test
/// left behind (killing their monitors would orphan them), then the runtime's leftover
/// `process`es (found by `dir` in their command line: containerd's shims, CRI-O's
/// conmons), and detaches mounts under `dir`, so that the directory can go.
fn tear_down(pod_cgroups: &Mutex<Vec<String>>, dir: &Path, process: &str) {
    let leftovers: Vec<String> = pod_cgroups.lock().unwrap().drain(..).collect();
    for cg in &leftovers {
        crate::cri::kill_cgroup_tree(cg);
    }
    let root = dir.display().to_string();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains(process) && cmdline.contains(&root) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|mp| mp.starts_with(&root))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}
