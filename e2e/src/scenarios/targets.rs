//! The runtime paths the scenarios run on, and which scenarios apply to each: the node
//! itself, the OCI runtimes without CRI (runc and crun bundles, podman with hooks.d), and
//! the CRI runtimes (containerd 2.1 and 1.7, CRI-O on runc and on crun).

use crate::containerd::Release;
use crate::crio::OciRuntime;
use crate::oci::Engine;

/// A runtime path the scenarios run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The node itself, no runtime (boot, the agent).
    Node,
    /// An OCI runtime without CRI: the hook in a bundle's `config.json`, or podman's
    /// hooks.d.
    Oci(Engine),
    /// containerd (NRI plugin, base spec, systemd driver).
    Containerd(Release),
    /// CRI-O with this OCI runtime (hooks.d).
    Crio(OciRuntime),
}

impl Target {
    /// The CRI runtimes, in run order.
    pub const ALL: [Target; 4] = [
        Target::Containerd(Release::V2_1),
        Target::Containerd(Release::V1_7),
        Target::Crio(OciRuntime::Runc),
        Target::Crio(OciRuntime::Crun),
    ];

    /// The OCI runtime paths without CRI the hook scenarios run on, in run order.
    pub const OCI: [Target; 3] = [
        Target::Oci(Engine::Bundle(OciRuntime::Runc)),
        Target::Oci(Engine::Bundle(OciRuntime::Crun)),
        Target::Oci(Engine::Podman),
    ];

    /// The matrix's runtime column (empty for the node).
    pub fn name(self) -> &'static str {
        match self {
            Target::Node => "",
            Target::Oci(e) => e.name(),
            Target::Containerd(Release::V2_1) => "containerd-2.1",
            Target::Containerd(Release::V1_7) => "containerd-1.7",
            Target::Crio(OciRuntime::Runc) => "crio-runc",
            Target::Crio(OciRuntime::Crun) => "crio-crun",
        }
    }

    /// The scenarios that apply to it, in run order (beside [`NODE_SCENARIOS`]).
    pub fn scenarios(self) -> &'static [&'static str] {
        match self {
            Target::Node => &[],
            Target::Oci(_) => HOOK_SCENARIOS,
            Target::Containerd(_) => CONTAINERD_SCENARIOS,
            Target::Crio(_) => CRIO_SCENARIOS,
        }
    }
}

/// Which of a kernel's rows one guest runs: `cargo xtask e2e --crio-guest` boots two
/// guests of each kernel at once, and each TCG guest keeps one host core busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Share {
    /// Every row.
    All,
    /// Every row but the second guest's.
    First,
    /// The rows [`SECOND_GUEST`] names.
    Second,
}

/// The second guest's rows: the CRI-O ones (runtimes `crio-runc`, `crio-crun`) and
/// containerd 1.7's but its two 20-of-20 proofs. Under TCG on 2 cores (`.ci/run`,
/// 2026-12-01) the first guest's scenarios took 1,248 s and the second's 1,817 s while it
/// had all of containerd 1.7's; `nri_first_instruction` and `why_hooks` on 1.7 (311 s of
/// them) run in the first guest since, which evens the two out.
pub const SECOND_GUEST: &str = "crio\
    |containerd_starts@containerd-1.7\
    |nri_identity@containerd-1.7\
    |nri_non_matching@containerd-1.7\
    |nri_audit@containerd-1.7\
    |nri_removal@containerd-1.7\
    |nri_sync_not_covered@containerd-1.7\
    |nri_agent_down@containerd-1.7\
    |nri_runtime_restart@containerd-1.7\
    |base_spec_@containerd-1.7\
    |systemd@containerd-1.7\
    |kube_@containerd-1.7";

/// Every (scenario, runtime) pair in run order: the node's first, then the hook on the
/// OCI runtimes without CRI, then the CRI runtimes'.
pub fn table() -> Vec<(&'static str, Target)> {
    let per_target = Target::OCI
        .into_iter()
        .chain(Target::ALL)
        .flat_map(|t| t.scenarios().iter().map(move |s| (*s, t)));
    NODE_SCENARIOS.iter().copied().chain(per_target).collect()
}

/// What the rest builds on, each once or once per runtime it checks (the shell suite's
/// order): the guest booted, containerd starts, runc/crun run a bundle and podman a
/// container, the agent starts, the agent's kernel tests pass (in the mode it chooses
/// and with kprobe forced).
pub const NODE_SCENARIOS: &[(&str, Target)] = &[
    ("boot", Target::Node),
    ("containerd_starts", Target::Containerd(Release::V1_7)),
    ("containerd_starts", Target::Containerd(Release::V2_1)),
    ("bundle_runs", Target::Oci(Engine::Bundle(OciRuntime::Runc))),
    ("bundle_runs", Target::Oci(Engine::Bundle(OciRuntime::Crun))),
    ("podman_runs", Target::Oci(Engine::Podman)),
    ("agent_starts", Target::Node),
    ("agent_kernel_tests", Target::Node),
    ("agent_kernel_exec_semantics", Target::Node),
    // Named apart, so that `--scenario agent_kernel` and `--scenario agent_kprobe`
    // select one half each.
    ("agent_kprobe_exec_semantics", Target::Node),
    ("agent_kprobe_restart", Target::Node),
];

/// The OCI hook's scenarios on the runtimes without CRI, in run order (each runs once
/// per runtime).
pub const HOOK_SCENARIOS: &[&str] = &[
    "hook_first_instruction",
    "hook_non_matching",
    "hook_audit",
    "hook_agent_down",
    "hook_removal",
];

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
    "kube_first_instruction",
    "kube_label_removal",
    "kube_crd_policy",
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
    "kube_first_instruction",
    "kube_label_removal",
    "kube_crd_policy",
];
