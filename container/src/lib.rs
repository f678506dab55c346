//! rthooks' one container model, shared by the OCI hook, the agent, the NRI plugin and the
//! e2e CRI client:
//!
//! * [`cgroup`]: the `linux.cgroupsPath` grammar runc and crun accept (cgroupfs paths and
//!   systemd `slice:prefix:name`) as a parsed type, and what a cgroup path tells about the
//!   pod and the container;
//! * [`annotations`]: the keys containerd and CRI-O put in a container's spec;
//! * [`identity`]: who a container is, from request fields, annotations and its cgroup;
//! * [`labels`]: the `rthooks.io/pod-labels` annotation and Kubernetes label rules.
//!
//! Only data and rules live here: finding the cgroup on a host (mounts, ids) is the
//! agent's job, as the authority for the cgroup.
pub mod annotations;
pub mod cgroup;
pub mod identity;
pub mod labels;

pub use cgroup::{CgroupPath, CgroupsPath, CgroupsPathError, Refusal};
pub use identity::{ContainerIdentity, IdentityError};
pub use labels::{LabelsError, POD_LABELS_ANNOTATION};
