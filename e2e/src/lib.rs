//! End-to-end test support for rthooks: harnesses that drive real runtimes, usable from
//! other crates' integration tests and from the VM suite.
//!
//! * [`debian`]: Debian packages fetched, verified and unpacked into `~/.cache/rthooks`
//!   (the test kit's fetcher, which xtask uses too).
//! * [`images`]: locally built `localhost/pause:1` and `localhost/busybox:1` OCI tarballs.
//! * [`containerd`]: a private containerd (1.7.24 or 2.1.9) with NRI, in a temp dir.
//! * [`crio`]: a private CRI-O (the binaries of `RTHOOKS_CRIO_DIR`), runc or crun, in a temp dir.
//! * [`oci`]: runc/crun bundles and podman with the hook, without CRI.
//! * [`cri`]: a CRI v1 client doing what kubelet does (pods, containers, cleanup).
//! * [`stack`]: containerd or CRI-O + `rthooks-agent` + `rthooks-oci-hook`, put in by
//!   `rthooks-nri-hook`, containerd's base spec or CRI-O's hooks.d.
//! * [`kube`]: a Kubernetes API server (etcd + apiextensions-apiserver) for the agent.
//! * [`scenarios`]: the scenarios `rthooks-e2e guest` runs in the VM guests (runner,
//!   runtimes, the first-instruction proof, the results writer, the scenarios by topic).
//! * [`timing`]: waits, stretched for slow guests.

mod command;
pub mod containerd;
pub mod cri;
pub mod crio;
mod daemon;
pub mod demo;
pub mod images;
pub mod kube;
pub mod oci;
pub mod scenarios;
pub mod stack;
pub mod timing;

pub use rthooks_testkit::debian;

/// The CRI v1 types, re-exported for tests.
pub use k8s_cri;
