//! Boots one guest under QEMU, streams its console, and enforces a deadline: a guest that
//! hangs or panics is killed and reported, never waited on forever.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::sh_quote;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            // One host thread runs every vCPU in turn. Multi-threaded TCG races with the
            // guest's live code patching: a static key flipped while containers start
            // (memcg, tracepoints, BPF LSM hooks) patches kernel text through int3
            // (text_poke_bp), and under MTTCG on a busy host another vCPU can still
            // execute a stale translation holding the int3 after the patcher finished,
            // so the guest dies with "Oops: int3" (seen in CI, 6.12, at runc's first
            // memory cgroup). The guest keeps 2 vCPUs, so SMP code paths still run.
            Accel::Tcg => &["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A directory shared with the guest over virtio-9p.
#[derive(Debug, Clone)]
pub struct Share {
    pub tag: &'static str,
    pub path: PathBuf,
    pub readonly: bool,
}

/// The 9p tag of the host root that `vm/guest/vng-init` mounts with `cache=loose`.
pub const VNG_CACHED_ROOT_TAG: &str = "rthooks-hostroot";

/// What boots the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// QEMU with our initramfs (`vm/guest/init`) and 9p shares.
    Qemu,
    /// virtme-ng: its own init and initramfs (modules from the kernel's tree), the host
    /// root shared read-only with overlays; `init` (`vm/guest/vng-init`) then speaks our
    /// console protocol and runs the job found in `results`.
    Vng {
        vng: PathBuf,
        init: PathBuf,
        results: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct Boot {
    pub runner: Runner,
    /// `qemu-system-x86_64`, or a stand-in in tests.
    pub qemu: PathBuf,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub shares: Vec<Share>,
    pub deadline: Duration,
    /// Every console line goes here, whatever is shown.
    pub console_log: Option<PathBuf>,
    pub memory: &'static str,
    pub smp: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Init ran the job and powered off.
    Done {
        rc: i32,
    },
    /// QEMU ended before init said it was done.
    Crashed {
        status: String,
    },
    Panic {
        line: String,
    },
    /// Init reported it could not set up the guest.
    InitFailed {
        line: String,
    },
    /// Killed at the deadline.
    Timeout,
}

#[derive(Debug, Clone)]
pub struct BootResult {
    pub outcome: Outcome,
    pub seconds: f64,
    /// Init said "trial ok" (KVM probe boots).
    pub trial_ok: bool,
    /// The last console lines, for reports.
    pub tail: Vec<String>,
}

impl BootResult {
    pub fn describe(&self) -> String {
        match &self.outcome {
            Outcome::Done { rc } => format!("guest finished (job exit code {rc})"),
            Outcome::Crashed { status } => {
                format!("QEMU ended before the guest finished ({status})")
            }
            Outcome::Panic { line } => format!("kernel panic: {line}"),
            Outcome::InitFailed { line } => format!("guest init failed: {line}"),
            Outcome::Timeout => format!("guest killed at the deadline ({:.0} s)", self.seconds),
        }
    }
}

impl Boot {
    pub fn command(&self) -> Command {
        match &self.runner {
            Runner::Qemu => self.qemu_command(),
            Runner::Vng { vng, init, results } => self.vng_command(vng, init, results),
        }
    }

    fn vng_command(&self, vng: &Path, init: &Path, results: &Path) -> Command {
        let mut cmd = Command::new(vng);
        // vng runs its siblings (virtme-run, virtme-ng-init) by name: a virtualenv's
        // bin directory must be on PATH.
        if let Some(bin) = vng.parent() {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![bin.to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            if let Ok(joined) = std::env::join_paths(dirs) {
                cmd.env("PATH", joined);
            }
        }
        cmd.arg("--run").arg(&self.kernel);
        // 9p: virtiofsd is not packaged here (vng would wait for it, then fall back).
        cmd.args([
            "--user",
            "root",
            "--verbose",
            "--disable-monitor",
            "--force-9p",
        ]);
        cmd.args(["--cpus", &self.smp.to_string(), "--memory", self.memory]);
        // vng wants a path; a bare name means "the one on PATH", which it finds itself.
        if self.qemu.components().count() > 1 {
            cmd.arg("--qemu").arg(&self.qemu);
        }
        // A second share of the host root that vm/guest/vng-init mounts with the page
        // cache (vng's own root mount has none; a 9p channel mounts only once).
        let mut qemu_opts = format!(
            "-virtfs local,path=/,mount_tag={VNG_CACHED_ROOT_TAG},security_model=none,multidevs=remap,readonly=on"
        );
        if self.accel == Accel::Tcg {
            // vng would pick KVM whenever /dev/kvm opens; our trial boot knows better.
            cmd.arg("--disable-kvm");
            qemu_opts.push_str(" -accel tcg,thread=single");
        }
        // `=`: the value starts with a dash, which argparse would take for an option.
        cmd.arg(format!("--qemu-opts={qemu_opts}"));
        if !self.append.is_empty() {
            cmd.arg("--append").arg(&self.append);
        }
        // The same writable places our own init gives the guest (vm/guest/init): the
        // scenarios write config, state and installs there; the host keeps its files.
        for d in ["/etc", "/opt", "/root", "/usr/local", "/tmp", "/var/lib"] {
            if Path::new(d).is_dir() {
                cmd.args(["--overlay-rwdir", d]);
            }
        }
        cmd.arg("--rwdir").arg(results);
        cmd.arg("--exec").arg(format!(
            "/bin/bash {} {}",
            sh_quote(&init.display().to_string()),
            sh_quote(&results.display().to_string())
        ));
        cmd
    }

    fn qemu_command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.accel.args());
        cmd.args(["-smp", &self.smp.to_string(), "-m", self.memory]);
        cmd.args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
        cmd.arg("-kernel").arg(&self.kernel);
        cmd.arg("-initrd").arg(&self.initrd);
        cmd.arg("-append").arg(&self.append);
        for s in &self.shares {
            let mut opt = format!(
                "local,path={},mount_tag={},security_model=none,multidevs=remap",
                s.path.display(),
                s.tag
            );
            if s.readonly {
                opt.push_str(",readonly=on");
            }
            cmd.arg("-virtfs").arg(opt);
        }
        cmd
    }

    /// Runs the guest to its end or the deadline; `show` gets every console line.
    pub fn run(&self, mut show: impl FnMut(&str)) -> Result<BootResult> {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Its own process group, so the kill at the deadline reaches anything it started.
        cmd.process_group(0);
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.qemu.display()))?;
        let (tx, rx) = mpsc::channel::<String>();
        let mut readers = Vec::new();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut buf = Vec::new();
                while r
                    .read_until(b'\n', &mut buf)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {
                    let line = clean_console(&String::from_utf8_lossy(&buf));
                    if tx.send(line).is_err() {
                        break;
                    }
                    buf.clear();
                }
            }));
        }
        drop(tx);
        let mut log = match &self.console_log {
            Some(p) => Some(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ),
            None => None,
        };
        let mut tail: std::collections::VecDeque<String> = Default::default();
        let mut done_rc = None;
        let mut panic = None;
        let mut init_failed = None;
        let mut trial_ok = false;
        let mut timed_out = false;
        let mut until = start + self.deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(f) = log.as_mut() {
                        let _ = writeln!(f, "{line}");
                    }
                    show(&line);
                    if let Some(rest) = line.split("rthooks-init: done rc=").nth(1) {
                        done_rc = rest.trim().parse().ok().or(Some(-1));
                    } else if line.contains("rthooks-init: trial ok") {
                        trial_ok = true;
                    } else if line.contains("rthooks-init: FATAL") {
                        init_failed.get_or_insert(line.clone());
                    } else if panic.is_none() && line.contains("Kernel panic") {
                        panic = Some(line.clone());
                        // With panic=-1 QEMU exits by itself; if it does not, stop waiting.
                        until = until.min(Instant::now() + Duration::from_secs(10));
                    }
                    tail.push_back(line);
                    if tail.len() > 40 {
                        tail.pop_front();
                    }
                }
                // Both pipes closed: QEMU is gone (or closed them); collect its status.
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    break;
                }
            }
        }
        let status = if timed_out {
            kill_group(child.id());
            let _ = child.kill();
            child.wait().ok()
        } else {
            // The pipes can close a moment before the process is reaped; give it the
            // rest of the deadline but no more.
            wait_until(&mut child, until)?
        };
        if status.is_none() {
            timed_out = true;
            kill_group(child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
        for r in readers {
            let _ = r.join();
        }
        let outcome = if let Some(line) = init_failed {
            Outcome::InitFailed { line }
        } else if let Some(line) = panic {
            Outcome::Panic { line }
        } else if let Some(rc) = done_rc {
            Outcome::Done { rc }
        } else if timed_out {
            Outcome::Timeout
        } else {
            Outcome::Crashed {
                status: status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            }
        };
        Ok(BootResult {
            outcome,
            seconds: start.elapsed().as_secs_f64(),
            trial_ok,
            tail: tail.into(),
        })
    }
}

/// Drops terminal control sequences (the firmware clears the screen) and line endings.
pub fn clean_console(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte; otherwise a two-character escape.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn wait_until(
    child: &mut std::process::Child,
    until: Instant,
) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_group(pid: u32) {
    // std can only signal the child itself; `kill` reaches the whole group.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

/// KVM when a short trial boot succeeds with it, TCG otherwise: `/dev/kvm` can exist and
/// still not work (nested virtualisation). `RTHOOKS_ACCEL=kvm|tcg` skips the trial.
pub fn choose_accel(qemu: &Path, kernel: &Path, initrd: &Path) -> Accel {
    match std::env::var("RTHOOKS_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    // The verdict holds for this host kernel and QEMU; the trial costs up to its deadline.
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let probe_key = format!("{} {}", host.trim(), qemu.display());
    let probe_file = crate::util::cache_dir().join("kvm-probe");
    if let Ok(text) = std::fs::read_to_string(&probe_file) {
        if let Some(verdict) = text.strip_prefix(&format!("{probe_key} ")) {
            match verdict.trim() {
                "kvm" => return Accel::Kvm,
                "tcg" => {
                    eprintln!(
                        "vm: KVM failed its trial boot on this host before ({}); using TCG",
                        probe_file.display()
                    );
                    return Accel::Tcg;
                }
                _ => {}
            }
        }
    }
    let accel = try_kvm(qemu, kernel, initrd);
    let _ = std::fs::write(&probe_file, format!("{probe_key} {}\n", accel.name()));
    accel
}

fn try_kvm(qemu: &Path, kernel: &Path, initrd: &Path) -> Accel {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        eprintln!("vm: /dev/kvm is not usable; using TCG");
        return Accel::Tcg;
    }
    let trial = Boot {
        runner: Runner::Qemu,
        qemu: qemu.to_path_buf(),
        accel: Accel::Kvm,
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        append: "console=ttyS0 panic=-1 quiet rthooks.trial=1".into(),
        shares: vec![],
        deadline: Duration::from_secs(20),
        console_log: None,
        memory: "512M",
        smp: 1,
    };
    match trial.run(|_| {}) {
        Ok(r) if r.trial_ok => {
            eprintln!("vm: KVM trial boot took {:.1} s; using KVM", r.seconds);
            Accel::Kvm
        }
        Ok(r) => {
            let why = r
                .tail
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .cloned()
                .unwrap_or_default();
            eprintln!(
                "vm: KVM trial boot failed ({}; {why}); using TCG",
                r.describe()
            );
            Accel::Tcg
        }
        Err(e) => {
            eprintln!("vm: KVM trial boot failed ({e:#}); using TCG");
            Accel::Tcg
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_qemu(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("qemu");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn boot(qemu: PathBuf, deadline: Duration) -> Boot {
        Boot {
            runner: Runner::Qemu,
            qemu,
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: String::new(),
            shares: vec![],
            deadline,
            console_log: None,
            memory: "64M",
            smp: 1,
        }
    }

    #[test]
    fn a_hanging_guest_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // The sleep child keeps the pipe open: only killing the group ends it.
        let q = fake_qemu(
            dir.path(),
            "echo 'rthooks-init: started'\nsleep 600 &\nsleep 600",
        );
        let start = Instant::now();
        let mut seen = Vec::new();
        let r = boot(q, Duration::from_secs(2))
            .run(|l| seen.push(l.to_string()))
            .unwrap();
        assert_eq!(r.outcome, Outcome::Timeout);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
        assert_eq!(seen, ["rthooks-init: started"]);
        assert!(r.describe().contains("deadline"));
    }

    #[test]
    fn a_finished_guest_reports_its_job_status() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let q = fake_qemu(
            dir.path(),
            "echo 'rthooks-init: started'\necho 'rthooks-init: done rc=3'",
        );
        let mut b = boot(q, Duration::from_secs(20));
        b.console_log = Some(log.clone());
        let r = b.run(|_| {}).unwrap();
        assert_eq!(r.outcome, Outcome::Done { rc: 3 });
        assert!(std::fs::read_to_string(log).unwrap().contains("done rc=3"));
    }

    #[test]
    fn a_panic_is_reported_and_a_silent_exit_is_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let q = fake_qemu(
            dir.path(),
            "echo '[ 1.0] Kernel panic - not syncing: VFS'\nexit 0",
        );
        let r = boot(q, Duration::from_secs(20)).run(|_| {}).unwrap();
        assert!(matches!(r.outcome, Outcome::Panic { ref line } if line.contains("VFS")));
        let q = fake_qemu(dir.path(), "echo hello >&2\nexit 1");
        let r = boot(q, Duration::from_secs(20)).run(|_| {}).unwrap();
        assert!(
            matches!(r.outcome, Outcome::Crashed { .. }),
            "{:?}",
            r.outcome
        );
        assert_eq!(r.tail, ["hello"]);
    }

    #[test]
    fn a_panicking_guest_that_does_not_exit_is_still_killed() {
        let dir = tempfile::tempdir().unwrap();
        let q = fake_qemu(
            dir.path(),
            "echo 'Kernel panic - not syncing: Attempted to kill init!'\nexec sleep 600",
        );
        let start = Instant::now();
        let r = boot(q, Duration::from_secs(2)).run(|_| {}).unwrap();
        assert!(matches!(r.outcome, Outcome::Panic { .. }));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn console_lines_lose_terminal_controls() {
        assert_eq!(
            clean_console("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1)\r\n"),
            "SeaBIOS (version 1)"
        );
        assert_eq!(clean_console("a\tb\x07"), "a\tb");
    }

    #[test]
    fn vng_command_line_runs_our_init_with_the_results_writable() {
        let mut b = boot("/usr/bin/qemu-system-x86_64".into(), Duration::from_secs(1));
        b.runner = Runner::Vng {
            vng: "/venv/bin/vng".into(),
            init: "/ws/vm/guest/vng-init".into(),
            results: "/ws/target/e2e/6.12".into(),
        };
        b.append = "lsm=bpf".into();
        let cmd = b.command();
        assert_eq!(cmd.get_program(), "/venv/bin/vng");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("--run /k "), "{joined}");
        assert!(joined.contains("--disable-kvm --qemu-opts=-virtfs local,path=/,mount_tag=rthooks-hostroot,security_model=none,multidevs=remap,readonly=on -accel tcg,thread=single"), "{joined}");
        assert!(joined.contains("--qemu /usr/bin/qemu-system-x86_64"));
        assert!(joined.contains("--append lsm=bpf"));
        assert!(joined.contains("--rwdir /ws/target/e2e/6.12"));
        assert!(joined.contains("--overlay-rwdir /tmp"));
        // --exec is one argument: vng hands it to a shell in the guest.
        let exec = args.iter().position(|a| a == "--exec").unwrap();
        assert_eq!(
            args[exec + 1],
            "/bin/bash '/ws/vm/guest/vng-init' '/ws/target/e2e/6.12'"
        );
        let path = cmd
            .get_envs()
            .find(|(k, _)| *k == "PATH")
            .and_then(|(_, v)| v)
            .unwrap();
        assert!(path.to_string_lossy().starts_with("/venv/bin:"));
    }

    #[test]
    fn command_line_shares_and_accel() {
        let mut b = boot("qemu-system-x86_64".into(), Duration::from_secs(1));
        b.shares.push(Share {
            tag: "hostroot",
            path: "/".into(),
            readonly: true,
        });
        let args: Vec<String> = b
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg,thread=single -cpu max"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains(
            "local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap,readonly=on"
        ));
    }
}
