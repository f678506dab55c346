//! The connection to the Kubernetes API: whether the agent uses one, and the client.
//!
//! On when the agent runs in a cluster (the service account's environment and token, as a
//! DaemonSet pod has them) or is given `--kubeconfig`; off otherwise, and then labels are
//! what a registration request carries. A developer's `~/.kube/config` or `$KUBECONFIG`
//! never switches it on by accident: only the agent's own flag does.
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::core::{ApiResource, GroupVersionKind};

/// The service account's token as the kubelet mounts it into a pod.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Set in every pod's environment by the kubelet.
const SERVICE_HOST_ENV: &str = "KUBERNETES_SERVICE_HOST";

/// The agent's Kubernetes flags (part of [`crate::AgentConfig`]).
#[derive(clap::Args, Debug, Clone)]
pub struct KubeArgs {
    /// Kubeconfig for the Kubernetes API (pod labels, namespace labels). Without it the
    /// API is used when the agent runs in a cluster (KUBERNETES_SERVICE_HOST and the
    /// service account token); otherwise labels come only from registration requests.
    #[arg(long, env = "RTHOOKS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name: only pods with spec.nodeName equal to it are watched. Needed when
    /// the API is used (a DaemonSet sets NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// How long a registration without trusted labels waits for its pod to appear in the
    /// agent's pod store before failing (the hook's failure rule then decides). While the
    /// API is unreachable or not yet listed, registrations fail at once instead.
    #[arg(long, env = "RTHOOKS_POD_LABEL_WAIT", default_value = "500ms", value_parser = crate::config::parse_duration)]
    pub pod_label_wait: Duration,

    /// API group (version v1) serving pods and namespaces; empty = the core group. Tests
    /// point it at Pod- and Namespace-shaped custom resources (e.g. core.test.rthooks.io,
    /// resources `pods` and `testnamespaces`) on a server that serves no core resources.
    #[arg(long, env = "RTHOOKS_KUBE_CORE_GROUP", default_value = "")]
    pub kube_core_group: String,

    /// Report deny and kill as Kubernetes Events on the pod (events.k8s.io, reason
    /// ExecDenied/ExecKilled), so that `kubectl describe pod` shows why an exec failed.
    /// Needs create and patch on events.k8s.io events.
    #[arg(long, env = "RTHOOKS_KUBE_EVENTS")]
    pub kube_events: bool,

    /// With --kube-events: at most one Event request per (pod, container, action,
    /// binary, policies) within this interval; repeats within it are only counted
    /// (rthooks_kube_events_total{result="suppressed"}).
    #[arg(long, env = "RTHOOKS_KUBE_EVENTS_INTERVAL", default_value = "1m", value_parser = crate::config::parse_duration)]
    pub kube_events_interval: Duration,
}

/// How the agent reaches the API, if at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    Off,
    InCluster,
    Kubeconfig(PathBuf),
}

impl KubeArgs {
    /// The connection these flags and the environment call for.
    pub fn connection(&self) -> Connection {
        match &self.kubeconfig {
            Some(path) => Connection::Kubeconfig(path.clone()),
            None if in_cluster(
                std::env::var_os(SERVICE_HOST_ENV).is_some(),
                Path::new(SERVICE_ACCOUNT_TOKEN),
            ) =>
            {
                Connection::InCluster
            }
            None => Connection::Off,
        }
    }

    /// The resources the pod and namespace sources watch.
    pub fn resources(&self) -> Resources {
        Resources::in_group(&self.kube_core_group)
    }
}

fn in_cluster(service_host_set: bool, token: &Path) -> bool {
    service_host_set && token.exists()
}

/// The plural of the Namespace-shaped custom resource outside the core group.
pub const TEST_NAMESPACES: &str = "testnamespaces";

/// The resources the agent reads identity from.
#[derive(Clone, Debug)]
pub struct Resources {
    pub pods: ApiResource,
    pub namespaces: ApiResource,
}

impl Resources {
    /// core/v1 `pods` and `namespaces`.
    pub fn core() -> Resources {
        Resources::in_group("")
    }

    /// Kinds Pod and Namespace, version v1, of `group`: `pods` and `namespaces` in the core
    /// group; `pods` and `testnamespaces` in any other, because the API server reads
    /// `/apis/<group>/v1/namespaces/<name>` as the prefix of a namespace named `<name>`,
    /// so a custom resource called `namespaces` could be listed and watched but not
    /// changed by name.
    pub fn in_group(group: &str) -> Resources {
        let resource = |kind: &str, plural: &str| {
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
        };
        let namespaces = if group.is_empty() {
            "namespaces"
        } else {
            TEST_NAMESPACES
        };
        Resources {
            pods: resource("Pod", "pods"),
            namespaces: resource("Namespace", namespaces),
        }
    }
}

/// Why the API connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("the Kubernetes API is configured but this node's name is not: set --node-name or NODE_NAME")]
    NoNodeName,
}

/// The client for `connection`, or `None` when it is off.
pub async fn connect(connection: &Connection) -> Result<Option<kube::Client>, KubeError> {
    let config = match connection {
        Connection::Off => return Ok(None),
        Connection::InCluster => kube::Config::incluster().map_err(KubeError::InCluster)?,
        Connection::Kubeconfig(path) => {
            let kubeconfig_error = |source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(kubeconfig_error)?
        }
    };
    let mut config = config;
    // Names the agent in the API server's audit log (what its RBAC needs is read there).
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("rthooks-agent/", env!("CARGO_PKG_VERSION"))),
    ));
    kube::Client::try_from(config)
        .map(Some)
        .map_err(KubeError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        kube: KubeArgs,
    }

    #[test]
    fn on_with_a_kubeconfig_or_in_a_cluster_only() {
        let f = Flags::parse_from(["x", "--kubeconfig=/k", "--node-name=n1"]);
        assert_eq!(f.kube.connection(), Connection::Kubeconfig("/k".into()));
        assert_eq!(f.kube.node_name.as_deref(), Some("n1"));
        assert_eq!(f.kube.pod_label_wait, Duration::from_millis(500));
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        assert!(!in_cluster(true, &token), "no token, no cluster");
        std::fs::write(&token, "t").unwrap();
        assert!(!in_cluster(false, &token), "no service host, no cluster");
        assert!(in_cluster(true, &token));
    }

    #[test]
    fn the_resources_are_core_v1_unless_a_test_group_is_given() {
        let core = Resources::core();
        assert_eq!(core.pods.api_version, "v1");
        assert_eq!(core.pods.plural, "pods");
        assert_eq!(core.namespaces.kind, "Namespace");
        let test = Resources::in_group("core.test.rthooks.io");
        assert_eq!(test.pods.api_version, "core.test.rthooks.io/v1");
        assert_eq!(test.namespaces.plural, TEST_NAMESPACES);
    }
}
