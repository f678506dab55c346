//! `cargo xtask hook-variants`: the OCI hook's HTTP/2 client and allocator variants (cargo
//! features of rthooks-oci-hook, musl release builds), each run `--runs` times against the
//! real agent, interleaved in one run so that load changes hit every variant alike. CPU
//! time per invocation (the child's user + system time, from `getrusage(RUSAGE_CHILDREN)`
//! around each reaped child) decides; wall p50/p99 and the binary size are printed beside
//! it (oci-hook/README.md, "HTTP/2 client and allocator").
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::resource::{getrusage, UsageWho};
use rthooks_testkit::AgentSpec;

use crate::hookbench::BenchBundle;
use crate::setup::{musl_target_installed, MUSL_TARGET};
use crate::util::{cargo, loadavg, quantile, target_dir};

/// The variants: a name and rthooks-oci-hook's cargo features.
const VARIANTS: &[(&str, &str)] = &[
    ("own client + arena", ""),
    ("h2 + arena", "client-h2"),
    ("own client + musl malloc", "alloc-system"),
    ("own client + mimalloc", "alloc-mimalloc"),
];

/// CPU time per invocation above the baseline's beyond which a simpler variant loses.
const RULE_MS: f64 = 0.2;

#[derive(clap::Args)]
pub struct Args {
    /// Measured invocations per variant (after 50 warm-up runs each).
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// The agent binary (default: build target/release/rthooks-agent).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Use the variant binaries already under target/hook-variants/.
    #[arg(long)]
    pub no_build: bool,
}

struct Sample {
    cpu: Duration,
    wall: Duration,
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the agent loads eBPF programs: run as root"
    );
    ensure!(
        musl_target_installed(),
        "no {MUSL_TARGET} target (cargo xtask setup adds it)"
    );
    let out = target_dir().join("hook-variants");
    let bins: Vec<PathBuf> = VARIANTS
        .iter()
        .map(|(name, _)| out.join(slug(name)).join("rthooks-oci-hook"))
        .collect();
    if !args.no_build {
        build_variants(&bins)?;
    }
    let agent_bin = match &args.agent {
        Some(a) => a.clone(),
        None => {
            if !args.no_build {
                cargo(&["build", "--release", "-p", "rthooks-agent"])?;
            }
            target_dir().join("release/rthooks-agent")
        }
    };

    let run_dir = out.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    let bundle = BenchBundle::create(&run_dir.join("bundle"))?;
    // The shared launcher: its own socket, pin, state and policy directories; killed and
    // unpinned when dropped.
    let agent = AgentSpec::new(&agent_bin)
        .dir(run_dir.join("agent"))
        .pin_dir("/sys/fs/bpf/rthooks-hook-variants")
        .arg("--log-level=warn")
        .start()?;
    let address = agent.address();
    invoke(&bins[0], &bundle, &address, &run_dir, 0)
        .context("the agent did not register the bench container")?;
    let load_before = loadavg();
    let mut samples: Vec<Vec<Sample>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    let total = 50 + args.runs;
    for round in 0..total {
        // Rotate who goes first, so no variant always follows the same neighbour.
        for k in 0..VARIANTS.len() {
            let v = (round + k) % VARIANTS.len();
            let s = invoke(&bins[v], &bundle, &address, &run_dir, v)
                .with_context(|| format!("variant {}", VARIANTS[v].0))?;
            if round >= 50 {
                samples[v].push(s);
            }
        }
    }
    let load_after = loadavg();
    drop(agent);
    let _ = std::fs::remove_dir(&bundle.cgroup);

    let base_cpu = mean_ms(&samples[0]);
    println!(
        "hook variants: {} invocations each (after 50 warm-up), interleaved; musl release \
         builds, real agent ({}), state JSON of a containerd nginx pod on stdin",
        args.runs,
        agent_bin.display()
    );
    println!("load average before: {load_before}; after: {load_after}");
    println!();
    println!("| variant | features | CPU/inv (mean) | CPU p50 | wall p50 | wall p99 | binary | vs first |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, (name, features)) in VARIANTS.iter().enumerate() {
        let s = &samples[i];
        let mut cpu: Vec<Duration> = s.iter().map(|x| x.cpu).collect();
        let mut wall: Vec<Duration> = s.iter().map(|x| x.wall).collect();
        cpu.sort();
        wall.sort();
        let size = std::fs::metadata(&bins[i]).map(|m| m.len()).unwrap_or(0);
        let delta = mean_ms(s) - base_cpu;
        println!(
            "| {name} | {} | {:.3} ms | {:.3} ms | {:.2} ms | {:.2} ms | {:.2} MB | {:+.3} ms{} |",
            if features.is_empty() {
                "(default)"
            } else {
                features
            },
            mean_ms(s),
            ms(pct(&cpu, 0.5)),
            ms(pct(&wall, 0.5)),
            ms(pct(&wall, 0.99)),
            size as f64 / 1e6,
            delta,
            if i > 0 && delta > RULE_MS {
                " (over the 0.2 ms rule)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// One musl release build per variant, each copied out before the next overwrites it.
fn build_variants(bins: &[PathBuf]) -> Result<()> {
    let built = target_dir()
        .join(MUSL_TARGET)
        .join("release/rthooks-oci-hook");
    for ((name, features), dst) in VARIANTS.iter().zip(bins) {
        eprintln!("hook-variants: building {name}");
        let mut a = vec![
            "build",
            "--release",
            "--target",
            MUSL_TARGET,
            "-p",
            "rthooks-oci-hook",
            "--bin",
            "rthooks-oci-hook",
        ];
        if !features.is_empty() {
            a.extend(["--features", features]);
        }
        cargo(&a)?;
        std::fs::create_dir_all(dst.parent().unwrap())?;
        std::fs::copy(&built, dst).with_context(|| format!("copying {}", built.display()))?;
    }
    Ok(())
}

/// One hook invocation: its CPU time (its own, reaped before the next starts) and wall
/// time from spawn to reaping.
fn invoke(bin: &Path, bundle: &BenchBundle, address: &str, dir: &Path, v: usize) -> Result<Sample> {
    let before = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let start = Instant::now();
    let status = Command::new(bin)
        .arg("createRuntime")
        .arg(format!("--grpc-address={address}"))
        .arg(format!(
            "--log-fname={}",
            dir.join(format!("hook-{v}.log")).display()
        ))
        .arg("--config-file=/nonexistent/rthooks-oci-hook.json")
        .current_dir(&bundle.dir)
        .stdin(std::fs::File::open(&bundle.state)?)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let wall = start.elapsed();
    let after = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    ensure!(
        status.success(),
        "{} exited {status} (see {})",
        bin.display(),
        dir.display()
    );
    let tv = |u: &nix::sys::resource::Usage| {
        let t = u.user_time();
        let s = u.system_time();
        Duration::from_micros(
            (t.tv_sec() * 1_000_000 + t.tv_usec() + s.tv_sec() * 1_000_000 + s.tv_usec()) as u64,
        )
    };
    Ok(Sample {
        cpu: tv(&after) - tv(&before),
        wall,
    })
}

fn mean_ms(s: &[Sample]) -> f64 {
    s.iter().map(|x| x.cpu.as_secs_f64()).sum::<f64>() * 1e3 / s.len().max(1) as f64
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    quantile(sorted, p).unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
