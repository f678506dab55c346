//! The installers' journal: each file an installer touches is recorded (with its original
//! bytes) before it is changed, so `uninstall` can restore it byte for byte.
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::containerd::file_mode;
use crate::error::{Error, Result};

/// FNV-1a, to notice that a file changed after we wrote it (not a security check).
fn fnv64(b: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// One file an installer touched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub path: PathBuf,
    /// Whether the file existed before; if so `backup` holds its bytes and `mode`.
    pub existed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Hash of what we last wrote.
    pub written: String,
    /// The hook binary is shared by installers: only its first installer restores it.
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub installer: String,
    pub entries: Vec<Entry>,
}

/// The changes of one installer, recorded before they are made.
pub(crate) struct Tx {
    state_dir: PathBuf,
    name: String,
    manifest: Manifest,
    report: Vec<String>,
}

impl Tx {
    fn manifest_path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join(format!("{name}.json"))
    }

    pub(crate) fn open(state_dir: &Path, name: &str) -> Result<Tx> {
        let p = Self::manifest_path(state_dir, name);
        let manifest = match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| Error::Json {
                what: format!("the install manifest {}", p.display()),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                installer: name.to_owned(),
                entries: Vec::new(),
            },
            Err(e) => return Err(Error::io("reading the install manifest", p, e)),
        };
        Ok(Tx {
            state_dir: state_dir.to_owned(),
            name: name.to_owned(),
            manifest,
            report: Vec::new(),
        })
    }

    pub(crate) fn note(&mut self, s: String) {
        self.report.push(s);
    }

    pub(crate) fn finish(mut self) -> Vec<String> {
        if self.report.is_empty() {
            self.report
                .push(format!("{}: already installed, nothing changed", self.name));
        }
        self.report
    }

    fn save(&self) -> Result<()> {
        let p = Self::manifest_path(&self.state_dir, &self.name);
        if self.manifest.entries.is_empty() {
            return match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("removing the manifest", p, e))
                }
                _ => Ok(()),
            };
        }
        let mut b = serde_json::to_vec_pretty(&self.manifest).expect("serialisable");
        b.push(b'\n');
        atomic_write(&p, &b, 0o600)
    }

    /// Manifests of the other installers in the same state directory.
    fn others(&self) -> Vec<(PathBuf, Manifest)> {
        let Ok(rd) = std::fs::read_dir(&self.state_dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && *p != Self::manifest_path(&self.state_dir, &self.name)
            })
            .filter_map(|p| {
                Some((
                    p.clone(),
                    serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?,
                ))
            })
            .collect()
    }

    /// Writes `path` (atomically) unless it already has these bytes and mode, recording
    /// its original first.
    pub(crate) fn write(
        &mut self,
        path: &Path,
        bytes: &[u8],
        mode: u32,
        shared: bool,
    ) -> Result<()> {
        // A symlinked config (config management often does this) stays a symlink: the
        // file it points to is what changes and what uninstall restores.
        let resolved;
        let path = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                resolved = std::fs::canonicalize(path)
                    .map_err(|e| Error::io("resolving a symlink", path, e))?;
                resolved.as_path()
            }
            _ => path,
        };
        let current = std::fs::read(path).ok();
        let unchanged = current.as_deref() == Some(bytes) && file_mode(path) == Some(mode);
        if !self.manifest.entries.iter().any(|e| e.path == path) {
            let owned_elsewhere = shared
                && self
                    .others()
                    .iter()
                    .any(|(_, m)| m.entries.iter().any(|e| e.path == path && !e.shared));
            // Identical bytes that no installer of ours wrote: not ours to remove later.
            if unchanged && !owned_elsewhere {
                return Ok(());
            }
            let mut entry = Entry {
                path: path.to_owned(),
                existed: current.is_some(),
                backup: None,
                mode: file_mode(path),
                written: String::new(),
                shared: owned_elsewhere,
            };
            if let (Some(cur), false) = (&current, owned_elsewhere) {
                let dir = self.state_dir.join("originals").join(&self.name);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io("creating the state directory", &dir, e))?;
                let b = dir.join(format!(
                    "{}.{}",
                    self.manifest.entries.len(),
                    fnv64(path.as_os_str().as_encoded_bytes())
                ));
                atomic_write(&b, cur, 0o600)?;
                entry.backup = Some(b);
            }
            if unchanged {
                entry.written = fnv64(bytes);
            }
            self.manifest.entries.push(entry);
            // Recorded before the change, so an interrupted install can still be undone.
            self.save()?;
        }
        if unchanged {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating a directory", dir, e))?;
        }
        atomic_write(path, bytes, mode)?;
        let h = fnv64(bytes);
        if let Some(e) = self.manifest.entries.iter_mut().find(|e| e.path == path) {
            e.written = h;
        }
        self.save()?;
        self.report.push(format!("wrote {}", path.display()));
        Ok(())
    }

    pub(crate) fn rollback(mut self, force: bool) -> Result<Vec<String>> {
        if self.manifest.entries.is_empty() {
            return Ok(vec![format!(
                "{}: not installed, nothing to undo",
                self.name
            )]);
        }
        // Refuse to clobber someone else's later edits unless forced.
        if !force {
            for e in &self.manifest.entries {
                if e.shared {
                    continue;
                }
                if let Ok(cur) = std::fs::read(&e.path) {
                    if fnv64(&cur) != e.written {
                        return Err(Error::Refused(format!(
                            "{} changed since it was installed; uninstall with --force to restore the original anyway",
                            e.path.display()
                        )));
                    }
                }
            }
        }
        let others = self.others();
        let mut report = Vec::new();
        for e in self.manifest.entries.iter().rev() {
            if e.shared {
                continue;
            }
            // Another installer still uses the shared binary: hand the original over.
            if let Some((p, mut m)) = others
                .iter()
                .find(|(_, m)| m.entries.iter().any(|x| x.path == e.path && x.shared))
                .cloned()
            {
                if let Some(x) = m.entries.iter_mut().find(|x| x.path == e.path) {
                    *x = Entry {
                        shared: false,
                        ..e.clone()
                    };
                }
                let mut b = serde_json::to_vec_pretty(&m).expect("serialisable");
                b.push(b'\n');
                atomic_write(&p, &b, 0o600)?;
                report.push(format!(
                    "kept {} (still used by {})",
                    e.path.display(),
                    m.installer
                ));
                continue;
            }
            match (&e.existed, &e.backup) {
                (true, Some(b)) => {
                    let orig = std::fs::read(b)
                        .map_err(|x| Error::io("reading a saved original", b, x))?;
                    atomic_write(&e.path, &orig, e.mode.unwrap_or(0o644))?;
                    report.push(format!("restored {}", e.path.display()));
                }
                _ => {
                    match std::fs::remove_file(&e.path) {
                        Err(x) if x.kind() != std::io::ErrorKind::NotFound => {
                            return Err(Error::io("removing", &e.path, x))
                        }
                        _ => {}
                    }
                    report.push(format!("removed {}", e.path.display()));
                }
            }
        }
        for e in &self.manifest.entries {
            if let Some(b) = &e.backup {
                let _ = std::fs::remove_file(b);
            }
        }
        let _ = std::fs::remove_dir(self.state_dir.join("originals").join(&self.name));
        let _ = std::fs::remove_dir(self.state_dir.join("originals"));
        self.manifest.entries.clear();
        self.save()?;
        let _ = std::fs::remove_dir(&self.state_dir);
        Ok(report)
    }
}

/// Writes via a temporary file in the same directory and a rename, so readers (CRI-O's
/// inotify watch on hooks.d, containerd at start, a runtime exec-ing the binary) see the
/// old or the new file, never a partial one. The temporary name has no `.json` suffix so
/// hooks.d readers ignore it.
pub fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating a directory", dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.rthooks-tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        // Keep the owner of the file being replaced (or restored).
        if let Ok(md) = std::fs::metadata(path) {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid()))?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("writing", path, e));
    }
    Ok(())
}

/// Reads a manifest (tests, diagnostics).
pub fn read_manifest(state_dir: &Path, name: &str) -> Option<Manifest> {
    serde_json::from_slice(&std::fs::read(Tx::manifest_path(state_dir, name)).ok()?).ok()
}
