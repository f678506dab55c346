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
    #[error("agent at {address}: {reason}")]
    Agent { address: String, reason: String },
    #[error("agent at {address} did not answer within {timeout_ms} ms")]
    AgentTimeout { address: String, timeout_ms: u128 },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid fail CEL expression {expr:?}: {reason}")]
    Cel { expr: String, reason: String },
    #[error("invalid namespace regex {regex:?}: {reason}")]
    Regex { regex: String, reason: String },
    #[error("{context}: {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    #[allow(dead_code)]
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }
}

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
