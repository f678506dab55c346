//! rthooks' OCI hook: run by the container runtime (runc, crun, via containerd, CRI-O or
//! podman) at `createRuntime`, it tells rthooks-agent which container is being created —
//! cgroup, pod namespace, labels, name, image — before the container's first instruction,
//! so policies apply from its first `execve`. When the agent cannot be told, a
//! Tetragon-compatible failure rule decides whether the container may start anyway.
//!
//! Modules: [`state`] (stdin state, `config.json`), [`container`] (the container model
//! shared with the agent: cgroupsPath grammar, annotation keys, identity), [`config`]
//! (flags, env, file), [`policy`] (failure rule), [`log`] (rotated JSON log), [`agent`]
//! (the agent's methods, through the one-call HTTP/2 gRPC client `rthooks-grpc-client`),
//! [`hook`] (one invocation), [`alloc`] (the binary's allocator). The installers live in
//! their own crate and binary, `rthooks-setup`, so the binary the runtime executes for
//! every container holds only the hook.
pub mod agent;
pub mod alloc;
pub mod config;
pub mod error;
pub mod hook;
pub mod log;
pub mod policy;
pub mod state;

pub use error::{Error, Result};
/// The container model (cgroupsPath grammar, annotation keys, identity) the hook uses.
pub use rthooks_container as container;
