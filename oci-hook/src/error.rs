//! The library's one error type.
use std::path::PathBuf;

/// Everything that can go wrong while handling one hook invocation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the OCI state from stdin: {0}")]
    StdinRead(#[source] std::io::Error),
    #[error("the OCI state on stdin is not valid JSON: {0}")]
    StateJson(#[source] JsonError),
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
    #[error("{path} is not a valid OCI runtime spec: {source}")]
    SpecJson {
        path: PathBuf,
        #[source]
        source: JsonError,
    },
    #[error("the spec has no linux.cgroupsPath")]
    NoCgroupsPath,
    #[error("unsupported {0}")]
    CgroupsPath(#[from] rthooks_container::CgroupsPathError),
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
    #[error("invalid fail CEL expression {expr:?}: {source}")]
    Cel {
        expr: String,
        #[source]
        source: CelError,
    },
    #[error("invalid namespace regex {regex:?}: {}", one_line(source))]
    Regex {
        regex: String,
        #[source]
        source: regex::Error,
    },
}

/// Why a JSON document the hook reads (the OCI state, the bundle's `config.json`) was
/// refused.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("{0}")]
    Syntax(#[from] serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
}

/// Why a `--fail-cel-expr` did not compile.
#[derive(Debug, thiserror::Error)]
pub enum CelError {
    #[error("{}", one_line(.0))]
    Parse(#[from] cel::ParseErrors),
    /// The third-party parser panicked on this input (caught: a bad expression must never
    /// crash the hook).
    #[error("the CEL parser crashed")]
    ParserCrashed,
}

/// Parser errors (regex, CEL) span lines, pointing at the column; the hook's log and the
/// runtime's error message hold one line per error.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().replace('\n', " ")
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// Each error built from another library's error keeps it as its source (a caller
    /// can walk the chain), and its message stays on one line (the hook's log and the
    /// runtime's error hold one line each).
    #[test]
    fn errors_keep_their_causes_on_one_line() {
        let errors = [
            crate::state::parse_state(b"{nope").unwrap_err(),
            Error::SpecJson {
                path: "/b/config.json".into(),
                source: crate::state::parse_spec(b"[1]").unwrap_err(),
            },
            Error::CgroupsPath(rthooks_container::CgroupsPath::parse("/a/../b").unwrap_err()),
            crate::policy::compile_cel("1 +").unwrap_err(),
        ];
        // Built at run time: clippy refuses an invalid regex literal.
        let unclosed = String::from("(");
        let errors = errors.into_iter().chain([Error::Regex {
            source: regex::Regex::new(&unclosed).unwrap_err(),
            regex: unclosed,
        }]);
        for e in errors {
            let message = e.to_string();
            assert!(e.source().is_some(), "{message}: no source");
            assert!(!message.contains('\n'), "{message:?} spans lines");
        }
    }
}
