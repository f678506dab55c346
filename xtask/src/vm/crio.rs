//! Where the guests' CRI-O comes from: `--crio-dir` (or `RTHOOKS_CRIO_DIR`), else the
//! newest `crio-*.tar.zst` in `../shared/crio/` beside the checkout, unpacked once into
//! the cache (`crio/<tarball name>/`). No package registry these machines reach has
//! CRI-O, so there is nothing to download: without either, the CRI-O scenarios skip and
//! say so.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{cache_dir, run, workspace_root};

/// The binaries a CRI-O directory must hold.
pub const BINARIES: [&str; 3] = ["crio", "pinns", "conmon"];

/// The CRI-O directory the guests get: `given` (absolute), else the shared tarball
/// unpacked into the cache; `None` when there is neither.
pub fn resolve(given: Option<&Path>) -> Result<Option<PathBuf>> {
    if let Some(dir) = given {
        return Ok(Some(super::absolute(dir)));
    }
    let shared = workspace_root()
        .parent()
        .map(|p| p.join("shared/crio"))
        .unwrap_or_default();
    match newest_tarball(&shared)? {
        Some(tarball) => unpacked(&tarball).map(Some),
        None => Ok(None),
    }
}

/// What the job says when there is no CRI-O directory.
pub fn missing_reason() -> String {
    format!(
        "no CRI-O: give --crio-dir DIR (crio, pinns, conmon) or RTHOOKS_CRIO_DIR, or put \
         crio-<version>.tar.zst into {}",
        workspace_root()
            .parent()
            .map(|p| p.join("shared/crio").display().to_string())
            .unwrap_or_else(|| "../shared/crio".into())
    )
}

/// The `crio-*.tar.zst` in `dir` with the highest version (none when `dir` is absent).
fn newest_tarball(dir: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    for e in entries {
        let path = e?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(version) = tarball_version(&name) {
            found.push((version, path));
        }
    }
    found.sort();
    Ok(found.pop().map(|(_, p)| p))
}

/// `crio-1.37.0.tar.zst` → `[1, 37, 0]`; other names → `None`.
fn tarball_version(name: &str) -> Option<Vec<u64>> {
    let v = name.strip_prefix("crio-")?.strip_suffix(".tar.zst")?;
    v.split('.').map(|p| p.parse().ok()).collect()
}

/// `tarball` unpacked into `<cache>/crio/<its name>/` (once; a half-unpacked tree is
/// never used: it is unpacked beside and renamed).
fn unpacked(tarball: &Path) -> Result<PathBuf> {
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.zst"))
        .context("a crio tarball name")?;
    let root = cache_dir().join("crio");
    let dir = root.join(name);
    if complete(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    let _lock =
        rthooks_testkit::debian::CacheLock::at(&root.join(".lock"), "another unpack of CRI-O")?;
    if complete(&dir) {
        return Ok(dir);
    }
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    run(Command::new("tar")
        .arg("--zstd")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(&tmp))?;
    if !complete(&tmp) {
        bail!(
            "{} does not hold {}",
            tarball.display(),
            BINARIES.join(", ")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    eprintln!("e2e: unpacked {} into {}", tarball.display(), dir.display());
    Ok(dir)
}

fn complete(dir: &Path) -> bool {
    BINARIES.iter().all(|b| dir.join(b).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_tarball_wins_by_version_not_by_name() {
        assert_eq!(tarball_version("crio-1.37.0.tar.zst"), Some(vec![1, 37, 0]));
        assert_eq!(tarball_version("crio-1.37.0.tar.gz"), None);
        assert_eq!(tarball_version("crio-x.tar.zst"), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_tarball(&dir.path().join("absent")).unwrap(), None);
        for n in ["crio-1.9.0.tar.zst", "crio-1.37.0.tar.zst", "README.md"] {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        assert_eq!(
            newest_tarball(dir.path()).unwrap(),
            Some(dir.path().join("crio-1.37.0.tar.zst"))
        );
    }

    #[test]
    fn a_given_directory_is_used_as_given_made_absolute() {
        let got = resolve(Some(Path::new("rel/crio"))).unwrap().unwrap();
        assert!(got.is_absolute() && got.ends_with("rel/crio"));
    }
}
