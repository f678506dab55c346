//! CRI-driven scenarios for the VM guests (`rthooks-e2e guest --results FILE`): the full
//! stack per CRI runtime (containerd 2.1 and 1.7; CRI-O on runc and on crun), one result
//! line per scenario, in the format of `vm/README.md` (a plan line first, then `scenario,
//! runtime, result, reason, detail, seconds, enforcement_mode, uname`).
//!
//! Scenarios share one stack per group and runtime: `nri_*` and `why_hooks` the NRI
//! plugin's, `base_spec_*` containerd configured by `rthooks-setup install
//! containerd-base-spec` (no NRI), `*systemd*` runc's systemd cgroup driver (skipped
//! without systemd), `hooks_d_*` CRI-O with `rthooks-setup install hooks-d`'s file (no
//! NRI; skipped without CRI-O's binaries). A scenario is written once and runs on every
//! stack it applies to. "The entrypoint never ran" is proven by entrypoints that would
//! write a file into a hostPath mount; an unselected container writing its file is the
//! control that makes an absent file mean something.

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::containerd::Options;
use crate::containerd::{is_root, Release};
use crate::cri::{ContainerSpec, Cri, HostMount, Pod, PodSpec};
use crate::crio::OciRuntime;
use crate::images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
use crate::k8s_cri::v1::ContainerState;
use crate::stack::{wait_until, Binaries, HookPath, RuntimeOptions, Stack};

/// Pods labelled app=blocked may not run busybox (shared with the shell scenarios in
/// vm/guest/scenarios/40-hook.sh); every container of this suite runs
/// `/bin/sleep` or `/bin/sh`, busybox links, as its first instruction.
pub const POLICY: &str = include_str!("../../vm/guest/policies/deny-busybox-blocked.yaml");

/// Pods labelled app=audited are watched, not stopped.
pub const AUDIT_POLICY: &str = include_str!("../../vm/guest/policies/audit-busybox-audited.yaml");

/// The base-spec and hooks.d paths have no NRI plugin, so no pod labels reach the hook
/// (without a Kubernetes API the agent only knows what the hook forwards): select by
/// namespace.
pub const NAMESPACE_POLICY: &str = "apiVersion: rthooks.io/v1alpha1
kind: NamespacedRuntimePolicy
metadata:
  name: deny-busybox-locked
  namespace: locked
spec:
  rules:
    - binaries: [/bin/busybox]
      action: Deny
";

/// [`AUDIT_POLICY`] by namespace, for the paths without labels.
pub const AUDIT_NAMESPACE_POLICY: &str = "apiVersion: rthooks.io/v1alpha1
kind: NamespacedRuntimePolicy
metadata:
  name: audit-busybox-audit-ns
  namespace: audit-ns
spec:
  rules:
    - binaries: [/bin/busybox]
      action: Audit
";

/// The namespace of the selected pods: [`POLICY`] selects them by label, and
/// [`NAMESPACE_POLICY`] by this namespace where no labels reach the agent.
const LOCKED: &str = "locked";

/// A pod every stack's deny policy selects (by label or by namespace).
fn blocked_pod(name: &str) -> PodSpec {
    PodSpec::new(name, LOCKED).label("app", "blocked")
}

/// The CRI runtimes the scenarios run on, in run order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// containerd (NRI plugin, base spec, systemd driver).
    Containerd(Release),
    /// CRI-O with this OCI runtime (hooks.d).
    Crio(OciRuntime),
}

impl Target {
    /// Every runtime, in run order.
    pub const ALL: [Target; 4] = [
        Target::Containerd(Release::V2_1),
        Target::Containerd(Release::V1_7),
        Target::Crio(OciRuntime::Runc),
        Target::Crio(OciRuntime::Crun),
    ];

    /// The matrix's runtime column.
    pub fn name(self) -> &'static str {
        match self {
            Target::Containerd(Release::V2_1) => "containerd-2.1",
            Target::Containerd(Release::V1_7) => "containerd-1.7",
            Target::Crio(OciRuntime::Runc) => "crio-runc",
            Target::Crio(OciRuntime::Crun) => "crio-crun",
        }
    }

    /// The scenarios that apply to it, in run order.
    pub fn scenarios(self) -> &'static [&'static str] {
        match self {
            Target::Containerd(_) => CONTAINERD_SCENARIOS,
            Target::Crio(_) => CRIO_SCENARIOS,
        }
    }
}

/// The (scenario, runtime) pairs `filter` chooses and `exclude` does not, in run order:
/// each is a list of `|`-separated alternatives matched against the scenario's name and
/// its runtime's (an empty `exclude` leaves nothing out).
pub fn plan(filter: &str, exclude: &str) -> Vec<(&'static str, Target)> {
    let names = |pattern: &str, s: &str, t: Target| {
        pattern
            .split('|')
            .any(|f| s.contains(f) || t.name().contains(f))
    };
    Target::ALL
        .iter()
        .flat_map(|t| t.scenarios().iter().map(move |s| (*s, *t)))
        .filter(|(s, t)| names(filter, s, *t) && (exclude.is_empty() || !names(exclude, s, *t)))
        .collect()
}

/// The scenarios on CRI-O, in run order: through CRI-O's NRI, what shows the plugin
/// works there (labels annotation and hook added, first instruction); through hooks.d,
/// the containerd NRI ones that apply to a hook without labels.
pub const CRIO_SCENARIOS: &[&str] = &[
    "nri_identity",
    "nri_first_instruction",
    "hooks_d_first_instruction",
    "hooks_d_non_matching",
    "hooks_d_audit",
    "hooks_d_removal",
    "hooks_d_why_hooks",
    "hooks_d_agent_down",
];

/// The scenario names on containerd, in run order (each runs once per release).
pub const CONTAINERD_SCENARIOS: &[&str] = &[
    "nri_identity",
    "nri_first_instruction",
    "nri_non_matching",
    "nri_audit",
    "nri_removal",
    "nri_sync_not_covered",
    "why_hooks",
    "nri_agent_down",
    "nri_runtime_restart",
    "base_spec_first_instruction",
    "base_spec_non_matching",
    "nri_systemd_cgroup_identity",
];

/// How many starts the first-instruction proofs make.
pub const STARTS: usize = 20;

/// Container starts in flight at once (one sandbox: 20 sequential starts under TCG would
/// eat most of the scenario timeout).
const PARALLEL: usize = 5;

/// Which stack a scenario needs (scenarios of one group share one stack per release).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// NRI plugin + hook + agent, cgroupfs driver.
    Nri,
    /// The hook in containerd's base runtime spec, no NRI.
    BaseSpec,
    /// NRI stack with runc's systemd cgroup driver.
    Systemd,
    /// CRI-O with the hook in hooks.d, no NRI.
    HooksD,
}

const GROUPS: [Group; 4] = [Group::Nri, Group::BaseSpec, Group::Systemd, Group::HooksD];

fn group_of(scenario: &str) -> Group {
    if scenario.starts_with("hooks_d_") {
        Group::HooksD
    } else if scenario.starts_with("base_spec_") {
        Group::BaseSpec
    } else if scenario.contains("systemd") {
        Group::Systemd
    } else {
        Group::Nri
    }
}

/// Where systemd says it runs (sd_booted(3)).
const SYSTEMD_MARKER: &str = "/run/systemd/system";

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

/// A busybox container whose first instruction is `/bin/sleep 600` (a busybox link).
pub(crate) fn sleeper(name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["/bin/sleep".into(), "600".into()],
        ..Default::default()
    }
}

/// A fresh directory in the stack's scratch dir, mounted into containers at `/trace`, and
/// beside it `<dir>.hold/fifo`, the FIFO a [`tracer`] blocks on (see there).
fn trace_dir(stack: &Stack, tag: &str) -> Result<PathBuf> {
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

fn hold_dir(trace_dir: &Path) -> PathBuf {
    let mut hold = trace_dir.as_os_str().to_owned();
    hold.push(".hold");
    hold.into()
}

/// Files in a trace directory: one per entrypoint that ran.
fn traces(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| rd.count())
}

/// A container whose entrypoint (`/bin/sh`, i.e. busybox) first writes `/trace/<name>`
/// into the hostPath mount `dir`, then waits: the file exists if and only if the
/// entrypoint ran.
///
/// It waits in the shell itself, opening a FIFO no one ever writes (`/hold/fifo`, from
/// [`trace_dir`]), not with `exec sleep`: that would be a second exec of busybox, and a
/// container registered after its start (why_hooks, nri_sync_not_covered) would then be
/// killed or refused at it whenever the registration wins the race against the shell,
/// leaving no running container to list or to exec into.
fn tracer(name: &str, dir: &Path) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo ran > /trace/{name}; read _ < /hold/fifo"),
        ],
        mounts: vec![
            HostMount {
                host_path: dir.to_path_buf(),
                container_path: "/trace".into(),
                readonly: false,
            },
            HostMount {
                host_path: hold_dir(dir),
                container_path: "/hold".into(),
                readonly: true,
            },
        ],
        ..Default::default()
    }
}

/// What became of a started container.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
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
    let deadline = Instant::now() + secs(10);
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
/// before any hook ran: neither an escape nor a proof. Both were seen only with containerd
/// 1.7.24 on 5.10 guests under load. Says what happened, for the detail.
fn start_lost_by_runtime(error: &str) -> Option<&'static str> {
    if error.contains("/proc/0/ns/") {
        // "namespace path: lstat /proc/0/ns/ipc": containerd issue 9160, open upstream.
        Some("containerd gave runc pid 0 for the sandbox (containerd issue 9160)")
    } else if error.contains("failed to start shim") {
        // "try create new shim socket 2x: … address already in use": the pod's shim did
        // not answer in time, and containerd would not start another.
        Some("containerd could not start or reach the pod's shim")
    } else {
        None
    }
}

/// How often a start lost by the runtime is tried again with a new container.
const LOST_START_RETRIES: usize = 2;

/// Creates a container from `spec` and starts it through `start`; when `lost` says the
/// runtime lost the start ([`start_lost_by_runtime`]), removes the container and tries
/// again. Returns the container, what `start` made of it, and why attempts were repeated.
async fn create_started<T>(
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
fn repeated_detail(repeated: &[&str]) -> String {
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
async fn prove_first_instruction(
    stack: &Stack,
    cri: &Cri,
    pod: &Pod,
    n: usize,
    tag: &str,
) -> Result<String> {
    let dir = trace_dir(stack, tag)?;
    let t = Instant::now();
    let (fates, repeated) = start_tracers(cri, pod, n, tag, &dir).await?;
    let took = t.elapsed().as_secs_f64();
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
    let escaped = traces(&dir);
    let summary = format!(
        "{stopped}/{n} starts stopped before the entrypoint ran ({}; {took:.0} s); {escaped}/{n} trace files; {events}/{n} enforcement events{}",
        fate_counts(&fates),
        repeated_detail(&repeated)
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
    for (id, f) in &fates {
        let ev = &stack.events_about(id)[0];
        if ev["binary"] != "/bin/busybox" || ev["container"]["pod_name"] != pod.spec.name.as_str() {
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
async fn trace_control(stack: &Stack, cri: &mut Cri, tag: &str) -> Result<()> {
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

/// A container that runs `/pause` (not busybox) and has the host's busybox bind-mounted
/// at `/bin/busybox`, plus `dir` at `/trace`: it keeps running in a selected pod, and
/// an exec of busybox inside it is what the policy must stop.
fn guard(name: &str, dir: &Path) -> Result<ContainerSpec> {
    let root = crate::debian::unpacked(&crate::images::BUSYBOX_STATIC)?;
    let bb = crate::debian::find_file(&root, "busybox")
        .ok_or_else(|| anyhow::anyhow!("busybox not in busybox-static"))?;
    Ok(ContainerSpec {
        name: name.into(),
        image: PAUSE_IMAGE.into(),
        command: vec!["/pause".into()],
        mounts: vec![
            HostMount {
                host_path: bb,
                container_path: "/bin/busybox".into(),
                readonly: true,
            },
            HostMount {
                host_path: dir.to_path_buf(),
                container_path: "/trace".into(),
                readonly: false,
            },
        ],
        ..Default::default()
    })
}

/// ExecSync of busybox writing `/trace/<file>` in container `id`: `Ok(how it was
/// stopped)` when it did not run, `Err` when it ran.
async fn exec_stopped(cri: &mut Cri, id: &str, dir: &Path, file: &str) -> Result<String> {
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

async fn first_instruction(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

async fn audit(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

/// The hook's own words from a runtime error (`rthooks-oci-hook: refusing …`), else the
/// whole root cause.
fn hook_refusal(e: &anyhow::Error) -> String {
    let msg = e.root_cause().to_string();
    match msg.find("rthooks-oci-hook:") {
        Some(i) => {
            let tail = &msg[i..];
            tail[..tail.find(" (log:").unwrap_or(tail.len())].replace("\\\"", "\"")
        }
        None => msg,
    }
}

async fn agent_down(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

/// What a controller watching the Kubernetes API knows of container `late-<i>`, whose
/// spec has `cgroups_path` (the runtime chooses the leaf: `<id>` for containerd,
/// `crio-<id>` for CRI-O).
fn late_identity(
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
async fn why_hooks(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

async fn base_spec_first_instruction(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
    trace_control(stack, cri, "bs-control").await?;
    let pod = cri.run_pod(&PodSpec::new("blocked", "locked")).await?;
    let r = prove_first_instruction(stack, cri, &pod, 3, "bs-victim").await;
    cri.remove_pod(&pod).await?;
    Ok(format!(
        "{} (namespace policy, hook from the base spec, no NRI); control: an unselected container wrote its trace file",
        r?
    ))
}

async fn base_spec_non_matching(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

async fn systemd_cgroup_identity(stack: &mut Stack, cri: &mut Cri) -> Result<String> {
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

fn step<'a>(name: &str, stack: &'a mut Stack, cri: &'a mut Cri) -> Step<'a> {
    match name {
        "nri_identity" => Box::pin(identity(stack, cri)),
        "nri_first_instruction" => Box::pin(first_instruction(stack, cri)),
        "nri_non_matching" => Box::pin(non_matching(stack, cri)),
        "nri_audit" => Box::pin(audit(stack, cri)),
        "nri_removal" => Box::pin(removal(stack, cri)),
        "nri_runtime_restart" => Box::pin(runtime_restart(stack, cri)),
        "nri_sync_not_covered" => Box::pin(sync_not_covered(stack, cri)),
        "why_hooks" => Box::pin(why_hooks(stack, cri)),
        "nri_agent_down" => Box::pin(agent_down(stack, cri)),
        "base_spec_first_instruction" => Box::pin(base_spec_first_instruction(stack, cri)),
        "base_spec_non_matching" => Box::pin(base_spec_non_matching(stack, cri)),
        "nri_systemd_cgroup_identity" => Box::pin(systemd_cgroup_identity(stack, cri)),
        "hooks_d_first_instruction" => Box::pin(first_instruction(stack, cri)),
        "hooks_d_non_matching" => Box::pin(non_matching(stack, cri)),
        "hooks_d_audit" => Box::pin(audit(stack, cri)),
        "hooks_d_removal" => Box::pin(removal(stack, cri)),
        "hooks_d_why_hooks" => Box::pin(why_hooks(stack, cri)),
        "hooks_d_agent_down" => Box::pin(agent_down(stack, cri)),
        other => {
            let other = other.to_string();
            Box::pin(async move { bail!("no such scenario: {other}") })
        }
    }
}

/// Runs the scenarios [`plan`] chooses, appending to `results`. Returns
/// whether none failed.
pub async fn run(
    results: &Path,
    bin_dir: &Path,
    filter: &str,
    exclude: &str,
    timeout: Duration,
) -> Result<bool> {
    let out = Results {
        file: results.to_path_buf(),
    };
    // `a|b` chooses scenarios containing a or b (the shell scenarios match none of
    // such a filter, which is what a run of only these scenarios wants).
    let chosen = plan(filter, exclude);
    let lines: Vec<_> = chosen
        .iter()
        .map(|(s, t)| json!({"scenario": s, "runtime": t.name()}))
        .collect();
    out.append(json!({ "plan": lines }))?;
    let uname = uname();
    let mut ok = true;
    for target in Target::ALL {
        for group in GROUPS {
            let names: Vec<&str> = chosen
                .iter()
                .filter(|(s, t)| *t == target && group_of(s) == group)
                .map(|(s, _)| *s)
                .collect();
            if !names.is_empty() {
                ok &= run_group(&out, target, group, &names, bin_dir, timeout, &uname).await?;
            }
        }
    }
    Ok(ok)
}

/// Copies the stack's logs (agent, hook, plugin, events, containerd) next to the
/// results, `logs/e2e-<scenario>-<runtime>/`: the stack's directory goes with it.
fn keep_logs(out: &Results, stack: &Stack, scenario: &str, runtime: &str) {
    let Some(dir) = out.file.parent() else {
        return;
    };
    let dest = dir.join("logs").join(format!("e2e-{scenario}-{runtime}"));
    if std::fs::create_dir_all(&dest).is_err() {
        return;
    }
    let d = stack.dir.path();
    for f in ["agent.log", "hook.log", "nri-hook.log", "events.jsonl"] {
        let _ = std::fs::copy(d.join(f), dest.join(f));
    }
    let _ = std::fs::copy(
        stack.runtime.log_path(),
        dest.join(format!("{}.log", stack.runtime.name())),
    );
}

/// The stack a group needs: its policies, runtime options and hook path.
async fn start_group(target: Target, group: Group, bins: Binaries) -> Result<Stack> {
    let containerd = |o: Options| RuntimeOptions::Containerd(o);
    match (target, group) {
        (Target::Containerd(release), Group::Nri) => {
            Stack::start(
                release,
                bins,
                &[("deny-busybox.yaml", POLICY), ("audit.yaml", AUDIT_POLICY)],
            )
            .await
        }
        (Target::Containerd(release), Group::BaseSpec) => {
            Stack::start_with(
                containerd(Options::new(release)),
                HookPath::BaseSpec,
                bins,
                &[("deny-locked.yaml", NAMESPACE_POLICY)],
            )
            .await
        }
        (Target::Containerd(release), Group::Systemd) => {
            let mut o = Options::new(release);
            o.systemd_cgroup = true;
            Stack::start_with(
                containerd(o),
                HookPath::Nri,
                bins,
                &[("deny-busybox.yaml", POLICY)],
            )
            .await
        }
        (Target::Crio(runtime), Group::Nri | Group::HooksD) => {
            let crio = crate::crio::Binaries::from_env()?
                .context("no CRI-O binaries (RTHOOKS_CRIO_DIR)")?;
            let (path, policies): (_, &[(&str, &str)]) = if group == Group::Nri {
                (
                    HookPath::Nri,
                    &[("deny-busybox.yaml", POLICY), ("audit.yaml", AUDIT_POLICY)],
                )
            } else {
                (
                    HookPath::HooksD,
                    &[
                        ("deny-locked.yaml", NAMESPACE_POLICY),
                        ("audit-ns.yaml", AUDIT_NAMESPACE_POLICY),
                    ],
                )
            };
            Stack::start_with(
                RuntimeOptions::Crio(crio, crate::crio::Options::new(runtime)),
                path,
                bins,
                policies,
            )
            .await
        }
        (t, g) => bail!("no {g:?} stack on {}", t.name()),
    }
}

/// Why a group cannot run here (a skip), or that it cannot run at all (a failure).
fn unavailable(target: Target, group: Group) -> Option<Verdict> {
    if !is_root() {
        return Some(Verdict::skip("needs root"));
    }
    if group == Group::Systemd && !Path::new(SYSTEMD_MARKER).exists() {
        return Some(Verdict::skip(format!(
            "needs systemd (runc's systemd cgroup driver asks it over D-Bus to create the \
             scopes): {SYSTEMD_MARKER} is absent, this guest has no systemd"
        )));
    }
    if let Target::Crio(runtime) = target {
        match crate::crio::Binaries::from_env() {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Some(Verdict::skip(format!(
                    "no CRI-O: {} is not set (cargo xtask e2e/test set it from --crio-dir, \
                     RTHOOKS_CRIO_DIR or ../shared/crio/crio-*.tar.zst beside the checkout)",
                    crate::crio::CRIO_DIR_ENV
                )))
            }
            Err(e) => return Some(Verdict::fail(format!("{e:#}"))),
        }
        if let Err(e) = runtime.binary() {
            return Some(Verdict::skip(format!("{e:#}")));
        }
        // On the hybrid development hosts crun refuses to run, and with runc CRI-O leaves
        // the container's cgroup v2 directory behind after RemoveContainer (so the agent
        // keeps the container until the pod's cgroup goes). The guests are cgroup v2 only.
        if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            return Some(Verdict::skip(
                "CRI-O's scenarios need the unified cgroup hierarchy (crun refuses a hybrid \
                 host; runc under CRI-O leaves the v2 directory after RemoveContainer): \
                 /sys/fs/cgroup is not cgroup v2 here",
            ));
        }
    }
    None
}

/// Starts the group's stack, runs `names` on it, appends their lines; whether none failed.
async fn run_group(
    out: &Results,
    target: Target,
    group: Group,
    names: &[&str],
    bin_dir: &Path,
    timeout: Duration,
    uname: &str,
) -> Result<bool> {
    let runtime = target.name();
    let setup = if let Some(v) = unavailable(target, group) {
        Err(v)
    } else {
        match Binaries::in_dir(bin_dir) {
            Err(e) => Err(Verdict::skip(e.to_string())),
            Ok(bins) => {
                match tokio::time::timeout(timeout, start_group(target, group, bins)).await {
                    Ok(Ok(s)) => Ok(s),
                    Ok(Err(e)) => Err(Verdict::fail(format!("stack did not start: {e:#}"))),
                    Err(_) => Err(Verdict::fail("stack did not start in time")),
                }
            }
        }
    };
    let mut stack = match setup {
        Ok(s) => s,
        Err(v) => {
            for s in names {
                out.append(line(s, runtime, &v, 0.0, "", uname))?;
            }
            return Ok(v.result != "fail");
        }
    };
    let status = stack.status().unwrap_or_default();
    let mode = status["enforcement_mode"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let why = status["enforcement_reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut cri = stack.runtime.cri().await?;
    let mut ok = true;
    for s in names {
        let t = Instant::now();
        let v = match tokio::time::timeout(timeout, step(s, &mut stack, &mut cri)).await {
            // The agent's reason for its mode, once per stack, for the matrix.
            Ok(Ok(detail)) if *s == names[0] && !why.is_empty() => {
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
            uname,
        ))?;
        if v.result == "fail" {
            keep_logs(out, &stack, s, runtime);
        }
        // A failed or timed-out scenario may have left pods, or the agent or plugin
        // stopped: the next scenario starts from the stack as the group set it up.
        if v.result != "pass" {
            let _ = cri.remove_all_pods().await;
            if stack.agent.as_mut().is_none_or(|a| !a.running()) {
                let _ = stack.start_agent().await;
            }
            let _ = stack.enable_hooks(&mut cri).await;
        }
    }
    let _ = cri.remove_all_pods().await;
    drop(stack);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_chooses_by_scenario_or_by_runtime() {
        let names = |f| {
            plan(f, "")
                .into_iter()
                .map(|(s, t)| format!("{s}@{}", t.name()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            plan("", "").len(),
            2 * CONTAINERD_SCENARIOS.len() + 2 * CRIO_SCENARIOS.len()
        );
        assert_eq!(
            names("hooks_d_audit|nri_audit"),
            [
                "nri_audit@containerd-2.1",
                "nri_audit@containerd-1.7",
                "hooks_d_audit@crio-runc",
                "hooks_d_audit@crio-crun"
            ]
        );
        let crun = names("crio-crun");
        assert_eq!(crun.len(), CRIO_SCENARIOS.len());
        assert!(crun.iter().all(|n| n.ends_with("@crio-crun")));
        assert_eq!(names("crio").len(), 2 * CRIO_SCENARIOS.len());
        // What the other guest runs when the CRI-O scenarios have their own.
        let rest = plan("", "crio");
        assert_eq!(rest.len(), 2 * CONTAINERD_SCENARIOS.len());
        assert!(rest.iter().all(|(_, t)| matches!(t, Target::Containerd(_))));
        // Every planned scenario has a group whose stack its runtime can start.
        for (s, t) in plan("", "") {
            let g = group_of(s);
            let crio_only = g == Group::HooksD;
            let containerd_only = matches!(g, Group::BaseSpec | Group::Systemd);
            match t {
                Target::Crio(_) => assert!(!containerd_only, "{s} on {t:?}"),
                Target::Containerd(_) => assert!(!crio_only, "{s} on {t:?}"),
            }
        }
    }

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
