//! CRI-driven scenarios for the VM guests (`rthooks-e2e guest --results FILE`): the full
//! stack per containerd release, one result line per scenario, in the format of
//! `vm/README.md` (a plan line first, then `scenario, runtime, result, reason, detail,
//! seconds, enforcement_mode, uname`).

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use crate::containerd::{is_root, Release};
use crate::cri::{ContainerSpec, Cri, PodSpec};
use crate::images::BUSYBOX_IMAGE;
use crate::k8s_cri::v1::ContainerState;
use crate::stack::{wait_until, Binaries, Stack};

/// Pods labelled app=blocked may not run busybox; every container of this suite runs
/// `/bin/sleep`, a busybox link, as its first instruction.
pub const POLICY: &str = "apiVersion: rthooks.io/v1alpha1
kind: RuntimePolicy
metadata:
  name: deny-busybox-blocked
spec:
  podSelector:
    matchLabels: {app: blocked}
  rules:
    - binaries: [/bin/busybox]
      action: Deny
";

/// The scenario names, in run order (each runs once per containerd release).
pub const SCENARIOS: &[&str] = &[
    "nri_identity",
    "nri_first_instruction",
    "nri_non_matching",
    "nri_removal",
    "nri_sync_not_covered",
    "nri_runtime_restart",
];

/// A scenario's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// "pass", "fail" or "skip".
    pub result: &'static str,
    /// Why (fail/skip).
    pub reason: String,
    /// What was seen.
    pub detail: String,
}

impl Verdict {
    fn pass(detail: impl Into<String>) -> Self {
        Verdict {
            result: "pass",
            reason: String::new(),
            detail: detail.into(),
        }
    }
    fn fail(reason: impl Into<String>) -> Self {
        Verdict {
            result: "fail",
            reason: reason.into(),
            detail: String::new(),
        }
    }
    fn skip(reason: impl Into<String>) -> Self {
        Verdict {
            result: "skip",
            reason: reason.into(),
            detail: String::new(),
        }
    }
}

/// How much longer than on a host to wait: TCG guests run an order of magnitude slower.
pub fn patience() -> f64 {
    if let Some(p) = std::env::var("RTHOOKS_E2E_PATIENCE")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        return p;
    }
    if std::env::var_os("RTHOOKS_KERNEL").is_some() {
        6.0
    } else {
        1.0
    }
}

/// `n` seconds, stretched by [`patience`].
pub fn secs(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 * patience())
}

fn runtime_name(r: Release) -> &'static str {
    match r {
        Release::V2_1 => "containerd-2.1",
        Release::V1_7 => "containerd-1.7",
    }
}

fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

struct Results {
    file: PathBuf,
}

impl Results {
    fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)?;
        writeln!(f, "{v}")?;
        Ok(())
    }
}

fn sleeper(name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["/bin/sleep".into(), "600".into()],
        ..Default::default()
    }
}

type Step<'a> = Pin<Box<dyn Future<Output = Result<String>> + 'a>>;

async fn identity(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let pod = cri
        .run_pod(
            &PodSpec::new("web", "prod")
                .label("app", "web")
                .label("tier", "frontend"),
        )
        .await?;
    let id = cri.create_container(&pod, &sleeper("nginx")).await?;
    cri.start_container(&id).await?;
    if !wait_until(secs(10), || stack.container(&id).is_some()).await {
        bail!("the agent does not list the container");
    }
    let c = stack.container(&id).unwrap();
    let want_cgroup = format!("{}/{id}", pod.spec.cgroup_parent());
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
        "covered, labels and cgroup {} known",
        c["cgroup_id"]
    ))
}

async fn first_instruction(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let pod = cri
        .run_pod(&PodSpec::new("blocked", "prod").label("app", "blocked"))
        .await?;
    let id = cri.create_container(&pod, &sleeper("victim")).await?;
    let how = match cri.start_container(&id).await {
        // LSM mode: the exec is refused, so the start fails.
        Err(e) => format!("start refused ({})", e.root_cause()),
        Ok(()) => {
            // sigkill mode: the exec happens and is killed before it runs on.
            let mut exit = None;
            let deadline = Instant::now() + secs(10);
            while exit.is_none() && Instant::now() < deadline {
                let (st, _) = cri.container_status(&id).await?;
                if st.state == ContainerState::ContainerExited as i32 {
                    exit = Some(st.exit_code);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match exit {
                Some(137) => "killed at its first exec (exit 137)".to_string(),
                // LSM mode: runc's init cannot exec the entrypoint (EPERM) and exits
                // non-zero; the deny event checked below says why.
                Some(code) if code != 0 => {
                    format!("its entrypoint exec was refused (runc init exit {code})")
                }
                other => bail!("the selected container was not stopped: exit {other:?}"),
            }
        }
    };
    if !wait_until(secs(10), || !stack.events_about(&id).is_empty()).await {
        let events = std::fs::read_to_string(stack.events_file()).unwrap_or_default();
        let tail: Vec<&str> = events.lines().rev().take(3).collect();
        bail!("{how}, but no enforcement event names the container; last events: {tail:?}");
    }
    let ev = stack.events_about(&id)[0].clone();
    cri.remove_pod(&pod).await?;
    if ev["container"]["pod_name"] != "blocked" || ev["binary"] != "/bin/busybox" {
        bail!("unexpected event: {ev}");
    }
    if how.contains("refused") && ev["action"] != "deny" {
        bail!("{how}, but the event is not a deny: {ev}");
    }
    Ok(format!(
        "{how}; event {} by {}",
        ev["action"], ev["policies"]
    ))
}

async fn non_matching(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

async fn removal(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

async fn sync_not_covered(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

async fn runtime_restart(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    let before = stack.registrations();
    let t = Instant::now();
    stack.containerd.restart().await?;
    *cri = stack.containerd.cri().await?;
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

fn step<'a>(name: &str, stack: &'a mut Stack, cri: &'a mut Cri) -> Step<'a> {
    match name {
        "nri_identity" => Box::pin(identity(stack, cri)),
        "nri_first_instruction" => Box::pin(first_instruction(stack, cri)),
        "nri_non_matching" => Box::pin(non_matching(stack, cri)),
        "nri_removal" => Box::pin(removal(stack, cri)),
        "nri_runtime_restart" => Box::pin(runtime_restart(stack, cri)),
        _ => Box::pin(sync_not_covered(stack, cri)),
    }
}

/// Runs the scenarios matching `filter` (substring) for both releases, appending to
/// `results`. Returns whether none failed.
pub async fn run(results: &Path, bin_dir: &Path, filter: &str, timeout: Duration) -> Result<bool> {
    let out = Results {
        file: results.to_path_buf(),
    };
    let chosen: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| s.contains(filter))
        .collect();
    let plan: Vec<_> = Release::ALL
        .iter()
        .flat_map(|r| {
            chosen
                .iter()
                .map(move |s| json!({"scenario": s, "runtime": runtime_name(*r)}))
        })
        .collect();
    out.append(json!({ "plan": plan }))?;
    let uname = uname();
    let mut ok = true;
    for release in Release::ALL {
        let runtime = runtime_name(release);
        let setup = if !is_root() {
            Err(Verdict::skip("needs root"))
        } else {
            match Binaries::in_dir(bin_dir) {
                Err(e) => Err(Verdict::skip(e.to_string())),
                Ok(bins) => {
                    match tokio::time::timeout(
                        timeout,
                        Stack::start(release, bins, &[("deny-busybox.yaml", POLICY)]),
                    )
                    .await
                    {
                        Ok(Ok(s)) => Ok(s),
                        Ok(Err(e)) => Err(Verdict::fail(format!("stack did not start: {e:#}"))),
                        Err(_) => Err(Verdict::fail("stack did not start in time")),
                    }
                }
            }
        };
        let (mut stack, mode, why) = match setup {
            Ok(s) => {
                let status = s.status().unwrap_or_default();
                let mode = status["enforcement_mode"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let why = status["enforcement_reason"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (Some(s), mode, why)
            }
            Err(v) => {
                for s in &chosen {
                    ok &= v.result != "fail";
                    out.append(line(s, runtime, &v, 0.0, "", &uname))?;
                }
                continue;
            }
        };
        let stack_ref = stack.as_mut().unwrap();
        let mut cri = stack_ref.containerd.cri().await?;
        for s in &chosen {
            let t = Instant::now();
            let v = match tokio::time::timeout(timeout, step(s, stack_ref, &mut cri)).await {
                // The agent's reason for its mode, once per release, for the matrix.
                Ok(Ok(detail)) if *s == chosen[0] && !why.is_empty() => {
                    Verdict::pass(format!("{detail} (agent: {mode}, {why})"))
                }
                Ok(Ok(detail)) => Verdict::pass(detail),
                Ok(Err(e)) => Verdict::fail(format!("{e:#}")),
                Err(_) => Verdict::fail(format!("timed out after {timeout:?}")),
            };
            ok &= v.result != "fail";
            eprintln!(
                "e2e guest: {s} ({runtime}) -> {} {}{}",
                v.result, v.reason, v.detail
            );
            out.append(line(
                s,
                runtime,
                &v,
                t.elapsed().as_secs_f64(),
                &mode,
                &uname,
            ))?;
        }
        let _ = cri.remove_all_pods().await;
        drop(stack.take());
    }
    Ok(ok)
}

fn line(
    scenario: &str,
    runtime: &str,
    v: &Verdict,
    secs: f64,
    mode: &str,
    uname: &str,
) -> serde_json::Value {
    json!({
        "scenario": scenario, "runtime": runtime, "result": v.result, "reason": v.reason,
        "detail": v.detail, "seconds": (secs * 100.0).round() / 100.0,
        "enforcement_mode": mode, "uname": uname,
    })
}
