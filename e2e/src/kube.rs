//! A Kubernetes API server for the guests' Kubernetes rows: etcd and the real
//! `apiextensions-apiserver` (built once by `cargo xtask setup` into the cache, which the
//! guests see through the host root) on loopback, started by `rthooks-testkit`. It serves
//! no core resources, so pods and namespaces are custom resources of the test group
//! [`GROUP`], which the agent is pointed at with `--kube-core-group` (DESIGN.md), beside
//! the policy CRDs of `deploy/crds/`.
//!
//! The pod objects carry the labels; the CRI sandboxes carry none, and the paths these
//! rows run on (containerd's base spec, CRI-O's hooks.d) forward no labels annotation, so
//! whatever selects a container by its labels came from the API.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use rthooks_testkit::apiserver::{namespace_crd, pod_crd, TestApiServer};
use serde_json::json;

use crate::timing::secs;

/// The group serving the Pod- and Namespace-shaped test resources.
pub const GROUP: &str = "core.test.rthooks.io";
/// The agent's `kube::client::TEST_NAMESPACES`: the Namespace-shaped resource's plural
/// outside the core group.
const TEST_NAMESPACES: &str = "testnamespaces";
/// This node's name, for `--node-name` and the pods' `spec.nodeName`.
pub const NODE: &str = "rthooks-guest";

/// The running server, shared by every stack of one guest run (it starts in ~1 min
/// under TCG; the objects of each scenario have names of their own).
pub struct Cluster {
    server: TestApiServer,
    client: kube::Client,
}

/// Why this guest cannot have an API server (a skip), when it cannot.
pub fn unavailable() -> Option<String> {
    rthooks_testkit::apiserver::unavailable()
}

impl Cluster {
    /// Starts etcd and the server, the audit log at `audit_log`, and installs the test
    /// group's CRDs and the policy CRDs (Established before this returns).
    pub async fn start(audit_log: &Path) -> Result<Arc<Self>> {
        let server = TestApiServer::start(audit_log)
            .await
            .context("starting etcd and apiextensions-apiserver")?;
        let mut crds = vec![pod_crd(GROUP), namespace_crd(GROUP, TEST_NAMESPACES)];
        crds.extend(rthooks_policy::resources::crds());
        server
            .install_crds(&crds)
            .await
            .context("installing the CRDs")?;
        let client = server.client().await?;
        Ok(Arc::new(Cluster { server, client }))
    }

    fn pods(&self, namespace: &str) -> Api<DynamicObject> {
        let resource = ApiResource {
            group: GROUP.into(),
            version: "v1".into(),
            api_version: format!("{GROUP}/v1"),
            kind: "Pod".into(),
            plural: "pods".into(),
        };
        Api::namespaced_with(self.client.clone(), namespace, &resource)
    }

    /// Creates pod `namespace/name` on this node with `labels`; returns the UID the server
    /// gave it (the CRI sandbox must carry the same one).
    pub async fn create_pod(
        &self,
        namespace: &str,
        name: &str,
        labels: serde_json::Value,
    ) -> Result<String> {
        let pod: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "localhost/busybox:1"}]},
        }))?;
        let created = self
            .pods(namespace)
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        created
            .metadata
            .uid
            .context("the server gave the pod no UID")
    }

    /// Merges `labels` into the pod's (a `null` value removes that label).
    pub async fn patch_labels(
        &self,
        namespace: &str,
        name: &str,
        labels: serde_json::Value,
    ) -> Result<()> {
        let patch = Patch::Merge(json!({"metadata": {"labels": labels}}));
        self.pods(namespace)
            .patch(name, &PatchParams::default(), &patch)
            .await
            .with_context(|| format!("patching pod {namespace}/{name}"))?;
        Ok(())
    }

    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<()> {
        self.pods(namespace)
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Creates the `RuntimePolicy` (cluster-wide) of the policy document `yaml`.
    pub async fn create_runtime_policy(&self, yaml: &str) -> Result<()> {
        let [policy] = <[_; 1]>::try_from(rthooks_policy::parse_policies(yaml)?)
            .map_err(|p| anyhow::anyhow!("one policy document wanted, got {}", p.len()))?;
        let resource = rthooks_policy::RuntimePolicy::new(&policy.metadata.name, policy.spec);
        Api::<rthooks_policy::RuntimePolicy>::all(self.client.clone())
            .create(&PostParams::default(), &resource)
            .await
            .with_context(|| format!("creating RuntimePolicy {}", policy.metadata.name))?;
        Ok(())
    }

    pub async fn delete_runtime_policy(&self, name: &str) -> Result<()> {
        Api::<rthooks_policy::RuntimePolicy>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting RuntimePolicy {name}"))?;
        Ok(())
    }

    /// The server's log, for a failure's detail.
    pub fn log(&self) -> String {
        self.server.log()
    }
}

/// What a stack's agent needs to use the cluster: the flags, and the metrics address whose
/// `/readyz` says when its pod store has listed.
#[derive(Clone)]
pub struct AgentApi {
    pub cluster: Arc<Cluster>,
    metrics: String,
}

impl AgentApi {
    pub fn new(cluster: Arc<Cluster>) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Ok(AgentApi {
            cluster,
            metrics: format!("127.0.0.1:{port}"),
        })
    }

    /// The agent's flags: this server, this node, the test group; no trusted labels
    /// annotation (labels come from the API only).
    pub fn agent_flags(&self) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", self.cluster.server.kubeconfig.display()),
            format!("--node-name={NODE}"),
            format!("--kube-core-group={GROUP}"),
            // The default 500 ms is a node's; a TCG guest is an order of magnitude slower.
            format!("--pod-label-wait={}s", secs(1).as_secs().max(1)),
            format!("--metrics-address={}", self.metrics),
        ]
    }

    /// Waits until the agent's `/readyz` answers 200 (its pod and namespace stores listed).
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + secs(30);
        loop {
            let answer = readyz(&self.metrics);
            if answer.as_ref().is_some_and(|(ok, _)| *ok) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the agent was not ready within {:?}: {:?}",
                    secs(30),
                    answer.map(|(_, body)| body)
                );
            }
            // Polling the agent's readiness with a deadline: it has no notification.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `(200?, body)` of the agent's `/readyz`, or None while nothing answers.
fn readyz(address: &str) -> Option<(bool, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.contains(" 200 "), body.to_string()))
}
