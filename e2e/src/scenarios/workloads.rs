//! What the scenarios run and enforce: the policies the stacks load and the containers
//! the scenarios start.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cri::{ContainerSpec, HostMount, PodSpec};
use crate::images::{BUSYBOX_IMAGE, PAUSE_IMAGE};

/// Pods labelled app=blocked may not run busybox (the CRI and the hook scenarios alike);
/// every container of this suite runs
/// `/bin/sleep` or `/bin/sh`, busybox links, as its first instruction.
pub const POLICY: &str = include_str!("../../../vm/guest/policies/deny-busybox-blocked.yaml");

/// Pods labelled app=audited are watched, not stopped.
pub const AUDIT_POLICY: &str =
    include_str!("../../../vm/guest/policies/audit-busybox-audited.yaml");

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
pub(super) fn blocked_pod(name: &str) -> PodSpec {
    PodSpec::new(name, LOCKED).label("app", "blocked")
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

/// Where the FIFO a [`tracer`] blocks on lives, beside its trace directory.
pub(super) fn hold_dir(trace_dir: &Path) -> PathBuf {
    let mut hold = trace_dir.as_os_str().to_owned();
    hold.push(".hold");
    hold.into()
}

/// A container whose entrypoint (`/bin/sh`, i.e. busybox) first writes `/trace/<name>`
/// into the hostPath mount `dir`, then waits: the file exists if and only if the
/// entrypoint ran.
///
/// It waits in the shell itself, opening a FIFO no one ever writes (`/hold/fifo`, from
/// `proofs::trace_dir`), not with `exec sleep`: that would be a second exec of busybox, and a
/// container registered after its start (why_hooks, nri_sync_not_covered) would then be
/// killed or refused at it whenever the registration wins the race against the shell,
/// leaving no running container to list or to exec into.
pub(super) fn tracer(name: &str, dir: &Path) -> ContainerSpec {
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

/// A container that runs `/pause` (not busybox) and has the host's busybox bind-mounted
/// at `/bin/busybox`, plus `dir` at `/trace`: it keeps running in a selected pod, and
/// an exec of busybox inside it is what the policy must stop.
pub(super) fn guard(name: &str, dir: &Path) -> Result<ContainerSpec> {
    let bb = crate::images::busybox_binary()?;
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
