//! The agent library's one error type. Each variant maps to a gRPC status in `server`.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("cgroup {path:?}: {reason}")]
    Cgroup { path: String, reason: String },
    #[error("invalid policy: {0}")]
    InvalidPolicy(String),
    #[error("policy {0} not found")]
    PolicyNotFound(String),
    #[error("policy {0} comes from a file; change or remove the file instead")]
    PolicyFromFile(String),
    #[error("all {0} policy slots are in use")]
    NoPolicySlot(usize),
    #[error("map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("BPF: {0}")]
    Bpf(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let msg = e.to_string();
        match e {
            Error::InvalidRequest(_) | Error::InvalidPolicy(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::Cgroup { .. } => tonic::Status::failed_precondition(msg),
            Error::PolicyNotFound(_) => tonic::Status::not_found(msg),
            Error::PolicyFromFile(_) => tonic::Status::failed_precondition(msg),
            Error::NoPolicySlot(_) => tonic::Status::resource_exhausted(msg),
            Error::Map { .. } | Error::Bpf(_) | Error::Io { .. } => tonic::Status::internal(msg),
        }
    }
}
