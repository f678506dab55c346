//! The agent's configuration: flags, environment variables (`RTHOOKS_*`) and an optional
//! file (`--config`, JSON or YAML, keys = long flag names). Precedence: flag > env > file
//! > default.
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use rthooks_config::{ConfigFile, Layers};
use serde_json::Value;

use crate::bpf::RequestedMode;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "rthooks-agent",
    version,
    // A flag given twice (e.g. by a config file and a wrapper) takes its last value.
    args_override_self = true,
    about = "rthooks node agent: registers containers from the OCI hook into eBPF maps and enforces runtime policies in the kernel",
    long_about = "rthooks node agent.\n\nLoads and pins the eBPF filter (LSM, or tracepoint + SIGKILL where LSM programs cannot run), \
serves the Tetragon-compatible RuntimeHook gRPC method that rthooks-oci-hook calls while a container is created, \
resolves each container's cgroup and identity, and keeps the BPF maps in step with policies from --policy-dir \
and the API. Programs stay attached (pinned) when the agent exits; `rthooks-agent --unpin` removes them."
)]
pub struct AgentConfig {
    /// Configuration file (JSON or YAML; keys are long flag names, e.g. "policy-dir").
    #[arg(long, env = "RTHOOKS_CONFIG")]
    pub config: Option<PathBuf>,

    /// gRPC socket (unix:///path). Created with mode 0600.
    #[arg(long, env = "RTHOOKS_GRPC_ADDRESS", default_value = rthooks_api::DEFAULT_AGENT_ADDRESS)]
    pub grpc_address: String,

    /// Extra peer uids allowed on the socket (root and the agent's own uid always are).
    #[arg(long, env = "RTHOOKS_ALLOW_UIDS", value_delimiter = ',')]
    pub allow_uids: Vec<u32>,

    /// bpffs directory for pinned maps and links.
    #[arg(
        long,
        env = "RTHOOKS_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/rthooks"
    )]
    pub bpf_pin_dir: PathBuf,

    /// Directory of policy YAML files (watched).
    #[arg(
        long,
        env = "RTHOOKS_POLICY_DIR",
        default_value = "/etc/rthooks/policies"
    )]
    pub policy_dir: PathBuf,

    /// How often the policy directory is re-read for changes.
    #[arg(long, env = "RTHOOKS_POLICY_POLL", default_value = "1s", value_parser = parse_duration)]
    pub policy_poll: Duration,

    /// Where the agent keeps container identities and policy slots across restarts.
    #[arg(long, env = "RTHOOKS_STATE_DIR", default_value = "/var/lib/rthooks")]
    pub state_dir: PathBuf,

    /// Enforcement mode.
    #[arg(long, env = "RTHOOKS_ENFORCEMENT", value_enum, default_value = "auto")]
    pub enforcement: RequestedMode,

    /// Believe the rthooks.io/pod-labels annotation. Only safe where the NRI plugin always
    /// overwrites it; otherwise a pod could choose its own labels.
    #[arg(long, env = "RTHOOKS_TRUST_LABEL_ANNOTATION")]
    pub trust_label_annotation: bool,

    /// cgroup v2 mount point (default: found in /proc/self/mountinfo).
    #[arg(long, env = "RTHOOKS_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Write events as JSON lines to this file ("-" for stdout).
    #[arg(long, env = "RTHOOKS_EVENTS_FILE")]
    pub events_file: Option<PathBuf>,

    /// Serve Prometheus metrics, /healthz and /readyz on this address (e.g. 127.0.0.1:9810).
    #[arg(long, env = "RTHOOKS_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,

    /// How often containers whose cgroup disappeared are dropped.
    #[arg(long, env = "RTHOOKS_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// Log format.
    #[arg(long, env = "RTHOOKS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "rthooks_agent=debug").
    #[arg(long, env = "RTHOOKS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Remove every pinned program and map under --bpf-pin-dir and exit (stops enforcement).
    #[arg(long)]
    pub unpin: bool,

    #[command(flatten)]
    pub kube: crate::kube::KubeArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub use rthooks_config::parse_duration;

/// Why the configuration could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(transparent)]
    File(#[from] rthooks_config::FileError),
    /// The file is not YAML (JSON is YAML too) or not a mapping.
    #[error("config file {} is not a YAML or JSON mapping", path.display())]
    Yaml {
        /// The file.
        path: PathBuf,
        /// The cause (boxed: serde-saphyr's error is large).
        #[source]
        source: Box<crate::yaml::Error>,
    },
    /// Keys of the file that cannot be used; the agent refuses to start on any.
    #[error("config file {}: {}", path.display(), problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Keys {
        /// The file.
        path: PathBuf,
        /// Each unusable key.
        problems: Vec<rthooks_config::KeyProblem>,
    },
}

/// Parses flags and environment, then fills in the values neither gave from the config
/// file (`config_flag`, whose env variable is `env`), JSON or YAML. `--help`, `--version`
/// and flag errors exit as usual; every key of the file must be usable.
pub fn parse_with_file<T: Parser>(
    args: Vec<OsString>,
    config_flag: &str,
    env: &str,
) -> Result<T, ConfigError> {
    let layers = Layers::<T>::parse(&args).unwrap_or_else(|e| e.exit());
    let file = layers
        .matches()
        .try_get_one::<PathBuf>(config_flag)
        .ok()
        .flatten()
        .cloned()
        .or_else(|| std::env::var_os(env).map(PathBuf::from));
    let Some(path) = file else {
        return Ok(layers.into_value());
    };
    let text =
        std::fs::read_to_string(&path).map_err(|source| rthooks_config::FileError::Read {
            path: path.clone(),
            source,
        })?;
    let values = yaml_to_json(&text).map_err(|source| ConfigError::Yaml {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let layered = layers.with_file(
        &ConfigFile {
            path: path.clone(),
            values,
        },
        &[],
    );
    if !layered.problems.is_empty() {
        return Err(ConfigError::Keys {
            path,
            problems: layered.problems,
        });
    }
    Ok(layered.value)
}

/// The config file's YAML as the JSON object the layered configuration takes (an empty
/// file is an empty object).
pub fn yaml_to_json(text: &str) -> Result<serde_json::Map<String, Value>, crate::yaml::Error> {
    let map: Option<serde_json::Map<String, Value>> = crate::yaml::from_str(text)?;
    Ok(map.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        // Go syntax everywhere now (the agent used to refuse hours and combinations).
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn config_yaml_becomes_a_json_object() {
        assert!(yaml_to_json("").unwrap().is_empty());
        assert!(yaml_to_json("# nothing set\n").unwrap().is_empty());
        let map = yaml_to_json(
            "policy-poll: 2s\nallow-uid: [1000, 1001]\ntrust-label-annotation: yes\nunpin: true\n",
        )
        .unwrap();
        assert_eq!(map["policy-poll"], "2s");
        assert_eq!(map["allow-uid"], serde_json::json!([1000, 1001]));
        // YAML 1.2: `yes` is a string, not a boolean, as it was with serde_yaml.
        assert_eq!(map["trust-label-annotation"], "yes");
        assert_eq!(map["unpin"], true);
        assert!(yaml_to_json("- not\n- a map\n").is_err());
        // JSON is YAML.
        assert_eq!(yaml_to_json(r#"{"unpin": false}"#).unwrap()["unpin"], false);
    }

    #[test]
    fn file_values_apply_unless_given_on_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.yaml");
        std::fs::write(
            &file,
            "policy-dir: /from/file\ntrust-label-annotation: true\nstate-dir: /file/state\n",
        )
        .unwrap();
        let args: Vec<OsString> = [
            "rthooks-agent",
            "--config",
            file.to_str().unwrap(),
            "--state-dir",
            "/cli/state",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let c: AgentConfig = parse_with_file(args, "config", "RTHOOKS_TEST_UNSET").unwrap();
        assert_eq!(c.policy_dir, PathBuf::from("/from/file"));
        assert_eq!(c.state_dir, PathBuf::from("/cli/state"));
        assert!(c.trust_label_annotation);

        std::fs::write(&file, "no-such-key: 1\n").unwrap();
        let args: Vec<OsString> = ["rthooks-agent", "--config", file.to_str().unwrap()]
            .iter()
            .map(OsString::from)
            .collect();
        let e = parse_with_file::<AgentConfig>(args, "config", "RTHOOKS_TEST_UNSET").unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");

        // JSON is read too; lists and bad values are checked as flags would be.
        std::fs::write(
            &file,
            r#"{"allow-uids": [5, 6], "policy-poll": "1h", "enforcement": "sigkill"}"#,
        )
        .unwrap();
        let args: Vec<OsString> = ["rthooks-agent", "--config", file.to_str().unwrap()]
            .iter()
            .map(OsString::from)
            .collect();
        let c: AgentConfig = parse_with_file(args.clone(), "config", "RTHOOKS_TEST_UNSET").unwrap();
        assert_eq!(c.allow_uids, [5, 6]);
        assert_eq!(c.policy_poll, Duration::from_secs(3600));
        assert_eq!(c.enforcement, RequestedMode::Sigkill);
        // The Kubernetes keys take the same layering.
        std::fs::write(
            &file,
            "kubeconfig: /etc/rthooks/kubeconfig\nnode-name: n7\npod-label-wait: 250ms\n",
        )
        .unwrap();
        let c: AgentConfig = parse_with_file(args.clone(), "config", "RTHOOKS_TEST_UNSET").unwrap();
        assert_eq!(
            c.kube.connection(),
            crate::kube::Connection::Kubeconfig("/etc/rthooks/kubeconfig".into())
        );
        assert_eq!(c.kube.node_name.as_deref(), Some("n7"));
        assert_eq!(c.kube.pod_label_wait, Duration::from_millis(250));
        std::fs::write(&file, "policy-poll: soon\n").unwrap();
        let e = parse_with_file::<AgentConfig>(args, "config", "RTHOOKS_TEST_UNSET").unwrap_err();
        assert!(e.to_string().contains("policy-poll: invalid value"), "{e}");
    }
}
