//! The agent's Kubernetes side: the connection ([`client`]: in a cluster through its
//! service account, or a `--kubeconfig`), and the sources of pod identity it keeps in
//! reflector stores (`pods`: this node's pods; `namespaces`: namespace labels).
//!
//! The sources take the resource they watch as a parameter ([`Resources`]): core/v1
//! `pods` and `namespaces` in production, Pod- and Namespace-shaped custom resources of a
//! test group where the test API server (which serves no core resources) stands in.
pub mod client;

pub use client::{Connection, KubeArgs, KubeError, Resources};

/// Where a source's view of the API stands. Registrations fail fast unless it is
/// [`ApiState::Synced`]; readiness and metrics report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiState {
    /// Not listed yet since the agent started.
    Connecting,
    /// Listed, and the watch (or a probe after an error) reached the server since.
    Synced,
    /// The last list or watch failed; the store may be stale.
    Unreachable(String),
}

impl ApiState {
    pub fn is_synced(&self) -> bool {
        matches!(self, ApiState::Synced)
    }
}

impl std::fmt::Display for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiState::Connecting => f.write_str("not listed yet"),
            ApiState::Synced => f.write_str("synced"),
            ApiState::Unreachable(why) => write!(f, "unreachable: {why}"),
        }
    }
}
