//! The library's one error type.
use std::path::PathBuf;

/// Everything that can go wrong while handling one hook invocation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the OCI state from stdin: {0}")]
    StdinRead(#[source] std::io::Error),
    #[error("the OCI state on stdin is not valid JSON: {0}")]
    StateJson(String),
    #[error("{}", no_config_message(bundle.as_deref(), cwd.as_deref()))]
    NoConfig {
        bundle: Option<PathBuf>,
        cwd: Option<PathBuf>,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is not a valid OCI runtime spec: {reason}")]
    SpecJson { path: PathBuf, reason: String },
    #[error("the spec has no linux.cgroupsPath")]
    NoCgroupsPath,
    #[error("unsupported cgroupsPath {path:?}: {reason}")]
    CgroupsPath { path: String, reason: String },
    #[error("agent at {address}: {source}")]
    Agent {
        address: String,
        #[source]
        source: rthooks_grpc_client::CallError,
    },
    #[error("agent at {address}: undecodable {method} response: {source}")]
    AgentResponse {
        address: String,
        method: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("agent at {address} did not answer within {timeout_ms} ms")]
    AgentTimeout { address: String, timeout_ms: u128 },
    #[error("invalid fail CEL expression {expr:?}: {reason}")]
    Cel { expr: String, reason: String },
    #[error("invalid namespace regex {regex:?}: {reason}")]
    Regex { regex: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn no_config_message(bundle: Option<&std::path::Path>, cwd: Option<&std::path::Path>) -> String {
    match (bundle, cwd) {
        (Some(b), _) => format!("no config.json in the bundle {}", b.display()),
        (None, Some(c)) => format!(
            "the runtime passed no bundle and the working directory {} has no config.json \
             (looked for config.json, ../config.json, ../userdata/config.json)",
            c.display()
        ),
        (None, None) => "the runtime passed no bundle and the working directory is unknown".into(),
    }
}
