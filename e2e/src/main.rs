//! `rthooks-e2e`: the VM suite's entry points (see `vm/README.md`).
//!
//! * `prefetch` (on the host, before the guests boot: they have no network and a read-only
//!   cache): fetches both containerd releases and builds the test images.
//! * `guest --results FILE`: runs the suite's one scenario set (the node, the hook without
//!   CRI on runc, crun and podman, the whole stack on containerd and CRI-O) and appends
//!   the plan and one result line per scenario to FILE.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use rthooks_e2e::containerd::{binaries, Release};
use rthooks_e2e::images;
use rthooks_e2e::scenarios::{self, Share};

#[derive(Parser)]
#[command(name = "rthooks-e2e", about = "rthooks end-to-end scenarios")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download the containerd releases and build the OCI image tarballs (cached).
    Prefetch,
    /// The whole stack, narrated: a selected pod stopped at its first exec, another running.
    Demo {
        /// Where the rthooks binaries are (default: this binary's directory).
        #[arg(long, env = "RTHOOKS_BIN_DIR")]
        bin_dir: Option<PathBuf>,
    },
    /// Run the scenarios (needs root) and append JSON result lines.
    Guest {
        /// The results file (JSON lines).
        #[arg(long)]
        results: PathBuf,
        /// Where rthooks-agent, rthooksctl, rthooks-oci-hook, rthooks-setup and
        /// rthooks-nri-hook are (default: this binary's directory).
        #[arg(long, env = "RTHOOKS_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// Only scenarios whose name contains this (alternatives separated by `|`).
        #[arg(long, env = "RTHOOKS_SCENARIO_FILTER", default_value = "")]
        filter: String,
        /// This guest's share of the kernel's rows (`cargo xtask e2e --crio-guest` boots
        /// two guests of each kernel, `first` and `second`); `--filter` chooses within it.
        #[arg(long, env = "RTHOOKS_GUEST_SHARE", value_enum, default_value_t = Share::All)]
        share: Share,
        /// Leave out scenarios whose name or runtime contains this (alternatives
        /// separated by `|`; empty: none).
        #[arg(long, env = "RTHOOKS_SCENARIO_EXCLUDE", default_value = "")]
        exclude: String,
        /// Per-scenario timeout in seconds.
        #[arg(long, env = "RTHOOKS_SCENARIO_TIMEOUT", default_value_t = 180)]
        timeout: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Prefetch => {
            for r in Release::ALL {
                let b = binaries(r)?;
                eprintln!("prefetch: {r:?}: {}", b.containerd.display());
            }
            eprintln!("prefetch: {}", images::pause_tar()?.display());
            eprintln!("prefetch: {}", images::busybox_tar()?.display());
            Ok(())
        }
        Cmd::Demo { bin_dir } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(rthooks_e2e::demo::run(&bin_dir_or_own(bin_dir)))
        }
        Cmd::Guest {
            results,
            bin_dir,
            filter,
            share,
            exclude,
            timeout,
        } => {
            let bin_dir = bin_dir_or_own(bin_dir);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let ok = rt.block_on(scenarios::run(
                &results,
                &bin_dir,
                &filter,
                share,
                &exclude,
                Duration::from_secs(timeout),
            ))?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The given directory, or the one this binary is in (where cargo puts its siblings).
fn bin_dir_or_own(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(PathBuf::from))
            .unwrap_or_default()
    })
}
