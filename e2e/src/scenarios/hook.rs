//! The OCI hook on the runtime paths without CRI, each scenario once per path: a runc
//! bundle, a crun bundle (the hook in `config.json`), podman with our hooks.d file
//! (`rthooks-setup install hooks-d`). Identity comes from containerd's CRI annotations
//! and the pod-labels annotation the agent is told to trust. One stack per path: the
//! real agent, the real hook, the deny and audit policies by label.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::proofs::{prove_stopped, Fate, Started};
use crate::cri::PodSpec;
use crate::oci::{OciNode, Ran};
use crate::stack::{Runtime, Stack};
use crate::timing::{secs, wait_until};

/// How many starts the first-instruction proof makes.
const STARTS: usize = 20;

/// Starts at once: the agent registers one container at a time (0.5–0.9 s each under
/// TCG), so more at once only makes the hooks wait longer for it.
const PARALLEL: usize = 4;

fn oci_node(stack: &Stack) -> Result<&OciNode> {
    match &stack.runtime {
        Runtime::Oci(n) => Ok(n),
        _ => bail!("the hook scenarios run on a bundle or podman stack"),
    }
}

/// A pod of namespace `ns` with `labels`.
fn pod(name: &str, ns: &str, labels: &[(&str, &str)]) -> PodSpec {
    labels
        .iter()
        .fold(PodSpec::new(name, ns), |p, (k, v)| p.label(k, v))
}

/// The hook's (last) decision at createRuntime for container `name`, from its log.
fn decision(stack: &Stack, name: &str) -> String {
    stack
        .hook_log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["stage"] == "createRuntime" && l["container_name"] == name)
        .filter_map(|l| l["decision"].as_str().map(str::to_string))
        .next_back()
        .unwrap_or_default()
}

/// The agent's enforcement mode.
fn mode(stack: &Stack) -> String {
    stack
        .status()
        .and_then(|s| s["enforcement_mode"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The runtime's words for the LSM's EPERM (runc: lower case, crun: capitalised).
fn eperm(out: &str) -> bool {
    out.to_lowercase().contains("operation not permitted")
}

/// What a foreground run whose entrypoint the policy denies came to, in the proof's
/// terms: lsm refuses the exec (the runtime reports EPERM), the other modes kill it.
fn fate(ran: &Ran) -> Fate {
    match ran.rc {
        0 => Fate::Exited0,
        137 => Fate::Killed,
        _ if eperm(&ran.out) => Fate::Refused(ran.out.trim().to_string()),
        rc => Fate::Failed(rc),
    }
}

/// Whether the last exec was stopped by the kernel in `mode` (lsm: EPERM; the others:
/// SIGKILL, status 137); says why not.
fn exec_refused(mode: &str, ran: &Ran) -> Result<()> {
    match ran.rc {
        0 => bail!("it exited 0"),
        137 if mode != "lsm" => Ok(()),
        // The shell in the container words EPERM its own way ("… not permitted").
        _ if mode == "lsm" && ran.out.to_lowercase().contains("not permitted") => Ok(()),
        rc => bail!(
            "status {rc}, not {}: {}",
            if mode == "lsm" {
                "EPERM"
            } else {
                "137 (SIGKILL)"
            },
            ran.out
        ),
    }
}

/// A container matching the Deny policy on `/bin/busybox`, whose entrypoint is busybox,
/// never runs it: 20 fresh containers, none writes its first line; the hook registered
/// each, the kernel reported each.
pub(super) async fn first_instruction(stack: &mut Stack) -> Result<String> {
    let tag = "first";
    let node = oci_node(stack)?;
    let shared = node.shared_dir(tag)?;
    let blocked = pod("blocked", "shop", &[("app", "blocked"), ("tier", "web")]);
    let t = Instant::now();
    let mut fates = Vec::new();
    for chunk in (0..STARTS).collect::<Vec<_>>().chunks(PARALLEL) {
        // `<tag>-<i>-c`: no name is a part of another (events are found by name).
        let runs: Vec<(String, Vec<String>)> = chunk
            .iter()
            .map(|i| {
                let script = format!("echo ran >/shared/{tag}-{i}");
                (
                    format!("{tag}-{i}-c"),
                    vec!["/bin/sh".into(), "-c".into(), script],
                )
            })
            .collect();
        let rans = node.run_all(&blocked, &shared, &runs).await?;
        for ((name, _), ran) in runs.into_iter().zip(rans) {
            fates.push((name, fate(&ran)));
        }
    }
    let started = Started {
        fates,
        took: t.elapsed(),
        repeated: Vec::new(),
    };
    let registered = started
        .fates
        .iter()
        .filter(|(name, _)| decision(stack, name) == "registered")
        .count();
    if registered != STARTS {
        bail!("the hook registered {registered} of {STARTS} containers");
    }
    let proof = prove_stopped(stack, &started, &shared, tag, &blocked.name).await?;
    Ok(format!(
        "{proof}; {PARALLEL} at a time, {registered}/{STARTS} registered by the hook; {}",
        node.version
    ))
}

/// The same binary, labels that do not match: the container runs.
pub(super) async fn non_matching(stack: &mut Stack) -> Result<String> {
    let node = oci_node(stack)?;
    let shared = node.shared_dir("nonmatch")?;
    let free = pod("nonmatch", "shop", &[("app", "web"), ("tier", "blocked")]);
    let ran = node
        .run(
            "nonmatch",
            &free,
            &shared,
            &[
                "/bin/sh",
                "-c",
                "echo ran >/shared/nonmatch; echo hello-from-nonmatch",
            ],
        )
        .await?;
    let d = decision(stack, "nonmatch");
    if d != "registered" {
        bail!("the hook did not register the container ({d})");
    }
    if ran.rc != 0 || !ran.out.contains("hello-from-nonmatch") {
        bail!("exit status {}, output: {}", ran.rc, ran.out);
    }
    if !shared.join("nonmatch").exists() {
        bail!("/shared/nonmatch was not written: {}", ran.out);
    }
    let events = stack.events_about("\"nonmatch\"");
    if !events.is_empty() {
        bail!("the agent reported events for it: {events:?}");
    }
    Ok(format!(
        "registered, labels app=web: exit 0, output seen, no event; {}",
        node.version
    ))
}

/// An Audit policy: the container runs, and the event carries its identity.
pub(super) async fn audit(stack: &mut Stack) -> Result<String> {
    let node = oci_node(stack)?;
    let shared = node.shared_dir("audit")?;
    let audited = pod(
        "pod-audit",
        "team-a",
        &[("app", "audited"), ("tier", "web")],
    );
    let ran = node
        .run(
            "audit",
            &audited,
            &shared,
            &[
                "/bin/sh",
                "-c",
                "echo ran >/shared/audit; echo hello-from-audit",
            ],
        )
        .await?;
    if ran.rc != 0 || !ran.out.contains("hello-from-audit") {
        bail!("exit status {}, output: {}", ran.rc, ran.out);
    }
    if !shared.join("audit").exists() {
        bail!("/shared/audit was not written: {}", ran.out);
    }
    let matching = || {
        stack.events_about("\"audit\"").into_iter().find(|e| {
            let c = &e["container"];
            e["action"] == "audit"
                && e["binary"] == "/bin/busybox"
                && c["pod_namespace"] == "team-a"
                && c["pod_name"] == "pod-audit"
                && c["container_name"] == "audit"
                && c["pod_labels"]["app"] == "audited"
                && c["pod_labels"]["tier"] == "web"
        })
    };
    if !wait_until(secs(5), || matching().is_some()).await {
        bail!(
            "no audit event with the container's namespace, pod, labels and name: {:?}",
            stack.events_about("\"audit\"")
        );
    }
    let e = matching().unwrap_or_default();
    let c = &e["container"];
    Ok(format!(
        "exit 0, output seen; event policies {}, namespace {}, pod {}, container {}, labels {}; {}",
        e["policies"],
        c["pod_namespace"],
        c["pod_name"],
        c["container_name"],
        c["pod_labels"],
        node.version
    ))
}

/// The long-running container's entrypoint: it runs each command line written to
/// `/shared/req-N` (through `eval`, in a child of its shell) and leaves its output and exit
/// status in `/shared/out-N` and `/shared/rc-N`. Everything it runs itself is
/// `busybox-ok`, which no policy names. The container's own process does the exec: a
/// runtime's exec lands outside the container's root in these guests.
const SERVER: &str = r#"while :; do
    for f in /shared/req-*; do
        [ -e "$f" ] || continue
        read -r c <"$f"; n=${f#/shared/req-}; /bin/busybox-ok rm -f "$f"
        eval "$c" >"/shared/out-$n" 2>&1; echo $? >"/shared/rc-$n"
    done
    /bin/busybox-ok sleep 0.2
done"#;

/// Has the running [`SERVER`] container behind `shared` run `cmdline` as request `n`.
async fn in_container(shared: &Path, n: &str, cmdline: &str) -> Result<Ran> {
    let tmp = shared.join(format!(".req-{n}"));
    std::fs::write(&tmp, format!("{cmdline}\n"))?;
    std::fs::rename(&tmp, shared.join(format!("req-{n}")))?;
    let rc = shared.join(format!("rc-{n}"));
    let done = || std::fs::read_to_string(&rc).is_ok_and(|s| !s.trim().is_empty());
    if !wait_until(secs(10), done).await {
        bail!(
            "the container did not run {cmdline:?} within {:?}",
            secs(10)
        );
    }
    Ok(Ran {
        rc: std::fs::read_to_string(&rc)?.trim().parse().unwrap_or(-1),
        out: std::fs::read_to_string(shared.join(format!("out-{n}"))).unwrap_or_default(),
    })
}

/// The agent down: the hook fails closed except in kube-system; a container matched
/// while the agent ran stays enforced (pinned programs); after a restart new containers
/// are covered again.
pub(super) async fn agent_down(stack: &mut Stack) -> Result<String> {
    let mode = mode(stack);
    let version = oci_node(stack)?.version.clone();
    let shared = oci_node(stack)?.shared_dir("down")?;
    let long = pod("pod-down-long", "shop", &[("app", "blocked")]);
    let node = oci_node(stack)?;
    let ran = node
        .start(
            "down-long",
            &long,
            &shared,
            &["/bin/busybox-ok", "sh", "-c", SERVER],
        )
        .await?;
    if ran.rc != 0 {
        bail!(
            "the long-running container did not start (rc {}): {}",
            ran.rc,
            ran.out
        );
    }
    let mut up = false;
    for _ in 0..(secs(5).as_millis() / 200) {
        if node.running("down-long").await {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !up {
        bail!("the long-running container is not running");
    }
    if decision(stack, "down-long") != "registered" {
        bail!("the hook did not register down-long");
    }
    let ok = in_container(&shared, "ok1", "/bin/busybox-ok true").await?;
    if ok.rc != 0 {
        bail!(
            "busybox-ok did not run in down-long (rc {}): {}",
            ok.rc,
            ok.out
        );
    }
    let deny = in_container(
        &shared,
        "deny1",
        r#"/bin/busybox sh -c "echo ran >/shared/ran-deny1""#,
    )
    .await?;
    exec_refused(&mode, &deny).context("with the agent up, busybox in down-long")?;
    if shared.join("ran-deny1").exists() {
        bail!("with the agent up, busybox ran in down-long");
    }

    stack.stop_agent();
    let result = async {
        if stack.status().is_some() {
            bail!("the agent still answers after it was stopped");
        }
        let node = oci_node(stack)?;
        // Fail closed: a normal namespace is refused before anything runs in it.
        let shop = pod("pod-down-shop", "shop", &[("app", "web")]);
        let refused = node
            .run(
                "down-shop",
                &shop,
                &shared,
                &["/bin/busybox-ok", "sh", "-c", "echo ran >/shared/down-shop"],
            )
            .await?;
        if refused.rc == 0 || shared.join("down-shop").exists() {
            bail!(
                "a container in 'shop' started without the agent: {}",
                refused.out
            );
        }
        let d = decision(stack, "down-shop");
        if d != "refused" {
            bail!("the hook's decision was '{d}', not refused");
        }
        // runc and podman put the hook's stderr in their error; crun only its status.
        let crun = node.engine.name() == "crun";
        if !(refused.out.contains("refusing") || crun && refused.out.contains("exit code: 1")) {
            bail!(
                "the runtime's error does not carry the hook's reason: {}",
                refused.out
            );
        }
        // kube-system is on the allow list.
        let ks = pod("pod-down-ks", "kube-system", &[("app", "web")]);
        let allowed = node
            .run(
                "down-ks",
                &ks,
                &shared,
                &["/bin/busybox-ok", "sh", "-c", "echo ran >/shared/down-ks"],
            )
            .await?;
        if allowed.rc != 0 || !shared.join("down-ks").exists() {
            bail!(
                "a kube-system container did not run without the agent (rc {}): {}",
                allowed.rc,
                allowed.out
            );
        }
        let d = decision(stack, "down-ks");
        if d != "allowed-unregistered" {
            bail!("the hook's decision was '{d}', not allowed-unregistered");
        }
        // The pinned programs still enforce for down-long: from its own process, and in a
        // process the runtime adds to it (exec joins its cgroup).
        let ok = in_container(&shared, "ok2", "/bin/busybox-ok true").await?;
        if ok.rc != 0 {
            bail!(
                "with the agent down, busybox-ok did not run in down-long (rc {}): {}",
                ok.rc,
                ok.out
            );
        }
        let own = in_container(
            &shared,
            "deny2",
            r#"/bin/busybox sh -c "echo ran >/shared/ran-deny2""#,
        )
        .await?;
        exec_refused(&mode, &own).context("with the agent down, busybox in down-long")?;
        if shared.join("ran-deny2").exists() {
            bail!("with the agent down, busybox ran in down-long");
        }
        let exec = node
            .exec("down-long", &["/bin/sh", "-c", "echo ran"])
            .await?;
        exec_refused(&mode, &exec).with_context(|| {
            format!(
                "with the agent down, {} exec of busybox in down-long",
                node.engine.name()
            )
        })?;
        if !node.running("down-long").await {
            bail!("down-long is not running any more");
        }
        Ok((refused.rc, own.rc, exec.rc))
    }
    .await;
    let restarted = stack.start_agent().await;
    let (shop_rc, in_rc, exec_rc) = result?;
    restarted?;
    let listed = || {
        stack
            .containers()
            .iter()
            .any(|c| c["container_name"] == "down-long")
    };
    if !wait_until(secs(5), listed).await {
        bail!("the restarted agent does not list down-long");
    }
    let node = oci_node(stack)?;
    let after = pod("pod-down-after", "shop", &[("app", "blocked")]);
    let ran = node
        .run(
            "down-after",
            &after,
            &shared,
            &["/bin/sh", "-c", "echo ran >/shared/down-after"],
        )
        .await?;
    if shared.join("down-after").exists() {
        bail!("after the restart: its first line ran (rc {})", ran.rc);
    }
    exec_refused(&mode, &ran).context("after the restart")?;
    if decision(stack, "down-after") != "registered" {
        bail!("the restarted agent did not register down-after");
    }
    let act = if mode == "lsm" { "deny" } else { "kill" };
    let reported = || {
        stack
            .events_about("\"down-after\"")
            .iter()
            .any(|e| e["action"] == act && e["binary"] == "/bin/busybox")
    };
    if !wait_until(secs(5), reported).await {
        bail!("no '{act}' event for down-after");
    }
    node.remove("down-long").await?;
    Ok(format!(
        "agent down: shop refused by the hook (rc {shop_rc}), kube-system ran; in the running matched container busybox still refused (own process rc {in_rc}, {} exec rc {exec_rc}); after restart: listed again, a new container refused ({mode}); {version}",
        node.engine.name()
    ))
}

/// The number of entries of the agent's containers map, as its status counts them.
fn container_entries(stack: &Stack) -> Option<u64> {
    stack.status()?["maps"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == "containers")?["entries"]
        .as_u64()
}

/// After the container is deleted the agent forgets it and its map entry is gone (read
/// from the pinned map by `rthooksctl debug maps`).
pub(super) async fn removal(stack: &mut Stack) -> Result<String> {
    let node = oci_node(stack)?;
    let shared = node.shared_dir("removal")?;
    let p = pod("pod-removal", "shop", &[("app", "blocked")]);
    let ran = node
        .start("removal", &p, &shared, &["/bin/busybox-ok", "sleep", "600"])
        .await?;
    if ran.rc != 0 {
        bail!("the container did not start (rc {}): {}", ran.rc, ran.out);
    }
    let entry = || {
        stack
            .containers()
            .into_iter()
            .find(|c| c["container_name"] == "removal")
    };
    if !wait_until(secs(5), || entry().is_some()).await {
        bail!("the agent does not list the container");
    }
    let c = entry().unwrap_or_default();
    let id = c["cgroup_id"].as_u64().context("no cgroup id")?;
    if c["policies"].as_array().is_none_or(|p| p.is_empty()) {
        bail!("no policy selects it: {c}");
    }
    let in_map = |stack: &Stack| {
        stack.debug_maps().map(|m| {
            m["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["cgroup_id"] == id)
        })
    };
    match in_map(stack) {
        Ok(true) => {}
        Ok(false) => bail!("cgroup id {id} is not in the pinned containers map"),
        Err(e) => return Err(e.context("reading the pinned maps")),
    }
    let before = container_entries(stack).context("no containers map in the agent's status")?;
    let t = Instant::now();
    node.remove("removal")
        .await
        .context("deleting the container")?;
    let forgotten = || {
        entry().is_none()
            && in_map(stack).is_ok_and(|present| !present)
            && container_entries(stack).is_some_and(|n| n < before)
    };
    if !wait_until(secs(5), forgotten).await {
        bail!(
            "after the delete, the agent or the map still has it (listed: {}, in the map: {:?}, entries {:?} of {before})",
            entry().is_some(),
            in_map(stack).ok(),
            container_entries(stack)
        );
    }
    let took = t.elapsed().as_secs_f64();
    let via = if stack
        .agent
        .as_ref()
        .is_some_and(|a| a.log().contains("cgroup removed; container forgotten"))
    {
        "the kernel's cgroup_rmdir event"
    } else {
        "reconciliation"
    };
    Ok(format!(
        "cgroup id {id}: listed and in RTHOOKS_CONTAINERS before; {took:.1} s after delete: not listed, map key gone (rthooksctl debug maps), status {} of {before} entries (via {via}); {}",
        container_entries(stack).unwrap_or_default(),
        node.version
    ))
}
