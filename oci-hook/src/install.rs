//! Installers: make a node's runtime run the hook, and undo it.
//!
//! * `hooks-d`: CRI-O and podman read hooks.d JSON (schema 1.0.0). The binary is copied
//!   first (atomically), because CRI-O validates a hook file by stat-ing its `path`.
//! * `containerd-base-spec`: containerd without NRI can only add hooks through a runtime's
//!   `base_runtime_spec`, which *replaces* its default spec; so the spec starts from the
//!   runtime's own default (`ctr oci spec`, or the base spec already configured), gets the
//!   hook added, and the runc runtime in containerd's TOML (config version 2 or 3) is
//!   pointed at it, keeping every other setting and comment (toml_edit).
//! * `containerd-nri`: enable NRI in a containerd 1.7 config (2.x has it on).
//!
//! Every file is written atomically (temporary file + rename). Before the first change
//! to a file its original is copied into the state directory and recorded in a manifest,
//! so `uninstall` restores it byte for byte (or removes a file that did not exist).
//! Installing again with the same inputs writes nothing.
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use toml_edit::{DocumentMut, Item, Table};

use crate::config::{self, BINARY_NAME};
use crate::error::{Error, Result};

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
    name = "rthooks-oci-hook",
    about = "Install or remove the rthooks OCI hook"
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
    /// The binary to install (default: this executable).
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

/// Entry point for `install`/`uninstall` argv (argv[0] included).
pub fn main(args: &[OsString]) -> anyhow::Result<()> {
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| e.exit());
    let report = match cli.action {
        Action::Install { target } => install(&target)?,
        Action::Uninstall { target } => uninstall(&target)?,
    };
    for l in report {
        println!("{l}");
    }
    Ok(())
}

impl Common {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.install_dir.join("install-state"))
    }
    fn installed_binary(&self) -> PathBuf {
        self.install_dir.join(BINARY_NAME)
    }
    fn source_binary(&self) -> Result<PathBuf> {
        match &self.binary {
            Some(b) => Ok(b.clone()),
            None => std::env::current_exe()
                .map_err(|e| Error::io("finding this executable", "/proc/self/exe", e)),
        }
    }
    /// The hook's argv for a stage; the extra arguments are checked with the hook's own
    /// parser so a typo fails the install, not every container.
    fn hook_argv(&self, stage: &str) -> Result<Vec<String>> {
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
        let parsed = config::parse(&check)
            .map_err(|e| Error::Install(format!("invalid --hook-arg: {}", e.to_string().trim())))?;
        // The hook compiles its failure rule only when a container fails: catch a bad
        // CEL expression or regex now rather than on the day the agent is down.
        if let Some(e) = crate::policy::FailurePolicy::from_config(&parsed.config)
            .1
            .first()
        {
            return Err(Error::Install(format!("invalid --hook-arg: {e}")));
        }
        Ok(argv)
    }
}

/// Runs an install; returns what it did, one line each.
pub fn install(target: &Target) -> Result<Vec<String>> {
    match target {
        Target::HooksD(a) => install_hooks_d(a),
        Target::ContainerdBaseSpec(a) => install_base_spec(a),
        Target::ContainerdNri(a) => install_nri(a),
    }
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

fn install_binary(tx: &mut Tx, c: &Common) -> Result<()> {
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

/// containerd config version: 2 (1.x) or 3 (2.x); version 1 is not supported.
pub fn containerd_config_version(doc: &DocumentMut) -> Result<i64> {
    match doc.get("version").and_then(Item::as_integer) {
        Some(v @ (2 | 3)) => Ok(v),
        Some(v) => Err(Error::Install(format!("containerd config version {v} is not supported (2 or 3)"))),
        None => Err(Error::Install(
            "containerd config has no `version` (version 1 is not supported; use `containerd config migrate`)".into(),
        )),
    }
}

/// The table path of a CRI runtime for a config version.
pub fn runtime_table_path(version: i64, runtime: &str) -> [String; 5] {
    let plugin = if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    [
        "plugins".into(),
        plugin.into(),
        "containerd".into(),
        "runtimes".into(),
        runtime.into(),
    ]
}

/// Walks to (creating as needed) a table; intermediate tables are created implicit so the
/// output gains one `[a.b.c]` header rather than one per level.
fn table_at<'a>(
    doc: &'a mut DocumentMut,
    path: &[String],
) -> Result<&'a mut dyn toml_edit::TableLike> {
    let mut cur: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for (i, key) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        if cur.get(key).is_none() {
            let mut t = Table::new();
            t.set_implicit(!last);
            cur.insert(key, Item::Table(t));
        }
        let item = cur.get_mut(key).expect("inserted above");
        cur = item.as_table_like_mut().ok_or_else(|| {
            Error::Install(format!(
                "`{}` in containerd's config is not a table",
                path[..=i].join(".")
            ))
        })?;
    }
    Ok(cur)
}

fn get_str_at(doc: &DocumentMut, path: &[String], key: &str) -> Option<String> {
    let mut cur: &dyn toml_edit::TableLike = doc.as_table();
    for k in path {
        cur = cur.get(k)?.as_table_like()?;
    }
    cur.get(key)?.as_str().map(str::to_owned)
}

/// Sets a key, keeping the surrounding whitespace/comments of an existing value.
fn set_value(t: &mut dyn toml_edit::TableLike, key: &str, v: impl Into<toml_edit::Value>) -> bool {
    let mut v: toml_edit::Value = v.into();
    if let Some(old) = t.get(key).and_then(Item::as_value) {
        if old.to_string().trim() == v.to_string().trim() {
            return false;
        }
        *v.decor_mut() = old.decor().clone();
    }
    t.insert(key, Item::Value(v));
    true
}

/// Adds (or replaces) our hook in a spec's `hooks.createRuntime`, keeping everything
/// else, including other hooks.
pub fn add_hook_to_spec(
    spec: &mut Json,
    stage: &str,
    binary: &Path,
    argv: &[String],
    timeout: u32,
) -> Result<()> {
    let obj = spec
        .as_object_mut()
        .ok_or_else(|| Error::Install("the base spec is not a JSON object".into()))?;
    let hooks = obj.entry("hooks").or_insert_with(|| json!({}));
    let hooks = hooks
        .as_object_mut()
        .ok_or_else(|| Error::Install("`hooks` in the base spec is not an object".into()))?;
    let list = hooks.entry(stage).or_insert_with(|| json!([]));
    let list = list
        .as_array_mut()
        .ok_or_else(|| Error::Install(format!("`hooks.{stage}` in the base spec is not a list")))?;
    let ours = json!({ "path": binary, "args": argv, "timeout": timeout });
    let bin = binary.to_string_lossy();
    match list
        .iter()
        .position(|h| h.get("path").and_then(Json::as_str) == Some(&bin))
    {
        Some(i) => list[i] = ours,
        None => list.push(ours),
    }
    Ok(())
}

fn default_spec(a: &BaseSpecArgs) -> Result<Vec<u8>> {
    if let Some(p) = &a.spec_from {
        return std::fs::read(p).map_err(|e| Error::io("reading --spec-from", p, e));
    }
    let out = std::process::Command::new(&a.ctr)
        .args(["oci", "spec"])
        .output()
        .map_err(|e| Error::io("running `ctr oci spec` (or give --spec-from)", &a.ctr, e))?;
    if !out.status.success() {
        return Err(Error::Install(format!(
            "`{} oci spec` failed: {}",
            a.ctr.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn install_base_spec(a: &BaseSpecArgs) -> Result<Vec<String>> {
    let c = &a.common;
    let cfg_bytes = std::fs::read(&a.containerd_config).map_err(|e| {
        Error::io(
            "reading containerd's config (create it with `containerd config default`)",
            &a.containerd_config,
            e,
        )
    })?;
    let cfg_text = String::from_utf8(cfg_bytes)
        .map_err(|_| Error::Install(format!("{} is not UTF-8", a.containerd_config.display())))?;
    let mut doc: DocumentMut = cfg_text.parse().map_err(|e| {
        Error::Install(format!(
            "{} is not valid TOML: {e}",
            a.containerd_config.display()
        ))
    })?;
    let version = containerd_config_version(&doc)?;
    if a.runtimes.is_empty() {
        return Err(Error::Install("no --runtime given".into()));
    }

    // Start from the spec the runtime uses today: ours (re-install), another base spec an
    // admin configured, or the runtime's built-in default.
    let ours = a.base_spec.to_string_lossy().into_owned();
    let mut configured: Vec<String> = a
        .runtimes
        .iter()
        .filter_map(|r| get_str_at(&doc, &runtime_table_path(version, r), "base_runtime_spec"))
        .filter(|s| !s.is_empty())
        .collect();
    configured.dedup();
    let start_from = match configured.as_slice() {
        [] => None,
        [one] => Some(PathBuf::from(one)),
        many => {
            return Err(Error::Install(format!(
                "the runtimes use different base specs ({}); install for one at a time",
                many.join(", ")
            )))
        }
    };
    let mut tx = Tx::open(&c.state_dir(), "containerd-base-spec")?;
    let spec_bytes = match &start_from {
        Some(p) if *p == a.base_spec && !a.base_spec.exists() => default_spec(a)?,
        Some(p) => std::fs::read(p)
            .map_err(|e| Error::io("reading the configured base_runtime_spec", p, e))?,
        None => default_spec(a)?,
    };
    if let Some(p) = start_from.as_deref().filter(|p| *p != a.base_spec) {
        tx.note(format!(
            "starting from the configured base spec {}",
            p.display()
        ));
    }
    let mut spec: Json = serde_json::from_slice(&spec_bytes)
        .map_err(|e| Error::Install(format!("the default spec is not valid JSON: {e}")))?;
    install_binary(&mut tx, c)?;
    let mut stages = vec!["createRuntime"];
    if a.poststop {
        stages.push("poststop");
    }
    for stage in stages {
        add_hook_to_spec(
            &mut spec,
            stage,
            &c.installed_binary(),
            &c.hook_argv(stage)?,
            c.hook_timeout,
        )?;
    }
    let mut text = serde_json::to_string_pretty(&spec).expect("serialisable");
    text.push('\n');
    // containerd reads it as root; 0644 matches its own files.
    tx.write(&a.base_spec, text.as_bytes(), 0o644, false)?;

    for r in &a.runtimes {
        let path = runtime_table_path(version, r);
        let t = table_at(&mut doc, &path)?;
        if t.get("runtime_type").is_none() {
            set_value(t, "runtime_type", "io.containerd.runc.v2");
        }
        set_value(t, "base_runtime_spec", ours.as_str());
    }
    let mode = file_mode(&a.containerd_config).unwrap_or(0o644);
    tx.write(
        &a.containerd_config,
        doc.to_string().as_bytes(),
        mode,
        false,
    )?;
    tx.note("restart containerd to apply".to_owned());
    Ok(tx.finish())
}

/// NRI defaults of containerd 1.7 (`containerd config default`), with `disable = false`.
const NRI_TABLE: &[(&str, NriVal)] = &[
    ("disable", NriVal::B(false)),
    ("disable_connections", NriVal::B(false)),
    ("plugin_config_path", NriVal::S("/etc/nri/conf.d")),
    ("plugin_path", NriVal::S("/opt/nri/plugins")),
    ("plugin_registration_timeout", NriVal::S("5s")),
    ("plugin_request_timeout", NriVal::S("2s")),
    ("socket_path", NriVal::S("/var/run/nri/nri.sock")),
];

enum NriVal {
    B(bool),
    S(&'static str),
}

fn install_nri(a: &NriArgs) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(&a.containerd_config)
        .map_err(|e| Error::io("reading containerd's config", &a.containerd_config, e))?;
    let mut doc: DocumentMut = text.parse().map_err(|e| {
        Error::Install(format!(
            "{} is not valid TOML: {e}",
            a.containerd_config.display()
        ))
    })?;
    let version = containerd_config_version(&doc)?;
    let mut tx = Tx::open(&a.state_dir, "containerd-nri")?;
    let path = ["plugins".to_owned(), "io.containerd.nri.v1.nri".to_owned()];
    let exists = get_table_like(&doc, &path).is_some();
    if !exists && version >= 3 {
        tx.note("containerd 2.x enables NRI by default; nothing to change".into());
        return Ok(tx.finish());
    }
    let t = table_at(&mut doc, &path)?;
    if exists {
        set_value(t, "disable", false);
    } else {
        for (k, v) in NRI_TABLE {
            match v {
                NriVal::B(b) => set_value(t, k, *b),
                NriVal::S(s) => set_value(t, k, *s),
            };
        }
    }
    let mode = file_mode(&a.containerd_config).unwrap_or(0o644);
    tx.write(
        &a.containerd_config,
        doc.to_string().as_bytes(),
        mode,
        false,
    )?;
    tx.note("restart containerd to apply".into());
    Ok(tx.finish())
}

fn get_table_like<'a>(
    doc: &'a DocumentMut,
    path: &[String],
) -> Option<&'a dyn toml_edit::TableLike> {
    let mut cur: &dyn toml_edit::TableLike = doc.as_table();
    for k in path {
        cur = cur.get(k)?.as_table_like()?;
    }
    Some(cur)
}

fn file_mode(p: &Path) -> Option<u32> {
    std::fs::metadata(p)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// FNV-1a, to notice that a file changed after we wrote it (not a security check).
fn fnv64(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// One file an installer touched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    /// Whether the file existed before; if so `backup` holds its bytes and `mode`.
    pub existed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Hash of what we last wrote.
    pub written: String,
    /// The hook binary is shared by installers: only its first installer restores it.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub installer: String,
    pub entries: Vec<Entry>,
}

/// The changes of one installer, recorded before they are made.
struct Tx {
    state_dir: PathBuf,
    name: String,
    manifest: Manifest,
    report: Vec<String>,
}

impl Tx {
    fn manifest_path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join(format!("{name}.json"))
    }

    fn open(state_dir: &Path, name: &str) -> Result<Tx> {
        let p = Self::manifest_path(state_dir, name);
        let manifest = match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::Install(format!("corrupt install manifest {}: {e}", p.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                installer: name.to_owned(),
                entries: Vec::new(),
            },
            Err(e) => return Err(Error::io("reading the install manifest", p, e)),
        };
        Ok(Tx {
            state_dir: state_dir.to_owned(),
            name: name.to_owned(),
            manifest,
            report: Vec::new(),
        })
    }

    fn note(&mut self, s: String) {
        self.report.push(s);
    }

    fn finish(mut self) -> Vec<String> {
        if self.report.is_empty() {
            self.report
                .push(format!("{}: already installed, nothing changed", self.name));
        }
        self.report
    }

    fn save(&self) -> Result<()> {
        let p = Self::manifest_path(&self.state_dir, &self.name);
        if self.manifest.entries.is_empty() {
            return match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("removing the manifest", p, e))
                }
                _ => Ok(()),
            };
        }
        let mut b = serde_json::to_vec_pretty(&self.manifest).expect("serialisable");
        b.push(b'\n');
        atomic_write(&p, &b, 0o600)
    }

    /// Manifests of the other installers in the same state directory.
    fn others(&self) -> Vec<(PathBuf, Manifest)> {
        let Ok(rd) = std::fs::read_dir(&self.state_dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && *p != Self::manifest_path(&self.state_dir, &self.name)
            })
            .filter_map(|p| {
                Some((
                    p.clone(),
                    serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?,
                ))
            })
            .collect()
    }

    /// Writes `path` (atomically) unless it already has these bytes and mode, recording
    /// its original first.
    fn write(&mut self, path: &Path, bytes: &[u8], mode: u32, shared: bool) -> Result<()> {
        // A symlinked config (config management often does this) stays a symlink: the
        // file it points to is what changes and what uninstall restores.
        let resolved;
        let path = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                resolved = std::fs::canonicalize(path)
                    .map_err(|e| Error::io("resolving a symlink", path, e))?;
                resolved.as_path()
            }
            _ => path,
        };
        let current = std::fs::read(path).ok();
        let unchanged = current.as_deref() == Some(bytes) && file_mode(path) == Some(mode);
        if !self.manifest.entries.iter().any(|e| e.path == path) {
            let owned_elsewhere = shared
                && self
                    .others()
                    .iter()
                    .any(|(_, m)| m.entries.iter().any(|e| e.path == path && !e.shared));
            // Identical bytes that no installer of ours wrote: not ours to remove later.
            if unchanged && !owned_elsewhere {
                return Ok(());
            }
            let mut entry = Entry {
                path: path.to_owned(),
                existed: current.is_some(),
                backup: None,
                mode: file_mode(path),
                written: String::new(),
                shared: owned_elsewhere,
            };
            if let (Some(cur), false) = (&current, owned_elsewhere) {
                let dir = self.state_dir.join("originals").join(&self.name);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io("creating the state directory", &dir, e))?;
                let b = dir.join(format!(
                    "{}.{}",
                    self.manifest.entries.len(),
                    fnv64(path.as_os_str().as_encoded_bytes())
                ));
                atomic_write(&b, cur, 0o600)?;
                entry.backup = Some(b);
            }
            if unchanged {
                entry.written = fnv64(bytes);
            }
            self.manifest.entries.push(entry);
            // Recorded before the change, so an interrupted install can still be undone.
            self.save()?;
        }
        if unchanged {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating a directory", dir, e))?;
        }
        atomic_write(path, bytes, mode)?;
        let h = fnv64(bytes);
        if let Some(e) = self.manifest.entries.iter_mut().find(|e| e.path == path) {
            e.written = h;
        }
        self.save()?;
        tracing::info!(installer = %self.name, path = %path.display(), "wrote");
        self.report.push(format!("wrote {}", path.display()));
        Ok(())
    }

    fn rollback(mut self, force: bool) -> Result<Vec<String>> {
        if self.manifest.entries.is_empty() {
            return Ok(vec![format!(
                "{}: not installed, nothing to undo",
                self.name
            )]);
        }
        // Refuse to clobber someone else's later edits unless forced.
        if !force {
            for e in &self.manifest.entries {
                if e.shared {
                    continue;
                }
                if let Ok(cur) = std::fs::read(&e.path) {
                    if fnv64(&cur) != e.written {
                        return Err(Error::Install(format!(
                            "{} changed since it was installed; uninstall with --force to restore the original anyway",
                            e.path.display()
                        )));
                    }
                }
            }
        }
        let others = self.others();
        let mut report = Vec::new();
        for e in self.manifest.entries.iter().rev() {
            if e.shared {
                continue;
            }
            // Another installer still uses the shared binary: hand the original over.
            if let Some((p, mut m)) = others
                .iter()
                .find(|(_, m)| m.entries.iter().any(|x| x.path == e.path && x.shared))
                .cloned()
            {
                if let Some(x) = m.entries.iter_mut().find(|x| x.path == e.path) {
                    *x = Entry {
                        shared: false,
                        ..e.clone()
                    };
                }
                let mut b = serde_json::to_vec_pretty(&m).expect("serialisable");
                b.push(b'\n');
                atomic_write(&p, &b, 0o600)?;
                report.push(format!(
                    "kept {} (still used by {})",
                    e.path.display(),
                    m.installer
                ));
                continue;
            }
            match (&e.existed, &e.backup) {
                (true, Some(b)) => {
                    let orig = std::fs::read(b)
                        .map_err(|x| Error::io("reading a saved original", b, x))?;
                    atomic_write(&e.path, &orig, e.mode.unwrap_or(0o644))?;
                    report.push(format!("restored {}", e.path.display()));
                }
                _ => {
                    match std::fs::remove_file(&e.path) {
                        Err(x) if x.kind() != std::io::ErrorKind::NotFound => {
                            return Err(Error::io("removing", &e.path, x))
                        }
                        _ => {}
                    }
                    report.push(format!("removed {}", e.path.display()));
                }
            }
        }
        for e in &self.manifest.entries {
            if let Some(b) = &e.backup {
                let _ = std::fs::remove_file(b);
            }
        }
        let _ = std::fs::remove_dir(self.state_dir.join("originals").join(&self.name));
        let _ = std::fs::remove_dir(self.state_dir.join("originals"));
        self.manifest.entries.clear();
        self.save()?;
        let _ = std::fs::remove_dir(&self.state_dir);
        Ok(report)
    }
}

/// Writes via a temporary file in the same directory and a rename, so readers (CRI-O's
/// inotify watch on hooks.d, containerd at start, a runtime exec-ing the binary) see the
/// old or the new file, never a partial one. The temporary name has no `.json` suffix so
/// hooks.d readers ignore it.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating a directory", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.rthooks-tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        // Keep the owner of the file being replaced (or restored).
        if let Ok(md) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid()))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", path, e));
    }
    Ok(())
}

/// Reads a manifest (tests, diagnostics).
pub fn read_manifest(state_dir: &Path, name: &str) -> Option<Manifest> {
    serde_json::from_slice(&std::fs::read(Tx::manifest_path(state_dir, name)).ok()?).ok()
}

/// Convenience for tests: the table of a runtime in a parsed config.
pub fn runtime_settings(
    doc: &DocumentMut,
    version: i64,
    runtime: &str,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(t) = get_table_like(doc, &runtime_table_path(version, runtime)) {
        for (k, v) in t.iter() {
            if let Some(v) = v.as_value() {
                out.insert(k.to_owned(), v.to_string().trim().to_owned());
            }
        }
    }
    out
}
