//! Selected containers stopped before their first instruction: through the NRI plugin,
//! hooks.d and containerd's base spec, and why a hook is needed at all (an identity
//! reported after the start comes too late).

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::proofs::{
    create_started, exec_stopped, prove_first_instruction, repeated_detail, start_lost_by_runtime,
    trace_control, trace_dir, traces, PARALLEL, STARTS,
};
use super::workloads::{blocked_pod, tracer};
use crate::cri::{Cri, Pod, PodSpec};
use crate::images::BUSYBOX_IMAGE;
use crate::k8s_cri::v1::ContainerState;
use crate::stack::Stack;
use crate::timing::{secs, wait_until};

pub(super) async fn first_instruction(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    trace_control(stack, cri, "fi-control").await?;
    let pod = cri.run_pod(&blocked_pod("blocked")).await?;
    let r = prove_first_instruction(stack, cri, &pod, STARTS, "victim").await;
    cri.remove_pod(&pod).await?;
    let ev = stack
        .events_about("\"pod_name\":\"blocked\"")
        .first()
        .map(|e| format!("; events {} by {}", e["action"], e["policies"]))
        .unwrap_or_default();
    Ok(format!(
        "{}{ev}; control: an unselected container wrote its trace file",
        r?
    ))
}

/// What a controller watching the Kubernetes API knows of container `late-<i>`, whose
/// spec has `cgroups_path` (the runtime chooses the leaf: `<id>` for containerd,
/// `crio-<id>` for CRI-O).
pub(super) fn late_identity(
    pod: &Pod,
    id: &str,
    i: usize,
    cgroups_path: String,
) -> rthooks_api::tetragon::CreateContainer {
    let labels: serde_json::Map<_, _> = pod
        .spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    rthooks_api::tetragon::CreateContainer {
        cgroups_path,
        annotations: [(
            rthooks_api::POD_LABELS_ANNOTATION.to_string(),
            serde_json::Value::Object(labels).to_string(),
        )]
        .into(),
        container_name: format!("late-{i}"),
        container_id: id.into(),
        pod_name: pod.spec.name.clone(),
        pod_uid: pod.spec.uid.clone(),
        pod_namespace: pod.spec.namespace.clone(),
        container_image: BUSYBOX_IMAGE.into(),
        ..Default::default()
    }
}

/// The identity learned only after the start: what a controller watching the Kubernetes
/// API would do (CRI says running → report it through the agent's API).
pub(super) async fn why_hooks(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let dir = trace_dir(stack, "why-late")?;
    stack.disable_hooks(cri).await?;
    let pod = cri.run_pod(&blocked_pod("blocked")).await?;
    let late = async {
        let t = Instant::now();
        let (mut ids, mut repeated) = (Vec::new(), Vec::new());
        let mut set = tokio::task::JoinSet::new();
        for i in 0..STARTS {
            let (mut cri, p) = (cri.clone(), pod.clone());
            let spec = tracer(&format!("late-{i}"), &dir);
            set.spawn(async move {
                // The start's own result is the outcome: a lost one is tried again, any
                // other failure ends the scenario.
                let start = async |cri: &mut Cri, id: &str| Ok(cri.start_container(id).await);
                let lost = |started: &Result<()>| {
                    start_lost_by_runtime(&started.as_ref().err()?.root_cause().to_string())
                };
                let (id, started, r) = create_started(&mut cri, &p, &spec, start, lost).await?;
                started?;
                let (st, _) = cri.container_status(&id).await?;
                let spec = cri.container_spec(&id).await?;
                let cgroups_path = spec["linux"]["cgroupsPath"]
                    .as_str()
                    .context("no linux.cgroupsPath in the container's spec")?
                    .to_string();
                Ok::<_, anyhow::Error>((i, id, st.state, cgroups_path, r))
            });
            // A controller reports each container as soon as CRI says it runs.
            while set.len() >= PARALLEL || (i + 1 == STARTS && !set.is_empty()) {
                let (i, id, state, cgroups_path, r) =
                    set.join_next().await.expect("non-empty")??;
                repeated.extend(r);
                if state != ContainerState::ContainerRunning as i32 {
                    bail!("without hooks a selected container is not running (state {state})");
                }
                stack
                    .report_container(late_identity(&pod, &id, i, cgroups_path), "api-watch")
                    .await?;
                ids.push((i, id));
            }
        }
        let took = t.elapsed().as_secs_f64();
        // The entrypoint writes its file right after its exec: let stragglers finish.
        wait_until(secs(5), || traces(&dir) == STARTS).await;
        let escaped = traces(&dir);
        // The late identity does work, for what comes after: the agent lists the
        // container (not covered) and a new exec of busybox in it is stopped. Only one
        // whose entrypoint ran is still there to look at: CRI says running once runc's
        // start returned, before runc init's exec of the entrypoint, so a report can
        // still win that race and the entrypoint's own exec is stopped (the escape count
        // then shows one fewer).
        let Some((_, first)) = ids
            .iter()
            .find(|(i, _)| dir.join(format!("late-{i}")).exists())
        else {
            bail!("no selected container's entrypoint ran without hooks");
        };
        let listed = stack.container(first);
        if listed.as_ref().is_none_or(|c| c["covered"] != false) {
            bail!("the reported container is not listed as not covered: {listed:?}");
        }
        let later = exec_stopped(cri, first, &dir, "later-exec")
            .await
            .context("a later exec in a reported container")?;
        Ok::<_, anyhow::Error>((
            escaped,
            format!("{later}; {took:.0} s{}", repeated_detail(&repeated)),
        ))
    }
    .await;
    cri.remove_pod(&pod).await?;
    let restarted = stack.enable_hooks(cri).await;
    let (escaped, later) = late?;
    restarted?;
    let pod = cri.run_pod(&blocked_pod("blocked")).await?;
    let with = prove_first_instruction(stack, cri, &pod, STARTS, "why-hooked").await;
    cri.remove_pod(&pod).await?;
    let with = with.context(format!(
        "without hooks {escaped}/{STARTS} escaped; with hooks"
    ))?;
    Ok(format!(
        "without hooks {escaped}/{STARTS} escaped (identity reported through the API once CRI said running; afterwards: {later}); with hooks 0/{STARTS}: {with}"
    ))
}

pub(super) async fn base_spec_first_instruction(
    stack: &mut Stack,
    cri: &mut Cri,
) -> Result<String> {
    trace_control(stack, cri, "bs-control").await?;
    let pod = cri.run_pod(&PodSpec::new("blocked", "locked")).await?;
    let r = prove_first_instruction(stack, cri, &pod, 3, "bs-victim").await;
    cri.remove_pod(&pod).await?;
    Ok(format!(
        "{} (namespace policy, hook from the base spec, no NRI); control: an unselected container wrote its trace file",
        r?
    ))
}
