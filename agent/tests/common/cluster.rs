//! The test Kubernetes API server as the agent's pod and namespace tests and figures use
//! it: Pod- and Namespace-shaped CRDs in the test group, pods and namespaces created and
//! changed through it, and the agent's readiness and metrics.
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use rthooks_agent::kube::client::TEST_NAMESPACES;
use rthooks_agent::kube::Resources;
use rthooks_api::tetragon::CreateContainer;
use rthooks_testkit::apiserver::{namespace_crd, pod_crd, unavailable, TestApiServer};
use serde_json::json;

use super::*;

pub const GROUP: &str = "core.test.rthooks.io";
pub const NODE: &str = "node-a";
/// Generous: a test that waits for a pod creates it once the agent waits, and a pod that
/// never comes costs the whole bound once.
pub const WAIT: &str = "3s";

/// The test server, its Pod-shaped CRD, and a runtime for the test's own API calls.
pub struct Cluster {
    pub rt: tokio::runtime::Runtime,
    pub server: TestApiServer,
}

impl Cluster {
    pub fn start(test: &str) -> Option<Cluster> {
        if !kernel_tests_possible() {
            return None;
        }
        if let Some(why) = unavailable() {
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let audit = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("apiserver-audit/kube_pods-{test}.log"));
        let server = rt.block_on(async {
            let server = TestApiServer::start(&audit).await.unwrap();
            let client = server.client().await.unwrap();
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in [pod_crd(GROUP), namespace_crd(GROUP, TEST_NAMESPACES)] {
                crds.create(&PostParams::default(), &crd).await.unwrap();
                let name = crd.metadata.name.unwrap();
                tokio::time::timeout(
                    Duration::from_secs(60),
                    await_condition(crds.clone(), &name, conditions::is_crd_established()),
                )
                .await
                .expect("the CRD is Established within 60 s")
                .unwrap();
            }
            server
        });
        Some(Cluster { rt, server })
    }

    pub fn agent_flags(&self, metrics: &str) -> Vec<String> {
        vec![
            format!("--kubeconfig={}", self.server.kubeconfig.display()),
            format!("--node-name={NODE}"),
            format!("--kube-core-group={GROUP}"),
            format!("--pod-label-wait={WAIT}"),
            format!("--metrics-address={metrics}"),
        ]
    }

    /// An agent using this server (metrics, readiness on `metrics`), once it is ready,
    /// with a policy denying `victim` to pods labelled `app: web`.
    pub fn ready_agent(&self, metrics: &str, victim: &Victim, extra: &[&str]) -> Agent {
        let mut flags = self.agent_flags(metrics);
        flags.extend(extra.iter().map(|f| f.to_string()));
        let agent = Agent::start(&flags.iter().map(String::as_str).collect::<Vec<_>>());
        wait_ready(metrics);
        agent
            .add_policy(&policy_yaml("deny-web", "web", &victim.path, "Deny"))
            .unwrap();
        agent
    }

    pub fn in_ns(&self, ns: &str) -> Api<DynamicObject> {
        let client = self.rt.block_on(self.server.client()).unwrap();
        Api::namespaced_with(client, ns, &Resources::in_group(GROUP).pods)
    }

    /// Creates a pod; returns its UID.
    pub fn create_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        labels: serde_json::Value,
    ) -> String {
        self.create(ns, pod(name, node, labels, json!({}), json!({})))
    }

    pub fn create(&self, ns: &str, pod: DynamicObject) -> String {
        let created = self
            .rt
            .block_on(self.in_ns(ns).create(&PostParams::default(), &pod))
            .unwrap();
        created.metadata.uid.unwrap()
    }

    pub fn set_labels(&self, ns: &str, name: &str, labels: serde_json::Value) {
        let patch = Patch::Merge(json!({"metadata": {"labels": labels}}));
        self.rt
            .block_on(self.in_ns(ns).patch(name, &PatchParams::default(), &patch))
            .unwrap();
    }

    pub fn namespaces(&self) -> Api<DynamicObject> {
        let client = self.rt.block_on(self.server.client()).unwrap();
        Api::all_with(client, &Resources::in_group(GROUP).namespaces)
    }

    pub fn create_namespace(&self, name: &str, labels: serde_json::Value) {
        let ns: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("{GROUP}/v1"), "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap();
        self.rt
            .block_on(self.namespaces().create(&PostParams::default(), &ns))
            .unwrap();
    }

    pub fn set_namespace_labels(&self, name: &str, labels: serde_json::Value) {
        let patch = Patch::Merge(json!({"metadata": {"labels": labels}}));
        self.rt
            .block_on(
                self.namespaces()
                    .patch(name, &PatchParams::default(), &patch),
            )
            .unwrap();
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        self.rt
            .block_on(self.in_ns(ns).delete(name, &DeleteParams::default()))
            .unwrap();
    }
}

pub fn pod(
    name: &str,
    node: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
    status: serde_json::Value,
) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": format!("{GROUP}/v1"), "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "localhost/web:1"}]},
        "status": status,
    }))
    .unwrap()
}

/// What CRI-O's hooks.d or containerd's base spec gives the agent: the pod's namespace,
/// name and UID but no trusted labels (the annotation below is a pod's own claim, which
/// an agent without --trust-label-annotation ignores).
pub fn request(cgroup: &Cgroup, id: &str, ns: &str, pod: &str, uid: &str) -> CreateContainer {
    CreateContainer {
        cgroups_path: cgroup.relative.clone(),
        container_id: id.into(),
        container_name: "app".into(),
        pod_name: pod.into(),
        pod_namespace: ns.into(),
        pod_uid: uid.into(),
        annotations: [(
            rthooks_api::POD_LABELS_ANNOTATION.to_string(),
            r#"{"app":"not-web"}"#.to_string(),
        )]
        .into(),
        ..Default::default()
    }
}

pub fn wait_ready(addr: &str) {
    wait_for("the agent's readiness", Duration::from_secs(60), || {
        http_get(addr, "/readyz").filter(|(status, _)| status.contains(" 200 "))
    });
}

pub fn metric(addr: &str, line_prefix: &str) -> Option<u64> {
    let (_, body) = http_get(addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

pub fn labels_of(agent: &Agent, container_id: &str) -> Option<Vec<(String, String)>> {
    let c = agent
        .containers()
        .into_iter()
        .find(|c| c.container_id == container_id)?;
    let mut labels: Vec<(String, String)> = c.pod_labels.into_iter().collect();
    labels.sort();
    Some(labels)
}

pub fn app(v: &str) -> Option<Vec<(String, String)>> {
    Some(vec![("app".to_string(), v.to_string())])
}

/// The agent's pid, for stopping it while the API changes behind its back.
pub fn signal(agent: &Agent, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(agent.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// Registers `req` once its pod has reached the agent's store (until then the agent
/// refuses it: the pod is not in the store).
pub fn register_once_listed(agent: &Agent, req: CreateContainer) {
    wait_for(
        "the pod in the agent's store",
        Duration::from_secs(30),
        || agent.runtime_hook(req.clone()).ok(),
    );
}

/// One RuntimeHook call on a connection and runtime of its own (from another thread).
pub fn hook_call(socket: &str, req: CreateContainer) -> Result<(), tonic::Status> {
    use rthooks_api::tetragon::fine_guidance_sensors_client::FineGuidanceSensorsClient;
    use rthooks_api::tetragon::{runtime_hook_request, RuntimeHookRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = rthooks_api::client::connect_unix(socket, Duration::from_secs(5))
            .await
            .unwrap();
        FineGuidanceSensorsClient::new(channel)
            .runtime_hook(RuntimeHookRequest {
                event: Some(runtime_hook_request::Event::CreateContainer(req)),
            })
            .await
            .map(|_| ())
    })
}
