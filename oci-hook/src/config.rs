//! Hook configuration: flags (Tetragon's hook flags, same meaning), environment variables
//! (`RTHOOKS_OCI_HOOK_<FLAG>`), then `rthooks-oci-hook.json` beside the binary (keys = long
//! flag names), then our defaults.
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use serde_json::Value;

use crate::error::{Error, Result};

pub const DEFAULT_GRPC_ADDRESS: &str = rthooks_api::DEFAULT_AGENT_ADDRESS;
pub const DEFAULT_GRPC_TIMEOUT: &str = "2s";
pub const DEFAULT_ALLOW_NAMESPACES: &str = "kube-system,rthooks";
pub const DEFAULT_NAMESPACE_KEYS: &str =
    "io.kubernetes.pod.namespace,io.kubernetes.cri.sandbox-namespace";
pub const DEFAULT_LOG_FNAME: &str = "/var/log/rthooks/oci-hook.log";
pub const CONFIG_FILE_NAME: &str = "rthooks-oci-hook.json";
pub const BINARY_NAME: &str = "rthooks-oci-hook";

/// Command line of a hook invocation: `rthooks-oci-hook <stage> [flags]`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "rthooks-oci-hook",
    version,
    about = "OCI hook that registers containers with rthooks-agent (Tetragon-compatible flags).",
    after_help = "Installers (a separate binary): rthooks-setup install|uninstall <hooks-d|containerd-base-spec|containerd-nri> --help"
)]
pub struct HookArgs {
    /// Hook stage: createRuntime (registers the container), createContainer, poststop.
    pub stage: Option<String>,
    /// Agent gRPC address: unix:///path, or host:port for TCP.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_GRPC_ADDRESS", default_value = DEFAULT_GRPC_ADDRESS)]
    pub grpc_address: String,
    /// Deadline for the whole agent call (Go duration: 2s, 500ms, 1m).
    #[arg(long, env = "RTHOOKS_OCI_HOOK_GRPC_TIMEOUT", default_value = DEFAULT_GRPC_TIMEOUT, value_parser = parse_duration)]
    pub grpc_timeout: Duration,
    /// Namespaces whose containers start even when the agent cannot register them.
    /// Ignored when --fail-cel-expr is set.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_FAIL_ALLOW_NAMESPACES", default_value = DEFAULT_ALLOW_NAMESPACES, value_delimiter = ',', action = clap::ArgAction::Append)]
    pub fail_allow_namespaces: Vec<String>,
    /// Regexes (substring match; anchor with ^$) for such namespaces. Ignored when
    /// --fail-cel-expr is set.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_FAIL_ALLOW_NAMESPACES_REGEX", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub fail_allow_namespaces_regex: Vec<String>,
    /// CEL expression over `annotations` (map) and `annotations_namespace_keys` (list):
    /// when set, the container fails exactly when it is true.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_FAIL_CEL_EXPR")]
    pub fail_cel_expr: Option<String>,
    /// Annotation keys holding the pod namespace (first present wins).
    #[arg(long, env = "RTHOOKS_OCI_HOOK_ANNOTATIONS_NAMESPACE_KEY", default_value = DEFAULT_NAMESPACE_KEYS, value_delimiter = ',', action = clap::ArgAction::Append)]
    pub annotations_namespace_key: Vec<String>,
    /// Log file (JSON lines, size-rotated).
    #[arg(long, env = "RTHOOKS_OCI_HOOK_LOG_FNAME", default_value = DEFAULT_LOG_FNAME)]
    pub log_fname: PathBuf,
    /// debug, info, warn or error.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Rotate the log at this many MiB.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_LOG_MAX_SIZE", default_value_t = 10)]
    pub log_max_size: u64,
    /// Rotated logs to keep.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_LOG_MAX_BACKUPS", default_value_t = 3)]
    pub log_max_backups: u32,
    /// Do not contact the agent; only log what would be sent.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_DISABLE_GRPC", num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub disable_grpc: bool,
    /// Print the effective configuration (JSON, usable as the config file) and exit.
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub just_print_config: bool,
    /// Never refuse a container, whatever the failure.
    #[arg(long, env = "RTHOOKS_OCI_HOOK_FAIL_OPEN", num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set)]
    pub fail_open: bool,
    /// Configuration file (default: rthooks-oci-hook.json beside the binary).
    #[arg(long, env = "RTHOOKS_OCI_HOOK_CONFIG")]
    pub config_file: Option<PathBuf>,
}

/// The effective configuration, as printed by `--just-print-config`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    pub grpc_address: String,
    #[serde(serialize_with = "ser_duration")]
    pub grpc_timeout: Duration,
    pub fail_allow_namespaces: Vec<String>,
    pub fail_allow_namespaces_regex: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_cel_expr: Option<String>,
    pub annotations_namespace_key: Vec<String>,
    pub log_fname: PathBuf,
    pub log_level: String,
    pub log_max_size: u64,
    pub log_max_backups: u32,
    pub disable_grpc: bool,
    pub fail_open: bool,
    /// The file that was read, if any (not a flag).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// The result of parsing: the stage, the configuration, and non-fatal problems found in
/// it (logged with the invocation).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub stage: Option<String>,
    pub just_print_config: bool,
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Parses a hook command line; `Err` carries clap's error (help, version, bad flag).
pub fn parse<I, T>(args: I) -> std::result::Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let m = HookArgs::command().try_get_matches_from(args)?;
    let a = HookArgs::from_arg_matches(&m)?;
    let mut warnings = Vec::new();
    let mut config = Config {
        grpc_address: a.grpc_address,
        grpc_timeout: a.grpc_timeout,
        fail_allow_namespaces: clean(a.fail_allow_namespaces),
        fail_allow_namespaces_regex: clean(a.fail_allow_namespaces_regex),
        fail_cel_expr: a.fail_cel_expr.filter(|s| !s.trim().is_empty()),
        annotations_namespace_key: clean(a.annotations_namespace_key),
        log_fname: a.log_fname,
        log_level: a.log_level,
        log_max_size: a.log_max_size,
        log_max_backups: a.log_max_backups,
        disable_grpc: a.disable_grpc,
        fail_open: a.fail_open,
        config_file: None,
    };
    let (path, explicit) = match a.config_file {
        Some(p) => (Some(p), true),
        None => (default_config_path(), false),
    };
    if let Some(path) = path {
        match std::fs::read(&path) {
            Ok(bytes) => match apply_file(&mut config, &m, &bytes) {
                Ok(w) => {
                    warnings.extend(w.into_iter().map(|w| format!("{}: {w}", path.display())));
                    config.config_file = Some(path);
                }
                Err(e) => warnings.push(format!("ignoring config file {}: {e}", path.display())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
            Err(e) => warnings.push(format!("ignoring config file {}: {e}", path.display())),
        }
    }
    Ok(Parsed {
        stage: a.stage,
        just_print_config: a.just_print_config,
        config,
        warnings,
    })
}

fn clean(v: Vec<String>) -> Vec<String> {
    v.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `rthooks-oci-hook.json` in the directory of the (symlink-resolved) running binary.
pub fn default_config_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    Some(exe.parent()?.join(CONFIG_FILE_NAME))
}

fn from_flag_or_env(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
    )
}

/// Applies a JSON config file to the values that neither a flag nor the environment set.
/// Returns warnings (unknown keys).
pub fn apply_file(config: &mut Config, m: &ArgMatches, bytes: &[u8]) -> Result<Vec<String>> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::Config(e.to_string()))?;
    let Value::Object(obj) = v else {
        return Err(Error::Config("not a JSON object".into()));
    };
    let mut warnings = Vec::new();
    // Building clap's command is not free: once, not per key.
    let ids: Vec<String> = HookArgs::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    for (key, val) in &obj {
        let id = key.replace('-', "_");
        let known = ids.contains(&id);
        if !known || matches!(id.as_str(), "stage" | "config_file" | "just_print_config") {
            warnings.push(format!("unknown key {key:?}"));
            continue;
        }
        if from_flag_or_env(m, &id) {
            continue;
        }
        let bad = |what: &str| Error::Config(format!("{key}: expected {what}"));
        match id.as_str() {
            "grpc_address" => config.grpc_address = as_str(val).ok_or_else(|| bad("a string"))?,
            "grpc_timeout" => {
                config.grpc_timeout = match val {
                    Value::Number(n) => n
                        .as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(Duration::from_secs_f64)
                        .ok_or_else(|| bad("a duration"))?,
                    _ => parse_duration(&as_str(val).ok_or_else(|| bad("a duration"))?)
                        .map_err(|e| Error::Config(format!("{key}: {e}")))?,
                }
            }
            "fail_allow_namespaces" => {
                config.fail_allow_namespaces = as_list(val).ok_or_else(|| bad("a list"))?
            }
            "fail_allow_namespaces_regex" => {
                config.fail_allow_namespaces_regex = as_list(val).ok_or_else(|| bad("a list"))?
            }
            "annotations_namespace_key" => {
                config.annotations_namespace_key = as_list(val).ok_or_else(|| bad("a list"))?
            }
            "fail_cel_expr" => {
                config.fail_cel_expr = as_str(val).filter(|s| !s.trim().is_empty());
            }
            "log_fname" => config.log_fname = as_str(val).ok_or_else(|| bad("a string"))?.into(),
            "log_level" => config.log_level = as_str(val).ok_or_else(|| bad("a string"))?,
            "log_max_size" => config.log_max_size = val.as_u64().ok_or_else(|| bad("a number"))?,
            "log_max_backups" => {
                config.log_max_backups = val
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad("a number"))?
            }
            "disable_grpc" => config.disable_grpc = as_bool(val).ok_or_else(|| bad("a boolean"))?,
            "fail_open" => config.fail_open = as_bool(val).ok_or_else(|| bad("a boolean"))?,
            _ => warnings.push(format!("unsupported key {key:?}")),
        }
    }
    Ok(warnings)
}

fn as_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A list given as a JSON array or a comma-separated string.
fn as_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(clean(s.split(',').map(str::to_owned).collect())),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(clean),
        _ => None,
    }
}

/// Parses a Go-style duration (`2s`, `1.5s`, `500ms`, `1m30s`, `250us`); a bare number is
/// seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return secs_to_duration(secs, s);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?} lacks a unit"))?;
        if num_end == 0 {
            return Err(format!("invalid duration {s:?}"));
        }
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}"))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            u => return Err(format!("unknown unit {u:?} in duration {s:?}")),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    secs_to_duration(total, s)
}

fn secs_to_duration(secs: f64, s: &str) -> std::result::Result<Duration, String> {
    if !secs.is_finite() || !(0.0..=86400.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way Go would for the common cases.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0s".into()
    } else if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1_000) {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

impl Config {
    /// Pretty JSON with keys = long flag names (the config file format).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Path of the config file for a given binary path.
pub fn config_path_for(binary: &Path) -> PathBuf {
    binary.with_file_name(CONFIG_FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Parsed {
        let mut v = vec!["rthooks-oci-hook"];
        v.extend_from_slice(args);
        // Point at a file that cannot exist so a stray config beside the test binary
        // does not leak in.
        v.extend_from_slice(&["--config-file", "/nonexistent/rthooks-oci-hook.json"]);
        parse(v).unwrap()
    }

    #[test]
    fn defaults() {
        let c = p(&["createRuntime"]);
        assert_eq!(c.stage.as_deref(), Some("createRuntime"));
        let c = c.config;
        assert_eq!(c.grpc_address, "unix:///run/rthooks/agent.sock");
        assert_eq!(c.grpc_timeout, Duration::from_secs(2));
        assert_eq!(c.fail_allow_namespaces, ["kube-system", "rthooks"]);
        assert!(c.fail_allow_namespaces_regex.is_empty());
        assert_eq!(
            c.annotations_namespace_key,
            [
                "io.kubernetes.pod.namespace",
                "io.kubernetes.cri.sandbox-namespace"
            ]
        );
        assert_eq!(c.log_fname, Path::new("/var/log/rthooks/oci-hook.log"));
        assert!(!c.disable_grpc && !c.fail_open);
    }

    #[test]
    fn tetragon_style_flags() {
        // Stage first, flags after: the order Tetragon's NRI plugin and hooks.d files use.
        let c = p(&[
            "createRuntime",
            "--log-fname",
            "/tmp/x.log",
            "--grpc-timeout=10s",
            "--fail-allow-namespaces",
            "a,b",
            "--fail-allow-namespaces",
            "c",
            "--fail-allow-namespaces-regex",
            "^team-.*$",
            "--disable-grpc",
            "--fail-cel-expr",
            "true",
        ]);
        let c = c.config;
        assert_eq!(c.grpc_timeout, Duration::from_secs(10));
        assert_eq!(c.fail_allow_namespaces, ["a", "b", "c"]);
        assert_eq!(c.fail_allow_namespaces_regex, ["^team-.*$"]);
        assert!(c.disable_grpc);
        assert_eq!(c.fail_cel_expr.as_deref(), Some("true"));
        let c = p(&["--disable-grpc=false", "--fail-allow-namespaces="]).config;
        assert!(!c.disable_grpc);
        assert!(c.fail_allow_namespaces.is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        for bad in ["", "s", "10x", "-1s", "1e400", "ms5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
    }

    #[test]
    fn file_fills_only_unset_values() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.json");
        std::fs::write(
            &f,
            r#"{"grpc-address":"unix:///tmp/a.sock","grpc-timeout":"300ms","fail-allow-namespaces":["x"],
                "fail-open":true,"log-level":"debug","bogus":1}"#,
        )
        .unwrap();
        let c = parse([
            "h",
            "createRuntime",
            "--config-file",
            f.to_str().unwrap(),
            "--log-level",
            "error",
        ])
        .unwrap();
        assert_eq!(c.config.grpc_address, "unix:///tmp/a.sock");
        assert_eq!(c.config.grpc_timeout, Duration::from_millis(300));
        assert_eq!(c.config.fail_allow_namespaces, ["x"]);
        assert!(c.config.fail_open);
        assert_eq!(c.config.log_level, "error", "the flag wins over the file");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        // Printed config reads back as a config file with the same meaning.
        let printed = c.config.to_json();
        std::fs::write(&f, &printed).unwrap();
        let again = parse(["h", "--config-file", f.to_str().unwrap()]).unwrap();
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
        let mut want = c.config.clone();
        want.config_file = again.config.config_file.clone();
        assert_eq!(again.config, want);
    }

    #[test]
    fn broken_file_is_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.json");
        std::fs::write(&f, "{not json").unwrap();
        let c = parse(["h", "--config-file", f.to_str().unwrap()]).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.config.grpc_timeout, Duration::from_secs(2));
    }
}
