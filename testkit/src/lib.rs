//! The one launcher of a real `rthooks-agent` for the crates' tests, benches and xtask.
//!
//! Why a crate of its own: the agent's kernel tests, the hook's runc/podman tests, the
//! agent's benchmark, `cargo xtask run-agent` and the hook benchmark (`cargo xtask
//! bench-hook`) each used to start the agent their own way (four sets of flags, four
//! readiness loops, four clean-ups). A dev-only crate (`publish = false`, only ever a
//! dev-dependency or xtask's dependency) keeps that out of the shipped binaries, and a
//! crate rather than a shared `#[path]` module lets xtask use it too.
//!
//! * [`AgentSpec`] says where the agent lives: by default everything in a fresh temporary
//!   directory (socket, policies, state, events, log) and a unique pin directory under
//!   `/sys/fs/bpf`, so tests never collide with each other or with a node's agent; each
//!   can be pointed elsewhere (xtask uses the real defaults).
//! * [`AgentSpec::start`] spawns it and returns once its socket accepts connections (the
//!   agent binds it only after loading its programs and state), or with the agent's log
//!   when it exits or does not get there.
//! * [`Agent`] stops it ([`Agent::kill`], [`Agent::terminate`]), starts it again with the
//!   same flags ([`Agent::respawn`]), reads its log and events, and, with the `client`
//!   feature (default), calls its API (status, containers, policies, `RuntimeHook`).
//!   Dropping it kills the agent and removes its pin directory (unless kept).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[cfg(feature = "apiserver")]
pub mod apiserver;
#[cfg(feature = "client")]
mod client;
pub mod debian;

/// How long [`AgentSpec::start`] waits for the socket (a cold BPF load on a busy 2-core
/// machine takes seconds).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Creating its directories or log failed.
    #[error("preparing {}", path.display())]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The binary could not be executed.
    #[error("starting {}", exe.display())]
    Spawn {
        /// The binary.
        exe: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It exited before its socket was up.
    #[error("agent exited with {status} before serving; its log:\n{log}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What it logged (empty when its output was not captured).
        log: String,
    },
    /// Its socket did not come up in time (the agent is killed).
    #[error("agent did not serve {} within {timeout:?}; its log:\n{log}", socket.display())]
    NotReady {
        /// The socket.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
        /// What it logged.
        log: String,
    },
}

/// The cache of downloads and tools built outside git: `$RTHOOKS_CACHE`, else
/// `~/.cache/rthooks`. The one definition: xtask fills it (`cargo xtask setup`, kernels,
/// guest userland), the tests find what it built there.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RTHOOKS_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/rthooks")
}

/// The variable through which `cargo xtask test` tells the tests where the test
/// Kubernetes API server's binaries are (default [`apiserver_bin_dir`]).
pub const APISERVER_BIN_DIR_ENV: &str = "RTHOOKS_APISERVER_BIN_DIR";

/// Where `cargo xtask setup` builds the test Kubernetes API server (`etcd`,
/// `apiextensions-apiserver`): `<cache>/apiserver/bin`.
pub fn apiserver_bin_dir() -> PathBuf {
    cache_dir().join("apiserver/bin")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test of this or another process uses at the same time.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Polls `f` until it returns Some, panicking after `timeout` (tests only).
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

/// The agent binary for a test or tool whose own binary is `beside` (e.g. the hook's
/// `CARGO_BIN_EXE_…`): see [`find_binary`], with `RTHOOKS_AGENT_BIN`.
pub fn find_agent_exe(beside: &Path) -> Result<PathBuf, String> {
    find_binary("rthooks-agent", "RTHOOKS_AGENT_BIN", beside)
}

/// Another package's binary `name`: `$env` if set, else in the profile directory of
/// `beside`, else in `target/debug` or `target/release` (`cargo xtask test` builds every
/// binary first).
pub fn find_binary(name: &str, env: &str, beside: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(p.into());
    }
    let profile_dir = beside.parent().unwrap_or(Path::new("."));
    let mut dirs = vec![profile_dir.to_owned()];
    if let Some(target) = profile_dir.parent() {
        dirs.extend([target.join("debug"), target.join("release")]);
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{name} binary not found beside {}: build it first (`cargo build -p {name}`) \
                 or set {env}",
                beside.display()
            )
        })
}

/// Where the agent's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// `agent.log` in its directory (readable with [`Agent::log`]).
    LogFile,
    /// This process's stdout and stderr (xtask run-agent).
    Inherit,
}

/// What to start: the binary, its directories and extra flags.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    exe: PathBuf,
    dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    policy_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    events_file: Option<PathBuf>,
    keep_pins: bool,
    output: Output,
    args: Vec<OsString>,
}

impl AgentSpec {
    /// The agent at `exe`, everything private to this instance.
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        AgentSpec {
            exe: exe.into(),
            dir: None,
            socket: None,
            pin_dir: None,
            policy_dir: None,
            state_dir: None,
            events_file: None,
            keep_pins: false,
            output: Output::LogFile,
            args: Vec::new(),
        }
    }

    /// Its directory (log, and the default socket, policies, state and events) instead of
    /// a temporary one; created if missing, never removed.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Its gRPC socket (default: `agent.sock` in its directory).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Its bpffs pin directory (default: a unique one under `/sys/fs/bpf`).
    pub fn pin_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.pin_dir = Some(path.into());
        self
    }

    /// Its policy directory (default: `policies/` in its directory, created empty).
    pub fn policy_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.policy_dir = Some(path.into());
        self
    }

    /// Its state directory (default: `state/` in its directory).
    pub fn state_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(path.into());
        self
    }

    /// Its events file (default: `events.jsonl` in its directory; `-` for stdout).
    pub fn events_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.events_file = Some(path.into());
        self
    }

    /// Leave the pinned programs and maps when the [`Agent`] is dropped (an agent's
    /// programs stay attached after it exits, by design).
    pub fn keep_pins(mut self) -> Self {
        self.keep_pins = true;
        self
    }

    /// Where its output goes (default: [`Output::LogFile`]).
    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// One more flag; flags given here come after the launcher's own, and the agent takes
    /// a flag's last value, so they can override them.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// More flags (see [`AgentSpec::arg`]).
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Starts the agent and waits until its socket accepts connections.
    pub fn start(self) -> Result<Agent, LaunchError> {
        let prepare = |path: &Path, r: std::io::Result<()>| {
            r.map_err(|source| LaunchError::Prepare {
                path: path.to_owned(),
                source,
            })
        };
        let (temp, dir) = match &self.dir {
            Some(d) => {
                prepare(d, std::fs::create_dir_all(d))?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("rthooks-agent-")
                    .tempdir()
                    .map_err(|source| LaunchError::Prepare {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                let d = t.path().to_owned();
                (Some(t), d)
            }
        };
        let socket = self.socket.unwrap_or_else(|| dir.join("agent.sock"));
        let pin_dir = self
            .pin_dir
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf").join(unique("rthooks-test")));
        let policy_dir = self.policy_dir.unwrap_or_else(|| dir.join("policies"));
        prepare(&policy_dir, std::fs::create_dir_all(&policy_dir))?;
        let state_dir = self.state_dir.unwrap_or_else(|| dir.join("state"));
        let events_file = self.events_file.unwrap_or_else(|| dir.join("events.jsonl"));
        let mut args: Vec<OsString> = vec![
            flag("grpc-address", format!("unix://{}", socket.display())),
            flag("bpf-pin-dir", &pin_dir),
            flag("policy-dir", &policy_dir),
            flag("state-dir", &state_dir),
            flag("events-file", &events_file),
        ];
        args.extend(self.args);
        // A caller's own --grpc-address or --bpf-pin-dir wins (the agent takes a flag's last
        // value): wait on and clean up what the agent will really use.
        let socket = match last_flag(&args, "grpc-address") {
            Some(a) => PathBuf::from(a.strip_prefix("unix://").unwrap_or(&a)),
            None => socket,
        };
        let pin_dir = last_flag(&args, "bpf-pin-dir").map_or(pin_dir, PathBuf::from);
        let mut agent = Agent {
            dir: AgentDir {
                path: dir,
                _temp: temp,
            },
            exe: self.exe,
            socket,
            pin_dir,
            policy_dir,
            events_file,
            args,
            output: self.output,
            keep_pins: self.keep_pins,
            child: None,
            #[cfg(feature = "client")]
            rt: std::sync::OnceLock::new(),
        };
        agent.respawn()?;
        Ok(agent)
    }
}

/// The value of the last `--name=value` or `--name value` in `args`.
fn last_flag(args: &[OsString], name: &str) -> Option<String> {
    let long = format!("--{name}");
    let mut found = None;
    let mut it = args.iter().map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == long {
            found = it.next().map(|v| v.into_owned());
        } else if let Some(v) = a.strip_prefix(&format!("{long}=")) {
            found = Some(v.to_owned());
        }
    }
    found
}

fn flag(name: &str, value: impl AsRef<std::ffi::OsStr>) -> OsString {
    let mut f = OsString::from(format!("--{name}="));
    f.push(value);
    f
}

/// The agent's directory: a temporary one (removed with the [`Agent`]) or the one given.
#[derive(Debug)]
pub struct AgentDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl AgentDir {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A running (or stopped) agent started by [`AgentSpec::start`].
pub struct Agent {
    /// Its directory (log, and by default socket, policies, state, events).
    pub dir: AgentDir,
    /// Its gRPC socket.
    pub socket: PathBuf,
    /// Its bpffs pin directory.
    pub pin_dir: PathBuf,
    exe: PathBuf,
    policy_dir: PathBuf,
    events_file: PathBuf,
    args: Vec<OsString>,
    output: Output,
    keep_pins: bool,
    child: Option<Child>,
    #[cfg(feature = "client")]
    rt: std::sync::OnceLock<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.socket)
            .field("pin_dir", &self.pin_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Agent {
    /// Starts the agent again with the same flags (after [`Agent::kill`] or
    /// [`Agent::terminate`]) and waits for its socket.
    pub fn respawn(&mut self) -> Result<(), LaunchError> {
        self.kill();
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args).stdin(Stdio::null());
        if self.output == Output::LogFile {
            let path = self.log_path();
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|f| Ok((f.try_clone()?, f)))
                .map_err(|source| LaunchError::Prepare { path, source })?;
            cmd.stdout(log.0).stderr(log.1);
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned above");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(LaunchError::Exited {
                    status,
                    log: self.log(),
                });
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(LaunchError::NotReady {
                    socket: self.socket.clone(),
                    timeout: READY_TIMEOUT,
                    log: self.log(),
                });
            }
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

    /// SIGTERM, then the exit status (None if it was not running, or still ran after
    /// `timeout`: then it is killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
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

    /// Waits until the agent exits by itself (or by a signal from elsewhere, e.g. ctrl-c).
    pub fn wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.child.take() {
            Some(mut c) => c.wait().map(Some),
            None => Ok(None),
        }
    }

    /// Whether its process still runs (false once it exited, was stopped or never started).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its socket as a gRPC address (`unix:///…`), what `--grpc-address` takes.
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Its policy directory.
    pub fn policy_dir(&self) -> PathBuf {
        self.policy_dir.clone()
    }

    /// The flags it runs with.
    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path.join("agent.log")
    }

    /// What it logged so far (every run appends), when its output goes to the log file.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The raw lines of its events file.
    pub fn event_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.events_file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if !self.keep_pins {
            // Removing the pins detaches this agent's programs.
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_flag_wins() {
        let args: Vec<OsString> = ["--grpc-address=unix:///a", "--x", "--grpc-address", "/b"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(last_flag(&args, "grpc-address").as_deref(), Some("/b"));
        assert_eq!(last_flag(&args, "bpf-pin-dir"), None);
    }

    #[test]
    fn an_agent_that_exits_is_reported_with_its_log() {
        // `false` stands for an agent that refuses to start: the launcher must say so
        // instead of waiting for a socket.
        let e = AgentSpec::new("/bin/false").start().unwrap_err();
        assert!(matches!(e, LaunchError::Exited { .. }), "{e}");
        let e = AgentSpec::new("/nonexistent/rthooks-agent")
            .start()
            .unwrap_err();
        assert!(matches!(e, LaunchError::Spawn { .. }), "{e}");
    }
}
