//! Calls to the agent over its UNIX socket, each under one overall deadline.
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use rthooks_api::tetragon::{self, fine_guidance_sensors_client::FineGuidanceSensorsClient};
use rthooks_api::v1::agent_client::AgentClient;

use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::state::Bundle;

/// Runs a future on a fresh current-thread runtime: the hook is a one-shot process, and a
/// multi-threaded runtime would cost thread start-ups on every container creation.
pub fn block_on<F: Future>(f: F) -> Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| Error::Agent {
            address: String::new(),
            reason: format!("cannot start the async runtime: {e}"),
        })?;
    Ok(rt.block_on(f))
}

/// The Tetragon-compatible request for a container.
pub fn create_container_request(
    bundle: &Bundle,
    cgroups_path: &str,
    identity: &Identity,
    annotations: &HashMap<String, String>,
) -> tetragon::RuntimeHookRequest {
    let c = tetragon::CreateContainer {
        cgroups_path: cgroups_path.to_owned(),
        root_dir: bundle.root_dir.to_string_lossy().into_owned(),
        annotations: annotations.clone(),
        container_name: identity.container_name.clone(),
        container_id: identity.container_id.clone(),
        pod_name: identity.pod_name.clone(),
        pod_uid: identity.pod_uid.clone(),
        pod_namespace: identity.pod_namespace.clone(),
        container_image: identity.image.clone(),
        mounts: bundle
            .spec
            .mounts
            .iter()
            .map(|m| tetragon::Mount {
                destination: m.destination.clone(),
                r#type: m.typ.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect(),
    };
    tetragon::RuntimeHookRequest {
        event: Some(tetragon::runtime_hook_request::Event::CreateContainer(c)),
    }
}

fn agent_err(address: &str, what: &str, e: impl std::error::Error) -> Error {
    // The transport error's Display is terse ("transport error"); the cause chain says
    // what actually happened (no such file, connection refused, …).
    let mut reason = format!("{what}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        let s_text = s.to_string();
        if !reason.contains(&s_text) {
            reason.push_str(": ");
            reason.push_str(&s_text);
        }
        src = s.source();
    }
    Error::Agent {
        address: address.to_owned(),
        reason,
    }
}

fn status_err(address: &str, s: tonic::Status) -> Error {
    Error::Agent {
        address: address.to_owned(),
        reason: format!("agent answered {:?}: {}", s.code(), s.message()),
    }
}

async fn with_deadline<T>(
    address: &str,
    timeout: Duration,
    f: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(Error::AgentTimeout {
            address: address.to_owned(),
            timeout_ms: timeout.as_millis(),
        }),
    }
}

/// A channel to the agent: a UNIX socket (`unix:///path`, `/path`), or, as Tetragon's hook
/// also accepts, TCP (`host:port`, `http://host:port`, `tcp://host:port`, `dns:///host:port`).
pub async fn channel(address: &str, timeout: Duration) -> Result<tonic::transport::Channel> {
    if rthooks_api::client::socket_path(address).is_some() {
        return rthooks_api::client::connect_unix(address, timeout)
            .await
            .map_err(|e| agent_err(address, "cannot connect", e));
    }
    let hostport = address
        .strip_prefix("tcp://")
        .or_else(|| address.strip_prefix("dns:///"))
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{hostport}"))
        .map_err(|e| agent_err(address, "invalid address", e))?
        .connect_timeout(timeout);
    endpoint
        .connect()
        .await
        .map_err(|e| agent_err(address, "cannot connect", e))
}

/// `tetragon.FineGuidanceSensors/RuntimeHook`.
pub async fn runtime_hook(
    address: &str,
    timeout: Duration,
    req: tetragon::RuntimeHookRequest,
) -> Result<()> {
    with_deadline(address, timeout, async {
        let ch = channel(address, timeout).await?;
        FineGuidanceSensorsClient::new(ch)
            .runtime_hook(req)
            .await
            .map_err(|s| status_err(address, s))?;
        Ok(())
    })
    .await
}

/// `rthooks.v1.Agent/RemoveContainer`: whether the agent knew the container.
pub async fn remove_container(
    address: &str,
    timeout: Duration,
    container_id: &str,
) -> Result<bool> {
    with_deadline(address, timeout, async {
        let ch = channel(address, timeout).await?;
        let r = AgentClient::new(ch)
            .remove_container(rthooks_api::v1::RemoveContainerRequest {
                container_id: container_id.to_owned(),
            })
            .await
            .map_err(|s| status_err(address, s))?;
        Ok(r.into_inner().removed)
    })
    .await
}
