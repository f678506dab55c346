//! Generates the protobuf code with protox (pure Rust), so building needs no `protoc`; the
//! tonic clients and servers only with the features that ask for them.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tetragon.proto", "proto/rthooks.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        .compile_fds(fds)?;
    Ok(())
}
