//! The installers' one error type.
use std::path::PathBuf;

/// Everything that can stop an install or an uninstall.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `--hook-arg` the hook itself would refuse (or a failure rule that does not
    /// compile): caught at install time rather than by every container.
    #[error("invalid --hook-arg: {reason}")]
    HookArgs { reason: String },
    #[error("{} is not UTF-8", path.display())]
    NotUtf8 {
        path: PathBuf,
        #[source]
        source: std::string::FromUtf8Error,
    },
    #[error("{} is not valid TOML", path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: toml_edit::TomlError,
    },
    #[error("{what} is not valid JSON")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{} oci spec` failed: {stderr}", ctr.display())]
    Ctr { ctr: PathBuf, stderr: String },
    /// The files are not in a shape the installer may change (an unsupported containerd
    /// config version, a key that is not a table, a file edited since install, …).
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
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
