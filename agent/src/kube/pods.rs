//! This node's pods in a reflector store: the labels of registrations that carry no
//! trusted labels, label changes of running pods, pods deleted or missed while the watch
//! was broken, and containers that run without ever having been registered.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::DynamicObject;
use ::kube::core::ApiResource;
use ::kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::watch;

use super::{spawn_watch, ApiState, Change, Watched};

/// The kubelet's annotation on a mirror pod: the static pod's UID (its config hash), which
/// is the UID the container runtime and our hook see.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the agent needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    /// For a mirror pod, the UID of the static pod it stands for.
    pub mirror_of: Option<String>,
    /// Its running containers as the kubelet reports them.
    pub containers: Vec<RunningContainer>,
}

/// A running container of a pod's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningContainer {
    pub name: String,
    /// Without the runtime's `containerd://` / `cri-o://` prefix.
    pub id: String,
    pub image: String,
}

impl PodInfo {
    pub fn from_object(obj: &DynamicObject) -> Option<PodInfo> {
        let meta = &obj.metadata;
        let status = &obj.data["status"];
        let containers = ["containerStatuses", "initContainerStatuses"]
            .iter()
            .filter_map(|k| status[k].as_array())
            .flatten()
            .filter(|s| s["state"].get("running").is_some())
            .filter_map(|s| {
                let id = s["containerID"].as_str()?;
                let id = id.split_once("://").map_or(id, |(_, id)| id);
                (!id.is_empty()).then(|| RunningContainer {
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    id: id.to_string(),
                    image: s["image"].as_str().unwrap_or_default().to_string(),
                })
            })
            .collect();
        Some(PodInfo {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone().unwrap_or_default(),
            labels: meta
                .labels
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
            mirror_of: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(MIRROR_ANNOTATION).cloned()),
            containers,
        })
    }

    /// Whether this pod object is the pod a container with `uid` belongs to: the same
    /// UID, or the static pod this mirror pod stands for. A container that named no UID
    /// is taken by name alone.
    pub fn is_pod_with_uid(&self, uid: &str) -> bool {
        uid.is_empty() || uid == self.uid || self.mirror_of.as_deref() == Some(uid)
    }
}

/// Why a registration got no labels from the API.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("pod labels unavailable: the Kubernetes API is {0} (no wait)")]
    Unavailable(ApiState),
    #[error("pod {namespace}/{name} not in the agent's pod store after {waited:?}")]
    NotFound {
        namespace: String,
        name: String,
        waited: Duration,
    },
}

/// How a label lookup went, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The pod was in the store.
    Store,
    /// It arrived while the registration waited.
    Waited,
}

/// What the pod source tells the agent.
pub trait PodEvents: Send + Sync + 'static {
    /// A pod was added or changed.
    fn pod_applied(&self, pod: &PodInfo);
    /// A pod was deleted.
    fn pod_deleted(&self, pod: &PodInfo);
    /// The store was (re)listed: `pods` is all of it, `gone` the pods it held before and
    /// no longer does (deleted while the watch was broken).
    fn pods_relisted(&self, pods: &[PodInfo], gone: &[PodInfo]);
}

/// This node's pods.
pub struct PodSource {
    resource: ApiResource,
    watched: Watched,
    wait: Duration,
}

impl PodSource {
    /// Watches `resource` on `node` (field selector `spec.nodeName`), telling `events` of
    /// every change after it is in the store. `wait` bounds [`PodSource::labels`].
    pub fn spawn(
        client: ::kube::Client,
        resource: ApiResource,
        node: &str,
        wait: Duration,
        events: Arc<dyn PodEvents>,
    ) -> PodSource {
        let react = move |change: Change<'_>, store: &Store<DynamicObject>| match change {
            Change::Applied(o) => {
                if let Some(p) = PodInfo::from_object(o) {
                    events.pod_applied(&p)
                }
            }
            Change::Deleted(o) => {
                if let Some(p) = PodInfo::from_object(o) {
                    events.pod_deleted(&p)
                }
            }
            Change::Relisted { before } => {
                let pods: Vec<PodInfo> = store
                    .state()
                    .iter()
                    .filter_map(|o| PodInfo::from_object(o))
                    .collect();
                let gone: Vec<PodInfo> = before
                    .iter()
                    .filter_map(|o| PodInfo::from_object(o))
                    .filter(|old| !pods.iter().any(|p| p.uid == old.uid))
                    .collect();
                events.pods_relisted(&pods, &gone);
            }
        };
        let watched = spawn_watch(
            client,
            resource.clone(),
            Some(format!("spec.nodeName={node}")),
            "pods",
            react,
        );
        PodSource {
            resource,
            watched,
            wait,
        }
    }

    pub fn state(&self) -> ApiState {
        self.watched.state.borrow().clone()
    }

    /// The state as it changes.
    pub fn state_changes(&self) -> watch::Receiver<ApiState> {
        self.watched.state.clone()
    }

    /// Pods in the store.
    pub fn len(&self) -> usize {
        self.watched.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pod `namespace/name` as the store has it now.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        let key = ObjectRef::new_with(name, self.resource.clone()).within(namespace);
        let obj = self.watched.store.get(&key)?;
        PodInfo::from_object(&obj)
    }

    /// The labels of pod `namespace/name` (with `uid`, when known): from the store, or,
    /// when it is not there yet, as soon as it arrives within the wait bound. Fails at once
    /// while the API is unreachable or not listed yet: waiting out the bound for every
    /// container start would only delay the hook's failure rule.
    pub async fn labels(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(BTreeMap<String, String>, Lookup), LabelError> {
        let state = self.state();
        if !state.is_synced() {
            return Err(LabelError::Unavailable(state));
        }
        let mut applied: watch::Receiver<u64> = self.watched.applied.clone();
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut how = Lookup::Store;
        loop {
            applied.borrow_and_update();
            if let Some(p) = self.pod(namespace, name).filter(|p| p.is_pod_with_uid(uid)) {
                return Ok((p.labels, how));
            }
            if how == Lookup::Store {
                tracing::debug!(uid, "waiting for pod {namespace}/{name} to reach the store");
            }
            how = Lookup::Waited;
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                // The bound passed, or the watch task ended.
                Ok(Err(_)) | Err(_) => {
                    return Err(LabelError::NotFound {
                        namespace: namespace.into(),
                        name: name.into(),
                        waited: self.wait,
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the real test API server cannot be made to do on cue: fail every request, or
    /// never answer. A hand-written tower service stands in for the API (tower-test is
    /// not obtainable here); it answers a list with `list` and holds every watch open.
    fn mock_client(behaviour: &'static str, list: serde_json::Value) -> ::kube::Client {
        let service = tower::service_fn(move |req: http::Request<::kube::client::Body>| {
            let list = list.clone();
            async move {
                let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
                let (status, body) = match behaviour {
                    "error" => (
                        500,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "etcdserver: request timed out", "code": 500}),
                    ),
                    "silent" => std::future::pending().await,
                    _ if watch => std::future::pending().await,
                    _ => (200, list),
                };
                http::Response::builder()
                    .status(status)
                    .body(::kube::client::Body::from(body.to_string().into_bytes()))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        ::kube::Client::new(service, "default")
    }

    struct Ignore;
    impl PodEvents for Ignore {
        fn pod_applied(&self, _: &PodInfo) {}
        fn pod_deleted(&self, _: &PodInfo) {}
        fn pods_relisted(&self, _: &[PodInfo], _: &[PodInfo]) {}
    }

    fn source(client: ::kube::Client, wait: Duration) -> PodSource {
        let resource = crate::kube::Resources::core().pods;
        PodSource::spawn(client, resource, "n1", wait, Arc::new(Ignore))
    }

    #[tokio::test]
    async fn api_errors_make_registrations_fail_at_once() {
        // A wait of an hour: only the no-wait path can answer this test.
        let pods = source(
            mock_client("error", serde_json::Value::Null),
            Duration::from_secs(3600),
        );
        pods.state_changes()
            .wait_for(|s| matches!(s, ApiState::Unreachable(_)))
            .await
            .unwrap();
        let e = pods.labels("shop", "web-0", "").await.unwrap_err();
        assert!(
            matches!(e, LabelError::Unavailable(ApiState::Unreachable(_))),
            "{e}"
        );
        assert!(e.to_string().contains("request timed out"), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_registrations_at_once() {
        let pods = source(
            mock_client("silent", serde_json::Value::Null),
            Duration::from_secs(3600),
        );
        let e = pods.labels("shop", "web-0", "").await.unwrap_err();
        assert!(
            matches!(e, LabelError::Unavailable(ApiState::Connecting)),
            "{e}"
        );
        assert!(e.to_string().contains("not listed yet"), "{e}");
    }

    #[tokio::test]
    async fn a_listed_store_answers_and_a_missing_pod_fails_after_the_bound() {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": "5"},
            "items": [{"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-0", "namespace": "shop", "uid": "u1",
                    "resourceVersion": "5", "labels": {"app": "web"}},
                "spec": {"nodeName": "n1"}}]});
        let pods = source(mock_client("list", list), Duration::from_millis(50));
        pods.state_changes()
            .wait_for(ApiState::is_synced)
            .await
            .unwrap();
        let (labels, how) = pods.labels("shop", "web-0", "u1").await.unwrap();
        assert_eq!(labels["app"], "web");
        assert_eq!(how, Lookup::Store);
        // A pod of that name but another UID is not this container's pod.
        let e = pods.labels("shop", "web-0", "u2").await.unwrap_err();
        assert!(matches!(e, LabelError::NotFound { .. }), "{e}");
        let e = pods.labels("shop", "ghost", "").await.unwrap_err();
        assert!(
            e.to_string()
                .contains("not in the agent's pod store after 50ms"),
            "{e}"
        );
    }

    #[test]
    fn a_pod_object_gives_labels_running_containers_and_its_static_pod() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "etcd-n1", "namespace": "kube-system", "uid": "mirror-uid",
                "labels": {"component": "etcd"},
                "annotations": {MIRROR_ANNOTATION: "static-hash"}},
            "spec": {"nodeName": "n1"},
            "status": {"containerStatuses": [
                {"name": "etcd", "containerID": "containerd://abc", "image": "etcd:3",
                 "state": {"running": {}}},
                {"name": "done", "containerID": "containerd://def", "image": "x",
                 "state": {"terminated": {}}},
                {"name": "waiting", "image": "y", "state": {"waiting": {}}}
            ]}
        }))
        .unwrap();
        let p = PodInfo::from_object(&obj).unwrap();
        assert_eq!(p.labels["component"], "etcd");
        assert_eq!(
            p.containers,
            [RunningContainer {
                name: "etcd".into(),
                id: "abc".into(),
                image: "etcd:3".into()
            }]
        );
        assert!(p.is_pod_with_uid("static-hash"), "the static pod's UID");
        assert!(p.is_pod_with_uid("mirror-uid"));
        assert!(p.is_pod_with_uid(""));
        assert!(!p.is_pod_with_uid("an-older-pod-of-that-name"));
    }
}
