//! Calls to the agent over its socket, each under one overall deadline.
use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use rthooks_api::tetragon;

use crate::error::{Error, Result};
use crate::state::Bundle;
use rthooks_container::{CgroupPath, ContainerIdentity};
use rthooks_grpc_client::{CallError, Target};

/// What the hook's requests name in `user-agent`.
const USER_AGENT: &str = "rthooks-oci-hook";

/// Where `--grpc-address` points: `unix:///path`, `unix:/path`, `/path`, or, as
/// Tetragon's hook also accepts, `host:port`, `tcp://host:port`, `http://host:port`,
/// `dns:///host:port`.
pub fn target(address: &str) -> Target {
    if let Some(p) = rthooks_api::socket_path(address) {
        return Target::Unix(p);
    }
    let hostport = address
        .strip_prefix("tcp://")
        .or_else(|| address.strip_prefix("dns:///"))
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    Target::Tcp(hostport.trim_end_matches('/').to_owned())
}

/// The Tetragon-compatible request for a container.
pub fn create_container_request(
    bundle: &Bundle,
    cgroup: &CgroupPath,
    identity: &ContainerIdentity,
    annotations: &HashMap<String, String>,
) -> tetragon::RuntimeHookRequest {
    let c = tetragon::CreateContainer {
        cgroups_path: cgroup.as_str().to_owned(),
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

fn call(address: &str, timeout: Duration, path: &str, message: &[u8]) -> Result<Vec<u8>> {
    #[cfg(not(feature = "client-h2"))]
    let unary = rthooks_grpc_client::unary;
    #[cfg(feature = "client-h2")]
    let unary = rthooks_grpc_client::h2_variant::unary;
    unary(&target(address), USER_AGENT, path, message, timeout).map_err(|e| match e {
        CallError::Timeout => Error::AgentTimeout {
            address: address.to_owned(),
            timeout_ms: timeout.as_millis(),
        },
        source => Error::Agent {
            address: address.to_owned(),
            source,
        },
    })
}

/// `tetragon.FineGuidanceSensors/RuntimeHook`. `address`: a UNIX socket (`unix:///path`,
/// `/path`), or, as Tetragon's hook also accepts, TCP (`host:port`, `http://host:port`,
/// `tcp://host:port`, `dns:///host:port`).
pub fn runtime_hook(
    address: &str,
    timeout: Duration,
    req: tetragon::RuntimeHookRequest,
) -> Result<()> {
    call(
        address,
        timeout,
        "/tetragon.FineGuidanceSensors/RuntimeHook",
        &req.encode_to_vec(),
    )?;
    Ok(())
}

/// `rthooks.v1.Agent/RemoveContainer`: whether the agent knew the container.
pub fn remove_container(address: &str, timeout: Duration, container_id: &str) -> Result<bool> {
    let req = rthooks_api::v1::RemoveContainerRequest {
        container_id: container_id.to_owned(),
    };
    let resp = call(
        address,
        timeout,
        "/rthooks.v1.Agent/RemoveContainer",
        &req.encode_to_vec(),
    )?;
    let r =
        rthooks_api::v1::RemoveContainerResponse::decode(resp.as_slice()).map_err(|source| {
            Error::AgentResponse {
                address: address.to_owned(),
                method: "RemoveContainer",
                source,
            }
        })?;
    Ok(r.removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            target("unix:///run/a.sock"),
            Target::Unix("/run/a.sock".into())
        );
        assert_eq!(target("/run/a.sock"), Target::Unix("/run/a.sock".into()));
        for a in [
            "localhost:54321",
            "tcp://localhost:54321",
            "http://localhost:54321/",
            "dns:///localhost:54321",
        ] {
            assert_eq!(target(a), Target::Tcp("localhost:54321".into()), "{a}");
        }
    }
}
