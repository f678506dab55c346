//! The Kubernetes API server the tests run against, built here from Debian's Go sources.
//!
//! kube-apiserver cannot be fetched on these machines, but `k8s.io/apiextensions-apiserver`
//! can be built: it is the API server that serves CustomResourceDefinitions, on the same
//! `k8s.io/apiserver` library as kube-apiserver, so watches, resourceVersions, bookmarks,
//! `410 Gone`, field selectors, CEL validation, the status subresource and server-side
//! apply behave as a cluster's do. Debian sid packages its source
//! (`golang-k8s-apiextensions-apiserver-dev`) with everything it imports, a Go toolchain
//! and etcd. The whole Depends closure of those is unpacked with `dpkg -x` into a private
//! root under the cache (nothing is installed on the host) and built in GOPATH mode.
//!
//! sid moves: no version is pinned here. The packages are whatever the private apt lists
//! (shared with `cargo xtask vm`) hold; once a build exists it is reused until its stamp
//! no longer names exactly the files of the current resolution, which only changes when
//! the lists are refreshed.
//!
//! Layout under `<cache>/apiserver/`: `root/` the unpacked packages, `gocache/` Go's build
//! cache, `bin/apiextensions-apiserver` and `bin/etcd` (a copy of the package's), and
//! `bin/.stamp` naming the package files they came from.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, run};
use rthooks_testkit::debian::{self, Apt, FetchStats};

/// What the build needs from sid: the server's source (which depends on every Go package
/// it imports), Debian's default Go toolchain, and etcd.
const ROOTS: &[&str] = &[
    "golang-k8s-apiextensions-apiserver-dev",
    "golang-go",
    "etcd-server",
];
const SUITE: &str = "sid";
/// The Go import path `go build` is given.
const PACKAGE: &str = "k8s.io/apiextensions-apiserver";

/// The variable through which `cargo xtask test` tells the tests where the binaries are,
/// and where they are built: the test kit's, where the tests look.
pub use rthooks_testkit::{apiserver_bin_dir as bin_dir, APISERVER_BIN_DIR_ENV as BIN_DIR_ENV};

/// Builds the server once; later calls return at once while the build's stamp is there.
pub fn ensure() -> Result<()> {
    let bin = bin_dir();
    let stamp = bin.join(".stamp");
    if stamp.exists() && bin.join("apiextensions-apiserver").exists() && bin.join("etcd").exists() {
        return Ok(());
    }
    let start = Instant::now();
    let _lock = debian::CacheLock::acquire()?;
    let apt = Apt::new(&crate::vm::config()?.suites())?;
    let wanted: Vec<(String, String)> = apt
        .depends_closure(ROOTS, SUITE)?
        .into_iter()
        .filter(|name| is_build_input(name))
        .map(|name| (name, SUITE.to_string()))
        .collect();
    let debs = apt.resolve(&wanted)?;
    let mut stats = FetchStats::default();
    let files = apt.fetch(&debs, &mut stats)?;
    let stamp_text: String = files
        .iter()
        .map(|p| format!("{}\n", p.file_name().unwrap().to_string_lossy()))
        .collect();
    let root = cache_dir().join("apiserver/root");
    debian::unpack(&files, &root)?;
    eprintln!(
        "setup: test API server sources: {} packages from {SUITE} ({:.0} MB, {:.0} MB downloaded)",
        debs.len(),
        (stats.downloaded_bytes + stats.cached_bytes) as f64 / 1e6,
        stats.downloaded_bytes as f64 / 1e6
    );
    build(&root, &bin)?;
    std::fs::write(&stamp, stamp_text)?;
    eprintln!(
        "setup: test API server ready in {:.0} s: {}",
        start.elapsed().as_secs_f64(),
        bin.display()
    );
    Ok(())
}

/// The closure also names the C library and the rest of a base system (the toolchain's
/// and etcd's Depends); a GOPATH build with cgo off reads only Go source packages and the
/// toolchain, and etcd runs on the host's C library.
fn is_build_input(name: &str) -> bool {
    name.starts_with("golang-") || ROOTS.contains(&name)
}

fn build(root: &Path, bin: &Path) -> Result<()> {
    let goroot = goroot(root)?;
    let gopath = root.join("usr/share/gocode");
    std::fs::create_dir_all(bin)?;
    let out = bin.join("apiextensions-apiserver.partial");
    eprintln!(
        "setup: building {PACKAGE} with {} (~6 min on 2 cores, 1.5 GB)",
        goroot.display()
    );
    run(Command::new(goroot.join("bin/go"))
        .args(["build", "-o"])
        .arg(&out)
        .arg(PACKAGE)
        .env("GOROOT", &goroot)
        .env("GOPATH", &gopath)
        .env("GO111MODULE", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", cache_dir().join("apiserver/gocache"))
        .current_dir(&gopath))?;
    std::fs::rename(&out, bin.join("apiextensions-apiserver"))?;
    let etcd = root.join("usr/bin/etcd");
    if !etcd.exists() {
        bail!("etcd-server left no {}", etcd.display());
    }
    std::fs::copy(&etcd, bin.join("etcd")).context("copying etcd")?;
    Ok(())
}

/// `usr/lib/go-<version>` of the unpacked toolchain (one, since one golang-go was
/// resolved; the newest if a leftover tree holds several).
fn goroot(root: &Path) -> Result<PathBuf> {
    let lib = root.join("usr/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("go-"))
                && p.join("bin/go").exists()
        })
        .collect();
    found.sort_by_key(|p| go_version(p));
    found
        .pop()
        .with_context(|| format!("no Go toolchain (go-*/bin/go) under {}", lib.display()))
}

/// `go-1.26` → `[1, 26]`, for ordering.
fn go_version(dir: &Path) -> Vec<u32> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("go-"))
        .map(|v| v.split('.').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_go_sources_and_the_roots_are_build_inputs() {
        assert!(is_build_input("golang-k8s-apiserver-dev"));
        assert!(is_build_input("golang-1.26-go"));
        assert!(is_build_input("etcd-server"));
        assert!(!is_build_input("libc6"));
        assert!(!is_build_input("systemd"));
    }

    #[test]
    fn newest_toolchain_wins() {
        let tmp = tempfile::tempdir().unwrap();
        for v in ["go-1.9", "go-1.26", "go-1.24"] {
            let d = tmp.path().join("usr/lib").join(v).join("bin");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("go"), "").unwrap();
        }
        assert!(goroot(tmp.path()).unwrap().ends_with("go-1.26"));
    }
}
