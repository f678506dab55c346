//! The [`Plugin`] trait (one method per NRI event) and the ttrpc `Plugin` service that
//! drives it.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use protobuf::Enum;
use tokio::sync::watch;
use ttrpc::r#async::TtrpcContext;

use super::api::{self, nri_ttrpc, Container, ContainerUpdate, Event, PodSandbox};

/// A set of NRI events (bit `1 << (event - 1)`, as the runtime expects in
/// `ConfigureResponse.events`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventMask(pub i32);

impl EventMask {
    /// No events.
    pub const EMPTY: EventMask = EventMask(0);

    /// The events every NRI runtime knows (RUN_POD_SANDBOX ..= REMOVE_CONTAINER). Later
    /// events (pod updates, validation) exist only in newer runtimes, and a runtime rejects
    /// the plugin when asked for an event it does not know.
    pub const BASE: EventMask = EventMask((1 << 11) - 1);

    /// All events of the API this crate was written against.
    pub const ALL: EventMask = EventMask((1 << 14) - 1);

    /// The mask holding `events`.
    pub fn of(events: &[Event]) -> Self {
        events.iter().fold(Self::EMPTY, |m, e| m.with(*e))
    }

    /// This mask plus `event`.
    pub fn with(self, event: Event) -> Self {
        match event.value() {
            v @ 1..=30 => EventMask(self.0 | (1 << (v - 1))),
            _ => self,
        }
    }

    /// Whether `event` is in the mask.
    pub fn contains(self, event: Event) -> bool {
        let v = event.value();
        (1..=30).contains(&v) && self.0 & (1 << (v - 1)) != 0
    }

    /// Events in both masks.
    pub fn intersect(self, other: EventMask) -> Self {
        EventMask(self.0 & other.0)
    }

    /// Events the runtime that sent `req` can deliver. The `NRI_version` field came with
    /// the newer events: a runtime that leaves it empty only knows [`EventMask::BASE`].
    pub fn supported_by(req: &api::ConfigureRequest) -> Self {
        if req.NRI_version.is_empty() {
            Self::BASE
        } else {
            Self::ALL
        }
    }
}

/// An error a plugin returns to the runtime (it becomes a ttrpc status whose message is
/// this error and its causes).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl PluginError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        PluginError {
            message: msg.into(),
            source: None,
        }
    }

    /// An error with this message, caused by `source`.
    pub fn with_source(
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        PluginError {
            message: msg.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The message and every cause, `: `-separated (what the runtime is told).
    pub fn report(&self) -> String {
        let mut text = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        text
    }
}

/// Result of a plugin handler.
pub type PluginResult<T> = Result<T, PluginError>;

/// An NRI plugin: one method per event. Implement [`Plugin::events`] and the handlers of
/// those events; every other handler has a do-nothing default.
///
/// Handlers run on the runtime's request path (containerd waits for them, 2 s by
/// default), so they should answer from memory and push slow work elsewhere.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// The events to subscribe to. The runner drops those the runtime does not support.
    fn events(&self) -> EventMask;

    /// Called once per connection before anything else, with the runtime's name, version
    /// and the plugin's configuration from the runtime (if any).
    async fn configure(&self, _req: &api::ConfigureRequest) -> PluginResult<()> {
        Ok(())
    }

    /// All pods and containers the runtime knows, once per connection right after
    /// configuration (split messages are joined before this is called).
    async fn synchronize(
        &self,
        _pods: Vec<PodSandbox>,
        _containers: Vec<Container>,
    ) -> PluginResult<Vec<ContainerUpdate>> {
        Ok(Vec::new())
    }

    /// The runtime is going down.
    async fn shutdown(&self) {}

    /// A pod sandbox was created.
    async fn run_pod_sandbox(&self, _pod: &PodSandbox) -> PluginResult<()> {
        Ok(())
    }

    /// A pod's resources are being updated.
    async fn update_pod_sandbox(&self, _req: &api::UpdatePodSandboxRequest) -> PluginResult<()> {
        Ok(())
    }

    /// A pod's resources were updated.
    async fn post_update_pod_sandbox(&self, _pod: &PodSandbox) -> PluginResult<()> {
        Ok(())
    }

    /// A pod sandbox is stopping.
    async fn stop_pod_sandbox(&self, _pod: &PodSandbox) -> PluginResult<()> {
        Ok(())
    }

    /// A pod sandbox was removed.
    async fn remove_pod_sandbox(&self, _pod: &PodSandbox) -> PluginResult<()> {
        Ok(())
    }

    /// A container is being created: the answer may adjust it (annotations, hooks, mounts,
    /// env, resources ...) and update or evict others.
    async fn create_container(
        &self,
        _pod: &PodSandbox,
        _container: &Container,
    ) -> PluginResult<api::CreateContainerResponse> {
        Ok(api::CreateContainerResponse::new())
    }

    /// A container was created.
    async fn post_create_container(&self, _pod: &PodSandbox, _ctr: &Container) -> PluginResult<()> {
        Ok(())
    }

    /// A container is starting.
    async fn start_container(&self, _pod: &PodSandbox, _ctr: &Container) -> PluginResult<()> {
        Ok(())
    }

    /// A container started.
    async fn post_start_container(&self, _pod: &PodSandbox, _ctr: &Container) -> PluginResult<()> {
        Ok(())
    }

    /// A container's resources are being updated.
    async fn update_container(
        &self,
        _req: &api::UpdateContainerRequest,
    ) -> PluginResult<api::UpdateContainerResponse> {
        Ok(api::UpdateContainerResponse::new())
    }

    /// A container's resources were updated.
    async fn post_update_container(&self, _pod: &PodSandbox, _ctr: &Container) -> PluginResult<()> {
        Ok(())
    }

    /// A container is stopping; the answer may update other containers.
    async fn stop_container(
        &self,
        _pod: &PodSandbox,
        _ctr: &Container,
    ) -> PluginResult<Vec<ContainerUpdate>> {
        Ok(Vec::new())
    }

    /// A container was removed.
    async fn remove_container(&self, _pod: &PodSandbox, _ctr: &Container) -> PluginResult<()> {
        Ok(())
    }

    /// Validates the adjustments all plugins made (validator plugins only); an error
    /// rejects the container with that reason.
    async fn validate_container_adjustment(
        &self,
        _req: &api::ValidateContainerAdjustmentRequest,
    ) -> PluginResult<()> {
        Ok(())
    }
}

/// What the runtime told the plugin in `Configure`, for the runner.
#[derive(Clone, Debug, Default)]
pub struct Configured {
    /// Runtime name (e.g. "containerd").
    pub runtime_name: String,
    /// Runtime version.
    pub runtime_version: String,
    /// The events subscribed to.
    pub events: EventMask,
    /// The runtime's request timeout (ms).
    pub request_timeout_ms: i64,
}

/// The ttrpc `Plugin` service adapter around a [`Plugin`].
pub(crate) struct Service<P: Plugin> {
    plugin: Arc<P>,
    configured: watch::Sender<Option<Configured>>,
    /// Parts of a split Synchronize (`more = true`) waiting for the last one.
    sync_parts: Mutex<Option<(Vec<PodSandbox>, Vec<Container>)>>,
}

impl<P: Plugin> Service<P> {
    pub(crate) fn new(plugin: Arc<P>) -> (Self, watch::Receiver<Option<Configured>>) {
        let (tx, rx) = watch::channel(None);
        (
            Service {
                plugin,
                configured: tx,
                sync_parts: Mutex::new(None),
            },
            rx,
        )
    }
}

fn status(e: PluginError) -> ttrpc::Error {
    ttrpc::error::get_rpc_status(ttrpc::Code::UNKNOWN, e.report())
}

fn pod(p: &protobuf::MessageField<PodSandbox>) -> &PodSandbox {
    p.as_ref().unwrap_or_else(|| PodSandbox::default_instance())
}

fn ctr(c: &protobuf::MessageField<Container>) -> &Container {
    c.as_ref().unwrap_or_else(|| Container::default_instance())
}

use protobuf::Message as _;

#[async_trait]
impl<P: Plugin> nri_ttrpc::Plugin for Service<P> {
    async fn configure(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConfigureRequest,
    ) -> ttrpc::Result<api::ConfigureResponse> {
        let wanted = self.plugin.events();
        let events = wanted.intersect(EventMask::supported_by(&req));
        if events != wanted {
            tracing::warn!(
                wanted = wanted.0,
                subscribed = events.0,
                nri_version = %req.NRI_version,
                "runtime does not support some events; not subscribing to them"
            );
        }
        // 0 would mean "every event" to the runtime: refuse rather than over-subscribe.
        if events == EventMask::EMPTY {
            return Err(status(PluginError::new(
                "none of the plugin's events is supported by the runtime",
            )));
        }
        self.plugin.configure(&req).await.map_err(status)?;
        tracing::info!(
            runtime = %req.runtime_name,
            version = %req.runtime_version,
            events = events.0,
            "configured"
        );
        self.configured.send_replace(Some(Configured {
            runtime_name: req.runtime_name.clone(),
            runtime_version: req.runtime_version.clone(),
            events,
            request_timeout_ms: req.request_timeout,
        }));
        let mut rsp = api::ConfigureResponse::new();
        rsp.events = events.0;
        Ok(rsp)
    }

    async fn synchronize(
        &self,
        _ctx: &TtrpcContext,
        req: api::SynchronizeRequest,
    ) -> ttrpc::Result<api::SynchronizeResponse> {
        let (pods, containers) = {
            let mut parts = self.sync_parts.lock().unwrap();
            let (pods, ctrs) = parts.get_or_insert_with(Default::default);
            pods.extend(req.pods);
            ctrs.extend(req.containers);
            if req.more {
                let mut rsp = api::SynchronizeResponse::new();
                rsp.more = true;
                return Ok(rsp);
            }
            parts.take().unwrap_or_default()
        };
        let update = self
            .plugin
            .synchronize(pods, containers)
            .await
            .map_err(status)?;
        let mut rsp = api::SynchronizeResponse::new();
        rsp.update = update;
        Ok(rsp)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _: api::Empty) -> ttrpc::Result<api::Empty> {
        self.plugin.shutdown().await;
        Ok(api::Empty::new())
    }

    async fn run_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::RunPodSandboxRequest,
    ) -> ttrpc::Result<api::RunPodSandboxResponse> {
        self.plugin
            .run_pod_sandbox(pod(&req.pod))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn update_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdatePodSandboxRequest,
    ) -> ttrpc::Result<api::UpdatePodSandboxResponse> {
        self.plugin.update_pod_sandbox(&req).await.map_err(status)?;
        Ok(Default::default())
    }

    async fn post_update_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::PostUpdatePodSandboxRequest,
    ) -> ttrpc::Result<api::PostUpdatePodSandboxResponse> {
        self.plugin
            .post_update_pod_sandbox(pod(&req.pod))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn stop_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::StopPodSandboxRequest,
    ) -> ttrpc::Result<api::StopPodSandboxResponse> {
        self.plugin
            .stop_pod_sandbox(pod(&req.pod))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn remove_pod_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: api::RemovePodSandboxRequest,
    ) -> ttrpc::Result<api::RemovePodSandboxResponse> {
        self.plugin
            .remove_pod_sandbox(pod(&req.pod))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateContainerRequest,
    ) -> ttrpc::Result<api::CreateContainerResponse> {
        let started = std::time::Instant::now();
        let r = self
            .plugin
            .create_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status);
        // The one handler on the runtime's critical path: keep its cost visible.
        tracing::debug!(
            container = %ctr(&req.container).name,
            elapsed_us = started.elapsed().as_micros() as u64,
            ok = r.is_ok(),
            "CreateContainer answered"
        );
        r
    }

    async fn post_create_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::PostCreateContainerRequest,
    ) -> ttrpc::Result<api::PostCreateContainerResponse> {
        self.plugin
            .post_create_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartContainerRequest,
    ) -> ttrpc::Result<api::StartContainerResponse> {
        self.plugin
            .start_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn post_start_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::PostStartContainerRequest,
    ) -> ttrpc::Result<api::PostStartContainerResponse> {
        self.plugin
            .post_start_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateContainerRequest,
    ) -> ttrpc::Result<api::UpdateContainerResponse> {
        self.plugin.update_container(&req).await.map_err(status)
    }

    async fn post_update_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::PostUpdateContainerRequest,
    ) -> ttrpc::Result<api::PostUpdateContainerResponse> {
        self.plugin
            .post_update_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn stop_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::StopContainerRequest,
    ) -> ttrpc::Result<api::StopContainerResponse> {
        let update = self
            .plugin
            .stop_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status)?;
        let mut rsp = api::StopContainerResponse::new();
        rsp.update = update;
        Ok(rsp)
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: api::RemoveContainerRequest,
    ) -> ttrpc::Result<api::RemoveContainerResponse> {
        self.plugin
            .remove_container(pod(&req.pod), ctr(&req.container))
            .await
            .map_err(status)?;
        Ok(Default::default())
    }

    async fn state_change(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateChangeEvent,
    ) -> ttrpc::Result<api::Empty> {
        let (p, c) = (pod(&req.pod), ctr(&req.container));
        let plugin = &self.plugin;
        let r = match req.event.enum_value_or_default() {
            Event::RUN_POD_SANDBOX => plugin.run_pod_sandbox(p).await,
            Event::STOP_POD_SANDBOX => plugin.stop_pod_sandbox(p).await,
            Event::REMOVE_POD_SANDBOX => plugin.remove_pod_sandbox(p).await,
            Event::POST_UPDATE_POD_SANDBOX => plugin.post_update_pod_sandbox(p).await,
            Event::POST_CREATE_CONTAINER => plugin.post_create_container(p, c).await,
            Event::START_CONTAINER => plugin.start_container(p, c).await,
            Event::POST_START_CONTAINER => plugin.post_start_container(p, c).await,
            Event::POST_UPDATE_CONTAINER => plugin.post_update_container(p, c).await,
            Event::REMOVE_CONTAINER => plugin.remove_container(p, c).await,
            other => {
                tracing::debug!(event = ?other, "ignoring state change");
                Ok(())
            }
        };
        r.map_err(status)?;
        Ok(api::Empty::new())
    }

    async fn validate_container_adjustment(
        &self,
        _ctx: &TtrpcContext,
        req: api::ValidateContainerAdjustmentRequest,
    ) -> ttrpc::Result<api::ValidateContainerAdjustmentResponse> {
        let mut rsp = api::ValidateContainerAdjustmentResponse::new();
        if let Err(e) = self.plugin.validate_container_adjustment(&req).await {
            rsp.reject = true;
            rsp.reason = e.report();
        }
        Ok(rsp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_bits_match_upstream() {
        // CREATE_CONTAINER = 4 → bit 3; REMOVE_CONTAINER = 11 → bit 10.
        let m = EventMask::of(&[Event::CREATE_CONTAINER, Event::REMOVE_CONTAINER]);
        assert_eq!(m.0, (1 << 3) | (1 << 10));
        assert!(m.contains(Event::CREATE_CONTAINER));
        assert!(!m.contains(Event::RUN_POD_SANDBOX));
        assert!(!m.contains(Event::UNKNOWN));
        assert_eq!(EventMask::BASE.0, 0x7ff);
    }

    #[test]
    fn newer_events_need_a_runtime_that_reports_its_nri_version() {
        let mut req = api::ConfigureRequest::new();
        let m = EventMask::of(&[Event::CREATE_CONTAINER, Event::UPDATE_POD_SANDBOX]);
        assert_eq!(
            m.intersect(EventMask::supported_by(&req)),
            EventMask::of(&[Event::CREATE_CONTAINER])
        );
        req.NRI_version = "v0.10.0".into();
        assert_eq!(m.intersect(EventMask::supported_by(&req)), m);
    }
}
