//! `rthooks-e2e demo`: the whole stack on one node, narrated for a person watching.
//!
//! containerd 2.1 with NRI, rthooks-agent and the rthooks NRI plugin start; a policy denies
//! `/bin/busybox` to pods labelled `app=blocked`; one pod with that label and one without
//! start the same busybox entrypoint. The first never runs a line of it, the second runs.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::containerd::Release;
use crate::cri::PodSpec;
use crate::k8s_cri::v1::ContainerState;
use crate::scenarios::{sleeper, POLICY};
use crate::stack::{Binaries, Stack};
use crate::timing::{secs, wait_until};

fn say(s: &str) {
    println!("demo: {s}");
}

/// Runs the demo; fails when the stack does not behave as narrated.
pub async fn run(bin_dir: &Path) -> Result<()> {
    let bins = Binaries::in_dir(bin_dir)?;
    say("starting containerd 2.1 (NRI on), rthooks-agent and the rthooks NRI plugin");
    say("policy loaded from the agent's policy directory:");
    for l in POLICY.lines() {
        println!("    {l}");
    }
    let stack = Stack::start(Release::V2_1, bins, &[("deny-busybox.yaml", POLICY)]).await?;
    let status = stack.status().unwrap_or_default();
    say(&format!(
        "the agent enforces in {} mode ({})",
        status["enforcement_mode"].as_str().unwrap_or("?"),
        status["enforcement_reason"].as_str().unwrap_or("")
    ));
    let mut cri = stack.runtime.cri().await?;

    say("starting pod shop/blocked (label app=blocked) whose entrypoint is /bin/sleep, a busybox applet");
    let blocked = cri
        .run_pod(&PodSpec::new("blocked", "shop").label("app", "blocked"))
        .await?;
    let id = cri.create_container(&blocked, &sleeper("victim")).await?;
    let started = cri.start_container(&id).await;
    let mut exit = None;
    let deadline = Instant::now() + secs(10);
    while started.is_ok() && exit.is_none() && Instant::now() < deadline {
        let (st, _) = cri.container_status(&id).await?;
        if st.state == ContainerState::ContainerExited as i32 {
            exit = Some(st.exit_code);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match (&started, exit) {
        (Err(e), _) => say(&format!("its start was refused: {}", e.root_cause())),
        (Ok(()), Some(137)) => say("it was killed (SIGKILL) at its first exec, before running a line of busybox"),
        (Ok(()), Some(code)) if code != 0 => say(&format!(
            "its entrypoint could not be executed (EPERM from the LSM program; runc init exited {code})"
        )),
        (Ok(()), other) => bail!("the blocked pod was not stopped (exit {other:?})"),
    }

    say("starting pod shop/web (label app=web) with the same image and entrypoint");
    let web = cri
        .run_pod(&PodSpec::new("web", "shop").label("app", "web"))
        .await?;
    let web_id = cri.create_container(&web, &sleeper("app")).await?;
    cri.start_container(&web_id).await?;
    tokio::time::sleep(secs(2)).await;
    let (st, _) = cri.container_status(&web_id).await?;
    if st.state != ContainerState::ContainerRunning as i32 {
        bail!("the unselected pod is not running (state {})", st.state);
    }
    say("it is running: the policy does not select it");

    if !wait_until(secs(10), || !stack.events_about(&id).is_empty()).await {
        bail!("no enforcement event names the blocked container");
    }
    say("events the agent wrote (JSON lines, also streamed by `rthooksctl events`):");
    for e in stack.events_about(&id) {
        println!("    {e}");
    }
    say("containers the agent knows (`rthooksctl containers`):");
    for c in stack.containers() {
        println!(
            "    {}/{} container={} labels={} covered={} policies={}",
            c["pod_namespace"].as_str().unwrap_or(""),
            c["pod_name"].as_str().unwrap_or(""),
            c["container_name"].as_str().unwrap_or(""),
            c["pod_labels"],
            c["covered"],
            c["policies"]
        );
    }
    say("what happened: the NRI plugin put the pod's labels and our OCI hook into each container's spec;");
    say("runc ran the hook while creating the container; the hook told the agent the container's cgroup");
    say("and identity; the agent wrote them into the BPF maps before the entrypoint's first instruction,");
    say("so the kernel stopped busybox in the selected pod and let the other run.");
    let _ = cri.remove_all_pods().await;
    Ok(())
}
