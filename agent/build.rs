//! Builds the eBPF programs (`bpf/`, nightly + build-std, via aya-build) into OUT_DIR, from
//! where `src/bpf.rs` embeds the object. `AYA_BUILD_SKIP=1` skips it (e.g. for clippy on
//! a machine without the BPF toolchain); such an agent refuses to start.
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let bpf_dir = manifest_dir
        .join("../bpf")
        .canonicalize()
        .context("bpf/ next to agent/")?;
    let bpf_dir = bpf_dir.to_str().context("non-UTF-8 path")?;
    // common/ is a dependency of the BPF crate: rebuild when the map layouts change.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../common/src").display()
    );
    // An empty placeholder keeps `include_bytes!` compiling when the build is skipped.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let object = out.join("rthooks");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "rthooks-bpf",
            root_dir: bpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
