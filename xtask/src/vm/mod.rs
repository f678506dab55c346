//! `cargo xtask vm` and `cargo xtask e2e`: Debian kernels in QEMU, the guest userland,
//! and the kernel × scenario compatibility matrix.
//!
//! Layout of the cache (`util::cache_dir()`): `apt/` private apt state, `debs/` verified
//! package files (both through `rthooks_testkit::debian`, the fetcher the e2e crate uses too), `kernels/<package>/` unpacked kernels with their `initramfs.cpio.gz`,
//! `userland/<name>/` unpacked guest userland. Guests see all of it, and the workspace,
//! at the same paths through the read-only host root share.
pub mod crio;
pub mod initramfs;
pub mod kernels;
pub mod matrix;
pub mod qemu;
pub mod vng;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, target_dir, workspace_root, TestBinary};
use kernels::{Config, Kernel};
use rthooks_testkit::debian::{self, Apt, FetchStats};

#[derive(clap::Args, Debug, Clone)]
pub struct Select {
    /// A kernel by its kernels.toml name (repeatable); default: the `default = true` one.
    #[arg(long = "kernel", value_name = "NAME")]
    pub kernels: Vec<String>,
    /// Every kernel in vm/kernels.toml.
    #[arg(long, conflicts_with = "kernels")]
    pub all: bool,
    /// A kernel tree you built yourself (`make` done: arch/x86/boot/bzImage, and the
    /// 9p/virtio/overlay drivers built in or as modules in the tree). Booted in addition
    /// to any --kernel; alone, instead of the default kernel.
    #[arg(long, value_name = "PATH")]
    pub kernel_dir: Vec<PathBuf>,
    /// Extra kernel command line for every kernel booted (after kernels.toml's).
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
}

impl Select {
    /// The Debian kernels of the matrix this selection names.
    pub fn kernels(&self, config: &Config) -> Result<Vec<Kernel>> {
        if !self.kernel_dir.is_empty() && self.kernels.is_empty() && !self.all {
            return Ok(Vec::new());
        }
        config.select(&self.kernels, self.all)
    }
}

/// Seconds a guest may run: the whole 6.12 suite takes ~15–25 min under TCG on a busy
/// 2-core host (each enforcement scenario starts 20 containers per runtime path).
pub const DEFAULT_GUEST_TIMEOUT: u64 = 2700;
/// Seconds one scenario may run: 20 podman starts take ~3 min on a busy host; CRI-O's
/// why_hooks (40 starts, two CRI-O restarts) took 5.3 min on 6.12 with the host at load 5.
pub const DEFAULT_SCENARIO_TIMEOUT: u64 = 600;

#[derive(clap::Args, Debug, Clone)]
pub struct E2eArgs {
    #[command(flatten)]
    pub select: Select,
    /// Seconds a guest may run before it is killed and reported.
    #[arg(long, default_value_t = DEFAULT_GUEST_TIMEOUT)]
    pub timeout: u64,
    /// Seconds one scenario may run inside the guest.
    #[arg(long, default_value_t = DEFAULT_SCENARIO_TIMEOUT)]
    pub scenario_timeout: u64,
    /// Run only scenarios whose name or runtime contains this (e.g. `hook_`, `crun`,
    /// `crio-crun`), or both as `SCENARIO@RUNTIME` (`kube@crio-runc`); alternatives
    /// separated by `|`.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Leave out the e2e crate's scenarios this names (same patterns as --scenario).
    /// `cargo xtask test` leaves out the rows that only `--all` runs.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Option<String>,
    /// Use the binaries already built (the agent's kernel-test scenarios then skip: only
    /// a build says which test executables are current).
    #[arg(long)]
    pub no_build: bool,
    /// Where the guests take rthooks' binaries from (default: the cargo target
    /// directory's `debug/`).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// CRI-O's binaries (`crio`, `pinns`, `conmon`) for the CRI-O scenarios, anywhere on
    /// this host. Default: the newest `../shared/crio/crio-*.tar.zst` beside the checkout,
    /// unpacked once into the cache; without either the CRI-O scenarios skip and say why.
    #[arg(long, value_name = "DIR", env = "RTHOOKS_CRIO_DIR")]
    pub crio_dir: Option<PathBuf>,
    /// What boots the guests: `qemu` (our initramfs and init) or `vng` (virtme-ng, pinned,
    /// installed from PyPI into the cache on first use; `$RTHOOKS_VNG` names another).
    /// Both run the same suite and write the same matrix.
    #[arg(long, value_enum, default_value_t = RunnerKind::Qemu)]
    pub runner: RunnerKind,
    /// Run each kernel's CRI-O rows and most of containerd 1.7's in a second guest of
    /// that kernel, booted beside the one that runs the rest (both count towards --jobs;
    /// their results go into the same matrix column; --scenario and --exclude choose in
    /// both): the two take about as long.
    #[arg(long)]
    pub crio_guest: bool,
    /// Guests booted at once. Each TCG guest keeps one host core busy, so more than the
    /// host's cores only makes each slower (and its waits likelier to run out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub jobs: u32,
    /// Also write the matrix (both tables, every failure and skip with its reason) into
    /// the README's "e2e matrix" section, failures included: that is what users read.
    #[arg(long)]
    pub update_readme: bool,
    /// A shell command the guest runs instead of the suite, in the suite's environment
    /// (e.g. a benchmark binary; `cargo xtask demo` uses it too). Its output is in
    /// `e2e/<kernel>/console.log`; the matrix then has no scenario results.
    #[arg(long = "guest-command", value_name = "SHELL")]
    pub command: Option<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerKind {
    Qemu,
    Vng,
}

/// A kernel ready to boot.
pub struct Prepared {
    pub kernel: Kernel,
    pub tree: initramfs::KernelTree,
    pub initramfs: PathBuf,
}

pub fn config() -> Result<Config> {
    Config::load(&workspace_root().join("vm/kernels.toml"))
}

/// `cargo xtask vm`: fetch, verify and unpack kernels and userland; build initramfs.
pub fn vm(select: &Select) -> Result<()> {
    let start = Instant::now();
    let config = config()?;
    let kernels = select.kernels(&config)?;
    let mut stats = FetchStats::default();
    let prepared = prepare(&config, &kernels, &select.kernel_dir, &mut stats)?;
    for p in &prepared {
        let append = if p.kernel.append.is_empty() {
            String::new()
        } else {
            format!(" [{}]", p.kernel.append)
        };
        eprintln!(
            "vm: {:<14} {}{append}\n    kernel    {}\n    initramfs {}",
            p.kernel.name,
            p.tree.release,
            p.tree.vmlinuz.display(),
            p.initramfs.display()
        );
    }
    eprintln!(
        "vm: ready in {:.1} s (downloaded {:.1} MB in {:.1} s, {:.1} MB already cached)",
        start.elapsed().as_secs_f64(),
        stats.downloaded_bytes as f64 / 1e6,
        stats.seconds,
        stats.cached_bytes as f64 / 1e6
    );
    Ok(())
}

/// Fetches the userland and the given kernels; builds their initramfs.
pub fn prepare(
    config: &Config,
    kernels: &[Kernel],
    kernel_dirs: &[PathBuf],
    stats: &mut FetchStats,
) -> Result<Vec<Prepared>> {
    // The initramfs's shell: the tree the e2e crate's busybox image comes from (it takes
    // the cache lock itself, so before this function does).
    let busybox_root = debian::unpacked(&debian::BUSYBOX_STATIC)?;
    let _lock = debian::CacheLock::acquire()?;
    let apt = Apt::new(&config.suites())?;
    for u in &config.userland {
        let wanted: Vec<(String, String)> = u
            .packages
            .iter()
            .map(|p| (p.clone(), u.suite.clone()))
            .collect();
        let debs = apt.resolve(&wanted)?;
        if let Some(prefix) = &u.version_prefix {
            for d in &debs {
                if !d.version.starts_with(prefix.as_str()) {
                    bail!(
                        "{} in {} is {}, kernels.toml wants {prefix}: update vm/kernels.toml",
                        d.package,
                        d.suite,
                        d.version
                    );
                }
            }
        }
        let files = apt.fetch(&debs, stats)?;
        if debian::unpack(&files, &userland_dir(&u.name))? {
            eprintln!(
                "vm: unpacked userland {} ({})",
                u.name,
                debs.iter()
                    .map(|d| format!("{} {}", d.package, d.version))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| busybox_root.join(p))
        .find(|p| p.exists())
        .with_context(|| format!("no busybox in {}", busybox_root.display()))?;
    let init = workspace_root().join("vm/guest/init");
    let mut out = Vec::new();
    for k in kernels {
        let wanted: Vec<(String, String)> = k
            .packages
            .iter()
            .map(|p| (p.clone(), k.suite.clone()))
            .collect();
        let debs = apt.resolve(&wanted)?;
        let files = apt.fetch(&debs, stats)?;
        let dir = cache_dir().join("kernels").join(&k.packages[0]);
        if debian::unpack(&files, &dir)? {
            eprintln!("vm: unpacked kernel {}", k.packages.join(" + "));
        }
        let tree = initramfs::KernelTree::find(&dir)?;
        let initrd = dir.join("initramfs.cpio.gz");
        if initramfs::build(&tree, &busybox, &init, &initrd)? {
            eprintln!("vm: built {}", initrd.display());
        }
        out.push(Prepared {
            kernel: k.clone(),
            tree,
            initramfs: initrd,
        });
    }
    for dir in kernel_dirs {
        let dir = absolute(dir);
        let tree = initramfs::KernelTree::from_build_tree(&dir)?;
        let initrd = cache_dir()
            .join("kernels/built")
            .join(
                dir.display()
                    .to_string()
                    .trim_start_matches('/')
                    .replace('/', "_"),
            )
            .join("initramfs.cpio.gz");
        std::fs::create_dir_all(initrd.parent().unwrap())?;
        if initramfs::build(&tree, &busybox, &init, &initrd)? {
            eprintln!("vm: built {}", initrd.display());
        }
        out.push(Prepared {
            kernel: Kernel {
                name: format!("built-{}", tree.release),
                suite: dir.display().to_string(),
                packages: Vec::new(),
                // --append is added to every kernel at boot.
                append: String::new(),
                default: false,
            },
            tree,
            initramfs: initrd,
        });
    }
    if out.is_empty() {
        bail!("no kernel selected");
    }
    Ok(out)
}

pub fn userland_dir(name: &str) -> PathBuf {
    cache_dir().join("userland").join(name)
}

/// `cargo xtask e2e`.
pub fn e2e(args: &E2eArgs) -> Result<()> {
    let crio_dir = crio::resolve(args.crio_dir.as_deref())?;
    match &crio_dir {
        Some(d) => eprintln!("e2e: CRI-O from {}", d.display()),
        None => eprintln!(
            "e2e: the CRI-O scenarios will skip: {}",
            crio::missing_reason()
        ),
    }
    let args = &E2eArgs {
        crio_dir,
        ..args.clone()
    };
    let config = config()?;
    let kernels = args.select.kernels(&config)?;
    if !args.no_build {
        // --keep-going: a crate that does not build yet must not stop the others' tests;
        // scenarios needing a missing binary skip and say so.
        if let Err(e) = crate::util::cargo(&["build", "--bins", "--keep-going"]) {
            eprintln!("e2e: warning: the build failed ({e:#}); scenarios needing the missing binaries will skip");
        }
    }
    // The agent's kernel tests run unchanged in the guests (agent_kernel_tests), found by
    // what cargo says it built.
    let test_binaries = if args.no_build {
        Vec::new()
    } else {
        crate::util::test_binaries(&["-p", "rthooks-agent"]).unwrap_or_else(|e| {
            eprintln!("e2e: warning: the agent's tests do not build ({e:#}); agent_kernel_tests will skip");
            Vec::new()
        })
    };
    let mut stats = FetchStats::default();
    let prepared = prepare(&config, &kernels, &args.select.kernel_dir, &mut stats)?;
    prefetch_e2e_crate(&bin_dir(args));
    let qemu_bin = PathBuf::from(
        std::env::var("RTHOOKS_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
    );
    let accel = qemu::choose_accel(&qemu_bin, &prepared[0].tree.vmlinuz, &prepared[0].initramfs);
    // Under the cargo target directory, so engineers sharing a workspace with their own
    // CARGO_TARGET_DIR do not boot guests into each other's result directories; the
    // lock serialises runs that do share one.
    let out_dir = target_dir().join("e2e");
    std::fs::create_dir_all(&out_dir)?;
    let _lock = debian::CacheLock::at(
        &out_dir.join(".lock"),
        "another cargo xtask e2e uses this directory",
    )?;
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    if args.runner == RunnerKind::Vng {
        // Installed once here, not by each guest thread at the same time.
        vng::ensure()?;
    }
    let guests: Vec<(&Prepared, Part)> = prepared
        .iter()
        .flat_map(|p| {
            let parts: &[Part] = if args.crio_guest {
                &[Part::First, Part::Second]
            } else {
                &[Part::All]
            };
            parts.iter().map(move |part| (p, *part))
        })
        .collect();
    let runs = in_parallel(&guests, args.jobs, |(p, part)| {
        run_kernel(p, *part, args, &test_binaries, accel, &qemu_bin, &out_dir)
    });
    for run in runs {
        let (r, line, _) = run?;
        rows.extend(r);
        summary.push(line);
    }
    let names: Vec<String> = prepared.iter().map(|p| p.kernel.name.clone()).collect();
    let generated =
        crate::util::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .unwrap_or_default()
            .trim()
            .to_string();
    for r in &mut rows {
        r.date.clone_from(&generated);
    }
    let mut md = matrix::render_md(&rows, &names, &generated);
    md.push_str(&format!(
        "\n## Guests\n\nAccelerator: {}.\n\n",
        accel.name()
    ));
    for s in &summary {
        md.push_str(&format!("- {s}\n"));
    }
    std::fs::write(out_dir.join("matrix.md"), &md)?;
    std::fs::write(out_dir.join("matrix.json"), matrix::render_json(&rows))?;
    let run = matrix::Run {
        date: generated.clone(),
        command: std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1).map(|a| {
                if a.contains(|c: char| c.is_whitespace() || c == '|') {
                    sh_quote(&a)
                } else {
                    a
                }
            }))
            .collect::<Vec<_>>()
            .join(" "),
        accel: format!(
            "{} via {}",
            accel.name(),
            match args.runner {
                RunnerKind::Qemu => "QEMU",
                RunnerKind::Vng => "virtme-ng",
            }
        ),
        guests: summary
            .iter()
            .map(|s| s.split(" (console:").next().unwrap_or(s).to_string())
            .collect(),
    };
    // A run without a scenario filter speaks for its kernels' whole columns.
    let whole = if args.scenario.is_none() && args.exclude.is_none() {
        names
    } else {
        Vec::new()
    };
    let this_run = matrix::Merged {
        runs: vec![run],
        rows: rows.clone(),
    };
    std::fs::write(
        out_dir.join(RUN_FILE),
        serde_json::to_string_pretty(&RunFile {
            whole,
            merged: this_run,
        })? + "\n",
    )?;
    if args.update_readme {
        merge_into_readme(&[out_dir.join(RUN_FILE)])?;
    }
    println!("\n{md}");
    eprintln!(
        "e2e: wrote {} and matrix.json",
        out_dir.join("matrix.md").display()
    );
    let failed = rows
        .iter()
        .filter(|r| r.result == matrix::Verdict::Fail)
        .count();
    if failed > 0 {
        // A failing matrix is a verdict, not an error with a backtrace worth printing.
        eprintln!("e2e: {failed} scenario(s) failed");
        std::process::exit(1);
    }
    Ok(())
}

/// `f` over `items` on up to `jobs` threads; results in the order of `items`.
fn in_parallel<T: Sync, R: Send>(items: &[T], jobs: u32, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..(jobs as usize).clamp(1, items.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                *results[i].lock().unwrap() = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap().expect("every item ran"))
        .collect()
}

/// Which scenarios one guest of a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// Every scenario (or those --scenario chooses).
    All,
    /// Every scenario but the second guest's (the e2e crate's `Share::First`).
    First,
    /// The CRI-O rows and containerd 1.7's but its two 20-of-20 proofs (`SECOND_GUEST`
    /// in `e2e/src/scenarios/targets.rs`): the two guests take about as long.
    Second,
}

impl Part {
    /// The guest's results directory below the output directory.
    fn results_dir(self, kernel: &str) -> String {
        match self {
            Part::Second => format!("{kernel}-second"),
            Part::All | Part::First => kernel.to_string(),
        }
    }
}

/// What `cargo xtask test` leaves to `--all`: the Kubernetes rows run in CI on one
/// containerd release and one CRI-O runtime (the same code on the others).
pub const CI_EXCLUDE: &str = "kube@containerd-1.7|kube@crio-crun";

fn run_kernel(
    p: &Prepared,
    part: Part,
    args: &E2eArgs,
    test_binaries: &[TestBinary],
    accel: qemu::Accel,
    qemu_bin: &Path,
    out_dir: &Path,
) -> Result<(Vec<matrix::Row>, String, bool)> {
    let name = &p.kernel.name;
    let guest = part.results_dir(name);
    let results = out_dir.join(&guest);
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    std::fs::write(
        results.join("job"),
        job_script(name, part, args, test_binaries, accel),
    )?;
    let runner = match args.runner {
        RunnerKind::Qemu => qemu::Runner::Qemu,
        RunnerKind::Vng => qemu::Runner::Vng {
            vng: vng::ensure()?,
            init: workspace_root().join("vm/guest/vng-init"),
            results: results.clone(),
        },
    };
    // virtme-ng sets up its own console and init.
    let mut append = match args.runner {
        RunnerKind::Qemu => "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off rdinit=/init",
        RunnerKind::Vng => "panic=-1 loglevel=4 mitigations=off",
    }
    .to_string();
    for extra in [&p.kernel.append, &args.select.append] {
        if !extra.is_empty() {
            append.push(' ');
            append.push_str(extra);
        }
    }
    let boot = qemu::Boot {
        runner,
        qemu: qemu_bin.to_path_buf(),
        accel,
        kernel: p.tree.vmlinuz.clone(),
        initrd: p.initramfs.clone(),
        append,
        shares: vec![
            qemu::Share {
                tag: "hostroot",
                path: "/".into(),
                readonly: true,
            },
            qemu::Share {
                tag: "results",
                path: results.clone(),
                readonly: false,
            },
        ],
        deadline: Duration::from_secs(args.timeout),
        console_log: Some(results.join("console.log")),
        // Room for etcd and the API server of the Kubernetes rows beside the runtimes.
        memory: "3G",
        smp: 2,
    };
    eprintln!(
        "e2e: booting {name} ({}, {}) with {} via {:?}",
        p.tree.release,
        p.kernel.suite,
        accel.name(),
        args.runner
    );
    let prefix = format!("[{guest}] ");
    let result = boot.run(|line| eprintln!("{prefix}{line}"))?;
    let problem = match &result.outcome {
        qemu::Outcome::Done { .. } => None,
        _ => Some(result.describe()),
    };
    if let Some(problem) = &problem {
        eprintln!("e2e: {guest}: {problem}; last console lines:");
        for l in result.tail.iter().rev().take(15).rev() {
            eprintln!("{prefix}| {l}");
        }
    }
    let text = std::fs::read_to_string(results.join("results.jsonl")).unwrap_or_default();
    let rows = matrix::parse_results(name, &text, problem.as_deref());
    let line = format!(
        "{guest}: {} — {} in {:.1} s (console: {})",
        p.tree.release,
        result.describe(),
        result.seconds,
        results.join("console.log").display()
    );
    eprintln!("e2e: {line}");
    let job_ok = matches!(result.outcome, qemu::Outcome::Done { rc: 0 });
    Ok((rows, line, job_ok))
}

/// What a run leaves for `cargo xtask matrix --add` (beside its `matrix.json`).
const RUN_FILE: &str = "run.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct RunFile {
    /// The kernels it ran every scenario of.
    whole: Vec<String>,
    #[serde(flatten)]
    merged: matrix::Merged,
}

/// `cargo xtask matrix`: the README matrix from the merged results.
#[derive(clap::Args, Clone, Debug)]
pub struct MatrixArgs {
    /// A run to merge first: its `run.json`, or the e2e output directory holding it
    /// (another checkout's `target/e2e`). Repeatable; merged in the order given.
    #[arg(long, value_name = "PATH")]
    pub add: Vec<PathBuf>,
}

/// `cargo xtask matrix`: merges the runs given into `vm/matrix.json` and writes the
/// README's matrix from it (with none, only rewrites the README).
pub fn matrix(args: &MatrixArgs) -> Result<()> {
    let files: Vec<PathBuf> = args
        .add
        .iter()
        .map(|p| {
            if p.is_dir() {
                p.join(RUN_FILE)
            } else {
                p.clone()
            }
        })
        .collect();
    merge_into_readme(&files)
}

/// Merges each run file into the merged matrix (in git, [`matrix::MERGED_FILE`]) and
/// splices the README's matrix section from it.
fn merge_into_readme(run_files: &[PathBuf]) -> Result<()> {
    let merged_path = workspace_root().join(matrix::MERGED_FILE);
    let mut merged: matrix::Merged = match std::fs::read_to_string(&merged_path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a merged matrix", merged_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => matrix::Merged::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", merged_path.display())),
    };
    for file in run_files {
        let text = std::fs::read_to_string(file).with_context(|| {
            format!(
                "reading {} (a run of `cargo xtask e2e` writes it)",
                file.display()
            )
        })?;
        let run: RunFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a run's {RUN_FILE}", file.display()))?;
        for r in run.merged.runs {
            let rows: Vec<matrix::Row> = run
                .merged
                .rows
                .iter()
                .filter(|row| row.date == r.date)
                .cloned()
                .collect();
            eprintln!(
                "matrix: adding {} cells of {} ({})",
                rows.len(),
                r.date,
                r.command
            );
            merged.add(r, &rows, &run.whole);
        }
    }
    std::fs::write(&merged_path, serde_json::to_string_pretty(&merged)? + "\n")?;
    let order: Vec<String> = config()?.kernels.iter().map(|k| k.name.clone()).collect();
    let section = matrix::render_readme(&merged, &merged.kernels(&order));
    let readme = workspace_root().join("README.md");
    let text = std::fs::read_to_string(&readme)?;
    let new = matrix::splice_readme(&text, &section).map_err(anyhow::Error::msg)?;
    std::fs::write(&readme, new)?;
    eprintln!(
        "matrix: wrote {} and the matrix in {}",
        merged_path.display(),
        readme.display()
    );
    Ok(())
}

/// `cargo xtask demo`: boots the default kernel and runs `rthooks-e2e demo` in it, which
/// narrates the whole stack stopping a selected pod at its first exec.
pub fn demo() -> Result<()> {
    let args = E2eArgs {
        select: Select {
            kernels: Vec::new(),
            all: false,
            kernel_dir: Vec::new(),
            append: String::new(),
        },
        timeout: 900,
        scenario_timeout: 300,
        scenario: None,
        exclude: None,
        no_build: false,
        bin_dir: None,
        crio_dir: None,
        crio_guest: false,
        runner: RunnerKind::Qemu,
        jobs: 1,
        update_readme: false,
        command: None,
    };
    crate::util::cargo(&["build", "--bins"])?;
    let config = config()?;
    let kernels = args.select.kernels(&config)?;
    let mut stats = FetchStats::default();
    let prepared = prepare(&config, &kernels, &[], &mut stats)?;
    let bins = bin_dir(&args);
    prefetch_e2e_crate(&bins);
    let args = E2eArgs {
        command: Some(format!(
            "{} demo",
            sh_quote(&bins.join("rthooks-e2e").display().to_string())
        )),
        ..args
    };
    let qemu_bin = PathBuf::from(
        std::env::var("RTHOOKS_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()),
    );
    let accel = qemu::choose_accel(&qemu_bin, &prepared[0].tree.vmlinuz, &prepared[0].initramfs);
    let out_dir = target_dir().join("demo");
    std::fs::create_dir_all(&out_dir)?;
    let (_, line, ok) = run_kernel(
        &prepared[0],
        Part::All,
        &args,
        &[],
        accel,
        &qemu_bin,
        &out_dir,
    )?;
    if !ok {
        anyhow::bail!("the demo did not complete: {line}");
    }
    Ok(())
}

fn bin_dir(args: &E2eArgs) -> PathBuf {
    args.bin_dir
        .as_deref()
        .map(absolute)
        .unwrap_or_else(|| target_dir().join("debug"))
}

/// The guests have no network and a read-only cache: whatever the e2e crate's in-guest
/// scenarios download or build (containerd packages, OCI image tarballs) is made here,
/// on the host, by `rthooks-e2e prefetch` — when the binary has that subcommand.
fn prefetch_e2e_crate(bin_dir: &Path) {
    let e2e = bin_dir.join("rthooks-e2e");
    let has_prefetch =
        crate::util::output(std::process::Command::new(&e2e).args(["prefetch", "--help"]))
            .is_some();
    if !has_prefetch {
        return;
    }
    eprintln!("e2e: {} prefetch", e2e.display());
    if let Err(e) = crate::util::run(std::process::Command::new(&e2e).arg("prefetch")) {
        eprintln!("e2e: warning: {e:#}; its in-guest scenarios will report what is missing");
    }
}

/// Paths given on the command line, made absolute: the guest does not share our cwd.
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    }
}

pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The guest's list of the test executables this run built ([`crate::util::test_binaries`]):
/// one `<target name>=<path>` a line.
pub const TEST_BINARIES_ENV: &str = "RTHOOKS_TEST_BINARIES";

fn test_binaries_value(test_binaries: &[TestBinary]) -> String {
    test_binaries
        .iter()
        .map(|t| format!("{}={}\n", t.name, t.executable.display()))
        .collect()
}

/// The script the guest init runs (after `switch_root` into the host root), from the results share.
fn job_script(
    kernel: &str,
    part: Part,
    args: &E2eArgs,
    test_binaries: &[TestBinary],
    accel: qemu::Accel,
) -> String {
    // Each guest chooses its share of the rows itself (the e2e crate knows the table);
    // the user's --scenario and --exclude hold in both.
    let share = match part {
        Part::All => "all",
        Part::First => "first",
        Part::Second => "second",
    };
    let ws = workspace_root();
    let vars = [
        ("RTHOOKS_KERNEL", kernel.to_string()),
        ("RTHOOKS_RESULTS_DIR", "/run/rthooks-vm/results".to_string()),
        ("RTHOOKS_BIN_DIR", bin_dir(args).display().to_string()),
        ("RTHOOKS_WORKSPACE", ws.display().to_string()),
        // The guest's HOME is not ours: the tests it runs find the cache by this.
        ("RTHOOKS_CACHE", cache_dir().display().to_string()),
        (
            "RTHOOKS_CRIO_DIR",
            args.crio_dir
                .as_deref()
                .map(absolute)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
        (
            "RTHOOKS_USERLAND",
            cache_dir().join("userland").display().to_string(),
        ),
        // etcd and the API server of the Kubernetes rows (`cargo xtask setup` builds them).
        (
            crate::apiserver::BIN_DIR_ENV,
            crate::apiserver::bin_dir().display().to_string(),
        ),
        (
            "RTHOOKS_SCENARIO_FILTER",
            args.scenario.clone().unwrap_or_default(),
        ),
        ("RTHOOKS_GUEST_SHARE", share.to_string()),
        (
            "RTHOOKS_SCENARIO_EXCLUDE",
            args.exclude.clone().unwrap_or_default(),
        ),
        (
            "RTHOOKS_SCENARIO_TIMEOUT",
            args.scenario_timeout.to_string(),
        ),
        // Guest-side code scales its own waits by this: TCG is several times slower.
        ("RTHOOKS_VM_ACCEL", accel.name().to_string()),
        (TEST_BINARIES_ENV, test_binaries_value(test_binaries)),
    ];
    let mut s = String::from("# Written by cargo xtask e2e; run by the guest init.\n");
    for (k, v) in vars {
        s.push_str(&format!("export {k}={}\n", sh_quote(&v)));
    }
    match &args.command {
        Some(command) => s.push_str(&format!("exec {command}\n")),
        None => s.push_str(&format!(
            "exec /bin/bash {}\n",
            sh_quote(&ws.join("vm/guest/suite.sh").display().to_string())
        )),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_dir_alone_replaces_the_default_kernel() {
        let config = Config::parse(
            "[[kernel]]\nname = \"6.12\"\nsuite = \"trixie\"\npackages = [\"x\"]\ndefault = true\n",
        )
        .unwrap();
        let mut select = Select {
            kernels: vec![],
            all: false,
            kernel_dir: vec!["/src/linux".into()],
            append: String::new(),
        };
        assert!(select.kernels(&config).unwrap().is_empty());
        select.kernels.push("6.12".into());
        assert_eq!(select.kernels(&config).unwrap().len(), 1);
        select.kernel_dir.clear();
        select.kernels.clear();
        assert_eq!(select.kernels(&config).unwrap()[0].name, "6.12");
    }

    #[test]
    fn job_script_quotes_values() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
        let args = E2eArgs {
            select: Select {
                kernels: vec![],
                all: false,
                kernel_dir: vec![],
                append: String::new(),
            },
            timeout: 1,
            scenario_timeout: 7,
            scenario: Some("it's".into()),
            exclude: Some("kube@crio-crun".into()),
            no_build: true,
            bin_dir: Some("/b".into()),
            crio_dir: None,
            crio_guest: false,
            runner: RunnerKind::Qemu,
            jobs: 1,
            update_readme: false,
            command: None,
        };
        let built = [TestBinary {
            name: "enforcement".into(),
            executable: "/t/deps/enforcement-1f".into(),
        }];
        let s = job_script("6.12", Part::All, &args, &built, qemu::Accel::Tcg);
        assert!(s.contains("export RTHOOKS_TEST_BINARIES='enforcement=/t/deps/enforcement-1f\n'\n"));
        assert!(s.contains("export RTHOOKS_KERNEL='6.12'\n"));
        assert!(s.contains("export RTHOOKS_SCENARIO_FILTER='it'\\''s'\n"));
        assert!(s.contains("export RTHOOKS_SCENARIO_TIMEOUT='7'\n"));
        assert!(s.contains("export RTHOOKS_BIN_DIR='/b'\n"));
        assert!(s.contains("export RTHOOKS_VM_ACCEL='tcg'\n"));
        assert!(s.contains("export RTHOOKS_SCENARIO_EXCLUDE='kube@crio-crun'\n"));
        assert!(s.contains("export RTHOOKS_GUEST_SHARE='all'\n"));
        // The two guests of a kernel split the scenarios between them; --scenario and
        // --exclude hold in both.
        for (part, share) in [(Part::First, "first"), (Part::Second, "second")] {
            let s = job_script("6.12", part, &args, &[], qemu::Accel::Tcg);
            assert!(s.contains(&format!("export RTHOOKS_GUEST_SHARE='{share}'\n")));
            assert!(s.contains("export RTHOOKS_SCENARIO_FILTER='it'\\''s'\n"));
            assert!(s.contains("export RTHOOKS_SCENARIO_EXCLUDE='kube@crio-crun'\n"));
        }
        assert_eq!(Part::Second.results_dir("6.12"), "6.12-second");
        assert!(s.lines().last().unwrap().starts_with("exec /bin/bash '"));
        let demo = E2eArgs {
            command: Some("/b/rthooks-e2e demo".into()),
            ..args
        };
        let s = job_script("6.12", Part::All, &demo, &[], qemu::Accel::Tcg);
        assert_eq!(s.lines().last().unwrap(), "exec /b/rthooks-e2e demo");
    }

    #[test]
    fn in_parallel_keeps_the_order_and_bounds_the_threads() {
        let running = std::sync::atomic::AtomicUsize::new(0);
        let most = std::sync::atomic::AtomicUsize::new(0);
        let items: Vec<u64> = (0..7).collect();
        let out = in_parallel(&items, 2, |&i| {
            let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            // Later items finish first: the order must come from the input, not completion.
            std::thread::sleep(Duration::from_millis(20 * (7 - i)));
            running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            i * 10
        });
        assert_eq!(out, vec![0, 10, 20, 30, 40, 50, 60]);
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 2);
        assert_eq!(in_parallel(&items[..0], 3, |&i| i), Vec::<u64>::new());
    }
}
