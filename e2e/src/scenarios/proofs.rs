//! The one proof of "stopped before its first instruction": a start stopped (refused,
//! killed or failed), the trace file its entrypoint would write never written, and the
//! kernel's enforcement event naming the container; plus the control that makes an
//! absent trace file mean something, and the same proof for an exec into a running
//! container.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::workloads::{hold_dir, tracer};
use crate::cri::{ContainerSpec, Cri, Pod, PodSpec};
use crate::k8s_cri::v1::ContainerState;
use crate::stack::Stack;
use crate::timing::{secs, wait_until};

/// How many starts the first-instruction proofs make.
pub const STARTS: usize = 20;

/// Container starts in flight at once (one sandbox: 20 sequential starts under TCG would
/// eat most of the scenario timeout).
pub(super) const PARALLEL: usize = 5;

/// A fresh directory in the stack's scratch dir, mounted into containers at `/trace`, and
/// beside it `<dir>.hold/fifo`, the FIFO a [`tracer`] blocks on (see there).
pub(super) fn trace_dir(stack: &Stack, tag: &str) -> Result<PathBuf> {
    let d = stack.dir.path().join(format!("trace-{tag}"));
    std::fs::create_dir_all(&d)?;
    let hold = hold_dir(&d);
    std::fs::create_dir_all(&hold)?;
    match nix::unistd::mkfifo(
        &hold.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e).context("mkfifo for the tracers' hold"),
    }
    Ok(d)
}

/// Files in a trace directory: one per entrypoint that ran.
pub(super) fn traces(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| rd.count())
}

/// What became of a started container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fate {
    /// StartContainer failed (LSM: runc cannot exec the entrypoint; or the hook failed).
    Refused(String),
    /// Exited 137: killed (sigkill mode kills at the first exec).
    Killed,
    /// Exited with another non-zero code (LSM: runc init's exec got EPERM).
    Failed(i32),
    /// Exited 0: the entrypoint ran.
    Exited0,
    /// Still running when we stopped looking (the trace file says whether it ran; a
    /// killed container can also look like this when containerd lags under load).
    Running,
}

impl Fate {
    fn stopped(&self) -> bool {
        !matches!(self, Fate::Exited0 | Fate::Running)
    }
}

/// Starts container `id` and waits (up to 10 s, stretched) for it to exit.
async fn start_fate(cri: &mut Cri, id: &str) -> Result<Fate> {
    if let Err(e) = cri.start_container(id).await {
        return Ok(Fate::Refused(format!("{}", e.root_cause())));
    }
    exit_fate(cri, id, Instant::now() + secs(10)).await
}

/// Waits until `deadline` for container `id` to exit; [`Fate::Running`] if it did not.
async fn exit_fate(cri: &mut Cri, id: &str, deadline: Instant) -> Result<Fate> {
    while Instant::now() < deadline {
        let (st, _) = cri.container_status(id).await?;
        if st.state == ContainerState::ContainerExited as i32 {
            return Ok(match st.exit_code {
                137 => Fate::Killed,
                0 => Fate::Exited0,
                c => Fate::Failed(c),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Fate::Running)
}

/// Starts that failed inside containerd before any process of the container existed, so
/// before any hook ran: neither an escape nor a proof. Each was seen only with containerd
/// 1.7.24 on 5.10 guests under load. Says what happened, for the detail.
pub(super) fn start_lost_by_runtime(error: &str) -> Option<&'static str> {
    if error.contains("/proc/0/ns/") {
        // "namespace path: lstat /proc/0/ns/ipc": containerd issue 9160, open upstream.
        Some("containerd gave runc pid 0 for the sandbox (containerd issue 9160)")
    } else if error.contains("failed to start shim") {
        // "try create new shim socket 2x: … address already in use": the pod's shim did
        // not answer in time, and containerd would not start another.
        Some("containerd could not start or reach the pod's shim")
    } else if error.contains("failed to create shim task: ttrpc: closed") {
        // The pod's shim went away while creating the task, before runc ran any hook:
        // seen once on 5.10 under load (kube_first_instruction, containerd 1.7.24, 2026-12-01:
        // "shim disconnected" 14 s after StartContainer; the agent never saw the container).
        Some("the pod's shim disconnected while creating the task")
    } else {
        None
    }
}

/// How often a start lost by the runtime is tried again with a new container.
const LOST_START_RETRIES: usize = 2;

/// Creates a container from `spec` and starts it through `start`; when `lost` says the
/// runtime lost the start ([`start_lost_by_runtime`]), removes the container and tries
/// again. Returns the container, what `start` made of it, and why attempts were repeated.
pub(super) async fn create_started<T>(
    cri: &mut Cri,
    pod: &Pod,
    spec: &ContainerSpec,
    start: impl AsyncFn(&mut Cri, &str) -> Result<T>,
    lost: impl Fn(&T) -> Option<&'static str>,
) -> Result<(String, T, Vec<&'static str>)> {
    let mut repeated = Vec::new();
    loop {
        let id = cri.create_container(pod, spec).await?;
        let outcome = start(cri, &id).await?;
        match lost(&outcome) {
            Some(why) if repeated.len() < LOST_START_RETRIES => {
                repeated.push(why);
                cri.remove_container(&id).await?;
            }
            _ => return Ok((id, outcome, repeated)),
        }
    }
}

/// "; creates repeated: 1× containerd could not …" (empty when none were).
pub(super) fn repeated_detail(repeated: &[&str]) -> String {
    if repeated.is_empty() {
        return String::new();
    }
    let mut by_cause = std::collections::BTreeMap::new();
    for why in repeated {
        *by_cause.entry(*why).or_insert(0) += 1;
    }
    let causes: Vec<String> = by_cause
        .iter()
        .map(|(why, n)| format!("{n}× {why}"))
        .collect();
    format!("; creates repeated: {}", causes.join(", "))
}

/// Creates `n` tracer containers `<prefix>-<i>` in `pod` and starts them, [`PARALLEL`]
/// at a time. Returns (container id, fate) in order, and the starts tried again.
async fn start_tracers(
    cri: &Cri,
    pod: &Pod,
    n: usize,
    prefix: &str,
    dir: &Path,
) -> Result<(Vec<(String, Fate)>, Vec<&'static str>)> {
    let mut out = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        // At most PARALLEL in flight: more only adds load to the hook's 2 s deadline.
        if set.len() >= PARALLEL {
            out.push(set.join_next().await.expect("non-empty")??);
        }
        let (mut cri, pod) = (cri.clone(), pod.clone());
        let spec = tracer(&format!("{prefix}-{i}"), dir);
        set.spawn(async move {
            let lost = |f: &Fate| match f {
                Fate::Refused(e) => start_lost_by_runtime(e),
                _ => None,
            };
            let (id, fate, repeated) =
                create_started(&mut cri, &pod, &spec, start_fate, lost).await?;
            Ok::<_, anyhow::Error>((i, id, fate, repeated))
        });
    }
    while let Some(r) = set.join_next().await {
        out.push(r??);
    }
    // One more window for the ones still running: under load the runtime reports an exit
    // (runc init refused its exec, or was killed) well after it happened — containerd took
    // over 60 s once at load 9 — and a late report is not an escape (the trace file, not
    // this, says whether the entrypoint ran).
    let mut cri = cri.clone();
    let deadline = Instant::now() + secs(10);
    for (_, id, fate, _) in out.iter_mut().filter(|(_, _, f, _)| *f == Fate::Running) {
        *fate = exit_fate(&mut cri, id, deadline).await?;
    }
    out.sort_by_key(|(i, ..)| *i);
    let repeated = out.iter().flat_map(|(.., r)| r.iter().copied()).collect();
    Ok((
        out.into_iter().map(|(_, id, f, _)| (id, f)).collect(),
        repeated,
    ))
}

/// "lsm: 20 refused" style summary of fates.
fn fate_counts(fates: &[(String, Fate)]) -> String {
    let (mut refused, mut killed, mut failed, mut ran, mut running) = (0, 0, 0, 0, 0);
    let mut why = String::new();
    for (_, f) in fates {
        match f {
            Fate::Refused(e) => {
                refused += 1;
                why = e.clone();
            }
            Fate::Killed => killed += 1,
            Fate::Failed(_) => failed += 1,
            Fate::Exited0 => ran += 1,
            Fate::Running => running += 1,
        }
    }
    let mut parts = Vec::new();
    if refused > 0 {
        parts.push(format!("{refused} start refused ({why})"));
    }
    if killed > 0 {
        parts.push(format!("{killed} killed at the first exec (exit 137)"));
    }
    if failed > 0 {
        parts.push(format!(
            "{failed} entrypoint exec refused (runc init exit non-zero)"
        ));
    }
    if ran > 0 {
        parts.push(format!("{ran} exited 0"));
    }
    if running > 0 {
        parts.push(format!("{running} still running after {:?}", secs(10)));
    }
    parts.join(", ")
}

/// The proof that `n` starts of a selected pod's containers never ran their entrypoint:
/// every start stopped, no trace file, one enforcement event per container naming it.
/// Returns the detail, or an error saying what escaped.
pub(super) async fn prove_first_instruction(
    stack: &Stack,
    cri: &Cri,
    pod: &Pod,
    n: usize,
    tag: &str,
) -> Result<String> {
    let dir = trace_dir(stack, tag)?;
    let t = Instant::now();
    let (fates, repeated) = start_tracers(cri, pod, n, tag, &dir).await?;
    let started = Started {
        fates,
        took: t.elapsed(),
        repeated,
    };
    prove_stopped(stack, &started, &dir, tag, &pod.spec.name).await
}

/// What became of the starts of a first-instruction proof: (what finds the container's
/// events, its fate) in start order (the trace file of the `i`th is `<tag>-<i>`), how long
/// the starts took, and which were repeated because the runtime lost them.
pub(super) struct Started {
    pub(super) fates: Vec<(String, Fate)>,
    pub(super) took: Duration,
    pub(super) repeated: Vec<&'static str>,
}

/// The one proof that the starts in `started` never ran their entrypoint: every start
/// stopped, no trace file in `dir`, one enforcement event per container naming it, its
/// pod (`pod_name`) and `/bin/busybox`, a deny where the start was refused. Returns the
/// detail, or an error saying what escaped.
pub(super) async fn prove_stopped(
    stack: &Stack,
    started: &Started,
    dir: &Path,
    tag: &str,
    pod_name: &str,
) -> Result<String> {
    let Started {
        fates,
        took,
        repeated,
    } = started;
    let (n, took) = (fates.len(), took.as_secs_f64());
    let stopped = fates.iter().filter(|(_, f)| f.stopped()).count();
    let with_event = |stack: &Stack| {
        fates
            .iter()
            .filter(|(id, _)| !stack.events_about(id).is_empty())
            .count()
    };
    wait_until(secs(10), || with_event(stack) == n).await;
    let events = with_event(stack);
    // A killed process is gone before it writes; give a straggler that did run the
    // time to write its file before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let escaped = traces(dir);
    let summary = format!(
        "{stopped}/{n} starts stopped before the entrypoint ran ({}; {took:.0} s); {escaped}/{n} trace files; {events}/{n} enforcement events{}",
        fate_counts(fates),
        repeated_detail(repeated)
    );
    if stopped != n || escaped != 0 || events != n {
        // Name the containers that escaped or were not reported, to find them in the
        // logs kept for failed scenarios.
        let odd: Vec<String> = fates
            .iter()
            .enumerate()
            .filter_map(|(i, (id, f))| {
                let wrote = dir.join(format!("{tag}-{i}")).exists();
                let event = !stack.events_about(id).is_empty();
                (wrote || !event || !f.stopped()).then(|| {
                    format!(
                        "{tag}-{i} {} {f:?} trace={wrote} event={event}",
                        &id[..12.min(id.len())]
                    )
                })
            })
            .collect();
        bail!("{summary}; {}", odd.join(", "));
    }
    // Deny (LSM) must be reported as deny; the events name the pod and the binary.
    for (id, f) in fates {
        let ev = &stack.events_about(id)[0];
        if ev["binary"] != "/bin/busybox" || ev["container"]["pod_name"] != pod_name {
            bail!("{summary}; unexpected event: {ev}");
        }
        if matches!(f, Fate::Refused(_) | Fate::Failed(_)) && ev["action"] != "deny" {
            bail!("{summary}; refused, but the event is not a deny: {ev}");
        }
    }
    Ok(summary)
}

/// Control for the trace files: an unselected container's entrypoint does write its
/// file (so "no file" above means "did not run", not "could not write").
pub(super) async fn trace_control(stack: &Stack, cri: &mut Cri, tag: &str) -> Result<()> {
    let dir = trace_dir(stack, tag)?;
    let pod = cri
        .run_pod(&PodSpec::new("control", "prod").label("app", "control"))
        .await?;
    let id = cri.create_container(&pod, &tracer("control", &dir)).await?;
    cri.start_container(&id).await?;
    let wrote = wait_until(secs(10), || traces(&dir) == 1).await;
    cri.remove_pod(&pod).await?;
    if !wrote {
        bail!("control: an unselected container did not write its trace file");
    }
    Ok(())
}

/// ExecSync of busybox writing `/trace/<file>` in container `id`: `Ok(how it was
/// stopped)` when it did not run, `Err` when it ran.
pub(super) async fn exec_stopped(
    cri: &mut Cri,
    id: &str,
    dir: &Path,
    file: &str,
) -> Result<String> {
    let script = format!("echo ran > /trace/{file}");
    let r = cri
        .exec_sync(
            id,
            &["/bin/busybox", "sh", "-c", &script],
            secs(10).as_secs() as i64,
        )
        .await;
    let ran = dir.join(file).exists();
    match r {
        _ if ran => bail!("the exec ran (it wrote /trace/{file}): {r:?}"),
        Err(e) => Ok(format!("exec refused ({})", e.root_cause())),
        Ok((137, _)) => Ok("exec killed (exit 137)".into()),
        // runc and crun exec report the LSM's EPERM ("operation not permitted", crun
        // capitalised) and exit 1; another failure is no proof.
        Ok((code, out)) if code != 0 && out.to_lowercase().contains("operation not permitted") => {
            Ok(format!("exec refused (exit {code}: {})", out.trim()))
        }
        Ok((code, out)) => bail!("the exec exited {code} without writing its file: {out}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_the_runtime_lost_are_told_apart_from_refusals() {
        // As a 5.10 guest's containerd 1.7.24 reported them.
        let pid0 = "failed to create containerd task: failed to create shim task: OCI runtime \
                    create failed: runc create failed: unable to create new parent process: \
                    namespace path: lstat /proc/0/ns/ipc: no such file or directory: unknown";
        let shim = "failed to create containerd task: failed to start shim: start failed: \
                    io.containerd.runc.v2: try create new shim socket 2x: listen unix \
                    /run/containerd/s/7328: bind: address already in use: exit status 1: unknown";
        assert!(start_lost_by_runtime(pid0).unwrap().contains("9160"));
        assert!(start_lost_by_runtime(shim).unwrap().contains("shim"));
        let closed = "code: 'Unknown error', message: \"failed to create containerd task: \
                      failed to create shim task: ttrpc: closed: unknown\"";
        assert!(start_lost_by_runtime(closed)
            .unwrap()
            .contains("disconnected"));
        // The LSM refusal of the entrypoint, our hook refusing, a sandbox that really exited.
        for refused in [
            "runc create failed: unable to start container process: exec: \"/bin/sh\": \
             operation not permitted: unknown",
            "runc create failed: error running createRuntime hook #0: exit status 1",
            "namespace path: lstat /proc/4173144/ns/ipc: no such file or directory",
        ] {
            assert_eq!(start_lost_by_runtime(refused), None, "{refused}");
        }
        assert_eq!(repeated_detail(&[]), "");
        let why = start_lost_by_runtime(pid0).unwrap();
        assert_eq!(
            repeated_detail(&[why, why]),
            format!("; creates repeated: 2× {why}")
        );
    }
}
