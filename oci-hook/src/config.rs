//! Hook configuration: flags (Tetragon's hook flags, same meaning), environment variables
//! (`RTHOOKS_OCI_HOOK_<FLAG>`), then `rthooks-oci-hook.json` beside the binary (keys = long
//! flag names), then our defaults.
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use rthooks_config::{format_duration, parse_duration, ConfigFile, Layers};

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
    /// Deadline for the whole agent call (Go duration: 2s, 500ms, 1m30s).
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
///
/// A config file problem never fails the hook: it becomes a warning, and the keys that
/// could not be used are left out (the rest of the file applies).
pub fn parse<I, T>(args: I) -> std::result::Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let layers = Layers::<HookArgs>::parse(args)?;
    let mut warnings = Vec::new();
    let (path, explicit) = match &layers.value().config_file {
        Some(p) => (Some(p.clone()), true),
        None => (default_config_path(), false),
    };
    let file = path.and_then(|path| match ConfigFile::read_json(&path) {
        Ok(f) => Some(f),
        Err(e) if e.is_not_found() && !explicit => None,
        Err(e) => {
            warnings.push(format!("ignoring {}", error_chain(&e)));
            None
        }
    });
    let (a, config_file) = match file {
        Some(file) => {
            let layered = layers.with_file(&file, NOT_IN_FILE);
            warnings.extend(
                layered
                    .problems
                    .iter()
                    .map(|p| format!("{}: {p}", file.path.display())),
            );
            (layered.value, Some(file.path))
        }
        None => (layers.into_value(), None),
    };
    let config = Config {
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
        config_file,
    };
    Ok(Parsed {
        stage: a.stage,
        just_print_config: a.just_print_config,
        config,
        warnings,
    })
}

/// Flags that make no sense in the file: the file's own path, and what only one
/// invocation can ask for.
const NOT_IN_FILE: &[&str] = &["config_file", "just_print_config"];

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

fn clean(v: Vec<String>) -> Vec<String> {
    v.into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// `rthooks-oci-hook.json` in the directory of the (symlink-resolved) running binary.
pub fn default_config_path() -> Option<PathBuf> {
    rthooks_config::beside_binary(CONFIG_FILE_NAME)
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
        // The shared Go syntax (rthooks-config tests it in full), hours included.
        let c = p(&["--grpc-timeout", "1m30s"]).config;
        assert_eq!(c.grpc_timeout, Duration::from_secs(90));
        assert_eq!(
            p(&["--grpc-timeout=1.5"]).config.grpc_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(
            p(&["--grpc-timeout=1h"]).config.grpc_timeout,
            Duration::from_secs(3600)
        );
        for bad in ["", "s", "10x", "-1s", "1e400", "ms5"] {
            let mut v = vec!["h", "--grpc-timeout", bad];
            v.extend_from_slice(&["--config-file", "/nonexistent/rthooks-oci-hook.json"]);
            assert!(parse(v).is_err(), "{bad}");
        }
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
        assert_eq!(c.config.config_file, None);
        // A bad value costs its key only, with the reason; the rest of the file applies.
        std::fs::write(
            &f,
            r#"{"grpc-timeout":"2d","log-max-backups":-1,"just-print-config":true,"log-level":"debug"}"#,
        )
        .unwrap();
        let c = parse(["h", "--config-file", f.to_str().unwrap()]).unwrap();
        assert_eq!(c.warnings.len(), 3, "{:?}", c.warnings);
        assert!(
            c.warnings.iter().any(|w| w.contains("unknown unit \"d\"")),
            "{:?}",
            c.warnings
        );
        assert_eq!(c.config.grpc_timeout, Duration::from_secs(2));
        assert_eq!(c.config.log_max_backups, 3);
        assert!(!c.just_print_config);
        assert_eq!(c.config.log_level, "debug");
        // An explicitly named file that is missing is worth a warning; the default one not.
        let c = parse(["h", "--config-file", "/nonexistent/c.json"]).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("No such file"), "{:?}", c.warnings);
    }
}
