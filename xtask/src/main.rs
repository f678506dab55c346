//! `cargo xtask`: build, set-up, tests and VMs for rthooks.
//!
//! Every command first runs [`setup::ensure`], which installs what is missing (apt
//! packages, the nightly's `rust-src`, `bpf-linker` linked against the nightly's LLVM)
//! and returns quickly when nothing is.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod run;
mod setup;
mod util;
mod vm;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, test and run rthooks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install missing prerequisites (idempotent).
    Setup,
    /// Build the eBPF object and every binary (release).
    Build,
    /// Run every test this machine can run (unit, integration, kernel).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and print their figures (exec overhead, hook registration).
    Bench,
    /// Build and start the agent here with the sample policies (deploy/policies).
    RunAgent {
        /// Extra agent flags (see `rthooks-agent --help`).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fetch and unpack the VM kernels and guest userland; build the initramfs.
    Vm(vm::Select),
    /// Boot each kernel in QEMU, run the e2e suite inside, print the kernel matrix.
    E2e(vm::E2eArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    setup::ensure()?;
    match cli.command {
        Command::Setup => Ok(()),
        Command::Build => util::cargo(&["build", "--release", "--bins"]),
        Command::Test { args } => test(&args),
        Command::RunAgent { args } => run::run_agent(&args),
        Command::Bench => util::cargo(&["bench", "-p", "rthooks-agent", "--bench", "exec_overhead"]),
        Command::Vm(select) => vm::vm(&select),
        Command::E2e(args) => vm::e2e(&args),
    }
}

/// Commands run on the workspace's default members: `--workspace` would also build the
/// eBPF crate for the host, which cannot work (it is built by agent/build.rs instead).
fn test(extra: &[String]) -> Result<()> {
    // Binaries first: the integration tests start the real agent and hooks.
    util::cargo(&["build", "--bins"])?;
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    util::cargo(&args)
}
