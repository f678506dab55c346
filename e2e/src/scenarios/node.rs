//! The node under the stack, before any hook: the guest booted with what the agent needs,
//! containerd starts, runc/crun run a bundle and podman a container in the guest's cgroup
//! v2, the agent starts in a mode the kernel honours, and the agent's own kernel tests
//! pass here unchanged.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::process::Command;

use super::results::Verdict;
use crate::containerd::{Containerd, Options, Release};
use crate::cri::PodSpec;
use crate::oci::{Engine, OciNode};
use crate::stack::{agent_spec, start_agent, Binaries};
use crate::timing::{secs, wait_until};

/// A node scenario's verdict and the enforcement mode it saw (empty: none).
pub(super) struct Outcome {
    pub(super) verdict: Verdict,
    pub(super) mode: String,
}

impl From<Verdict> for Outcome {
    fn from(verdict: Verdict) -> Self {
        Outcome {
            verdict,
            mode: String::new(),
        }
    }
}

/// Where the agent's test executables this run built are named: `NAME=PATH` a line, as
/// cargo's JSON messages named them to `cargo xtask e2e`.
pub const TEST_BINARIES_ENV: &str = "RTHOOKS_TEST_BINARIES";

/// The bpf LSM is active only when the kernel lists it (5.10 needs `lsm=...,bpf`).
pub(super) fn lsm_has_bpf() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap_or_default()
        .trim()
        .split(',')
        .any(|l| l == "bpf")
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The guest booted into the host root with the mounts the agent needs.
pub(super) async fn boot() -> Result<Outcome> {
    let btf = std::fs::File::open("/sys/kernel/btf/vmlinux").is_ok();
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let cgroup2 = mounts.contains(" /sys/fs/cgroup cgroup2 ");
    let bpffs = mounts.contains(" /sys/fs/bpf bpf ");
    let detail = format!(
        "btf={} bpf_lsm={} lsm={lsm} cgroup2={} bpffs={}",
        yes(btf),
        yes(lsm_has_bpf()),
        yes(cgroup2),
        yes(bpffs)
    );
    Ok(if !btf {
        Verdict::fail("no BTF at /sys/kernel/btf/vmlinux").detail(detail)
    } else if !cgroup2 || !bpffs {
        Verdict::fail("cgroup2 or bpffs missing").detail(detail)
    } else {
        Verdict::pass(detail)
    }
    .into())
}

/// containerd starts (the harness's config: root, state and sockets in tmpfs) and
/// answers `ctr version`.
pub(super) async fn containerd_starts(release: Release) -> Result<Outcome> {
    let mut options = Options::new(release);
    options.images = false;
    options.nri = false;
    let containerd = Containerd::start_with(options).await?;
    let out = Command::new(&containerd.bins.ctr)
        .arg("--address")
        .arg(containerd.socket())
        .arg("version")
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .skip_while(|l| !l.starts_with("Server:"))
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(str::trim)
        .context(format!("no server version in ctr version: {text}"))?;
    Ok(Verdict::pass(format!("server {version}")).into())
}

/// The runtime runs a container printing its `/proc/self/cgroup` (a bundle, no hook; or
/// podman's import of the same rootfs): the path the hook scenarios build on.
pub(super) async fn engine_runs(engine: Engine) -> Result<Outcome> {
    let node = match OciNode::prepare(engine).await {
        Ok(n) => n,
        Err(e) => return Ok(Verdict::skip(format!("{e:#}")).into()),
    };
    let shared = node.shared_dir("runs")?;
    let pod = PodSpec::new("plain", "default");
    let name = format!("e2e-{}", engine.name());
    let ran = node
        .run(&name, &pod, &shared, &["/bin/cat", "/proc/self/cgroup"])
        .await?;
    let cgroup = ran.out.find("0::/").map(|i| ran.out[i + 3..].trim());
    Ok(match (engine, cgroup) {
        _ if ran.rc != 0 => Verdict::fail(format!("{} run failed", engine.name())).detail(ran.out),
        (Engine::Bundle(_), Some(_)) if ran.out.starts_with("0::/") => {
            Verdict::pass(format!("{}; cgroup {}", node.version, ran.out.trim()))
        }
        (Engine::Podman, Some(c)) => Verdict::pass(format!("{}; cgroup {c}", node.version)),
        _ => Verdict::fail("unexpected /proc/self/cgroup in the container").detail(ran.out),
    }
    .into())
}

/// The agent loads its programs, serves its API, and reports an enforcement mode the
/// kernel can honour: never `lsm` unless `bpf` is an active LSM (5.10 without
/// `lsm=...,bpf` attaches LSM programs that never run).
pub(super) async fn agent_starts(bin_dir: &Path) -> Result<Outcome> {
    let bins = match Binaries::in_dir(bin_dir) {
        Ok(b) => b,
        Err(e) => return Ok(Verdict::skip(e.to_string()).into()),
    };
    let dir = tempfile::Builder::new().prefix("rths-agent-").tempdir()?;
    let pin_dir = PathBuf::from("/sys/fs/bpf/rthooks-e2e");
    let (answered, s, log) = match start_agent(agent_spec(&bins, &pin_dir, dir.path())).await {
        Ok(mut agent) => {
            let address = agent.address();
            let status = || {
                let out = std::process::Command::new(&bins.ctl)
                    .args(["--address", &address, "-o", "json", "status"])
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
                    .flatten()
            };
            let answered = wait_until(secs(10), || status().is_some() || !agent.running()).await
                && status().is_some();
            let s = status().unwrap_or_default();
            agent.terminate(secs(10));
            (answered, s, agent.log())
        }
        // The launcher's error carries the log.
        Err(e) => (false, serde_json::Value::default(), format!("{e:#}")),
    };
    // Its pinned programs would otherwise keep enforcing for the rest of the guest.
    let unpinned = std::process::Command::new(&bins.agent)
        .arg("--unpin")
        .arg("--bpf-pin-dir")
        .arg(&pin_dir)
        .status();
    if !answered {
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        return Ok(
            Verdict::fail("the agent did not answer (or exited) before answering")
                .detail(tail.into_iter().rev().collect::<Vec<_>>().join(" "))
                .into(),
        );
    }
    if !unpinned.is_ok_and(|s| s.success()) {
        return Ok(Verdict::fail(format!("unpinning {} failed", pin_dir.display())).into());
    }
    let mode = s["enforcement_mode"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let why = s["enforcement_reason"].as_str().unwrap_or_default();
    let verdict = match mode.as_str() {
        "lsm" if !lsm_has_bpf() => {
            Verdict::fail("the agent claims LSM mode but bpf is not an active LSM").detail(why)
        }
        "lsm" | "fentry" | "kprobe" | "sigkill" if why.is_empty() => Verdict::pass(mode.clone()),
        "lsm" | "fentry" | "kprobe" | "sigkill" => Verdict::pass(format!("{mode}: {why}")),
        other => Verdict::fail(format!("unknown enforcement mode '{other}'")).detail(s.to_string()),
    };
    Ok(Outcome { verdict, mode })
}

/// This run's build of the agent's test `name` (`agent/tests/<name>.rs`).
fn test_binary(name: &str) -> Option<PathBuf> {
    std::env::var(TEST_BINARIES_ENV)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(n, p)| *n == name && Path::new(p).is_file())
        .map(|(_, p)| PathBuf::from(p))
}

/// The agent's kernel tests `suite` (`agent/tests/<suite>.rs`), run unchanged here:
/// real programs on this kernel, in the mode the agent chooses (lsm where `bpf` is an
/// active LSM: a denied exec fails with EPERM; fentry, kprobe or sigkill otherwise), or in
/// `forced` (the agents the tests start read `RTHOOKS_ENFORCEMENT`); `filter` picks tests.
pub(super) async fn agent_tests(
    suite: &str,
    forced: Option<&str>,
    filter: Option<&str>,
) -> Result<Outcome> {
    let (Some(tests), Some(modes)) = (test_binary(suite), test_binary("exec_semantics")) else {
        return Ok(Verdict::skip(
            "the agent's test binaries were not built by this run (cargo xtask e2e without \
             --no-build builds them)",
        )
        .into());
    };
    let run = |exe: &Path, args: &[&str]| {
        let mut c = Command::new(exe);
        c.args(args);
        if let Some(m) = forced {
            c.env("RTHOOKS_ENFORCEMENT", m);
        }
        async move {
            let out = c.output().await?;
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok::<_, anyhow::Error>((out.status.success(), text))
        }
    };
    // The mode the agents choose here, and why (that test prints it).
    let (_, out) = run(
        &modes,
        &[
            "--exact",
            "the_chosen_mode_is_reported_with_its_reason",
            "--nocapture",
        ],
    )
    .await?;
    let chosen = out
        .lines()
        .find_map(|l| l.strip_prefix("rthooks enforcement mode: "))
        .map(str::to_string);
    let Some(chosen) = chosen else {
        if let Some(m) = forced.filter(|_| out.contains("mode requested but unavailable")) {
            let why = out
                .find(&format!("not {m}:"))
                .map(|i| out[i..].split('"').next().unwrap_or_default())
                .unwrap_or_default();
            return Ok(
                Verdict::skip(format!("--enforcement {m} is not available on this kernel"))
                    .detail(why.chars().take(300).collect::<String>())
                    .into(),
            );
        }
        let why = out
            .lines()
            .find(|l| l.contains("panicked") || l.contains("exited"))
            .unwrap_or_default();
        return Ok(Verdict::fail("the agent did not start").detail(why).into());
    };
    let mode = chosen.split(' ').next().unwrap_or_default().to_string();
    // --show-output: a test that cannot run its row here (e.g. no binfmt_misc in this
    // kernel) passes after printing "SKIPPED…: why"; the row's result must say so, or a
    // skipped row would read as a proven one.
    let mut args = vec!["--test-threads=1", "--show-output"];
    args.extend(filter);
    let (ok, out) = run(&tests, &args).await?;
    let verdict = if ok {
        let skipped: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("SKIPPED"))
            .collect();
        let result = out
            .lines()
            .find(|l| l.starts_with("test result"))
            .unwrap_or_default();
        if skipped.is_empty() {
            Verdict::pass(result)
        } else {
            Verdict::pass(format!("{result}; {}", skipped.join("; ")))
        }
    } else {
        let why: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("panicked") || l.contains("FAILED"))
            .take(5)
            .collect();
        Verdict::fail(format!("agent kernel tests ({suite}) failed")).detail(why.join(" "))
    };
    Ok(Outcome { verdict, mode })
}
