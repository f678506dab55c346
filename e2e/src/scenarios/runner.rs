//! The scenario table and its running: which (scenario, runtime) pairs a filter picks,
//! the stack each group of scenarios shares, the per-scenario timeout, and the result
//! line each one leaves.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::first_instruction::{base_spec_first_instruction, first_instruction, why_hooks};
use super::hook;
use super::identity::{audit, identity, systemd_cgroup_identity};
use super::kube::{kube_crd_policy, kube_first_instruction, kube_label_removal, SharedCluster};
use super::lifecycle::{agent_down, removal, runtime_restart, sync_not_covered};
use super::node::{self, Outcome};
use super::non_matching::{base_spec_non_matching, non_matching};
use super::results::{line, uname, Results, Verdict};
use super::targets::{table, Share, Target, NODE_SCENARIOS, SECOND_GUEST};
use super::workloads::{AUDIT_NAMESPACE_POLICY, AUDIT_POLICY, NAMESPACE_POLICY, POLICY};
use crate::containerd::{is_root, Options};
use crate::cri::Cri;
use crate::kube::AgentApi;
use crate::oci::{userland_binary, Engine};
use crate::stack::{Binaries, HookPath, Runtime, RuntimeOptions, Stack};

/// The (scenario, runtime) pairs of this guest's `share` that `filter` chooses and
/// `exclude` does not, in run order: each is a list of `|`-separated alternatives matched
/// against the scenario's name or its runtime's, or both as `SCENARIO@RUNTIME` (an empty
/// `exclude` leaves nothing out).
pub fn plan(filter: &str, share: Share, exclude: &str) -> Vec<(&'static str, Target)> {
    let names = |pattern: &str, s: &str, t: Target| {
        pattern.split('|').any(|f| match f.split_once('@') {
            Some((scenario, runtime)) => s.contains(scenario) && t.name().contains(runtime),
            None => s.contains(f) || t.name().contains(f),
        })
    };
    table()
        .into_iter()
        .filter(|(s, t)| {
            let shared = match share {
                Share::All => true,
                Share::First => !names(SECOND_GUEST, s, *t),
                Share::Second => names(SECOND_GUEST, s, *t),
            };
            shared && names(filter, s, *t) && (exclude.is_empty() || !names(exclude, s, *t))
        })
        .collect()
}

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
    /// The hook without CRI: the agent, and the hook in bundles or podman's hooks.d.
    Hook,
    /// No stack: each scenario brings what it checks.
    Node,
    /// The hook without labels (containerd's base spec, CRI-O's hooks.d), the agent taking
    /// them from the guest's Kubernetes API server.
    Kube,
}

fn group_of(scenario: &str) -> Group {
    if NODE_SCENARIOS.iter().any(|(s, _)| *s == scenario) {
        Group::Node
    } else if scenario.starts_with("hook_") {
        Group::Hook
    } else if scenario.starts_with("kube_") {
        Group::Kube
    } else if scenario.starts_with("hooks_d_") {
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

/// Set in the guests' environment by `cargo xtask e2e` (the kernels.toml name).
const GUEST_MARKER: &str = "RTHOOKS_KERNEL";

type Step<'a> = Pin<Box<dyn Future<Output = Result<String>> + 'a>>;

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
        "kube_first_instruction" => Box::pin(kube_first_instruction(stack, cri)),
        "kube_label_removal" => Box::pin(kube_label_removal(stack, cri)),
        "kube_crd_policy" => Box::pin(kube_crd_policy(stack, cri)),
        other => {
            let other = other.to_string();
            Box::pin(async move { bail!("no such scenario: {other}") })
        }
    }
}

/// The hook scenarios without CRI.
fn hook_step<'a>(name: &str, stack: &'a mut Stack) -> Step<'a> {
    match name {
        "hook_first_instruction" => Box::pin(hook::first_instruction(stack)),
        "hook_non_matching" => Box::pin(hook::non_matching(stack)),
        "hook_audit" => Box::pin(hook::audit(stack)),
        "hook_agent_down" => Box::pin(hook::agent_down(stack)),
        "hook_removal" => Box::pin(hook::removal(stack)),
        other => {
            let other = other.to_string();
            Box::pin(async move { bail!("no such scenario: {other}") })
        }
    }
}

type NodeStep<'a> = Pin<Box<dyn Future<Output = Result<Outcome>> + 'a>>;

/// The node's scenarios (no stack).
fn node_step<'a>(name: &str, target: Target, bin_dir: &'a Path) -> NodeStep<'a> {
    match (name, target) {
        ("boot", _) => Box::pin(node::boot()),
        ("containerd_starts", Target::Containerd(release)) => {
            Box::pin(node::containerd_starts(release))
        }
        ("bundle_runs" | "podman_runs", Target::Oci(engine)) => Box::pin(node::engine_runs(engine)),
        ("agent_starts", _) => Box::pin(node::agent_starts(bin_dir)),
        ("agent_kernel_tests", _) => Box::pin(node::agent_tests("enforcement", None, None)),
        ("agent_kernel_exec_semantics", _) => {
            Box::pin(node::agent_tests("exec_semantics", None, None))
        }
        // The kprobe path, forced where auto would choose lsm or fentry: every exec row,
        // and enforcement through an agent crash (its link is pinned).
        ("agent_kprobe_exec_semantics", _) => {
            Box::pin(node::agent_tests("exec_semantics", Some("kprobe"), None))
        }
        ("agent_kprobe_restart", _) => Box::pin(node::agent_tests(
            "enforcement",
            Some("kprobe"),
            Some("enforcement_survives_an_agent_crash_and_restart"),
        )),
        (other, t) => {
            let other = format!("{other} on {t:?}");
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
    share: Share,
    exclude: &str,
    timeout: Duration,
) -> Result<bool> {
    let out = Results::new(results);
    // `a|b` chooses scenarios whose name or runtime contains a or b.
    let chosen = plan(filter, share, exclude);
    let lines: Vec<_> = chosen
        .iter()
        .map(|(s, t)| json!({"scenario": s, "runtime": t.name()}))
        .collect();
    out.append(json!({ "plan": lines }))?;
    // Beside the results: the requests of every agent of this guest, for its RBAC.
    let audit_log = results.with_file_name("apiserver-audit.log");
    let mut kube = SharedCluster::new(&audit_log);
    let mut ok = true;
    let uname = uname();
    // Consecutive scenarios of one group and runtime share its stack.
    let mut rest = &chosen[..];
    while let Some(&(first, target)) = rest.first() {
        let group = group_of(first);
        let names: Vec<&str> = rest
            .iter()
            .take_while(|(s, t)| *t == target && group_of(s) == group)
            .map(|(s, _)| *s)
            .collect();
        rest = &rest[names.len()..];
        ok &= if group == Group::Node {
            run_node(&out, target, &names, bin_dir, timeout, &uname).await?
        } else {
            run_group(&out, target, group, &names, bin_dir, timeout, &mut kube).await?
        };
    }
    Ok(ok)
}

/// Runs the node's scenarios `names` (no stack), appends their lines; whether none failed.
async fn run_node(
    out: &Results,
    target: Target,
    names: &[&str],
    bin_dir: &Path,
    timeout: Duration,
    uname: &str,
) -> Result<bool> {
    let runtime = target.name();
    let mut ok = true;
    for s in names {
        let t = Instant::now();
        let outcome = match unavailable(target, Group::Node) {
            Some(v) => v.into(),
            None => match tokio::time::timeout(timeout, node_step(s, target, bin_dir)).await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => Verdict::fail(format!("{e:#}")).into(),
                Err(_) => Verdict::fail(format!("timed out after {timeout:?}")).into(),
            },
        };
        let Outcome { verdict: v, mode } = outcome;
        ok &= v.result != "fail";
        eprintln!(
            "e2e guest: {s} ({runtime}) -> {} {}{}",
            v.result, v.reason, v.detail
        );
        let secs = t.elapsed().as_secs_f64();
        out.append(line(s, runtime, &v, secs, &mode, uname))?;
    }
    Ok(ok)
}

/// Copies the stack's logs (agent, hook, plugin, events, containerd) next to the
/// results, `logs/e2e-<scenario>-<runtime>/`: the stack's directory goes with it.
fn keep_logs(out: &Results, stack: &Stack, scenario: &str, runtime: &str) {
    let Some(dir) = out.dir() else {
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
async fn start_group(
    target: Target,
    group: Group,
    bins: Binaries,
    kube: &mut SharedCluster,
) -> Result<Stack> {
    let containerd = |o: Options| RuntimeOptions::Containerd(o);
    match (target, group) {
        (_, Group::Kube) => {
            let (options, path) = match target {
                Target::Containerd(release) => {
                    (containerd(Options::new(release)), HookPath::BaseSpec)
                }
                Target::Crio(runtime) => (
                    RuntimeOptions::Crio(
                        crate::crio::Binaries::from_env()?
                            .context("no CRI-O binaries (RTHOOKS_CRIO_DIR)")?,
                        crate::crio::Options::new(runtime),
                    ),
                    HookPath::HooksD,
                ),
                Target::Oci(_) | Target::Node => bail!("no Kubernetes stack without CRI"),
            };
            let api = AgentApi::new(kube.get().await?)?;
            Stack::start_with_api(
                options,
                path,
                bins,
                &[("deny-busybox.yaml", POLICY)],
                Some(api),
            )
            .await
        }
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
        (Target::Oci(engine), Group::Hook) => {
            let path = match engine {
                Engine::Bundle(_) => HookPath::Bundle,
                Engine::Podman => HookPath::HooksD,
            };
            Stack::start_with(
                RuntimeOptions::Oci(engine),
                path,
                bins,
                &[("deny-busybox.yaml", POLICY), ("audit.yaml", AUDIT_POLICY)],
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
    if group == Group::Kube {
        if let Some(why) = crate::kube::unavailable() {
            return Some(Verdict::skip(why));
        }
    }
    // What they check (the guest's mounts, the agent's kernel tests, the userland's
    // runtimes) is the guests'; the host's is checked by the crates' own tests.
    if matches!(group, Group::Node | Group::Hook) && std::env::var_os(GUEST_MARKER).is_none() {
        return Some(Verdict::skip(format!(
            "runs in the VM guests ({GUEST_MARKER} is not set; cargo xtask e2e sets it)"
        )));
    }
    if let Target::Oci(engine) = target {
        if group == Group::Hook {
            let needed = match engine {
                Engine::Bundle(r) => vec![r.name()],
                Engine::Podman => vec!["podman", "conmon", "runc"],
            };
            if let Some(e) = needed.into_iter().find_map(|b| userland_binary(b).err()) {
                return Some(Verdict::skip(format!("{e:#}")));
            }
        }
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
    kube: &mut SharedCluster,
) -> Result<bool> {
    let runtime = target.name();
    let uname = &uname();
    let setup = if let Some(v) = unavailable(target, group) {
        Err(v)
    } else {
        match Binaries::in_dir(bin_dir) {
            Err(e) => Err(Verdict::skip(e.to_string())),
            Ok(bins) => {
                match tokio::time::timeout(timeout, start_group(target, group, bins, kube)).await {
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
    // The hook scenarios without CRI have none.
    let mut cri = match group {
        Group::Hook => None,
        _ => Some(stack.runtime.cri().await?),
    };
    let mut ok = true;
    for s in names {
        let t = Instant::now();
        let scenario = match cri.as_mut() {
            Some(cri) => step(s, &mut stack, cri),
            None => hook_step(s, &mut stack),
        };
        let v = match tokio::time::timeout(timeout, scenario).await {
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
            remove_all(&stack, cri.as_mut()).await;
            if stack.agent.as_mut().is_none_or(|a| !a.running()) {
                let _ = stack.start_agent().await;
            }
            if let Some(cri) = cri.as_mut() {
                let _ = stack.enable_hooks(cri).await;
            }
        }
    }
    remove_all(&stack, cri.as_mut()).await;
    drop(stack);
    Ok(ok)
}

/// Removes what scenarios left: every pod (CRI), every container (without CRI).
async fn remove_all(stack: &Stack, cri: Option<&mut Cri>) {
    match (cri, &stack.runtime) {
        (Some(cri), _) => {
            let _ = cri.remove_all_pods().await;
        }
        (None, Runtime::Oci(node)) => node.remove_all().await,
        (None, _) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::targets::{CONTAINERD_SCENARIOS, CRIO_SCENARIOS, HOOK_SCENARIOS};

    #[test]
    fn a_filter_chooses_by_scenario_or_by_runtime() {
        let names = |f| {
            plan(f, Share::All, "")
                .into_iter()
                .map(|(s, t)| format!("{s}@{}", t.name()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            plan("", Share::All, "").len(),
            NODE_SCENARIOS.len()
                + 3 * HOOK_SCENARIOS.len()
                + 2 * CONTAINERD_SCENARIOS.len()
                + 2 * CRIO_SCENARIOS.len()
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
        // The two guests of a kernel (`--crio-guest`) run every row once between them: the
        // second CRI-O's and containerd 1.7's, the first the rest and 1.7's two proofs.
        let all = plan("", Share::All, "");
        let first = plan("", Share::First, "");
        let second = plan("", Share::Second, "");
        assert_eq!(first.len() + second.len(), all.len());
        assert!(all.iter().all(|r| first.contains(r) != second.contains(r)));
        assert!(all
            .iter()
            .filter(|(_, t)| matches!(t, Target::Crio(_)))
            .all(|r| second.contains(r)));
        for proof in ["nri_first_instruction", "why_hooks"] {
            assert!(first.contains(&(proof, Target::Containerd(crate::containerd::Release::V1_7))));
        }
        // Each alternative of the split names a row (a renamed scenario would not).
        for alternative in SECOND_GUEST.split('|') {
            assert!(
                !plan(alternative, Share::All, "").is_empty(),
                "{alternative} names no row"
            );
        }
        // The user's --scenario and --exclude choose within a share.
        assert_eq!(
            plan("why_hooks|hooks_d_why", Share::Second, "crio-crun"),
            [(
                "hooks_d_why_hooks",
                Target::Crio(crate::crio::OciRuntime::Runc)
            )]
        );
        // SCENARIO@RUNTIME names both: what `cargo xtask test` leaves to `--all`.
        assert_eq!(
            names("kube_first@crio-runc|kube_crd@containerd-2"),
            [
                "kube_crd_policy@containerd-2.1",
                "kube_first_instruction@crio-runc"
            ]
        );
        let ci = plan("", Share::All, "kube@containerd-1.7|kube@crio-crun");
        let kube_rows = |rows: &[&str]| rows.iter().filter(|s| s.starts_with("kube_")).count();
        assert_eq!(
            ci.len(),
            plan("", Share::All, "").len()
                - kube_rows(CONTAINERD_SCENARIOS)
                - kube_rows(CRIO_SCENARIOS)
        );
        assert!(ci
            .iter()
            .any(|(s, t)| s.starts_with("kube_") && t.name() == "crio-runc"));
        assert!(!ci
            .iter()
            .any(|(s, t)| s.starts_with("kube_") && t.name() == "crio-crun"));
        // Every planned scenario has a group whose stack its runtime can start.
        for (s, t) in plan("", Share::All, "") {
            let g = group_of(s);
            let crio_only = g == Group::HooksD;
            let containerd_only = matches!(g, Group::BaseSpec | Group::Systemd);
            match t {
                Target::Crio(_) => assert!(!containerd_only && g != Group::Hook, "{s} on {t:?}"),
                Target::Containerd(_) => assert!(!crio_only && g != Group::Hook, "{s} on {t:?}"),
                Target::Oci(_) => assert!(matches!(g, Group::Hook | Group::Node), "{s} on {t:?}"),
                Target::Node => assert_eq!(g, Group::Node, "{s}"),
            }
        }
    }

    #[test]
    fn the_rows_the_shell_suite_wrote_keep_their_names_and_order() {
        // As vm/guest/scenarios/*.sh registered them (scenario, runtime), so that the
        // README matrix stays comparable.
        let mut shell = vec![
            ("boot", ""),
            ("containerd_starts", "containerd-1.7"),
            ("containerd_starts", "containerd-2.1"),
            ("bundle_runs", "runc"),
            ("bundle_runs", "crun"),
            ("podman_runs", "podman"),
            ("agent_starts", ""),
            ("agent_kernel_tests", ""),
            ("agent_kernel_exec_semantics", ""),
            ("agent_kprobe_exec_semantics", ""),
            ("agent_kprobe_restart", ""),
        ];
        for rt in ["runc", "crun", "podman"] {
            for s in HOOK_SCENARIOS {
                shell.push((s, rt));
            }
        }
        let ported: Vec<_> = plan("", Share::All, "")
            .into_iter()
            .map(|(s, t)| (s, t.name()))
            .take(shell.len())
            .collect();
        assert_eq!(ported, shell);
        // `--scenario agent_kernel` and `--scenario agent_kprobe` pick one half each.
        let half = |f| {
            plan(f, Share::All, "")
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            half("agent_kernel"),
            ["agent_kernel_tests", "agent_kernel_exec_semantics"]
        );
        assert_eq!(
            half("agent_kprobe"),
            ["agent_kprobe_exec_semantics", "agent_kprobe_restart"]
        );
    }
}
