//! Generates the NRI messages and ttrpc stubs with ttrpc-codegen (pure Rust, no protoc).
//!
//! The generated files open with inner attributes and doc comments (`#![allow(...)]`,
//! `//!`), which `include!` rejects, so they are written to a scratch directory and copied into `OUT_DIR` with
//! those lines removed; `src/nri/api.rs` includes the cleaned copies.
use std::path::PathBuf;
use std::{env, fs};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/nri.proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let raw = out.join("raw");
    fs::create_dir_all(&raw)?;
    ttrpc_codegen::Codegen::new()
        .out_dir(&raw)
        .input("proto/nri.proto")
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()?;
    for entry in fs::read_dir(&raw)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path)?;
            let cleaned: String = text
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !t.starts_with("#![") && !t.starts_with("//!")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            fs::write(out.join(path.file_name().unwrap()), cleaned)?;
        }
    }
    Ok(())
}
