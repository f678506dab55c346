//! `rthooks-setup`: make a node's container runtime run the rthooks OCI hook
//! (`rthooks-oci-hook`), and undo it. Apart from the hook so that the binary the runtime
//! executes for every container carries no installer code (Tetragon ships its setup apart
//! for the same reason).
//!
//! * `hooks-d`: CRI-O and podman read hooks.d JSON (schema 1.0.0). The binary is copied
//!   first (atomically), because CRI-O validates a hook file by stat-ing its `path`.
//! * `containerd-base-spec`: containerd without NRI can only add hooks through a runtime's
//!   `base_runtime_spec`, which *replaces* its default spec; so the spec starts from the
//!   runtime's own default (`ctr oci spec`, or the base spec already configured), gets the
//!   hook added, and the runc runtime in containerd's TOML (config version 2 or 3) is
//!   pointed at it, keeping every other setting and comment ([`containerd`], toml_edit).
//! * `containerd-nri`: enable NRI in a containerd 1.7 config (2.x has it on).
//!
//! Every file is written atomically (temporary file + rename). Before the first change
//! to a file its original is copied into the state directory and recorded in a manifest
//! ([`journal`]), so `uninstall` restores it byte for byte (or removes a file that did not
//! exist). Installing again with the same inputs writes nothing.
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use rthooks_oci_hook::config::{self, BINARY_NAME};
use rthooks_oci_hook::policy::FailurePolicy;
use serde_json::{json, Value as Json};

pub mod containerd;
pub mod error;
pub mod journal;

pub use containerd::{
    add_hook_to_spec, containerd_config_version, runtime_settings, runtime_table_path,
};
pub use error::{Error, Result};
use journal::Tx;
pub use journal::{atomic_write, read_manifest, Entry, Manifest};

pub const DEFAULT_INSTALL_DIR: &str = "/opt/rthooks";
/// The hooks.d default of containers/common: CRI-O reads only it unless configured, podman
/// reads it and `/etc/containers/oci/hooks.d`.
pub const DEFAULT_HOOKS_DIR: &str = "/usr/share/containers/oci/hooks.d";
pub const DEFAULT_HOOKS_FILE: &str = "rthooks.json";
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const DEFAULT_BASE_SPEC: &str = "/etc/containerd/rthooks-base-spec.json";
/// The OCI `timeout` (seconds) of the injected hook: above the hook's own 2 s deadline,
/// so the hook's failure rule decides rather than the runtime killing it.
pub const DEFAULT_HOOK_TIMEOUT: u32 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "rthooks-setup",
    version,
    about = "Install or remove the rthooks OCI hook (rthooks-oci-hook) for a node's runtime",
    long_about = "Install or remove the rthooks OCI hook (rthooks-oci-hook) for a node's runtime.\n\n\
        Every install is idempotent (a second run writes nothing) and reversible: uninstall \
        restores each file byte for byte from the state directory."
)]
pub struct Cli {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Install the hook for a runtime.
    Install {
        #[command(subcommand)]
        target: Target,
    },
    /// Undo an install, restoring the original files byte for byte.
    Uninstall {
        #[command(subcommand)]
        target: Target,
    },
}

#[derive(Debug, Subcommand)]
pub enum Target {
    /// hooks.d JSON for CRI-O and podman.
    HooksD(HooksDArgs),
    /// A containerd base_runtime_spec carrying the hook (containerd without NRI).
    ContainerdBaseSpec(BaseSpecArgs),
    /// Enable NRI in a containerd 1.7 configuration.
    ContainerdNri(NriArgs),
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Where the hook binary is installed.
    #[arg(long, default_value = DEFAULT_INSTALL_DIR)]
    pub install_dir: PathBuf,
    /// The hook binary to install (default: `rthooks-oci-hook` beside this executable).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where manifests and original files are kept (default: <install-dir>/install-state).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Extra arguments for the hook (after the stage), e.g. --hook-arg=--grpc-timeout=1s.
    #[arg(long = "hook-arg", allow_hyphen_values = true)]
    pub hook_args: Vec<String>,
    /// OCI timeout of the hook, seconds.
    #[arg(long, default_value_t = DEFAULT_HOOK_TIMEOUT)]
    pub hook_timeout: u32,
    /// Restore originals even when a file was changed by someone else since install.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HooksDArgs {
    #[command(flatten)]
    pub common: Common,
    /// The hooks.d directory.
    #[arg(long, default_value = DEFAULT_HOOKS_DIR)]
    pub hooks_dir: PathBuf,
    /// File name in the hooks directory.
    #[arg(long, default_value = DEFAULT_HOOKS_FILE)]
    pub file_name: String,
    /// Also install a poststop hook (`<name>-poststop.json`) that tells the agent when a
    /// container is gone (the agent also notices removed cgroups by itself).
    #[arg(long)]
    pub poststop: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BaseSpecArgs {
    #[command(flatten)]
    pub common: Common,
    /// containerd's configuration file (version 2 or 3).
    #[arg(long, default_value = DEFAULT_CONTAINERD_CONFIG)]
    pub containerd_config: PathBuf,
    /// Where to write the base spec.
    #[arg(long, default_value = DEFAULT_BASE_SPEC)]
    pub base_spec: PathBuf,
    /// `ctr` binary whose `ctr oci spec` gives the default spec.
    #[arg(long, default_value = "ctr")]
    pub ctr: PathBuf,
    /// Start from this spec file instead of running `ctr oci spec`.
    #[arg(long)]
    pub spec_from: Option<PathBuf>,
    /// CRI runtime names to point at the base spec.
    #[arg(long = "runtime", default_value = "runc")]
    pub runtimes: Vec<String>,
    /// Also add a poststop hook (RemoveContainer when a container is gone).
    #[arg(long)]
    pub poststop: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NriArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = DEFAULT_CONTAINERD_CONFIG)]
    pub containerd_config: PathBuf,
    /// Where manifests and original files are kept.
    #[arg(long, default_value = "/opt/rthooks/install-state")]
    pub state_dir: PathBuf,
    /// Restore the original even when it was changed since install.
    #[arg(long)]
    pub force: bool,
}

/// Runs a parsed command line; returns what it did, one line each.
pub fn run(cli: &Cli) -> Result<Vec<String>> {
    match &cli.action {
        Action::Install { target } => install(target),
        Action::Uninstall { target } => uninstall(target),
    }
}

impl Common {
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.install_dir.join("install-state"))
    }
    pub(crate) fn installed_binary(&self) -> PathBuf {
        self.install_dir.join(BINARY_NAME)
    }
    fn source_binary(&self) -> Result<PathBuf> {
        match &self.binary {
            Some(b) => Ok(b.clone()),
            None => hook_beside_this_executable(),
        }
    }
    /// The hook's argv for a stage; the extra arguments are checked with the hook's own
    /// parser so a typo fails the install, not every container.
    pub(crate) fn hook_argv(&self, stage: &str) -> Result<Vec<String>> {
        let mut argv = vec![BINARY_NAME.to_owned(), stage.to_owned()];
        argv.extend(self.hook_args.iter().cloned());
        let mut check = argv.clone();
        // Validate the flags alone, not whatever config file sits beside this binary.
        if !self
            .hook_args
            .iter()
            .any(|a| a.starts_with("--config-file"))
        {
            check.extend(["--config-file".into(), "/dev/null/none".into()]);
        }
        let parsed = config::parse(&check).map_err(|e| Error::HookArgs {
            reason: e.to_string().trim().to_owned(),
        })?;
        // The hook compiles its failure rule only when a container fails: catch a bad
        // CEL expression or regex now rather than on the day the agent is down.
        if let Some(e) = FailurePolicy::from_config(&parsed.config).1.first() {
            return Err(Error::HookArgs {
                reason: e.to_string(),
            });
        }
        Ok(argv)
    }
}

/// Runs an install; returns what it did, one line each.
pub fn install(target: &Target) -> Result<Vec<String>> {
    match target {
        Target::HooksD(a) => install_hooks_d(a),
        Target::ContainerdBaseSpec(a) => containerd::install_base_spec(a),
        Target::ContainerdNri(a) => containerd::install_nri(a),
    }
}

/// The hook a DaemonSet image or a release directory ships next to this binary.
fn hook_beside_this_executable() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("finding this executable", "/proc/self/exe", e))?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    let hook = exe.with_file_name(BINARY_NAME);
    if !hook.is_file() {
        return Err(Error::Refused(format!(
            "no {BINARY_NAME} beside {}: give the hook binary with --binary",
            exe.display()
        )));
    }
    Ok(hook)
}

/// Runs an uninstall; returns what it did.
pub fn uninstall(target: &Target) -> Result<Vec<String>> {
    let (state_dir, name, force) = match target {
        Target::HooksD(a) => (a.common.state_dir(), "hooks-d", a.common.force),
        Target::ContainerdBaseSpec(a) => {
            (a.common.state_dir(), "containerd-base-spec", a.common.force)
        }
        Target::ContainerdNri(a) => (a.state_dir.clone(), "containerd-nri", a.force),
    };
    Tx::open(&state_dir, name)?.rollback(force)
}

pub(crate) fn install_binary(tx: &mut Tx, c: &Common) -> Result<()> {
    let src = c.source_binary()?;
    let dst = c.installed_binary();
    let same_file = match (std::fs::canonicalize(&src), std::fs::canonicalize(&dst)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_file {
        tx.note(format!("{} is already the installed binary", dst.display()));
        return Ok(());
    }
    let bytes = std::fs::read(&src).map_err(|e| Error::io("reading the hook binary", &src, e))?;
    tx.write(&dst, &bytes, 0o755, true)
}

fn install_hooks_d(a: &HooksDArgs) -> Result<Vec<String>> {
    let c = &a.common;
    let mut tx = Tx::open(&c.state_dir(), "hooks-d")?;
    // Order matters: CRI-O rejects a hook file whose binary does not exist yet.
    install_binary(&mut tx, c)?;
    let mut files = vec![(a.file_name.clone(), "createRuntime")];
    if a.poststop {
        let stem = a.file_name.strip_suffix(".json").unwrap_or(&a.file_name);
        files.push((format!("{stem}-poststop.json"), "poststop"));
    }
    for (name, stage) in files {
        let doc = hooks_d_json(
            &c.installed_binary(),
            &c.hook_argv(stage)?,
            c.hook_timeout,
            stage,
        );
        let mut text = serde_json::to_string_pretty(&doc).expect("serialisable");
        text.push('\n');
        tx.write(&a.hooks_dir.join(name), text.as_bytes(), 0o644, false)?;
    }
    Ok(tx.finish())
}

/// The hooks.d 1.0.0 document for one stage.
pub fn hooks_d_json(binary: &Path, argv: &[String], timeout: u32, stage: &str) -> Json {
    json!({
        "version": "1.0.0",
        "hook": {
            "path": binary,
            "args": argv,
            "timeout": timeout,
        },
        "when": { "always": true },
        "stages": [stage],
    })
}
