//! The CRI runtimes the scenarios run on, and which scenarios apply to each.

use crate::containerd::Release;
use crate::crio::OciRuntime;

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
