//! `linux.cgroupsPath`: the forms runc and crun accept, parsed once into the cgroup
//! directory they name, and what that directory's path tells about the pod and container.
//!
//! * With a `/` it is a **cgroupfs** path below the cgroup v2 root. It is cleaned lexically
//!   the way runc cleans it (`filepath.Clean`): empty and `.` components go, so `a//b`,
//!   `/a/./b` and `/a/b/` all name `/a/b` (crun hands them to the kernel, whose path walk
//!   arrives at the same directory). A relative path is taken below the root, as crun does.
//!   A `..` component is refused: runc clamps it at the root while crun lets the kernel
//!   resolve it (above the root that leaves the cgroup mount), so the directory is not
//!   certain, and no runtime ever generates one.
//! * Otherwise it is systemd's **`slice:prefix:name`**. The slice (empty: `system.slice`,
//!   `-.slice`: the root) expands to its parents, `a-b-c.slice` →
//!   `/a.slice/a-b.slice/a-b-c.slice`, refusing what runc's `ExpandSlice` and systemd
//!   refuse (no `.slice` suffix, an empty component: `--`, a leading or trailing `-`). The
//!   leaf is runc's unit name: `prefix-name.scope` (an empty prefix gives `-name.scope`,
//!   as runc and crun both name it), or `name` itself when it is a slice (validated like
//!   one).
//!
//! crun may move the container's process into a single child cgroup of that directory
//! (`<dir>/container`): [`CgroupPath::contains`] says whether a process's cgroup is the
//! container's or below it.
use std::fmt;
use std::str::FromStr;

/// The slice runc uses when a systemd cgroupsPath leaves it empty (rootful runtimes).
pub const DEFAULT_SLICE: &str = "system.slice";
/// Longer paths are not something a runtime produced (PATH_MAX).
pub const MAX_CGROUPS_PATH_LEN: usize = 4096;

/// Why a cgroupsPath names no container cgroup.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {MAX_CGROUPS_PATH_LEN} bytes")]
    TooLong,
    #[error("it holds a NUL byte")]
    Nul,
    #[error("it holds a newline, which the kernel refuses in cgroup names")]
    Newline,
    #[error(
        "it has a `..` component: runc clamps it at the cgroup root, crun lets the kernel \
         resolve it (which can leave the cgroup mount), so the directory is not certain"
    )]
    ParentComponent,
    #[error(
        "it names the cgroup root, which holds every process of the host and is no \
         container's cgroup"
    )]
    Root,
    #[error("neither a cgroupfs path (with `/`) nor systemd `slice:prefix:name`")]
    Unrecognised,
    #[error("the systemd unit name is empty")]
    EmptyUnitName,
    #[error("{0:?} is not a slice (a systemd slice name ends in `.slice`)")]
    NotASlice(String),
    #[error(
        "slice {0:?} has an empty component (`--`, or a leading or trailing `-`), which \
         systemd refuses"
    )]
    EmptySliceComponent(String),
}

/// A cgroupsPath that names no container cgroup.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cgroupsPath {path:?}: {reason}")]
pub struct CgroupsPathError {
    /// The cgroupsPath as given.
    pub path: String,
    #[source]
    pub reason: Refusal,
}

/// A cgroup directory relative to the cgroup v2 root, lexically clean: it starts with `/`,
/// has no empty, `.` or `..` components and no trailing `/` (the root is `/`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// The cgroup root.
    pub fn root() -> CgroupPath {
        CgroupPath("/".into())
    }

    /// Cleans a cgroupfs path (see the module documentation). The root is accepted here:
    /// only as a container's cgroupsPath is it refused.
    pub fn clean(path: &str) -> Result<CgroupPath, Refusal> {
        check_bytes(path)?;
        let mut out = String::with_capacity(path.len() + 1);
        for comp in path.split('/') {
            match comp {
                "" | "." => {}
                ".." => return Err(Refusal::ParentComponent),
                c => {
                    out.push('/');
                    out.push_str(c);
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Ok(CgroupPath(out))
    }

    /// `/a/b`, or `/` for the root.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The same path without its leading `/` (empty for the root), to join to a mount point.
    pub fn relative(&self) -> &str {
        &self.0[1..]
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// Depth below the root (the root is 0), as `bpf_get_current_ancestor_cgroup_id`
    /// counts levels.
    pub fn level(&self) -> usize {
        self.components().count()
    }

    pub fn components(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.relative().split('/').filter(|c| !c.is_empty())
    }

    /// The last component (None for the root).
    pub fn leaf(&self) -> Option<&str> {
        self.components().next_back()
    }

    /// Whether `process_cgroup` (a path as `/proc/<pid>/cgroup` shows it) is this cgroup
    /// or one below it, as crun's child cgroup is.
    pub fn contains(&self, process_cgroup: &str) -> bool {
        let Ok(p) = CgroupPath::clean(process_cgroup) else {
            return false;
        };
        self.is_root()
            || p.0 == self.0
            || (p.0.starts_with(&self.0) && p.0.as_bytes().get(self.0.len()) == Some(&b'/'))
    }

    /// The pod UID kubelet encoded in the path: the innermost `pod<uid>` (cgroupfs driver)
    /// or `…-pod<uid>.slice` (systemd driver, where kubelet writes the UID's `-` as `_`),
    /// with `-` restored.
    pub fn pod_uid(&self) -> Option<String> {
        self.components().rev().find_map(|comp| {
            let comp = comp.strip_suffix(".slice").unwrap_or(comp);
            let uid = match comp.rfind("-pod") {
                Some(i) => &comp[i + 4..],
                None => comp.strip_prefix("pod")?,
            };
            let looks_like_uid = (32..=36).contains(&uid.len())
                && uid
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
            looks_like_uid.then(|| uid.replace('_', "-"))
        })
    }

    /// The container id in the leaf when it carries one: `cri-containerd-<id>.scope`,
    /// `crio-<id>.scope`, `libpod-<id>.scope`, or a bare cgroupfs `<id>` (at least 12 hex
    /// digits, as every runtime's ids are).
    pub fn container_id(&self) -> Option<&str> {
        let leaf = self.leaf()?;
        let leaf = leaf.strip_suffix(".scope").unwrap_or(leaf);
        let id = leaf.rsplit('-').next()?;
        (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A systemd `slice:prefix:name` cgroupsPath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemdUnit {
    /// The slice the unit goes in ([`DEFAULT_SLICE`] when the path left it empty).
    pub slice: String,
    pub prefix: String,
    pub name: String,
}

impl SystemdUnit {
    /// runc's unit name: `prefix-name.scope`, or `name` when it is a slice.
    pub fn unit_name(&self) -> String {
        if self.name.ends_with(".slice") {
            self.name.clone()
        } else {
            format!("{}-{}.scope", self.prefix, self.name)
        }
    }

    /// The unit's cgroup: the expanded slice, then the unit.
    pub fn dir(&self) -> CgroupPath {
        let slice = expand_slice(&self.slice).expect("validated when parsed");
        let mut path = slice.0;
        if path != "/" {
            path.push('/');
        }
        path.push_str(&self.unit_name());
        CgroupPath(path)
    }
}

/// A container's `linux.cgroupsPath`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupsPath {
    Cgroupfs(CgroupPath),
    Systemd(SystemdUnit),
}

impl CgroupsPath {
    pub fn parse(cgroups_path: &str) -> Result<CgroupsPath, CgroupsPathError> {
        let refuse = |reason| CgroupsPathError {
            path: cgroups_path.to_owned(),
            reason,
        };
        if cgroups_path.is_empty() {
            return Err(refuse(Refusal::Empty));
        }
        let parsed = if cgroups_path.contains('/') {
            CgroupPath::clean(cgroups_path).map(CgroupsPath::Cgroupfs)
        } else {
            parse_systemd(cgroups_path).map(CgroupsPath::Systemd)
        }
        .map_err(refuse)?;
        if parsed.dir().is_root() {
            return Err(refuse(Refusal::Root));
        }
        Ok(parsed)
    }

    /// The container's cgroup directory.
    pub fn dir(&self) -> CgroupPath {
        match self {
            CgroupsPath::Cgroupfs(p) => p.clone(),
            CgroupsPath::Systemd(u) => u.dir(),
        }
    }
}

impl FromStr for CgroupsPath {
    type Err = CgroupsPathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CgroupsPath::parse(s)
    }
}

fn check_bytes(s: &str) -> Result<(), Refusal> {
    if s.len() > MAX_CGROUPS_PATH_LEN {
        return Err(Refusal::TooLong);
    }
    if s.contains('\0') {
        return Err(Refusal::Nul);
    }
    if s.contains('\n') {
        return Err(Refusal::Newline);
    }
    Ok(())
}

fn parse_systemd(spec: &str) -> Result<SystemdUnit, Refusal> {
    check_bytes(spec)?;
    let parts: Vec<&str> = spec.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(Refusal::Unrecognised);
    };
    if name.is_empty() {
        return Err(Refusal::EmptyUnitName);
    }
    let slice = if slice.is_empty() {
        DEFAULT_SLICE
    } else {
        slice
    };
    expand_slice(slice)?;
    if name.ends_with(".slice") {
        // runc asks systemd for a slice unit of that name; systemd refuses the names
        // ExpandSlice refuses.
        expand_slice(name)?;
    }
    Ok(SystemdUnit {
        slice: slice.to_owned(),
        prefix: prefix.to_owned(),
        name: name.to_owned(),
    })
}

/// A systemd slice's cgroup: `a-b-c.slice` → `/a.slice/a-b.slice/a-b-c.slice`, `-.slice`
/// → `/` (runc's `ExpandSlice`).
pub fn expand_slice(slice: &str) -> Result<CgroupPath, Refusal> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(Refusal::NotASlice(slice.to_owned()));
    };
    if stem.is_empty() || slice.contains('/') {
        return Err(Refusal::NotASlice(slice.to_owned()));
    }
    if stem == "-" {
        return Ok(CgroupPath::root());
    }
    let mut path = String::with_capacity(slice.len() * 2);
    let mut prefix = String::new();
    for comp in stem.split('-') {
        if comp.is_empty() {
            return Err(Refusal::EmptySliceComponent(slice.to_owned()));
        }
        path.push('/');
        path.push_str(&prefix);
        path.push_str(comp);
        path.push_str(".slice");
        prefix.push_str(comp);
        prefix.push('-');
    }
    Ok(CgroupPath(path))
}

/// The cgroup v2 path in the contents of a `/proc/<pid>/cgroup` file (its `0::` line).
pub fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f";
    const UID_: &str = "8d7b6c6a_2c4e_4f1e_9d3b_0a1b2c3d4e5f";
    const CID: &str = "4f7e3c1b9a8d2e6f5c4b3a2918f7e6d5c4b3a2918f7e6d5c4b3a2918f7e6d5c4";

    /// What becomes of one cgroupsPath.
    enum Outcome {
        /// Accepted as given (already clean).
        Accepted(&'static str),
        /// Accepted, naming another spelling of a directory.
        Normalised(&'static str),
        Refused(Refusal),
    }
    use Outcome::*;

    /// Every form found in runtimes, in today's two resolvers' tests and in runc/crun's
    /// sources, with the decision for each.
    fn odd_paths() -> Vec<(String, Outcome, &'static str)> {
        let s = |x: &str| x.to_owned();
        vec![
            // cgroupfs
            (s("/kubepods/besteffort/podu/c"), Accepted("/kubepods/besteffort/podu/c"), "kubelet cgroupfs driver"),
            (s("/a/./b"), Normalised("/a/b"), "`.` dropped as runc's filepath.Clean does (the hook kept it, the agent refused it)"),
            (s("a//b"), Normalised("/a/b"), "empty component dropped, relative taken below the root (the hook kept it raw, the agent collapsed it)"),
            (s("/a//b/"), Normalised("/a/b"), "doubled and trailing `/`"),
            (s("kubepods/burstable/podx/c"), Normalised("/kubepods/burstable/podx/c"), "relative: below the root, as crun reads it"),
            (s("./a/b"), Normalised("/a/b"), "leading `.`"),
            (s("/a b/ü"), Accepted("/a b/ü"), "any byte but `/`, NUL and newline is a valid cgroup name"),
            (s("/a/b.scope.scope"), Accepted("/a/b.scope.scope"), "no special meaning in cgroupfs"),
            (s("/a/../b"), Refused(Refusal::ParentComponent), "`..` even when it would stay inside"),
            (s("/kubepods/../../etc"), Refused(Refusal::ParentComponent), "`..` that would escape"),
            (s("../x"), Refused(Refusal::ParentComponent), "relative `..`"),
            (s("/a/.."), Refused(Refusal::ParentComponent), "trailing `..`"),
            (s("/"), Refused(Refusal::Root), "the root is every process's ancestor"),
            (s("//./"), Refused(Refusal::Root), "the root spelled oddly"),
            (s("/a/\0"), Refused(Refusal::Nul), "NUL"),
            (s("/a/b\nc"), Refused(Refusal::Newline), "the kernel refuses `\\n` in cgroup names"),
            (format!("/{}", "a".repeat(MAX_CGROUPS_PATH_LEN)), Refused(Refusal::TooLong), "longer than PATH_MAX"),
            (s(""), Refused(Refusal::Empty), "no path"),
            // systemd
            (format!("kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"), Normalised(""), "containerd, systemd driver (checked below)"),
            (s("system.slice:libpod:abc"), Normalised("/system.slice/libpod-abc.scope"), "podman"),
            (s(":runc:abc"), Normalised("/system.slice/runc-abc.scope"), "empty slice: system.slice, as runc"),
            (s("user.slice::abc"), Normalised("/user.slice/-abc.scope"), "empty prefix: runc's `prefix + \"-\" + name` and crun's `:`→`-` both give `-abc.scope` (both old resolvers said `abc.scope`)"),
            (s("-.slice:runc:abc"), Normalised("/runc-abc.scope"), "root slice"),
            (s("system.slice:x:my-thing.slice"), Normalised("/system.slice/my-thing.slice"), "a slice as the unit: runc's name as is"),
            (s("machine.slice:x:machine-qemu.slice"), Normalised("/machine.slice/machine-qemu.slice"), "a nested slice as the unit"),
            (s("system.slice:x:a--b.slice"), Refused(Refusal::EmptySliceComponent(s("a--b.slice"))), "systemd refuses `--` in a slice unit (the hook accepted it, the agent refused it)"),
            (s("system.slice:x:-a.slice"), Refused(Refusal::EmptySliceComponent(s("-a.slice"))), "leading `-` in a slice unit"),
            (s("system.slice:cri:abc.scope"), Normalised("/system.slice/cri-abc.scope.scope"), "runc and crun both append `.scope` again"),
            (s("kubepods--besteffort.slice:crio:abc"), Refused(Refusal::EmptySliceComponent(s("kubepods--besteffort.slice"))), "`--` in the slice: runc's ExpandSlice refuses it"),
            (s("-kubepods.slice:crio:abc"), Refused(Refusal::EmptySliceComponent(s("-kubepods.slice"))), "leading `-`"),
            (s("kubepods-.slice:crio:abc"), Refused(Refusal::EmptySliceComponent(s("kubepods-.slice"))), "trailing `-`"),
            (s(".slice:crio:abc"), Refused(Refusal::NotASlice(s(".slice"))), "just `.slice`"),
            (s("notaslice:cri-containerd:abc"), Refused(Refusal::NotASlice(s("notaslice"))), "slice without `.slice`"),
            (s("kubepods.slice:crio:"), Refused(Refusal::EmptyUnitName), "no unit name"),
            (s("justaname"), Refused(Refusal::Unrecognised), "neither form (runc would read it relative to its own cgroup)"),
            (s("a:b"), Refused(Refusal::Unrecognised), "two fields"),
            (s("a.slice:b:c:d"), Refused(Refusal::Unrecognised), "four fields (runc refuses; crun would mangle it)"),
            (s("-.slice:x:-.slice"), Normalised("/-.slice"), "root slice with the root slice as unit: runc's name as is, not the root"),
        ]
    }

    #[test]
    fn odd_path_table() {
        for (input, outcome, why) in odd_paths() {
            let got = CgroupsPath::parse(&input);
            match outcome {
                Accepted(want) => {
                    assert_eq!(want, input, "{why}: an accepted path is already clean");
                    assert_eq!(got.unwrap().dir().as_str(), want, "{why}");
                }
                Normalised("") => {
                    got.unwrap_or_else(|e| panic!("{why}: {e}"));
                }
                Normalised(want) => {
                    assert_ne!(want, input, "{why}");
                    assert_eq!(
                        got.unwrap_or_else(|e| panic!("{why}: {e}")).dir().as_str(),
                        want,
                        "{why}"
                    );
                }
                Refused(reason) => {
                    let e = got.expect_err(why);
                    assert_eq!(e.reason, reason, "{input:?}: {why}");
                    assert_eq!(e.path, input);
                }
            }
        }
    }

    #[test]
    fn no_accepted_path_leaves_the_root() {
        for (input, _, _) in odd_paths() {
            if let Ok(p) = CgroupsPath::parse(&input) {
                let dir = p.dir();
                assert!(dir.as_str().starts_with('/'), "{input:?}");
                assert!(
                    !dir.components()
                        .any(|c| c == ".." || c == "." || c.is_empty()),
                    "{input:?} → {dir}"
                );
                assert!(!dir.is_root(), "{input:?}");
            }
        }
    }

    struct Kubelet {
        what: &'static str,
        cgroups_path: String,
        /// The unified line of `/proc/<pid>/cgroup` the runtime produced for it.
        process: String,
        dir: String,
        pod_uid: Option<&'static str>,
        container_id: Option<&'static str>,
    }

    fn kubelet_paths() -> Vec<Kubelet> {
        let systemd_dir = |qos: &str, prefix: &str| {
            format!("/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_}.slice/{prefix}-{CID}.scope")
        };
        vec![
            Kubelet {
                what: "containerd, cgroupfs driver",
                cgroups_path: format!("/kubepods/besteffort/pod{UID}/{CID}"),
                process: format!("/kubepods/besteffort/pod{UID}/{CID}"),
                dir: format!("/kubepods/besteffort/pod{UID}/{CID}"),
                pod_uid: Some(UID),
                container_id: Some(CID),
            },
            Kubelet {
                what: "guaranteed QoS (no QoS level in the path)",
                cgroups_path: format!("/kubepods/pod{UID}/{CID}"),
                process: format!("/kubepods/pod{UID}/{CID}"),
                dir: format!("/kubepods/pod{UID}/{CID}"),
                pod_uid: Some(UID),
                container_id: Some(CID),
            },
            Kubelet {
                what: "containerd, systemd driver",
                cgroups_path: format!("kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"),
                process: systemd_dir("besteffort", "cri-containerd"),
                dir: systemd_dir("besteffort", "cri-containerd"),
                pod_uid: Some(UID),
                container_id: Some(CID),
            },
            Kubelet {
                what: "CRI-O, systemd driver",
                cgroups_path: format!("kubepods-burstable-pod{UID_}.slice:crio:{CID}"),
                process: systemd_dir("burstable", "crio"),
                dir: systemd_dir("burstable", "crio"),
                pod_uid: Some(UID),
                container_id: Some(CID),
            },
            Kubelet {
                what: "crun: the process in a child cgroup of the scope",
                cgroups_path: format!("kubepods-burstable-pod{UID_}.slice:crio:{CID}"),
                process: format!("{}/container", systemd_dir("burstable", "crio")),
                dir: systemd_dir("burstable", "crio"),
                pod_uid: Some(UID),
                container_id: Some(CID),
            },
            Kubelet {
                what: "CRI-O, cgroupfs driver",
                cgroups_path: format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                process: format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                dir: format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
                pod_uid: Some(UID),
                container_id: Some(CID),
            },
            Kubelet {
                what: "static pod: 32 hex digits without dashes",
                cgroups_path: "/kubepods/pod0123456789abcdef0123456789abcdef/0123456789ab".into(),
                process: "/kubepods/pod0123456789abcdef0123456789abcdef/0123456789ab".into(),
                dir: "/kubepods/pod0123456789abcdef0123456789abcdef/0123456789ab".into(),
                pod_uid: Some("0123456789abcdef0123456789abcdef"),
                container_id: Some("0123456789ab"),
            },
            Kubelet {
                what: "podman, systemd manager (no pod)",
                cgroups_path: format!("machine.slice:libpod:{CID}"),
                process: format!("/machine.slice/libpod-{CID}.scope/container"),
                dir: format!("/machine.slice/libpod-{CID}.scope"),
                pod_uid: None,
                container_id: Some(CID),
            },
            Kubelet {
                what: "no id-shaped leaf",
                cgroups_path: "/libpod_parent/ctr".into(),
                process: "/libpod_parent/ctr".into(),
                dir: "/libpod_parent/ctr".into(),
                pod_uid: None,
                container_id: None,
            },
        ]
    }

    #[test]
    fn kubelet_and_runtime_paths() {
        for k in kubelet_paths() {
            let dir = CgroupsPath::parse(&k.cgroups_path)
                .unwrap_or_else(|e| panic!("{}: {e}", k.what))
                .dir();
            assert_eq!(dir.as_str(), k.dir, "{}", k.what);
            assert!(
                dir.contains(&k.process),
                "{}: {} not within {dir}",
                k.what,
                k.process
            );
            assert_eq!(dir.pod_uid().as_deref(), k.pod_uid, "{}", k.what);
            assert_eq!(dir.container_id(), k.container_id, "{}", k.what);
        }
    }

    #[test]
    fn contains_is_by_component() {
        let c = CgroupPath::clean("/a/b").unwrap();
        assert!(c.contains("/a/b"));
        assert!(c.contains("/a/b/c"));
        assert!(c.contains("a/b/c"));
        assert!(!c.contains("/a/bc"));
        assert!(!c.contains("/a"));
        assert!(!c.contains("/a/b/../../x"));
        assert!(CgroupPath::root().contains("/x"));
    }

    #[test]
    fn levels_and_relative_form() {
        let c = CgroupPath::clean("/a/b/c").unwrap();
        assert_eq!((c.level(), c.relative(), c.leaf()), (3, "a/b/c", Some("c")));
        let r = CgroupPath::root();
        assert_eq!((r.level(), r.relative(), r.leaf()), (0, "", None));
    }

    #[test]
    fn slice_expansion() {
        assert_eq!(
            expand_slice("a-b-c.slice").unwrap().as_str(),
            "/a.slice/a-b.slice/a-b-c.slice"
        );
        assert_eq!(expand_slice("-.slice").unwrap(), CgroupPath::root());
        assert!(expand_slice("a/b.slice").is_err());
    }

    #[test]
    fn proc_cgroup() {
        let hybrid = "12:pids:/x\n1:name=systemd:/y\n0::/kubepods/podX/abc\n";
        assert_eq!(unified_path(hybrid), Some("/kubepods/podX/abc"));
        assert_eq!(unified_path("1:cpu:/x\n"), None);
    }
}
