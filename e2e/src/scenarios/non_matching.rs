//! Containers no policy selects run undisturbed (and, on the base-spec path, the hook
//! that let them run came from the base spec).

use std::time::Duration;

use anyhow::{bail, Result};

use super::proofs::{trace_dir, traces};
use super::workloads::{sleeper, tracer};
use crate::cri::{Cri, PodSpec};
use crate::k8s_cri::v1::ContainerState;
use crate::stack::Stack;
use crate::timing::{secs, wait_until};

pub(super) async fn non_matching(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let pod = cri
        .run_pod(&PodSpec::new("free", "prod").label("app", "free"))
        .await?;
    let id = cri.create_container(&pod, &sleeper("free")).await?;
    cri.start_container(&id).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, _) = cri.container_status(&id).await?;
    let events = stack.events_about(&id);
    cri.remove_pod(&pod).await?;
    if st.state != ContainerState::ContainerRunning as i32 {
        bail!(
            "an unselected container stopped (state {}, exit {})",
            st.state,
            st.exit_code
        );
    }
    if !events.is_empty() {
        bail!("events for an unselected container: {events:?}");
    }
    Ok("unselected pod runs busybox undisturbed".into())
}

pub(super) async fn base_spec_non_matching(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let dir = trace_dir(stack, "bs-free")?;
    let pod = cri.run_pod(&PodSpec::new("free", "prod")).await?;
    let id = cri.create_container(&pod, &tracer("free", &dir)).await?;
    let spec = cri.container_spec(&id).await;
    cri.start_container(&id).await?;
    let wrote = wait_until(secs(10), || traces(&dir) == 1).await;
    let listed = wait_until(secs(10), || stack.container(&id).is_some()).await;
    let entry = stack.container(&id);
    let (st, _) = cri.container_status(&id).await?;
    let events = stack.events_about(&id);
    cri.remove_pod(&pod).await?;
    // The hook must be in the spec from the base spec, not from anywhere else.
    let hook = std::fs::read_to_string(stack.base_spec_path()).unwrap_or_default();
    let ours = spec?["hooks"]["createRuntime"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|h| {
            h["path"]
                .as_str()
                .is_some_and(|p| p.ends_with("rthooks-oci-hook") && hook.contains(p))
        });
    if !ours {
        bail!("the container's spec has no createRuntime hook from the base spec");
    }
    if !wrote || st.state != ContainerState::ContainerRunning as i32 {
        bail!(
            "an unselected container did not run (trace written: {wrote}, state {}, exit {})",
            st.state,
            st.exit_code
        );
    }
    if !events.is_empty() {
        bail!("events for an unselected container: {events:?}");
    }
    match entry {
        Some(c) if listed && c["covered"] == true && c["pod_namespace"] == "prod" => Ok(format!(
            "unselected pod runs busybox (trace written); hook from the base spec ran (agent: covered, source {})",
            c["source"]
        )),
        other => bail!("the hook from the base spec did not report the container: {other:?}"),
    }
}
