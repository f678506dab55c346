//! The processes of a runtime under test (containerd, CRI-O): started with their output
//! in a log, waited for until their socket appears, stopped, and cleaned up after.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Starts `cmd` with stdout and stderr appended to `log`.
pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))
}

/// Waits until `socket` exists; fails with the log's tail when `child` exits first or
/// `deadline` passes.
pub(crate) async fn wait_for_socket(
    child: &mut Option<Child>,
    socket: &Path,
    deadline: Instant,
    log: &Path,
) -> Result<()> {
    while !socket.exists() {
        if let Some(st) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("it exited ({st}):\n{}", log_tail(log, 40));
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not appear:\n{}",
                socket.display(),
                log_tail(log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
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
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// After a runtime rooted at `dir` stopped: kills the processes of the pods a failed test
/// left behind (killing their monitors would orphan them), then the runtime's leftover
/// `process`es (found by `dir` in their command line: containerd's shims, CRI-O's
/// conmons), and detaches mounts under `dir`, so that the directory can go.
pub(crate) fn tear_down(pod_cgroups: &Mutex<Vec<String>>, dir: &Path, process: &str) {
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
