//! gRPC protocol crates for rthooks.
//!
//! * [`tetragon`]: `tetragon.FineGuidanceSensors/RuntimeHook`, wire compatible with
//!   Tetragon (same package, names and field numbers), spoken by the OCI hook.
//! * [`v1`]: the agent's own `rthooks.v1.Agent` service (status, containers, policies,
//!   events) used by `rthooksctl`.
//!
//! Without features only the messages are built (prost, no tonic); `client` adds the tonic
//! clients and [`client::connect_unix`], `server` the service traits and servers.

pub mod tetragon {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/tetragon.rs"));
}

/// Nested as the proto package is (`rthooks.v1`), so that generated cross-package paths
/// (`super::super::tetragon`) resolve.
pub mod rthooks {
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/rthooks.v1.rs"));
    }
}
pub use rthooks::v1;

/// The agent's default socket.
pub const DEFAULT_AGENT_ADDRESS: &str = "unix:///run/rthooks/agent.sock";
/// Annotation carrying the pod's labels as a JSON object (set by our NRI plugin); its home
/// is the container model.
pub use rthooks_container::POD_LABELS_ANNOTATION;

/// The socket path of an address in `unix:///path`, `unix:/path` or `/path` form.
pub fn socket_path(address: &str) -> Option<std::path::PathBuf> {
    let path = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
        .unwrap_or(address);
    path.starts_with('/')
        .then(|| std::path::PathBuf::from(path))
}

#[cfg(feature = "client")]
pub mod client {
    //! Dialing the agent over a UNIX socket (`unix:///path` or a bare path).
    use std::path::PathBuf;
    use std::time::Duration;

    use tonic::transport::{Channel, Endpoint, Uri};

    pub use crate::socket_path;

    /// A channel to the agent's UNIX socket; connects lazily on first use unless
    /// `connect_timeout` is given, in which case it connects now.
    pub async fn connect_unix(
        address: &str,
        connect_timeout: Duration,
    ) -> Result<Channel, tonic::transport::Error> {
        let path = socket_path(address).unwrap_or_else(|| PathBuf::from(address));
        // The URI is required by the API but unused: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(connect_timeout);
        endpoint.connect_with_connector(tower_service(path)).await
    }

    fn tower_service(
        path: PathBuf,
    ) -> impl tower::Service<
        Uri,
        Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone {
        tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })
    }
}
