//! The e2e suite's one scenario set, run in the VM guests (`rthooks-e2e guest --results
//! FILE`): the node (boot, the runtimes, the agent and its kernel tests), the OCI hook
//! without CRI (runc and crun bundles, podman with hooks.d), and the full stack per CRI
//! runtime (containerd 2.1 and 1.7; CRI-O on runc and on crun); one result line per
//! scenario, in the format of `vm/README.md` (a plan line first, then `scenario, runtime,
//! result, reason, detail, seconds, enforcement_mode, uname`).
//!
//! Scenarios share one stack per group and runtime: `nri_*` and `why_hooks` the NRI
//! plugin's, `base_spec_*` containerd configured by `rthooks-setup install
//! containerd-base-spec` (no NRI), `*systemd*` runc's systemd cgroup driver (skipped
//! without systemd), `hooks_d_*` CRI-O with `rthooks-setup install hooks-d`'s file (no
//! NRI; skipped without CRI-O's binaries). A scenario is written once and runs on every
//! stack it applies to. "The entrypoint never ran" is proven by entrypoints that would
//! write a file into a hostPath mount; an unselected container writing its file is the
//! control that makes an absent file mean something. The node's and the hook's scenarios
//! (`hook_*`: one stack per bundle runtime or podman) run only in the guests.
//!
//! * [`runner`]: the scenario table, filters, timeout, running.
//! * [`targets`]: the runtimes ([`Target`]) and the scenarios that apply to each.
//! * [`proofs`]: the one "stopped before its first instruction" proof.
//! * [`results`]: the one results writer.
//! * [`workloads`]: the policies and containers the scenarios use.
//! * the scenarios by topic: [`node`], [`hook`] (without CRI), [`identity`],
//!   [`first_instruction`], [`non_matching`], [`lifecycle`], and the Kubernetes rows,
//!   [`kube`] (labels from an API server in the guest).

mod first_instruction;
mod hook;
mod identity;
mod kube;
mod lifecycle;
mod node;
mod non_matching;
mod proofs;
mod results;
mod runner;
mod targets;
mod workloads;

pub use node::TEST_BINARIES_ENV;
pub use proofs::STARTS;
pub use results::Verdict;
pub use runner::{plan, run};
pub use targets::{
    Share, Target, CONTAINERD_SCENARIOS, CRIO_SCENARIOS, HOOK_SCENARIOS, NODE_SCENARIOS,
    SECOND_GUEST,
};
pub(crate) use workloads::sleeper;
pub use workloads::{AUDIT_NAMESPACE_POLICY, AUDIT_POLICY, NAMESPACE_POLICY, POLICY};
