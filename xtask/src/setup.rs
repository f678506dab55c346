//! Prerequisites, installed when missing. Each check is cheap so that every xtask
//! command can call [`ensure`] first.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, output, run};

/// Debian packages the build and the tests use: runtimes for the host integration tests,
/// QEMU and guest tooling for the VM suite.
pub const APT_PACKAGES: &[&str] = &[
    // k8s-cri's build script (the e2e CRI client) runs protoc.
    "protobuf-compiler",
    // gcc -static for the test images' pause binary; jq for the guest scenarios.
    "libc6-dev",
    "gcc",
    "jq",
    // musl-gcc: the mimalloc variant of `cargo xtask hook-variants` compiles C for musl.
    "musl-tools",
    "runc",
    "podman",
    "busybox-static",
    "umoci",
    "qemu-system-x86",
    "cpio",
    "zstd",
    "xz-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const NIGHTLY: &str = "nightly";

pub fn ensure() -> Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    musl_target();
    Ok(())
}

fn apt_packages() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Installs the Debian packages of `packages` that are not installed yet.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The deployed hook is built for musl: glibc's start-up alone (CPU feature probing
/// with `cpuid`, which traps under virtualisation) costs the hook ~1 ms per container
/// (oci-hook/README.md, "Performance"). Optional: without it `cargo xtask build` builds
/// the glibc hook and says so; nothing else needs it.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

pub fn musl_target_installed() -> bool {
    output(Command::new("rustc").args(["--print", "target-libdir", "--target", MUSL_TARGET]))
        .is_some_and(|dir| {
            Path::new(dir.trim()).join("libstd.rlib").exists() || {
                std::fs::read_dir(dir.trim()).is_ok_and(|mut d| {
                    d.any(|e| {
                        e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-"))
                    })
                })
            }
        })
}

fn musl_target() {
    if musl_target_installed() {
        return;
    }
    eprintln!("setup: adding the {MUSL_TARGET} target (for the deployed OCI hook)");
    if let Err(e) = run(Command::new("rustup").args(["target", "add", MUSL_TARGET])) {
        eprintln!("setup: warning: {e:#}; the hook will be built for glibc (slower start-up)");
    }
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
            .context(
                "the nightly toolchain is needed for the eBPF crate (`rustup toolchain list`)",
            )?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn rust_src() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// bpf-linker must link the same LLVM major version as the nightly's rustc. Without a
/// system LLVM of that version we point it at rustc's own `libLLVM.so` through a small
/// prefix directory holding a `lib/libLLVM.so` symlink.
fn bpf_linker() -> Result<()> {
    // It loads the nightly's libLLVM at run time, which `rustup run` puts on the library
    // path (aya-build runs cargo the same way).
    if let Some(v) =
        output(Command::new("rustup").args(["run", NIGHTLY, "bpf-linker", "--version"]))
    {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    let sysroot = nightly_sysroot()?;
    let llvm_lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && n.contains(".so"))
        })
        .context("the nightly toolchain ships no libLLVM.so")?;
    let major = llvm_major(&llvm_lib)?;
    let prefix = cache_dir().join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm_lib, &link)?;
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against {} (LLVM {major}, ~3 min)",
        llvm_lib.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn llvm_major(lib: &Path) -> Result<u32> {
    // libLLVM.so.22.1-rust-... or libLLVM-22-rust-....so
    let name = lib.file_name().unwrap().to_string_lossy();
    let digits: String = name
        .trim_start_matches("libLLVM")
        .trim_start_matches(".so.")
        .trim_start_matches('-')
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    match digits.parse() {
        Ok(v) => Ok(v),
        Err(_) => bail!("cannot tell the LLVM version of {}", lib.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_library_names() {
        assert_eq!(
            llvm_major(Path::new("/x/libLLVM.so.22.1-rust-1.97.0-nightly")).unwrap(),
            22
        );
        assert_eq!(
            llvm_major(Path::new("/x/libLLVM-22-rust-1.97.0-nightly.so")).unwrap(),
            22
        );
        assert!(llvm_major(Path::new("/x/libfoo.so")).is_err());
    }
}
