//! The rthooks NRI plugin.
//!
//! * CreateContainer: answers from memory with an adjustment that adds the
//!   `rthooks-oci-hook` createRuntime hook and the `rthooks.io/pod-labels` annotation (the
//!   pod's labels as a JSON object, replacing whatever value the container carried, so a
//!   workload cannot choose its own labels). The agent is never called on this path: the
//!   hook itself tells the agent when the container is created.
//! * Synchronize: every container that existed before this connection is reported to the
//!   agent (`rthooks.v1.Agent/ReportContainer`, source `nri-sync`, `hook_ran` = whether its
//!   spec already holds our hook), so containers created while the plugin was down are
//!   known, and marked not covered, instead of being missed silently.
//! * RemoveContainer: the agent drops the container (`rthooks.v1.Agent/RemoveContainer`).
//!
//! Agent calls go through a queue served by one background task ([`AgentSink`]): NRI
//! replies never wait for the agent, and a missing agent only produces log lines (the
//! queue waits for it to come back, up to its capacity).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use protobuf::MessageField;
use rthooks_api::tetragon;
use rthooks_api::v1;
use rthooks_container::annotations::{self as keys};
use rthooks_container::labels;
use tokio::sync::mpsc;

use crate::nri::api::{self, Container, Event, PodSandbox};
use crate::nri::{EventMask, Plugin, PluginError, PluginResult};

pub use rthooks_api::{DEFAULT_AGENT_ADDRESS, POD_LABELS_ANNOTATION};

/// Where the hook is installed on a node.
pub const DEFAULT_HOOK_PATH: &str = "/opt/rthooks/rthooks-oci-hook";
/// The hook's default OCI timeout (seconds).
pub const DEFAULT_HOOK_TIMEOUT_SECS: i64 = 5;
/// Source recorded by the agent for containers learned from Synchronize.
pub const SYNC_SOURCE: &str = "nri-sync";

/// The OCI hook to inject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookSpec {
    /// Absolute path of the hook binary.
    pub path: String,
    /// argv, including `argv[0]`.
    pub args: Vec<String>,
    /// Environment (`KEY=value`).
    pub env: Vec<String>,
    /// OCI timeout in seconds (0 = none).
    pub timeout_secs: i64,
}

impl Default for HookSpec {
    fn default() -> Self {
        HookSpec {
            path: DEFAULT_HOOK_PATH.into(),
            args: vec!["rthooks-oci-hook".into(), "createRuntime".into()],
            env: Vec::new(),
            timeout_secs: DEFAULT_HOOK_TIMEOUT_SECS,
        }
    }
}

impl HookSpec {
    fn to_nri(&self) -> api::Hook {
        let mut h = api::Hook::new();
        h.path = self.path.clone();
        h.args = self.args.clone();
        h.env = self.env.clone();
        if self.timeout_secs > 0 {
            let mut t = api::OptionalInt::new();
            t.value = self.timeout_secs;
            h.timeout = MessageField::some(t);
        }
        h
    }
}

/// Whether the container's spec already runs `hook_path` at createRuntime.
pub fn has_hook(ctr: &Container, hook_path: &str) -> bool {
    ctr.hooks
        .as_ref()
        .is_some_and(|h| h.create_runtime.iter().any(|h| h.path == hook_path))
}

/// The CreateContainer answer: our hook (unless the spec already has it) and the labels
/// annotation.
pub fn create_response(
    hook: &HookSpec,
    pod: &PodSandbox,
    ctr: &Container,
) -> api::CreateContainerResponse {
    let mut adjust = api::ContainerAdjustment::new();
    // Setting the key overwrites any value the container brought along. No "-key" removal
    // marker with it: the runtime applies the adjustment map in random order, so a marker
    // can delete the value we set (seen with containerd 2.1).
    adjust.annotations.insert(
        POD_LABELS_ANNOTATION.into(),
        labels::annotation_value(&pod.labels),
    );
    if !has_hook(ctr, &hook.path) {
        let mut hooks = api::Hooks::new();
        hooks.create_runtime.push(hook.to_nri());
        adjust.hooks = MessageField::some(hooks);
    }
    let mut rsp = api::CreateContainerResponse::new();
    rsp.adjust = MessageField::some(adjust);
    rsp
}

/// The agent report for a container that already exists (Synchronize).
pub fn report_request(
    pod: Option<&PodSandbox>,
    ctr: &Container,
    hook_path: &str,
) -> v1::ReportContainerRequest {
    let mut annotations: HashMap<String, String> = ctr
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // The trusted labels are the pod's, whatever the container's annotation says.
    if let Some(pod) = pod {
        annotations.insert(
            POD_LABELS_ANNOTATION.into(),
            labels::annotation_value(&pod.labels),
        );
    }
    let container = tetragon::CreateContainer {
        cgroups_path: ctr
            .linux
            .as_ref()
            .map(|l| l.cgroups_path.clone())
            .unwrap_or_default(),
        root_dir: String::new(),
        container_image: keys::first(&annotations, keys::IMAGE_KEYS)
            .unwrap_or_default()
            .to_owned(),
        annotations,
        container_name: ctr.name.clone(),
        container_id: ctr.id.clone(),
        pod_name: pod.map(|p| p.name.clone()).unwrap_or_default(),
        pod_uid: pod.map(|p| p.uid.clone()).unwrap_or_default(),
        pod_namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
        mounts: ctr
            .mounts
            .iter()
            .map(|m| tetragon::Mount {
                destination: m.destination.clone(),
                r#type: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect(),
    };
    v1::ReportContainerRequest {
        container: Some(container),
        source: SYNC_SOURCE.into(),
        hook_ran: has_hook(ctr, hook_path),
    }
}

/// A call queued for the agent.
#[derive(Debug, Clone)]
pub enum AgentCall {
    /// `ReportContainer`.
    Report(Box<v1::ReportContainerRequest>),
    /// `RemoveContainer` by container id.
    Remove(String),
}

/// Fire-and-forget access to the agent: calls are queued and sent in order by one task.
#[derive(Clone, Debug)]
pub struct AgentSink {
    tx: Option<mpsc::Sender<AgentCall>>,
}

/// Queue capacity: room for a node's worth of Synchronize reports while the agent starts.
pub const AGENT_QUEUE: usize = 16384;

impl AgentSink {
    /// No agent: calls are dropped (with a debug log).
    pub fn disabled() -> Self {
        AgentSink { tx: None }
    }

    /// Starts the sender task for the agent at `address` (`unix:///path`). Must be called
    /// inside a tokio runtime.
    pub fn spawn(address: String) -> Self {
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        tokio::spawn(agent_task(address, rx));
        AgentSink { tx: Some(tx) }
    }

    /// Queues a call without waiting; a full queue drops it with a warning.
    pub fn push(&self, call: AgentCall) {
        match &self.tx {
            None => tracing::debug!(?call, "no agent configured; dropping"),
            Some(tx) => {
                if let Err(e) = tx.try_send(call) {
                    tracing::warn!(error = %e, "agent queue full or closed; dropping a call");
                }
            }
        }
    }
}

async fn agent_task(address: String, mut rx: mpsc::Receiver<AgentCall>) {
    const CALL_DEADLINE: Duration = Duration::from_secs(2);
    let mut client: Option<v1::agent_client::AgentClient<tonic::transport::Channel>> = None;
    let mut backoff = Duration::from_millis(200);
    while let Some(call) = rx.recv().await {
        // Wait for the agent (keeping the call) rather than dropping it: at node start the
        // plugin often comes up before the agent, and Synchronize reports matter then.
        let c = loop {
            if let Some(c) = &client {
                break c.clone();
            }
            match rthooks_api::client::connect_unix(&address, Duration::from_secs(1)).await {
                Ok(ch) => {
                    tracing::info!(%address, "connected to the agent");
                    backoff = Duration::from_millis(200);
                    client = Some(v1::agent_client::AgentClient::new(ch));
                }
                Err(e) => {
                    tracing::warn!(%address, error = %e, retry_in = ?backoff, queued = rx.len() + 1, "agent unreachable");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        };
        let mut c = c;
        let result = match &call {
            AgentCall::Report(req) => {
                let id = req
                    .container
                    .as_ref()
                    .map(|c| c.container_id.clone())
                    .unwrap_or_default();
                let mut r = tonic::Request::new((**req).clone());
                r.set_timeout(CALL_DEADLINE);
                c.report_container(r).await.map(|_| {
                    tracing::debug!(container = %id, hook_ran = req.hook_ran, "reported to agent");
                })
            }
            AgentCall::Remove(id) => {
                let mut r = tonic::Request::new(v1::RemoveContainerRequest {
                    container_id: id.clone(),
                });
                r.set_timeout(CALL_DEADLINE);
                c.remove_container(r).await.map(|_| {
                    tracing::debug!(container = %id, "removed from agent");
                })
            }
        };
        if let Err(s) = result {
            tracing::warn!(code = ?s.code(), message = %s.message(), ?call, "agent call failed");
            if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                // Reconnect on the next call.
                client = None;
            }
        }
    }
}

/// Settings a runtime can pass in `ConfigureRequest.config` (NRI reads them from
/// `<plugin_config_path>/<idx>-<name>.conf` or `<name>.conf`): the only way to configure a
/// plugin the runtime launches itself, as it starts it with an empty environment. A JSON
/// object; every key is optional.
///
/// ```json
/// {"hook_path": "/opt/rthooks/rthooks-oci-hook", "hook_args": ["rthooks-oci-hook", "createRuntime"],
///  "hook_env": [], "hook_timeout": 5, "agent_address": "unix:///run/rthooks/agent.sock"}
/// ```
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// [`HookSpec::path`].
    pub hook_path: Option<String>,
    /// [`HookSpec::args`].
    pub hook_args: Option<Vec<String>>,
    /// [`HookSpec::env`].
    pub hook_env: Option<Vec<String>>,
    /// [`HookSpec::timeout_secs`].
    pub hook_timeout: Option<i64>,
    /// The agent's address ("" or "none" disables reports).
    pub agent_address: Option<String>,
}

/// The rthooks plugin.
pub struct RthooksPlugin {
    hook: RwLock<HookSpec>,
    agent: Mutex<AgentSink>,
}

impl RthooksPlugin {
    /// A plugin injecting `hook` and reporting to `agent`.
    pub fn new(hook: HookSpec, agent: AgentSink) -> Self {
        RthooksPlugin {
            hook: RwLock::new(hook),
            agent: Mutex::new(agent),
        }
    }

    /// The hook currently injected.
    pub fn hook(&self) -> HookSpec {
        self.hook.read().unwrap().clone()
    }

    fn agent(&self) -> AgentSink {
        self.agent.lock().unwrap().clone()
    }

    /// Applies a runtime-supplied configuration (see [`RuntimeConfig`]).
    pub fn apply_config(&self, text: &str) -> PluginResult<()> {
        let cfg: RuntimeConfig = serde_json::from_str(text)
            .map_err(|e| PluginError::with_source("invalid plugin configuration", e))?;
        {
            let mut hook = self.hook.write().unwrap();
            if let Some(p) = cfg.hook_path {
                hook.path = p;
            }
            if let Some(a) = cfg.hook_args {
                hook.args = a;
            }
            if let Some(e) = cfg.hook_env {
                hook.env = e;
            }
            if let Some(t) = cfg.hook_timeout {
                hook.timeout_secs = t;
            }
            tracing::info!(hook = ?*hook, "hook configured by the runtime");
        }
        if let Some(a) = cfg.agent_address {
            let sink = match a.as_str() {
                "" | "none" => AgentSink::disabled(),
                a => AgentSink::spawn(a.to_string()),
            };
            *self.agent.lock().unwrap() = sink;
        }
        Ok(())
    }
}

#[async_trait]
impl Plugin for RthooksPlugin {
    fn events(&self) -> EventMask {
        EventMask::of(&[Event::CREATE_CONTAINER, Event::REMOVE_CONTAINER])
    }

    async fn configure(&self, req: &api::ConfigureRequest) -> PluginResult<()> {
        if !req.config.trim().is_empty() {
            self.apply_config(&req.config)?;
        }
        Ok(())
    }

    async fn synchronize(
        &self,
        pods: Vec<PodSandbox>,
        containers: Vec<Container>,
    ) -> PluginResult<Vec<api::ContainerUpdate>> {
        let by_id: HashMap<&str, &PodSandbox> = pods.iter().map(|p| (p.id.as_str(), p)).collect();
        let hook_path = self.hook().path;
        let agent = self.agent();
        let mut uncovered = 0;
        for ctr in &containers {
            let pod = by_id.get(ctr.pod_sandbox_id.as_str()).copied();
            let req = report_request(pod, ctr, &hook_path);
            if !req.hook_ran {
                uncovered += 1;
            }
            agent.push(AgentCall::Report(Box::new(req)));
        }
        tracing::info!(
            pods = pods.len(),
            containers = containers.len(),
            not_covered = uncovered,
            "synchronized; reporting existing containers to the agent"
        );
        Ok(Vec::new())
    }

    async fn create_container(
        &self,
        pod: &PodSandbox,
        ctr: &Container,
    ) -> PluginResult<api::CreateContainerResponse> {
        tracing::debug!(pod = %pod.name, namespace = %pod.namespace, container = %ctr.name, "create container");
        let hook = self.hook.read().unwrap();
        Ok(create_response(&hook, pod, ctr))
    }

    async fn remove_container(&self, _pod: &PodSandbox, ctr: &Container) -> PluginResult<()> {
        self.agent().push(AgentCall::Remove(ctr.id.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodSandbox {
        let mut p = PodSandbox::new();
        p.id = "sb1".into();
        p.name = "web-1".into();
        p.uid = "uid-1".into();
        p.namespace = "prod".into();
        p.labels.insert("app".into(), "web".into());
        p.labels.insert("tier".into(), "frontend".into());
        // Bookkeeping labels containerd and kubelet add: not the pod's labels.
        p.labels
            .insert("io.cri-containerd.kind".into(), "sandbox".into());
        p.labels
            .insert("io.kubernetes.pod.uid".into(), "uid-1".into());
        p
    }

    fn ctr() -> Container {
        let mut c = Container::new();
        c.id = "c1".into();
        c.pod_sandbox_id = "sb1".into();
        c.name = "nginx".into();
        c.annotations
            .insert(POD_LABELS_ANNOTATION.into(), r#"{"app":"evil"}"#.into());
        c.annotations.insert(
            keys::containerd::IMAGE_NAME.into(),
            "docker.io/library/nginx:1".into(),
        );
        let mut l = api::LinuxContainer::new();
        l.cgroups_path = "/kubepods/besteffort/poduid-1/c1".into();
        c.linux = MessageField::some(l);
        c
    }

    #[test]
    fn create_adds_hook_and_replaces_labels() {
        let rsp = create_response(&HookSpec::default(), &pod(), &ctr());
        let adj = rsp.adjust.as_ref().unwrap();
        assert_eq!(
            adj.annotations[POD_LABELS_ANNOTATION],
            r#"{"app":"web","tier":"frontend"}"#
        );
        assert_eq!(
            adj.annotations.len(),
            1,
            "no removal marker: {:?}",
            adj.annotations
        );
        let hooks = adj.hooks.as_ref().unwrap();
        assert_eq!(hooks.create_runtime.len(), 1);
        let h = &hooks.create_runtime[0];
        assert_eq!(h.path, DEFAULT_HOOK_PATH);
        assert_eq!(h.args, ["rthooks-oci-hook", "createRuntime"]);
        assert_eq!(h.timeout.value, 5);
    }

    #[test]
    fn runtime_config_overrides_the_hook() {
        let p = RthooksPlugin::new(HookSpec::default(), AgentSink::disabled());
        p.apply_config(r#"{"hook_path": "/x/hook", "hook_timeout": 3, "agent_address": "none"}"#)
            .unwrap();
        let h = p.hook();
        assert_eq!(h.path, "/x/hook");
        assert_eq!(h.timeout_secs, 3);
        assert_eq!(h.args, HookSpec::default().args);
        assert!(p.apply_config(r#"{"hook_pth": "/typo"}"#).is_err());
    }

    #[test]
    fn existing_hook_is_not_added_twice() {
        let mut c = ctr();
        let mut hooks = api::Hooks::new();
        hooks.create_runtime.push(HookSpec::default().to_nri());
        c.hooks = MessageField::some(hooks);
        assert!(has_hook(&c, DEFAULT_HOOK_PATH));
        let rsp = create_response(&HookSpec::default(), &pod(), &c);
        assert!(rsp.adjust.hooks.is_none());
    }

    #[test]
    fn report_carries_identity_and_trusted_labels() {
        let p = pod();
        let r = report_request(Some(&p), &ctr(), DEFAULT_HOOK_PATH);
        let c = r.container.unwrap();
        assert_eq!(c.cgroups_path, "/kubepods/besteffort/poduid-1/c1");
        assert_eq!(c.container_id, "c1");
        assert_eq!(c.container_name, "nginx");
        assert_eq!(c.pod_name, "web-1");
        assert_eq!(c.pod_uid, "uid-1");
        assert_eq!(c.pod_namespace, "prod");
        assert_eq!(c.container_image, "docker.io/library/nginx:1");
        assert_eq!(
            c.annotations[POD_LABELS_ANNOTATION],
            r#"{"app":"web","tier":"frontend"}"#
        );
        assert_eq!(r.source, "nri-sync");
        assert!(!r.hook_ran);
    }
}
