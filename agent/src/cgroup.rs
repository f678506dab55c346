//! Finding a container's cgroup on this host: the cgroup v2 mount, the directory a
//! cgroupsPath names ([`rthooks_container::CgroupsPath`] owns the grammar), and its id
//! (what `bpf_get_current_cgroup_id` reports). The agent is the authority for the cgroup:
//! senders forward the runtime's cgroupsPath, raw (Tetragon's hook) or already expanded
//! (ours), and both resolve here.
//!
//! crun may move the process into a single child cgroup below that path: the BPF filter
//! looks up *ancestors* of the task's cgroup, so registering the container's own cgroup
//! covers that child too.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use rthooks_container::{CgroupPath, CgroupsPath};

use crate::error::Error;

/// A resolved cgroup: its directory, its path below the v2 root, its id and depth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub dir: PathBuf,
    pub path: CgroupPath,
    pub id: u64,
    /// Depth below the root (the root is 0), as `bpf_get_current_ancestor_cgroup_id` counts.
    pub level: u32,
}

/// The cgroup v2 mount point. Pure v2 hosts mount it at `/sys/fs/cgroup`; hybrid hosts at
/// `/sys/fs/cgroup/unified`. Read from mountinfo so that unusual layouts work as well.
pub fn detect_root() -> Result<PathBuf, Error> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("/proc/self/mountinfo", e))?;
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
        })
        .collect();
    found.sort_by_key(|p| p.components().count());
    found.into_iter().next().ok_or_else(|| Error::Cgroup {
        path: "/".into(),
        reason: "no cgroup2 file system is mounted (see /proc/self/mountinfo)".into(),
    })
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The cgroup id of a cgroup v2 directory. The kernel's id is the directory's kernfs node
/// id, which `name_to_handle_at` returns as the handle and `stat` as the inode number on
/// every 64-bit kernel; the inode needs no unsafe code (neither nix nor rustix wraps
/// `name_to_handle_at`).
pub fn cgroup_id(dir: &Path) -> Result<u64, Error> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| Error::io(dir, e))
}

fn is_cgroup2(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|st| st.filesystem_type() == CGROUP2_SUPER_MAGIC)
}

/// Resolves `cgroups_path` below `root` on this host.
pub fn resolve(root: &Path, cgroups_path: &str) -> Result<Cgroup, Error> {
    let path = CgroupsPath::parse(cgroups_path)
        .map_err(|e| Error::Cgroup {
            path: e.path,
            reason: e.reason.to_string(),
        })?
        .dir();
    let bad = |reason: String| Error::Cgroup {
        path: cgroups_path.into(),
        reason,
    };
    let dir = root.join(path.relative());
    let real = dir
        .canonicalize()
        .map_err(|e| bad(format!("{} does not exist: {e}", dir.display())))?;
    let real_root = root.canonicalize().map_err(|e| Error::io(root, e))?;
    if !real.starts_with(&real_root) {
        return Err(bad(format!("{} leaves the cgroup root", real.display())));
    }
    if !real.is_dir() || !is_cgroup2(&real) {
        return Err(bad(format!(
            "{} is not a cgroup v2 directory",
            real.display()
        )));
    }
    let level = real.strip_prefix(&real_root).unwrap().components().count() as u32;
    if level >= rthooks_common::MAX_CGROUP_LEVELS {
        return Err(bad(format!(
            "cgroup depth {level} is deeper than the filter follows"
        )));
    }
    let id = cgroup_id(&real)?;
    Ok(Cgroup {
        dir: real,
        path,
        id,
        level,
    })
}

/// The cgroups (as cgroupfs paths below `root`, e.g. `/kubepods/pod<uid>/<id>`) of the
/// containers in `wanted` (pod UID, container id), found in one walk of the tree: a
/// directory named after the container id (cgroupfs: `<id>`, `crio-<id>`; systemd:
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`) below one named after its pod
/// (`pod<uid>`, or with `_` for `-` in systemd slices). Used to find containers that run
/// without having been registered.
pub fn find_container_cgroups(
    root: &Path,
    wanted: &[(&str, &str)],
) -> std::collections::HashMap<String, String> {
    let mut found = std::collections::HashMap::new();
    let mut pending = vec![(root.to_path_buf(), String::new(), 0u32)];
    while let Some((dir, relative, depth)) = pending.pop() {
        if depth >= rthooks_common::MAX_CGROUP_LEVELS {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{relative}/{name}");
            for (pod_uid, id) in wanted {
                let named = name == *id
                    || name
                        .strip_suffix(".scope")
                        .unwrap_or(&name)
                        .ends_with(&format!("-{id}"));
                let in_pod = pod_uid.is_empty()
                    || relative.contains(&format!("pod{pod_uid}"))
                    || relative.contains(&format!("pod{}", pod_uid.replace('-', "_")));
                if named && in_pod {
                    found.entry(id.to_string()).or_insert_with(|| path.clone());
                }
            }
            pending.push((e.path(), path, depth + 1));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_cgroups_are_found_below_their_pod() {
        let tmp = tempfile::tempdir().unwrap();
        for d in [
            "kubepods/besteffort/podaa-bb/c1",
            "kubepods.slice/kubepods-pod11_22.slice/cri-containerd-c2.scope",
            "kubepods/podother/c3",
        ] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let found = find_container_cgroups(
            tmp.path(),
            &[
                ("aa-bb", "c1"),
                ("11-22", "c2"),
                ("aa-bb", "c3"),
                ("", "none"),
            ],
        );
        assert_eq!(found["c1"], "/kubepods/besteffort/podaa-bb/c1");
        assert_eq!(
            found["c2"],
            "/kubepods.slice/kubepods-pod11_22.slice/cri-containerd-c2.scope"
        );
        assert!(!found.contains_key("c3"), "c3 runs in another pod's cgroup");
        assert_eq!(found.len(), 2);
    }

    #[test]
    fn resolve_refuses_missing_and_non_cgroup_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        let e = resolve(tmp.path(), "/missing").unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = resolve(tmp.path(), "/d").unwrap_err().to_string();
        assert!(e.contains("not a cgroup v2"), "{e}");
        let e = resolve(tmp.path(), "/d/../d").unwrap_err().to_string();
        assert!(e.contains("`..`"), "{e}");
    }

    #[test]
    fn resolves_a_real_cgroup_when_present() {
        let Ok(root) = detect_root() else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let name = format!("rthooks-cgroup-unit-{}", std::process::id());
        let dir = root.join(&name);
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!("skipped: cannot create {}: {e}", dir.display());
            return;
        }
        let got = resolve(&root, &format!("{name}//./"));
        let _ = std::fs::remove_dir(&dir);
        let cg = got.unwrap();
        assert_eq!(cg.level, 1);
        assert_eq!(cg.path.as_str(), format!("/{name}"));
    }
}
