//! Resolving a container's `linux.cgroupsPath` to a cgroup v2 directory on this host and
//! its id (what `bpf_get_current_cgroup_id` reports).
//!
//! Forms (DESIGN.md, "OCI hooks"): a path with `/` is a cgroupfs path below the cgroup v2
//! root; otherwise it is systemd's `slice:prefix:name`. crun may move the process into a
//! single child cgroup below that path: the BPF filter looks up *ancestors* of the task's
//! cgroup, so registering the container's own cgroup covers that child too.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A resolved cgroup: its directory, its path relative to the v2 root, its id and depth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub dir: PathBuf,
    pub relative: String,
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

/// Turns a cgroupsPath into a path relative to the cgroup v2 root, refusing anything that
/// could point outside it.
pub fn relative_path(cgroups_path: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::Cgroup {
        path: cgroups_path.into(),
        reason: reason.into(),
    };
    if cgroups_path.is_empty() {
        return Err(bad("empty cgroupsPath"));
    }
    if cgroups_path.len() > 4096 || cgroups_path.contains('\0') {
        return Err(bad("too long or holds NUL"));
    }
    let rel = if cgroups_path.contains('/') {
        cgroups_path.trim_start_matches('/').to_string()
    } else {
        systemd_path(cgroups_path).map_err(|r| bad(&r))?
    };
    // Split by hand: Path::components() silently drops "." components.
    if rel.split('/').any(|c| c == "." || c == "..") {
        return Err(bad(
            "'.' and '..' are not allowed (the path must stay below the cgroup root)",
        ));
    }
    Ok(rel
        .split('/')
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .join("/"))
}

/// `slice:prefix:name` → `a.slice/a-b.slice/prefix-name.scope` as runc/crun's systemd
/// driver lays it out (`a-b.slice` nests inside `a.slice`).
fn systemd_path(spec: &str) -> Result<String, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err("systemd cgroupsPath must be \"slice:prefix:name\"".into());
    };
    if name.is_empty() {
        return Err("systemd cgroupsPath has an empty name".into());
    }
    let mut out = expand_slice(if slice.is_empty() {
        "system.slice"
    } else {
        slice
    })?;
    let leaf = if name.ends_with(".slice") {
        // A slice given as the unit name is nested like any other slice.
        expand_slice(name)?
            .rsplit('/')
            .next()
            .unwrap_or(name)
            .to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    if !out.is_empty() {
        out.push('/');
    }
    out.push_str(&leaf);
    Ok(out)
}

fn expand_slice(slice: &str) -> Result<String, String> {
    let Some(base) = slice.strip_suffix(".slice") else {
        return Err(format!(
            "{slice:?} is not a systemd slice (must end in .slice)"
        ));
    };
    if base == "-" {
        return Ok(String::new());
    }
    if base.is_empty()
        || base.contains('/')
        || base.starts_with('-')
        || base.ends_with('-')
        || base.contains("--")
    {
        return Err(format!("invalid systemd slice name {slice:?}"));
    }
    let mut path = Vec::new();
    let mut prefix = String::new();
    for part in base.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path.join("/"))
}

/// The cgroup id: the 8-byte kernfs file handle of the directory (equal to its inode
/// number on cgroup v2), which is what the BPF helpers report.
pub fn cgroup_id(dir: &Path) -> Result<u64, Error> {
    let cpath = CString::new(dir.as_os_str().as_bytes()).map_err(|_| Error::Cgroup {
        path: dir.display().to_string(),
        reason: "path holds NUL".into(),
    })?;
    #[repr(C)]
    struct Handle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; 64],
    }
    let mut handle = Handle {
        handle_bytes: 64,
        handle_type: 0,
        f_handle: [0; 64],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: handle is a valid file_handle with room for handle_bytes bytes.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            &mut handle as *mut Handle as *mut libc::file_handle,
            &mut mount_id,
            0,
        )
    };
    if r == 0 && handle.handle_bytes == 8 {
        return Ok(u64::from_ne_bytes(handle.f_handle[..8].try_into().unwrap()));
    }
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| Error::io(dir, e))
}

fn is_cgroup2(dir: &Path) -> bool {
    let Ok(cpath) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let r = unsafe { libc::statfs(cpath.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC
}

/// Resolves `cgroups_path` below `root` on this host.
pub fn resolve(root: &Path, cgroups_path: &str) -> Result<Cgroup, Error> {
    let relative = relative_path(cgroups_path)?;
    let bad = |reason: String| Error::Cgroup {
        path: cgroups_path.into(),
        reason,
    };
    let dir = root.join(&relative);
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
        relative,
        id,
        level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_forms() {
        let cases = [
            ("/kubepods/besteffort/pod1234/abcd", "kubepods/besteffort/pod1234/abcd"),
            ("kubepods/burstable/podx/c", "kubepods/burstable/podx/c"),
            (
                "kubepods-besteffort-pod12_34.slice:cri-containerd:abcd",
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice/cri-containerd-abcd.scope",
            ),
            (
                "kubepods-burstable-podu.slice:crio:0123",
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu.slice/crio-0123.scope",
            ),
            ("system.slice:libpod:abc", "system.slice/libpod-abc.scope"),
            ("-.slice:x:y", "x-y.scope"),
            (":docker:abc", "system.slice/docker-abc.scope"),
            ("user.slice::name", "user.slice/name.scope"),
            ("machine.slice:x:machine-qemu.slice", "machine.slice/machine-qemu.slice"),
        ];
        for (input, want) in cases {
            assert_eq!(relative_path(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn refuses_escapes_and_garbage() {
        for bad in [
            "",
            "/kubepods/../../etc",
            "../x",
            "/a/./b",
            "a:b",
            "notaslice:p:n",
            "a--b.slice:p:n",
            "a.slice:p:",
            "a:b:c:d",
            "x\0y/z",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolve_refuses_missing_and_non_cgroup_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        let e = resolve(tmp.path(), "/missing").unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = resolve(tmp.path(), "/d").unwrap_err().to_string();
        assert!(e.contains("not a cgroup v2"), "{e}");
    }

    #[test]
    fn resolves_a_real_cgroup_when_present() {
        let Ok(root) = detect_root() else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let cg = resolve(&root, "/").unwrap();
        assert_eq!(cg.level, 0);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(cg.id, std::fs::metadata(&root).unwrap().ino());
    }
}
