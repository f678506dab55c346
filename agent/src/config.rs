//! The agent's configuration: flags, environment variables (`RTHOOKS_*`) and an optional
//! file (`--config`, JSON or YAML, keys = long flag names). Precedence: flag > env > file
//! > default.
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// "500ms", "2s", "1m" or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let v: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses flags, folding in the config file's keys where neither a flag nor its env var
/// gave a value.
pub fn parse_with_file<T: Parser>(
    args: Vec<OsString>,
    config_flag: &str,
    env: &str,
) -> anyhow::Result<T> {
    // Parse once as given, so --help, --version and flag errors behave as usual.
    T::try_parse_from(&args).unwrap_or_else(|e| e.exit());
    let file = config_path(&args, config_flag).or_else(|| std::env::var_os(env).map(PathBuf::from));
    let Some(file) = file else {
        return Ok(T::parse_from(args));
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| anyhow::anyhow!("config file {}: {e}", file.display()))?;
    let map =
        yaml_to_json(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", file.display()))?;
    let cmd = T::command();
    let mut from_file: Vec<OsString> = Vec::new();
    for (key, v) in map {
        let key = key.as_str();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key))
            .ok_or_else(|| {
                anyhow::anyhow!("config file {}: unknown key {key:?}", file.display())
            })?;
        let flag = format!("--{key}");
        let on_cli = args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == flag || a.starts_with(&format!("{flag}="))
        });
        let in_env = arg.get_env().is_some_and(|e| std::env::var_os(e).is_some());
        if on_cli || in_env {
            continue;
        }
        match v {
            Value::Bool(true) => from_file.push(flag.into()),
            Value::Bool(false) | Value::Null => {}
            Value::Array(items) => {
                for item in items {
                    from_file.push(format!("{flag}={}", scalar(&item)?).into());
                }
            }
            other => from_file.push(format!("{flag}={}", scalar(&other)?).into()),
        }
    }
    let mut all = vec![args[0].clone()];
    all.extend(from_file);
    all.extend(args.into_iter().skip(1));
    Ok(T::try_parse_from(all)?)
}

/// The config file's YAML as the JSON object the layered configuration takes (an empty
/// file is an empty object).
pub fn yaml_to_json(text: &str) -> Result<serde_json::Map<String, Value>, crate::yaml::Error> {
    let map: Option<serde_json::Map<String, Value>> = crate::yaml::from_str(text)?;
    Ok(map.unwrap_or_default())
}

fn scalar(v: &Value) -> anyhow::Result<String> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => anyhow::bail!("config value {other} is not a scalar"),
    })
}

fn config_path(args: &[OsString], flag: &str) -> Option<PathBuf> {
    let long = format!("--{flag}");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix(&format!("{long}=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("1h").is_err() && parse_duration("x").is_err());
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
    }
}
