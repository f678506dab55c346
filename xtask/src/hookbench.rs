//! `cargo xtask bench-hook`: wall time of `rthooks-oci-hook createRuntime` against the real
//! agent (oci-hook/README.md, "Performance"), measured with hyperfine. The agent is
//! started by the shared launcher (`rthooks-testkit`) on its own socket, pin directory,
//! state and policies, so nothing else on the machine collides with it.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use rthooks_testkit::AgentSpec;

use crate::util::{cgroup_v2_root, loadavg, output, quantile, run, target_dir, workspace_root};

#[derive(clap::Args, Debug)]
pub struct BenchHookArgs {
    /// The hook to measure (default: the musl release build).
    #[arg(long, env = "HOOK")]
    hook: Option<PathBuf>,
    /// The agent (default: the release build).
    #[arg(long, env = "AGENT")]
    agent: Option<PathBuf>,
    /// Runs per command.
    #[arg(long, env = "RUNS", default_value_t = 1000)]
    runs: u32,
    /// Where the agent's files, the hook logs and hyperfine's exports go.
    #[arg(long, env = "OUT", default_value = "/tmp/hookbench")]
    out: PathBuf,
    /// hyperfine (>= 1.16 feeds the state on stdin).
    #[arg(long, env = "HYPERFINE", default_value = "hyperfine")]
    hyperfine: String,
}

/// The bundle: a containerd-like spec whose cgroup exists (the agent resolves its id).
const BUNDLE: &str = "/tmp/hb";
const PIN_DIR: &str = "/sys/fs/bpf/rthooks-hookbench";

pub fn bench_hook(a: &BenchHookArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the agent loads eBPF programs: run as root");
    }
    let target = target_dir();
    let hook = a
        .hook
        .clone()
        .unwrap_or_else(|| target.join("x86_64-unknown-linux-musl/release/rthooks-oci-hook"));
    let agent = a
        .agent
        .clone()
        .unwrap_or_else(|| target.join("release/rthooks-agent"));
    for (what, p) in [("hook", &hook), ("agent", &agent)] {
        if !p.is_file() {
            bail!(
                "no {what} at {} (build it first: cargo build --release [--target \
                 x86_64-unknown-linux-musl] -p rthooks-oci-hook / -p rthooks-agent)",
                p.display()
            );
        }
    }
    let hook = hook.canonicalize()?;
    if output(Command::new(&a.hyperfine).arg("--version")).is_none() {
        bail!(
            "{} not found (cargo install hyperfine@1.20.0 --locked)",
            a.hyperfine
        );
    }

    let bench_bundle = BenchBundle::create(Path::new(BUNDLE))?;
    let bundle = bench_bundle.dir.as_path();
    std::fs::create_dir_all(&a.out)?;

    let agent = AgentSpec::new(agent)
        .dir(&a.out)
        .pin_dir(PIN_DIR)
        .arg("--log-level=warn")
        .start()?;

    // hyperfine >= 1.16 feeds the state on stdin; older ones run in the bundle directory,
    // where the hook finds config.json as it does when a runtime passes no state.
    let help = output(Command::new(&a.hyperfine).arg("--help")).unwrap_or_default();
    let input: Vec<String> = if help.contains("--input") {
        vec!["--input".into(), bench_bundle.state.display().to_string()]
    } else {
        Vec::new()
    };
    let hyperfine = |name: &str, cmd: &str, extra: &[&str]| -> Result<()> {
        run(Command::new(&a.hyperfine)
            .args(["-N", "--warmup", "50", "--runs", &a.runs.to_string()])
            .args(extra)
            .args(&input)
            .arg("--export-json")
            .arg(a.out.join(format!("{name}.json")))
            .arg(cmd)
            .current_dir(bundle)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()))
    };
    let log = |name: &str| a.out.join(format!("{name}.log"));
    let _ = std::fs::remove_file(log("up"));
    let _ = std::fs::remove_file(log("down"));
    println!("load before: {}", loadavg());
    let h = hook.display();
    hyperfine(
        "up",
        &format!(
            "{h} createRuntime --grpc-address {} --log-fname {}",
            agent.address(),
            log("up").display()
        ),
        &[],
    )?;
    // Agent down: the hook refuses (exit 1), which hyperfine must not treat as a failure.
    hyperfine(
        "down",
        &format!(
            "{h} createRuntime --grpc-address unix://{}/none.sock --log-fname {}",
            a.out.display(),
            log("down").display()
        ),
        &["-i"],
    )?;
    hyperfine("true", "/bin/true", &[])?;
    println!("load after:  {}", loadavg());
    println!("binary: {} bytes", std::fs::metadata(&hook)?.len());
    for name in ["up", "down", "true"] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.out.join(format!("{name}.json")))?)?;
        let r = &v["results"][0];
        let times = sorted(r["times"].as_array().into_iter().flatten());
        println!(
            "{name:5} wall p50 {:.2} ms  p90 {:.2}  p99 {:.2}  (user {:.2} ms, sys {:.2} ms)",
            pct(&times, 0.5) * 1e3,
            pct(&times, 0.9) * 1e3,
            pct(&times, 0.99) * 1e3,
            r["user"].as_f64().unwrap_or(0.0) * 1e3,
            r["system"].as_f64().unwrap_or(0.0) * 1e3,
        );
    }
    for name in ["up", "down"] {
        let text = std::fs::read_to_string(log(name))?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("{} is not JSON lines", log(name).display()))?;
        let mut decisions: Vec<&str> = lines
            .iter()
            .filter_map(|l| l["decision"].as_str())
            .collect();
        decisions.sort_unstable();
        decisions.dedup();
        let total = sorted(lines.iter().map(|l| &l["total_ms"]));
        println!(
            "{name:5} decisions {decisions:?}; in-process p50 {:.3} ms p99 {:.3}",
            pct(&total, 0.5),
            pct(&total, 0.99)
        );
    }
    drop(agent);
    Ok(())
}

fn sorted<'a>(values: impl Iterator<Item = &'a serde_json::Value>) -> Vec<f64> {
    let mut v: Vec<f64> = values.filter_map(serde_json::Value::as_f64).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The `p` quantile as the old script computed it: the element at `len * p`.
fn pct(sorted: &[f64], p: f64) -> f64 {
    quantile(sorted, p).unwrap_or(f64::NAN)
}

/// oci-hook/bench's containerd spec (an nginx pod, 12 mounts, the CRI annotations) as a
/// bundle whose cgroup exists, and its state JSON (`state.json` in the bundle) pointing
/// at it: what `bench-hook` and `hook-variants` feed the hook.
pub struct BenchBundle {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub cgroup: PathBuf,
}

impl BenchBundle {
    pub fn create(dir: &Path) -> Result<BenchBundle> {
        let src = workspace_root().join("oci-hook/bench");
        std::fs::create_dir_all(dir.join("rootfs"))?;
        std::fs::copy(src.join("config.json"), dir.join("config.json"))
            .context("copying config.json")?;
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("state.json"))?)?;
        state["bundle"] = dir.to_string_lossy().into_owned().into();
        let state_path = dir.join("state.json");
        std::fs::write(&state_path, serde_json::to_vec(&state)?)?;
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json"))?)?;
        let cgroups_path = spec["linux"]["cgroupsPath"]
            .as_str()
            .context("bench config.json has no linux.cgroupsPath")?;
        let cgroup = cgroup_v2_root().join(cgroups_path.trim_start_matches('/'));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating {}", cgroup.display()))?;
        Ok(BenchBundle {
            dir: dir.to_owned(),
            state: state_path,
            cgroup,
        })
    }
}
