//! A small NRI (containerd Node Resource Interface) plugin library.
//!
//! * [`mux`]: the connection multiplexer NRI runs over one UNIX socket.
//! * [`api`]: the NRI messages and ttrpc stubs (`nri.pkg.api.v1alpha1`).
//! * [`Plugin`]: one method per NRI event; implement those you subscribe to.
//! * [`Runner`]: connection, registration, configuration, synchronization, reconnects,
//!   and the pre-launched mode (`NRI_PLUGIN_SOCKET`).
//!
//! See [`Runner`] for an example.

pub mod api;
pub mod mux;
mod plugin;
mod runner;

pub use plugin::{Configured, EventMask, Plugin, PluginError, PluginResult};
pub use runner::{
    Endpoint, NriError, Runner, RunnerConfig, DEFAULT_SOCKET, ENV_PLUGIN_IDX, ENV_PLUGIN_NAME,
    ENV_PLUGIN_SOCKET,
};

#[cfg(test)]
mod tests;
