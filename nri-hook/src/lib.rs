//! rthooks' containerd NRI plugin.
//!
//! * [`config`]: the plugin's flags, environment variables and config file.
//! * [`nri`]: a reusable NRI plugin library (multiplexer, ttrpc API, plugin trait, runner).
//! * [`rthooks`]: the rthooks plugin: on CreateContainer it adds the `rthooks-oci-hook`
//!   createRuntime hook and the pod labels annotation; Synchronize and RemoveContainer keep
//!   the agent in step, asynchronously.

pub mod config;
pub mod nri;
pub mod rthooks;
