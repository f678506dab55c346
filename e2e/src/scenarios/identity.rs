//! What the agent learns of a container: identity through the NRI plugin (the spec's
//! hook and labels annotation, the agent's entry), the audit event's identity, and the
//! systemd cgroup driver's paths.

use anyhow::{bail, Result};

use super::workloads::sleeper;
use crate::cri::{Cri, PodSpec};
use crate::k8s_cri::v1::ContainerState;
use crate::stack::Stack;
use crate::timing::{secs, wait_until};

pub(super) async fn identity(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let pod = cri
        .run_pod(
            &PodSpec::new("web", "prod")
                .label("app", "web")
                .label("tier", "frontend"),
        )
        .await?;
    let id = cri.create_container(&pod, &sleeper("nginx")).await?;
    // What the plugin adjusted: our createRuntime hook and the labels annotation.
    let spec = cri.container_spec(&id).await?;
    cri.start_container(&id).await?;
    if !wait_until(secs(10), || stack.container(&id).is_some()).await {
        bail!("the agent does not list the container");
    }
    let hooked = spec["hooks"]["createRuntime"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|h| h["path"] == stack.bins.hook.display().to_string());
    let labels = spec["annotations"][rthooks_api::POD_LABELS_ANNOTATION]
        .as_str()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_default();
    if !hooked || labels["app"] != "web" {
        bail!(
            "the plugin's adjustment is not in the spec (hook: {hooked}, labels annotation: {labels}): {}",
            spec["hooks"]
        );
    }
    let c = stack.container(&id).unwrap();
    let want_cgroup = format!(
        "{}/{}",
        pod.spec.cgroup_parent(),
        stack.runtime.cgroup_leaf(&id)
    );
    let ok = c["covered"] == true
        && c["pod_name"] == "web"
        && c["pod_namespace"] == "prod"
        && c["pod_labels"]["app"] == "web"
        && c["pod_labels"]["tier"] == "frontend"
        && c["cgroup_path"].as_str().unwrap_or("").trim_matches('/')
            == want_cgroup.trim_matches('/')
        && c["cgroup_id"] != 0;
    cri.remove_pod(&pod).await?;
    if !ok {
        bail!("unexpected agent entry: {c}");
    }
    Ok(format!(
        "hook and labels annotation in the spec; covered, labels and cgroup {} known",
        c["cgroup_id"]
    ))
}

pub(super) async fn audit(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let pod = cri
        .run_pod(
            &PodSpec::new("watched", "audit-ns")
                .label("app", "audited")
                .label("tier", "backend"),
        )
        .await?;
    let id = cri.create_container(&pod, &sleeper("auditee")).await?;
    cri.start_container(&id).await?;
    let seen = wait_until(secs(10), || !stack.events_about(&id).is_empty()).await;
    let (st, _) = cri.container_status(&id).await?;
    let events = stack.events_about(&id);
    cri.remove_pod(&pod).await?;
    if !seen {
        bail!("no audit event names the container");
    }
    let ev = &events[0];
    let c = &ev["container"];
    // Labels reach the agent only through our NRI plugin; the rest comes from the
    // runtime's own annotations (containerd's or CRI-O's keys).
    let labels_ok = !stack.hook_path.carries_labels()
        || (c["pod_labels"]["app"] == "audited" && c["pod_labels"]["tier"] == "backend");
    let ok = ev["action"] == "audit"
        && ev["binary"] == "/bin/busybox"
        && c["pod_namespace"] == "audit-ns"
        && c["pod_name"] == "watched"
        && labels_ok
        && c["container_name"] == "auditee";
    if !ok {
        bail!("unexpected audit event: {ev}");
    }
    // Audit only reports: the container runs on.
    if st.state != ContainerState::ContainerRunning as i32 {
        bail!(
            "an audited container was stopped (state {}, exit {})",
            st.state,
            st.exit_code
        );
    }
    Ok(format!(
        "audit event: namespace {}, pod {}, labels {}, container {}, binary {}; the container runs on",
        c["pod_namespace"], c["pod_name"], c["pod_labels"], c["container_name"], ev["binary"]
    ))
}

pub(super) async fn systemd_cgroup_identity(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let mut spec = PodSpec::new("web", "prod").label("app", "web");
    spec.systemd = true;
    let pod = cri.run_pod(&spec).await?;
    let id = cri.create_container(&pod, &sleeper("nginx")).await?;
    cri.start_container(&id).await?;
    let seen = wait_until(secs(10), || stack.container(&id).is_some()).await;
    let entry = stack.container(&id);
    cri.remove_pod(&pod).await?;
    let c = match entry {
        Some(c) if seen => c,
        _ => bail!("the agent does not list the container"),
    };
    // runc's systemd driver: <slice path>/cri-containerd-<id>.scope.
    let want = format!("{}/cri-containerd-{id}.scope", pod.spec.cgroup_dir());
    let ok = c["covered"] == true
        && c["pod_labels"]["app"] == "web"
        && c["cgroup_path"].as_str().unwrap_or("").trim_matches('/') == want.trim_matches('/')
        && c["cgroup_id"] != 0;
    if !ok {
        bail!("unexpected agent entry (want cgroup {want}): {c}");
    }
    Ok(format!(
        "systemd driver: covered, cgroup {want} ({})",
        c["cgroup_id"]
    ))
}
