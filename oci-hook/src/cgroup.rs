//! `linux.cgroupsPath` forms and what can be read from them.
//!
//! A path with a `/` is a cgroupfs path (used as is, relative to the cgroup mount).
//! Otherwise runc's systemd form `slice:prefix:name` applies: the slice expands to its
//! parents (`a-b-c.slice` → `/a.slice/a-b.slice/a-b-c.slice`) and the leaf is
//! `prefix-name.scope`, or `name` itself when it is a slice.
use crate::error::{Error, Result};

/// The slice runc uses when a systemd path leaves it empty.
const DEFAULT_SLICE: &str = "system.slice";

/// The cgroup directory of a container, relative to the cgroup v2 mount, from the spec's
/// `linux.cgroupsPath`.
pub fn resolve(cgroups_path: &str) -> Result<String> {
    let err = |reason: &str| Error::CgroupsPath {
        path: cgroups_path.to_owned(),
        reason: reason.to_owned(),
    };
    if cgroups_path.is_empty() {
        return Err(Error::NoCgroupsPath);
    }
    if cgroups_path.contains('\0') {
        return Err(err("contains a NUL byte"));
    }
    if cgroups_path.contains('/') {
        if cgroups_path.split('/').any(|c| c == "..") {
            return Err(err("contains a `..` component"));
        }
        return Ok(cgroups_path.to_owned());
    }
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(err(
            "neither a cgroupfs path (with `/`) nor systemd `slice:prefix:name`",
        ));
    };
    if name.is_empty() {
        return Err(err("the systemd unit name is empty"));
    }
    let slice = if slice.is_empty() {
        DEFAULT_SLICE
    } else {
        slice
    };
    let mut path = expand_slice(slice).map_err(|r| err(&r))?;
    let leaf = if name.ends_with(".slice") {
        name.to_owned()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    if !path.ends_with('/') {
        path.push('/');
    }
    path.push_str(&leaf);
    Ok(path)
}

/// Expands a systemd slice name into its path below the cgroup root.
pub fn expand_slice(slice: &str) -> std::result::Result<String, String> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(format!("{slice:?} is not a slice (no .slice suffix)"));
    };
    if stem.is_empty() {
        return Err(format!("{slice:?} is not a valid slice name"));
    }
    if slice.contains('/') {
        return Err(format!("slice {slice:?} contains `/`"));
    }
    if stem == "-" {
        return Ok("/".into());
    }
    let mut path = String::with_capacity(slice.len() * 2);
    let mut prefix = String::new();
    for comp in stem.split('-') {
        if comp.is_empty() {
            return Err(format!(
                "slice {slice:?} has an empty component (`--` or a leading/trailing `-`)"
            ));
        }
        path.push('/');
        path.push_str(&prefix);
        path.push_str(comp);
        path.push_str(".slice");
        prefix.push_str(comp);
        prefix.push('-');
    }
    Ok(path)
}

/// The pod UID kubelet encoded in a cgroup path (`pod<uid>` with cgroupfs,
/// `…-pod<uid_with_underscores>.slice` with systemd), with `-` restored.
pub fn pod_uid_from_path(path: &str) -> Option<String> {
    path.split(['/', ':']).rev().find_map(|comp| {
        let comp = comp.strip_suffix(".slice").unwrap_or(comp);
        let uid = match comp.rfind("-pod") {
            Some(i) => &comp[i + 4..],
            None => comp.strip_prefix("pod")?,
        };
        let ok = (32..=36).contains(&uid.len())
            && uid
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
        ok.then(|| uid.replace('_', "-"))
    })
}

/// The container id in a cgroup path's leaf (`cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `libpod-<id>.scope`, or a bare cgroupfs `<id>`).
pub fn container_id_from_path(path: &str) -> Option<String> {
    let leaf = path.trim_end_matches('/').rsplit('/').next()?;
    let leaf = leaf.strip_suffix(".scope").unwrap_or(leaf);
    let id = leaf.rsplit('-').next()?;
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// The cgroup v2 path in the contents of a `/proc/<pid>/cgroup` file (the `0::` line).
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether `process` is the container's cgroup or one below it (crun moves the process
/// into a child such as `<path>/container`).
pub fn is_within(container: &str, process: &str) -> bool {
    let c = container.trim_end_matches('/');
    let c = if c.starts_with('/') {
        c.to_owned()
    } else {
        format!("/{c}")
    };
    let p = if process.starts_with('/') {
        process.to_owned()
    } else {
        format!("/{process}")
    };
    p == c || p.starts_with(&format!("{c}/")) || c == "/"
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f";
    const UID_: &str = "8d7b6c6a_2c4e_4f1e_9d3b_0a1b2c3d4e5f";
    const CID: &str = "4f7e3c1b9a8d2e6f5c4b3a2918f7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c4";

    struct Case {
        what: &'static str,
        cgroups_path: String,
        /// `/proc/<pid>/cgroup` unified line the runtime produced for it.
        proc_path: String,
        resolved: String,
        pod_uid: Option<&'static str>,
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                what: "containerd, cgroupfs driver (kubelet parent + id)",
                cgroups_path: format!("/kubepods/besteffort/pod{UID}/{CID}"),
                proc_path: format!("/kubepods/besteffort/pod{UID}/{CID}"),
                resolved: format!("/kubepods/besteffort/pod{UID}/{CID}"),
                pod_uid: Some(UID),
            },
            Case {
                what: "containerd, guaranteed QoS (no QoS level in the path)",
                cgroups_path: format!("/kubepods/pod{UID}/{CID}"),
                proc_path: format!("/kubepods/pod{UID}/{CID}"),
                resolved: format!("/kubepods/pod{UID}/{CID}"),
                pod_uid: Some(UID),
            },
            Case {
                what: "containerd, systemd driver",
                cgroups_path: format!("kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"),
                proc_path: format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                resolved: format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod_uid: Some(UID),
            },
            Case {
                what: "CRI-O, systemd driver, burstable",
                cgroups_path: format!("kubepods-burstable-pod{UID_}.slice:crio:{CID}"),
                proc_path: format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope"
                ),
                resolved: format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope"
                ),
                pod_uid: Some(UID),
            },
            Case {
                what: "CRI-O, cgroupfs driver",
                cgroups_path: format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                proc_path: format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                resolved: format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                pod_uid: Some(UID),
            },
            Case {
                what: "crun puts the process in a child cgroup of the systemd scope",
                cgroups_path: format!("kubepods-pod{UID_}.slice:crio:{CID}"),
                proc_path: format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope/container"),
                resolved: format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{CID}.scope"),
                pod_uid: Some(UID),
            },
            Case {
                what: "static pod: 32-hex UID without dashes",
                cgroups_path: "/kubepods/burstable/pod0123456789abcdef0123456789abcdef/ctr1234567890ab".into(),
                proc_path: "/kubepods/burstable/pod0123456789abcdef0123456789abcdef/ctr1234567890ab".into(),
                resolved: "/kubepods/burstable/pod0123456789abcdef0123456789abcdef/ctr1234567890ab".into(),
                pod_uid: Some("0123456789abcdef0123456789abcdef"),
            },
            Case {
                what: "plain runc / podman cgroupfs (no pod)",
                cgroups_path: format!("/libpod_parent/libpod-{CID}"),
                proc_path: format!("/libpod_parent/libpod-{CID}"),
                resolved: format!("/libpod_parent/libpod-{CID}"),
                pod_uid: None,
            },
            Case {
                what: "podman, systemd manager",
                cgroups_path: format!("machine.slice:libpod:{CID}"),
                proc_path: format!("/machine.slice/libpod-{CID}.scope/container"),
                resolved: format!("/machine.slice/libpod-{CID}.scope"),
                pod_uid: None,
            },
            Case {
                what: "systemd path with an empty slice uses system.slice",
                cgroups_path: ":runc:abc".into(),
                proc_path: "/system.slice/runc-abc.scope".into(),
                resolved: "/system.slice/runc-abc.scope".into(),
                pod_uid: None,
            },
            Case {
                what: "systemd root slice",
                cgroups_path: "-.slice:runc:abc".into(),
                proc_path: "/runc-abc.scope".into(),
                resolved: "/runc-abc.scope".into(),
                pod_uid: None,
            },
            Case {
                what: "systemd unit that is itself a slice",
                cgroups_path: "system.slice:x:my-thing.slice".into(),
                proc_path: "/system.slice/my-thing.slice".into(),
                resolved: "/system.slice/my-thing.slice".into(),
                pod_uid: None,
            },
        ]
    }

    #[test]
    fn table() {
        for c in cases() {
            let got = resolve(&c.cgroups_path).unwrap_or_else(|e| panic!("{}: {e}", c.what));
            assert_eq!(got, c.resolved, "{}", c.what);
            assert!(
                is_within(&got, &c.proc_path),
                "{}: {} not within {}",
                c.what,
                c.proc_path,
                got
            );
            assert_eq!(
                pod_uid_from_path(&got).as_deref(),
                c.pod_uid,
                "{} (resolved)",
                c.what
            );
            assert_eq!(
                pod_uid_from_path(&c.cgroups_path).as_deref(),
                c.pod_uid,
                "{} (raw)",
                c.what
            );
        }
    }

    #[test]
    fn odd_paths_are_errors() {
        for bad in [
            "",
            "justaname",
            "a:b",
            "a:b:c:d",
            "notaslice:cri-containerd:abc",
            "kubepods--besteffort.slice:crio:abc",
            "-kubepods.slice:crio:abc",
            "kubepods-.slice:crio:abc",
            ".slice:crio:abc",
            "kubepods.slice:crio:",
            "/a/../b",
            "/a/\0",
        ] {
            assert!(resolve(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(matches!(resolve(""), Err(Error::NoCgroupsPath)));
    }

    #[test]
    fn within() {
        assert!(is_within("/a/b", "/a/b"));
        assert!(is_within("/a/b/", "/a/b/c"));
        assert!(is_within("a/b", "/a/b/c"));
        assert!(!is_within("/a/b", "/a/bc"));
        assert!(!is_within("/a/b", "/a"));
    }

    #[test]
    fn proc_cgroup() {
        let hybrid = "12:pids:/x\n1:name=systemd:/y\n0::/kubepods/podX/abc\n";
        assert_eq!(unified_path(hybrid), Some("/kubepods/podX/abc"));
        assert_eq!(unified_path("1:cpu:/x\n"), None);
    }

    #[test]
    fn container_ids() {
        assert_eq!(
            container_id_from_path(&format!("/a/cri-containerd-{CID}.scope")).as_deref(),
            Some(CID)
        );
        assert_eq!(
            container_id_from_path(&format!("/a/{CID}")).as_deref(),
            Some(CID)
        );
        assert_eq!(container_id_from_path("/a/container"), None);
    }
}
