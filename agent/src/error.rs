//! The agent library's one error type. Each variant maps to a gRPC status in `server`.
//!
//! Variants that wrap another error keep it as their `source` and also print it: the
//! message reaches users through logs and gRPC statuses, which show one line.
use std::path::PathBuf;

use aya::maps::MapError;
use aya::pin::PinError;
use aya::programs::ProgramError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("cgroup {path:?}: {reason}")]
    Cgroup { path: String, reason: String },
    /// A policy document that does not parse or is not valid (`rthooks_policy`).
    #[error(transparent)]
    Policy(#[from] rthooks_policy::Error),
    #[error("policy {0} not found")]
    PolicyNotFound(String),
    #[error("policy {0} comes from a file; change or remove the file instead")]
    PolicyFromFile(String),
    #[error("all {0} policy slots are in use")]
    NoPolicySlot(usize),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("this agent was built without its eBPF object (AYA_BUILD_SKIP?)")]
    NoObject,
    #[error("the eBPF object has no {what} {name}")]
    NotInObject {
        what: &'static str,
        name: &'static str,
    },
    #[error("loading the eBPF object (if a pinned map in {} has an older layout, remove the directory): {source}", pin_dir.display())]
    LoadObject {
        pin_dir: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("{} is not on a BPF file system (mount -t bpf bpf /sys/fs/bpf)", .0.display())]
    NotBpffs(PathBuf),
    #[error("reading kernel BTF: {0}")]
    KernelBtf(#[from] aya::BtfError),
    /// Our own BTF reader (`btf`) found the data malformed or a type missing.
    #[error("BTF: {0}")]
    Btf(String),
    /// The kernel refused to load a program; `log` is the verifier's output, shortened.
    #[error("loading {program}: the kernel refused it ({source}); verifier output:\n{log}")]
    Verifier {
        program: &'static str,
        log: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} {program}: {source}")]
    Program {
        step: &'static str,
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("{mode} mode requested but unavailable: {reason}")]
    ModeUnavailable { mode: &'static str, reason: String },
    /// The program attached, but nothing can keep it attached once the agent exits.
    #[error(
        "{program} attached but cannot be pinned: {why}, so enforcement would stop with the agent"
    )]
    Unpinnable {
        program: &'static str,
        why: &'static str,
    },
    #[error("--grpc-address {0:?} is not unix:///absolute/path")]
    GrpcAddress(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// A registration without trusted labels got none from the Kubernetes API.
    #[error(transparent)]
    PodLabels(#[from] crate::kube::pods::LabelError),
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
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

    /// A failed program step; a verifier refusal keeps only the head and the end of its
    /// log (it runs to megabytes, and the reason is at the end).
    pub fn program(
        step: &'static str,
        program: &'static str,
    ) -> impl FnOnce(ProgramError) -> Error {
        move |e| match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => Error::Verifier {
                program,
                log: shorten_log(&verifier_log.to_string()),
                source: io_error,
            },
            source => Error::Program {
                step,
                program,
                source,
            },
        }
    }

    pub fn map(map: &'static str) -> impl Fn(MapError) -> Error {
        move |source| Error::Map { map, source }
    }
}

fn shorten_log(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() > 40 {
        format!(
            "{}\n  [... {} lines ...]\n{}",
            lines[..5].join("\n"),
            lines.len() - 25,
            lines[lines.len() - 20..].join("\n")
        )
    } else {
        text.to_string()
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        let msg = e.to_string();
        match e {
            Error::InvalidRequest(_) | Error::Policy(_) => tonic::Status::invalid_argument(msg),
            Error::Cgroup { .. } => tonic::Status::failed_precondition(msg),
            Error::PodLabels(_) => tonic::Status::unavailable(msg),
            Error::PolicyNotFound(_) => tonic::Status::not_found(msg),
            Error::PolicyFromFile(_) => tonic::Status::failed_precondition(msg),
            Error::NoPolicySlot(_) => tonic::Status::resource_exhausted(msg),
            Error::Map { .. }
            | Error::NoObject
            | Error::NotInObject { .. }
            | Error::LoadObject { .. }
            | Error::NotBpffs(_)
            | Error::KernelBtf(_)
            | Error::Btf(_)
            | Error::Verifier { .. }
            | Error::Program { .. }
            | Error::Pin { .. }
            | Error::ModeUnavailable { .. }
            | Error::Unpinnable { .. }
            | Error::GrpcAddress(_)
            | Error::Bind { .. }
            | Error::Serve(_)
            | Error::Kube(_)
            | Error::Io { .. } => tonic::Status::internal(msg),
        }
    }
}
