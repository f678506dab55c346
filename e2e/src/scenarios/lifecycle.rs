//! The stack's parts coming and going: the agent down (fail closed, pinned enforcement
//! goes on, covered again after a restart), a removed container forgotten, the NRI
//! plugin's Synchronize after it was down, containerd restarted under the plugin.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::proofs::{exec_stopped, prove_first_instruction, trace_dir};
use super::workloads::{blocked_pod, guard, sleeper};
use crate::cri::{Cri, PodSpec};
use crate::stack::Stack;
use crate::timing::{secs, wait_until};

/// The hook's own words from a runtime error (`rthooks-oci-hook: refusing …`), else the
/// whole root cause.
pub(super) fn hook_refusal(e: &anyhow::Error) -> String {
    let msg = e.root_cause().to_string();
    match msg.find("rthooks-oci-hook:") {
        Some(i) => {
            let tail = &msg[i..];
            tail[..tail.find(" (log:").unwrap_or(tail.len())].replace("\\\"", "\"")
        }
        None => msg,
    }
}

pub(super) async fn agent_down(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let dir = trace_dir(stack, "down")?;
    // A selected container that keeps running; exec'ing busybox in it is denied.
    let gpod = cri.run_pod(&blocked_pod("guarded")).await?;
    let gid = cri.create_container(&gpod, &guard("guard", &dir)?).await?;
    cri.start_container(&gid).await?;
    if !wait_until(secs(10), || {
        stack.container(&gid).is_some_and(|c| c["covered"] == true)
    })
    .await
    {
        bail!("the agent does not list the guard container as covered");
    }
    let up = exec_stopped(cri, &gid, &dir, "exec-agent-up")
        .await
        .context("precondition, agent up: exec of busybox in the selected container")?;

    stack.stop_agent();
    let mut facts = vec![format!("agent up: {up}")];
    let result = async {
        // Fail closed: an ordinary namespace cannot start a container.
        let pod = cri
            .run_pod(&PodSpec::new("refused", "prod").label("app", "web"))
            .await?;
        let created = cri.create_container(&pod, &sleeper("web")).await;
        let refused = match created {
            Err(e) => format!("CreateContainer failed ({})", hook_refusal(&e)),
            Ok(id) => match cri.start_container(&id).await {
                Err(e) => format!("StartContainer failed ({})", hook_refusal(&e)),
                Ok(()) => bail!("agent down: a container in namespace prod started (fail open)"),
            },
        };
        cri.remove_pod(&pod).await?;
        facts.push(format!("agent down: prod pod refused: {refused}"));
        // The allow list: kube-system starts.
        let pod = cri
            .run_pod(&PodSpec::new("coredns", "kube-system").label("app", "dns"))
            .await?;
        let id = cri.create_container(&pod, &sleeper("dns")).await?;
        cri.start_container(&id)
            .await
            .context("agent down: a kube-system container did not start")?;
        // Control: ExecSync works in an unselected container meanwhile.
        let (code, out) = cri
            .exec_sync(&id, &["/bin/busybox", "true"], secs(10).as_secs() as i64)
            .await?;
        cri.remove_pod(&pod).await?;
        if code != 0 {
            bail!("control exec in kube-system failed: exit {code}: {out}");
        }
        facts.push("kube-system pod started".into());
        // Pinned programs and maps keep enforcing.
        let down = exec_stopped(cri, &gid, &dir, "exec-agent-down")
            .await
            .context("agent down: exec of busybox in the running selected container")?;
        facts.push(format!("running selected container: {down}"));
        Ok(())
    }
    .await;
    let restarted = stack.start_agent().await;
    result?;
    restarted?;
    let remembered = stack.container(&gid).is_some();
    cri.remove_pod(&gpod).await?;
    // After the restart a new selected pod is covered again.
    let pod = cri.run_pod(&blocked_pod("blocked")).await?;
    let after = prove_first_instruction(stack, cri, &pod, 1, "after-restart").await;
    cri.remove_pod(&pod).await?;
    facts.push(format!(
        "after restart: {}",
        after.context("new selected pod after the agent restart")?
    ));
    facts.push(format!("guard still listed after restart: {remembered}"));
    Ok(facts.join("; "))
}

pub(super) async fn removal(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let pod = cri
        .run_pod(&PodSpec::new("gone", "prod").label("app", "gone"))
        .await?;
    let id = cri.create_container(&pod, &sleeper("gone")).await?;
    cri.start_container(&id).await?;
    if !wait_until(secs(10), || stack.container(&id).is_some()).await {
        bail!("the agent never listed the container");
    }
    cri.stop_container(&id, 0).await?;
    cri.remove_container(&id).await?;
    let t = Instant::now();
    let gone = wait_until(secs(10), || stack.container(&id).is_none()).await;
    cri.remove_pod(&pod).await?;
    if !gone {
        bail!("the agent still lists the removed container");
    }
    Ok(format!("dropped {:?} after RemoveContainer", t.elapsed()))
}

pub(super) async fn sync_not_covered(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    stack.stop_plugin();
    let pod = cri
        .run_pod(&PodSpec::new("dark", "prod").label("app", "dark"))
        .await?;
    let id = cri.create_container(&pod, &sleeper("dark")).await?;
    cri.start_container(&id).await?;
    stack.start_plugin().await?;
    let seen = wait_until(secs(15), || stack.container(&id).is_some()).await;
    let entry = stack.container(&id);
    cri.remove_pod(&pod).await?;
    if !seen {
        bail!("Synchronize did not tell the agent about the container");
    }
    let c = entry.unwrap();
    if c["covered"] != false || c["source"] != "nri-sync" {
        bail!("expected covered=false source=nri-sync: {c}");
    }
    Ok("started while the plugin was down: listed as not covered (nri-sync)".into())
}

pub(super) async fn runtime_restart(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let before = stack.registrations();
    let t = Instant::now();
    stack.runtime.restart().await?;
    *cri = stack.runtime.cri().await?;
    if !wait_until(secs(30), || stack.registrations() > before).await {
        bail!("the plugin did not register again after containerd restarted");
    }
    let rereg = t.elapsed();
    let pod = cri
        .run_pod(&PodSpec::new("after", "prod").label("app", "after"))
        .await?;
    let id = cri.create_container(&pod, &sleeper("after")).await?;
    cri.start_container(&id).await?;
    let seen = wait_until(secs(10), || stack.container(&id).is_some()).await;
    let entry = stack.container(&id);
    cri.remove_pod(&pod).await?;
    match entry {
        Some(c) if seen && c["covered"] == true && c["pod_labels"]["app"] == "after" => {
            Ok(format!(
                "re-registered {rereg:?} after the restart began; the next container is covered"
            ))
        }
        other => bail!("container after the restart not covered: {other:?}"),
    }
}
