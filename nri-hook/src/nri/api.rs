//! Generated NRI messages (`nri.pkg.api.v1alpha1`) and ttrpc stubs for the `Runtime` and
//! `Plugin` services, from `proto/nri.proto` (see `build.rs`).

/// Messages and enums.
#[allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_attributes,
    unused_imports,
    unused_results,
    missing_docs,
    unused_mut,
    trivial_casts
)]
pub mod nri {
    include!(concat!(env!("OUT_DIR"), "/nri.rs"));
}

/// ttrpc clients (`RuntimeClient`, `PluginClient`), server traits (`Runtime`, `Plugin`) and
/// their registration helpers (`create_runtime`, `create_plugin`).
#[allow(
    clippy::all,
    clippy::pedantic,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unused_results,
    missing_docs,
    dead_code
)]
pub mod nri_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/nri_ttrpc.rs"));
}

pub use nri::*;
