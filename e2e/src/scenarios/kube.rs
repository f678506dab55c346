//! The Kubernetes rows (`kube_*`): the agent takes pod labels only from the API server in
//! the guest ([`crate::kube`]), on the paths whose hook forwards no labels (containerd's
//! base spec, CRI-O's hooks.d). Every CRI sandbox has a pod object of the same namespace,
//! name and UID, created in the server before the sandbox runs; the sandbox itself carries
//! no labels, so a container selected by its labels was selected through the API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::proofs::{exec_stopped, prove_first_instruction, trace_dir, traces, STARTS};
use super::workloads::{guard, tracer};
use crate::cri::{Cri, Pod, PodSpec};
use crate::kube::{AgentApi, Cluster};
use crate::stack::Stack;
use crate::timing::{secs, wait_until};

/// A `RuntimePolicy` created in the server (not a policy file): pods labelled
/// `app=crd-blocked` may not run busybox.
const CRD_POLICY: &str = "apiVersion: rthooks.io/v1alpha1
kind: RuntimePolicy
metadata:
  name: deny-busybox-crd-blocked
spec:
  podSelector:
    matchLabels: {app: crd-blocked}
  rules:
    - binaries: [/bin/busybox]
      action: Deny
";

/// The guest's one API server, started by the first Kubernetes group that needs it and
/// shared by the others (dropped, so stopped, at the end of the run); a start that failed
/// is not tried again.
pub(super) struct SharedCluster {
    audit_log: PathBuf,
    cluster: Option<Result<Arc<Cluster>, String>>,
}

impl SharedCluster {
    /// Nothing started yet; the server will write its audit log to `audit_log`.
    pub(super) fn new(audit_log: &Path) -> Self {
        SharedCluster {
            audit_log: audit_log.to_path_buf(),
            cluster: None,
        }
    }

    pub(super) async fn get(&mut self) -> Result<Arc<Cluster>> {
        if self.cluster.is_none() {
            let started = Cluster::start(&self.audit_log).await;
            self.cluster = Some(started.map_err(|e| format!("{e:#}")));
        }
        match self.cluster.as_ref().expect("set above") {
            Ok(cluster) => Ok(cluster.clone()),
            Err(e) => bail!("{e}"),
        }
    }
}

fn api(stack: &Stack) -> Result<AgentApi> {
    stack
        .kube
        .clone()
        .context("this stack's agent has no Kubernetes API")
}

/// Creates pod `namespace/<name>-…` in the server with `labels`, then its sandbox through
/// CRI with the same namespace, name and UID and no labels.
async fn api_pod(
    api: &AgentApi,
    cri: &mut Cri,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
) -> Result<Pod> {
    let name = rthooks_testkit::unique(name);
    let uid = api.cluster.create_pod(namespace, &name, labels).await?;
    let mut spec = PodSpec::new(&name, namespace);
    spec.uid = uid;
    cri.run_pod(&spec).await
}

/// Removes the sandbox, then the pod object.
async fn remove_api_pod(api: &AgentApi, cri: &mut Cri, pod: &Pod) -> Result<()> {
    cri.remove_pod(pod).await?;
    api.cluster
        .delete_pod(&pod.spec.namespace, &pod.spec.name)
        .await
}

/// ExecSync of busybox writing `/trace/<file>` in container `id`, which must run.
async fn exec_runs(cri: &mut Cri, id: &str, dir: &Path, file: &str) -> Result<()> {
    let script = format!("echo ran > /trace/{file}");
    let (code, out) = cri
        .exec_sync(
            id,
            &["/bin/busybox", "sh", "-c", &script],
            secs(10).as_secs() as i64,
        )
        .await?;
    if code != 0 || !dir.join(file).exists() {
        bail!("the exec did not run: exit {code}: {}", out.trim());
    }
    Ok(())
}

/// Starts a guard container (`/pause`, busybox bind-mounted) in `pod` and waits until the
/// agent lists it with `labelled` true of its entry.
async fn started_guard(
    stack: &Stack,
    cri: &mut Cri,
    pod: &Pod,
    dir: &Path,
    labelled: impl Fn(&serde_json::Value) -> bool,
) -> Result<String> {
    let id = cri.create_container(pod, &guard("guard", dir)?).await?;
    cri.start_container(&id).await?;
    if !wait_until(secs(10), || {
        stack.container(&id).is_some_and(|c| labelled(&c))
    })
    .await
    {
        bail!(
            "the agent does not list the guard with its pod's labels from the API: {:?}",
            stack.container(&id)
        );
    }
    Ok(id)
}

/// A pod selected by its labels in the API is stopped at its first exec, [`STARTS`] times.
pub(super) async fn kube_first_instruction(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let api = api(stack)?;
    // The control: an unselected pod's entrypoint writes its file (so an absent file
    // means "did not run"); it needs its pod object too, or its registration fails.
    let dir = trace_dir(stack, "kube-control")?;
    let control = api_pod(&api, cri, "prod", "kube-control", json!({"app": "control"})).await?;
    let id = cri
        .create_container(&control, &tracer("control", &dir))
        .await?;
    cri.start_container(&id).await?;
    let wrote = wait_until(secs(10), || traces(&dir) == 1).await;
    remove_api_pod(&api, cri, &control).await?;
    if !wrote {
        bail!("control: an unselected container did not write its trace file");
    }
    let pod = api_pod(&api, cri, "shop", "kube-blocked", json!({"app": "blocked"})).await?;
    let proof = prove_first_instruction(stack, cri, &pod, STARTS, "kube-victim").await;
    remove_api_pod(&api, cri, &pod).await?;
    Ok(format!(
        "{} (podSelector app=blocked; the labels only in the API: none on the CRI sandbox, no labels annotation); control: an unselected container wrote its trace file",
        proof?
    ))
}

/// The pod loses its label in the API while its container runs: the container is released.
pub(super) async fn kube_label_removal(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let api = api(stack)?;
    let dir = trace_dir(stack, "kube-release")?;
    let labels = json!({"app": "blocked", "tier": "front"});
    let pod = api_pod(&api, cri, "shop", "kube-guarded", labels).await?;
    let result = async {
        let id = started_guard(stack, cri, &pod, &dir, |c| {
            c["pod_labels"]["app"] == "blocked" && c["policies"].as_array().is_some_and(|p| !p.is_empty())
        })
        .await?;
        let before = exec_stopped(cri, &id, &dir, "exec-labelled")
            .await
            .context("labelled: exec of busybox in the selected container")?;
        let t = Instant::now();
        api.cluster
            .patch_labels(&pod.spec.namespace, &pod.spec.name, json!({"app": null}))
            .await?;
        let released = |c: &serde_json::Value| {
            c["pod_labels"].get("app").is_none()
                && c["pod_labels"]["tier"] == "front"
                && c["policies"].as_array().is_some_and(|p| p.is_empty())
        };
        if !wait_until(secs(10), || stack.container(&id).is_some_and(|c| released(&c))).await {
            bail!(
                "the label removal did not reach the agent: {:?}",
                stack.container(&id)
            );
        }
        let took = t.elapsed();
        exec_runs(cri, &id, &dir, "exec-released")
            .await
            .context("after the label removal")?;
        Ok(format!(
            "labelled: {before}; label app removed in the API: entry rewritten {took:.1?} after the patch was sent, a later exec of busybox ran"
        ))
    }
    .await;
    remove_api_pod(&api, cri, &pod).await?;
    result
}

/// A `RuntimePolicy` created in the server stops an exec through the BPF programs; deleted,
/// it lets the next one run.
pub(super) async fn kube_crd_policy(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let api = api(stack)?;
    let dir = trace_dir(stack, "kube-crd")?;
    let pod = api_pod(&api, cri, "shop", "kube-crd", json!({"app": "crd-blocked"})).await?;
    let result = async {
        // Before the policy: the container runs busybox.
        let id = started_guard(stack, cri, &pod, &dir, |c| {
            c["pod_labels"]["app"] == "crd-blocked"
        })
        .await?;
        exec_runs(cri, &id, &dir, "exec-before")
            .await
            .context("before the RuntimePolicy")?;
        api.cluster.create_runtime_policy(CRD_POLICY).await?;
        let selected = |c: &serde_json::Value| {
            c["policies"]
                .as_array()
                .is_some_and(|p| p.iter().any(|n| n.as_str().is_some_and(|n| n.contains("deny-busybox-crd-blocked"))))
        };
        let t = Instant::now();
        let applied = wait_until(secs(10), || stack.container(&id).is_some_and(|c| selected(&c))).await;
        let took = t.elapsed();
        if !applied {
            bail!(
                "the RuntimePolicy does not select the container: {:?}",
                stack.container(&id)
            );
        }
        let stopped = exec_stopped(cri, &id, &dir, "exec-policy")
            .await
            .context("with the RuntimePolicy")?;
        let events = stack.events_about(&id);
        if !events
            .iter()
            .any(|e| e["policies"].to_string().contains("deny-busybox-crd-blocked"))
        {
            bail!("no enforcement event names the RuntimePolicy: {events:?}");
        }
        api.cluster
            .delete_runtime_policy("deny-busybox-crd-blocked")
            .await?;
        if !wait_until(secs(10), || stack.container(&id).is_some_and(|c| !selected(&c))).await {
            bail!("the deleted RuntimePolicy still selects the container");
        }
        exec_runs(cri, &id, &dir, "exec-after")
            .await
            .context("after the RuntimePolicy was deleted")?;
        Ok(format!(
            "before: busybox ran; RuntimePolicy created in the API: selecting {took:.1?} later, {stopped} (event names it); deleted: busybox ran again"
        ))
    }
    .await;
    // Whatever happened, the next runtime's stack starts without the policy.
    let _ = api
        .cluster
        .delete_runtime_policy("deny-busybox-crd-blocked")
        .await;
    remove_api_pod(&api, cri, &pod).await?;
    result
}
