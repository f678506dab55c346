//! `cargo xtask`: build, set-up, tests and VMs for rthooks.
//!
//! Every command first runs [`setup::ensure`], which installs what is missing (apt
//! packages, the nightly's `rust-src`, `bpf-linker` linked against the nightly's LLVM)
//! and returns quickly when nothing is.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod apiserver;
mod codegen;
mod hook_variants;
mod hookbench;
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
    /// Install missing prerequisites (idempotent), and build the test Kubernetes API
    /// server once (see xtask/src/apiserver.rs).
    Setup,
    /// Build the eBPF object and every binary (release).
    Build,
    /// Write the files generated from Rust types: the policy CRDs under deploy/crds/.
    Codegen,
    /// Run every test this machine can run: unit, integration and host-kernel tests, then
    /// the e2e suite in a QEMU guest of the default kernel (6.12).
    Test {
        /// Skip the VM suite (faster local runs; CI runs it).
        #[arg(long)]
        no_e2e: bool,
        /// CRI-O's binaries for the guest's CRI-O scenarios (see `cargo xtask e2e --help`;
        /// default: `../shared/crio/crio-*.tar.zst` beside the checkout).
        #[arg(long, value_name = "DIR", env = "RTHOOKS_CRIO_DIR")]
        crio_dir: Option<std::path::PathBuf>,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Boot the default kernel and watch the whole stack stop a selected pod at its
    /// first exec while another runs (containerd + NRI plugin + OCI hook + agent).
    Demo,
    /// Run the benchmarks and print their figures (exec overhead, hook registration).
    Bench,
    /// Measure `rthooks-oci-hook createRuntime` against the real agent with hyperfine
    /// (root; build the hook and agent in release first). Prints p50/p90/p99.
    BenchHook(hookbench::BenchHookArgs),
    /// Measure the OCI hook's HTTP/2 client and allocator variants against the real agent
    /// (root; musl builds; oci-hook/README.md, "HTTP/2 client and allocator").
    HookVariants(hook_variants::Args),
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
    /// Merge e2e runs into the README's kernel matrix (`vm/matrix.json` keeps every
    /// run's newest cells, so `e2e --all` may be run in parts, days or machines apart).
    Matrix(vm::MatrixArgs),
}

/// Every binary in release, and the hook and its installer again for musl: those are what
/// nodes run (static, so the installer container needs no libc either).
fn build_release() -> Result<()> {
    util::cargo(&["build", "--release", "--bins"])?;
    let target = util::target_dir();
    if setup::musl_target_installed() {
        util::cargo(&[
            "build",
            "--release",
            "--target",
            setup::MUSL_TARGET,
            "-p",
            "rthooks-oci-hook",
            "-p",
            "rthooks-setup",
        ])?;
        let dir = target.join(setup::MUSL_TARGET).join("release");
        eprintln!(
            "build: the hook to deploy: {} (install it with {})",
            dir.join("rthooks-oci-hook").display(),
            dir.join("rthooks-setup").display()
        );
    } else {
        eprintln!(
            "build: warning: no {} target; deploy {} (glibc: ~1 ms slower per container)",
            setup::MUSL_TARGET,
            target.join("release/rthooks-oci-hook").display()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    setup::ensure()?;
    match cli.command {
        Command::Setup => apiserver::ensure(),
        Command::Build => build_release(),
        Command::Codegen => codegen::codegen(),
        Command::Test {
            no_e2e,
            crio_dir,
            args,
        } => test(&args, !no_e2e, crio_dir),
        Command::RunAgent { args } => run::run_agent(&args),
        Command::BenchHook(args) => hookbench::bench_hook(&args),
        Command::HookVariants(args) => hook_variants::run(&args),
        Command::Demo => vm::demo(),
        Command::Bench => {
            util::cargo(&["bench", "-p", "rthooks-agent", "--bench", "exec_overhead"])
        }
        Command::Vm(select) => vm::vm(&select),
        Command::E2e(args) => vm::e2e(&args),
        Command::Matrix(args) => vm::matrix(&args),
    }
}

/// Commands run on the workspace's default members: `--workspace` would also build the
/// eBPF crate for the host, which cannot work (it is built by agent/build.rs instead).
fn test(extra: &[String], e2e: bool, crio_dir: Option<std::path::PathBuf>) -> Result<()> {
    // The tests that speak to a Kubernetes API server start this one.
    apiserver::ensure()?;
    std::env::set_var(apiserver::BIN_DIR_ENV, apiserver::bin_dir());
    // Binaries first: the integration tests start the real agent and hooks.
    util::cargo(&["build", "--bins"])?;
    let mut args = vec!["test", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    let host = util::cargo(&args);
    // The VM suite runs even when a host test failed: its matrix tells more about why.
    let guests = if e2e {
        vm::e2e(&vm::E2eArgs {
            select: vm::Select {
                kernels: vec![DEFAULT_E2E_KERNEL.into()],
                all: false,
                kernel_dir: Vec::new(),
                append: String::new(),
            },
            timeout: vm::DEFAULT_GUEST_TIMEOUT,
            scenario_timeout: vm::DEFAULT_SCENARIO_TIMEOUT,
            scenario: None,
            exclude: Some(vm::CI_EXCLUDE.into()),
            no_build: false,
            bin_dir: None,
            crio_dir,
            // The CRI-O and containerd 1.7 rows in a second guest beside the rest: both
            // cores, and CI's wall time is that of the longer guest.
            crio_guest: true,
            runner: vm::RunnerKind::Qemu,
            jobs: 2,
            update_readme: false,
            command: None,
        })
    } else {
        Ok(())
    };
    host?;
    guests
}

/// The kernel `cargo xtask test` boots (kernels.toml's default).
const DEFAULT_E2E_KERNEL: &str = "6.12";
