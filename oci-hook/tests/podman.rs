//! As root, with real podman (runc runtime) and the real agent: `rthooks-setup install
//! hooks-d`'s output is what podman reads, and the hook registers a podman container.
mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

fn podman(tmp: &Path, hooks_dir: &Path) -> Command {
    let mut c = Command::new(which("podman").expect("podman"));
    c.arg("--root")
        .arg(tmp.join("root"))
        .arg("--runroot")
        .arg(tmp.join("runroot"))
        .arg("--tmpdir")
        .arg(tmp.join("tmp"))
        .arg("--hooks-dir")
        .arg(hooks_dir)
        .args([
            "--runtime",
            "runc",
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    c
}

fn ok(what: &str, o: Output) -> String {
    assert!(o.status.success(), "{what} failed: {o:?}");
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}

#[test]
fn podman_runs_the_hook_from_our_hooks_d_file() {
    if !root_prereqs(&["podman", "runc", "conmon"]) {
        return;
    }
    let agent = Agent::start();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hooks_dir = t.join("hooks.d");
    let log = t.join("hook.log");

    let install = |verb: &str| {
        Command::new(setup_exe())
            .args([verb, "hooks-d", "--poststop"])
            .arg("--binary")
            .arg(hook_exe())
            .arg("--hooks-dir")
            .arg(&hooks_dir)
            .arg("--install-dir")
            .arg(t.join("opt"))
            .arg("--state-dir")
            .arg(t.join("state"))
            .arg(format!("--hook-arg=--grpc-address={}", agent.address()))
            .arg(format!("--hook-arg=--log-fname={}", log.display()))
            .arg("--hook-arg=--config-file=/nonexistent/rthooks-oci-hook.json")
            .output()
            .unwrap()
    };
    ok("install hooks-d", install("install"));
    assert!(hooks_dir.join("rthooks.json").is_file());

    make_rootfs(&t.join("rootfs"));
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(t.join("rootfs"))
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let import = podman(t, &hooks_dir)
        .args(["import", "-", "localhost/bb:1"])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    ok("podman import", import);

    let name = unique("rthooks-podman");
    let run = podman(t, &hooks_dir)
        .args(["run", "-d", "--name", &name, "--network", "none"])
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
        ])
        .args(["localhost/bb:1", "/bin/busybox", "sleep", "60"])
        .output()
        .unwrap();
    let rm = || {
        let _ = podman(t, &hooks_dir)
            .args(["rm", "-f", "-t", "0", &name])
            .output();
    };
    if !run.status.success() {
        rm();
        panic!(
            "podman run failed: {run:?}\nhook log: {:?}",
            log_lines(&log)
        );
    }
    let id = String::from_utf8(run.stdout).unwrap().trim().to_owned();
    let pid: u32 = ok(
        "podman inspect",
        podman(t, &hooks_dir)
            .args(["inspect", "--format", "{{.State.Pid}}", &name])
            .output()
            .unwrap(),
    )
    .parse()
    .unwrap();
    let (cg_path, cg_id) = cgroup_id_of_pid(pid);

    let lines = log_lines(&log);
    let line = lines.iter().find(|l| l["container_id"] == id.as_str());
    let containers = agent.containers();
    rm();
    let line = line.unwrap_or_else(|| panic!("no hook log line for {id}: {lines:?}"));
    assert_eq!(line["decision"], "registered", "{line}");
    let got = containers
        .iter()
        .find(|c| c.container_id == id)
        .unwrap_or_else(|| panic!("agent does not list {id}: {containers:?}"));
    assert_eq!(got.cgroup_id, cg_id, "cgroup id of {cg_path}");
    eprintln!(
        "podman container {id} registered (cgroup {cg_path}, id {cg_id}) in {} ms",
        line["total_ms"]
    );

    // podman ran the poststop hook on removal: the agent was told.
    let post = log_lines(&log)
        .into_iter()
        .find(|l| l["stage"] == "poststop" && l["container_id"] == id.as_str());
    let post = post.unwrap_or_else(|| panic!("no poststop line: {:?}", log_lines(&log)));
    assert_eq!(post["decision"], "removed", "{post}");
    assert!(!agent.containers().iter().any(|c| c.container_id == id));

    ok("uninstall hooks-d", install("uninstall"));
    assert!(!hooks_dir.join("rthooks.json").exists());
    assert!(!hooks_dir.join("rthooks-poststop.json").exists());
    assert!(!t.join("opt/rthooks-oci-hook").exists());
}
