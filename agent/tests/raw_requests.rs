//! The agent is the authority for the cgroup: every sender forwards what the runtime gave
//! it. This table sends RuntimeHook requests exactly as Tetragon's OCI hook and ours build
//! them (Tetragon's: the cgroupfs cgroupsPath raw, a systemd one expanded by runc's
//! `ExpandSlice` + `prefix-name.scope`, the runtime's annotations raw, only
//! `containerName` and `rootDir` filled; ours: every field filled, the expanded path,
//! our labels annotation; the NRI plugin's Synchronize report: the runtime's raw
//! `slice:prefix:name`) to the real agent, for real cgroup directories created under the
//! host's cgroup v2 mount, and reads back through the agent's API (`ListContainers`, what
//! `rthooksctl containers` shows) the cgroup id and identity each one gives.
mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use rthooks_api::tetragon::CreateContainer;
use rthooks_api::v1;

/// Directories created for one case, removed deepest first.
struct Tree {
    created: Vec<PathBuf>,
}

impl Tree {
    /// Creates `path` (relative to the cgroup root) and the parents that are missing.
    fn create(path: &str) -> (Tree, PathBuf) {
        let mut created = Vec::new();
        let mut dir = cgroup_root();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(comp);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        (Tree { created }, dir)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The kernel's id for a cgroup directory, read independently of the agent: the
/// `name_to_handle_at` handle, checked against the inode number.
fn kernel_cgroup_id(dir: &Path) -> u64 {
    #[repr(C)]
    struct Handle {
        handle_bytes: u32,
        handle_type: i32,
        f_handle: [u8; 64],
    }
    let cpath = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    let mut handle = Handle {
        handle_bytes: 64,
        handle_type: 0,
        f_handle: [0; 64],
    };
    let mut mount_id = 0;
    // SAFETY: a file_handle with room for handle_bytes bytes; valid C string and out pointer.
    let r = unsafe {
        libc::name_to_handle_at(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            &mut handle as *mut Handle as *mut libc::file_handle,
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {}: {}",
        dir.display(),
        std::io::Error::last_os_error()
    );
    assert_eq!(handle.handle_bytes, 8);
    let id = u64::from_ne_bytes(handle.f_handle[..8].try_into().unwrap());
    assert_eq!(
        id,
        std::fs::metadata(dir).unwrap().ino(),
        "handle and inode of {}",
        dir.display()
    );
    id
}

/// The identity the agent must report.
#[derive(Debug, Default, PartialEq)]
struct Want {
    container_id: String,
    container_name: String,
    image: String,
    pod_name: String,
    pod_uid: String,
    pod_namespace: String,
    labels: Vec<(String, String)>,
}

struct Case {
    what: &'static str,
    /// The cgroup directory the runtime created, below the cgroup root.
    dir: String,
    request: CreateContainer,
    want: Want,
}

fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One case's pod and container: a unique 64-hex container id, pod UID and top-level
/// cgroup name (without `-`, so it can start a slice name).
struct Ids {
    cid: String,
    uid: String,
    top: String,
}

impl Ids {
    fn new(n: u32) -> Ids {
        let seed = ((std::process::id() as u64) << 16) | n as u64;
        Ids {
            cid: format!("{seed:016x}").repeat(4),
            uid: format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id()),
            top: format!("rthooksraw{}n{n}", std::process::id()),
        }
    }

    /// kubelet's cgroupfs parent with the runtime's leaf (`<leaf_prefix><cid>`).
    fn cgroupfs(&self, qos: &str, leaf_prefix: &str) -> String {
        format!(
            "/{}/kubepods/{qos}/pod{}/{leaf_prefix}{}",
            self.top, self.uid, self.cid
        )
    }

    /// The runtime's raw `slice:prefix:id` for kubelet's systemd pod slice
    /// (`<top>[-<qos>]-pod<uid with _>.slice`), and the directory runc's systemd driver
    /// creates for it, written out by hand.
    fn systemd(&self, qos: Option<&str>, prefix: &str) -> (String, String) {
        let (t, cid, uid_) = (&self.top, &self.cid, self.uid.replace('-', "_"));
        match qos {
            Some(q) => (
                format!("{t}-{q}-pod{uid_}.slice:{prefix}:{cid}"),
                format!("/{t}.slice/{t}-{q}.slice/{t}-{q}-pod{uid_}.slice/{prefix}-{cid}.scope"),
            ),
            None => (
                format!("{t}-pod{uid_}.slice:{prefix}:{cid}"),
                format!("/{t}.slice/{t}-pod{uid_}.slice/{prefix}-{cid}.scope"),
            ),
        }
    }
}

/// containerd's CRI annotations, as in the spec it writes.
fn containerd_annotations(
    uid: &str,
    name: &str,
    ns: &str,
    container: &str,
    image: &str,
) -> HashMap<String, String> {
    map(&[
        ("io.kubernetes.cri.container-type", "container"),
        ("io.kubernetes.cri.container-name", container),
        ("io.kubernetes.cri.image-name", image),
        (
            "io.kubernetes.cri.sandbox-id",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ),
        ("io.kubernetes.cri.sandbox-name", name),
        ("io.kubernetes.cri.sandbox-namespace", ns),
        ("io.kubernetes.cri.sandbox-uid", uid),
    ])
}

/// CRI-O's annotations, as in the spec it writes.
fn crio_annotations(
    cid: &str,
    uid: &str,
    name: &str,
    ns: &str,
    container: &str,
    image: &str,
) -> HashMap<String, String> {
    map(&[
        ("io.kubernetes.container.name", container),
        ("io.kubernetes.cri-o.ContainerID", cid),
        ("io.kubernetes.cri-o.ImageName", image),
        ("io.kubernetes.cri-o.ContainerType", "container"),
        ("io.kubernetes.pod.name", name),
        ("io.kubernetes.pod.namespace", ns),
        ("io.kubernetes.pod.uid", uid),
    ])
}

/// What Tetragon's hook sends: the path (cgroupfs raw, systemd expanded), the bundle as
/// rootDir, all annotations, containerName from them; nothing else.
fn tetragon(cgroups_path: &str, annotations: HashMap<String, String>) -> CreateContainer {
    let container_name = annotations
        .get("io.kubernetes.cri.container-name")
        .or_else(|| annotations.get("io.kubernetes.container.name"))
        .cloned()
        .unwrap_or_default();
    CreateContainer {
        cgroups_path: cgroups_path.into(),
        root_dir: "/run/containerd/io.containerd.runtime.v2.task/k8s.io/x".into(),
        annotations,
        container_name,
        ..Default::default()
    }
}

fn want(cid: &str, uid: &str, name: &str, ns: &str, container: &str, image: &str) -> Want {
    Want {
        container_id: cid.into(),
        container_name: container.into(),
        image: image.into(),
        pod_name: name.into(),
        pod_uid: uid.into(),
        pod_namespace: ns.into(),
        labels: vec![],
    }
}

fn cases() -> Vec<Case> {
    let img = "docker.io/library/nginx:1.27";
    let crio_img = "quay.io/x/app:2";
    let mut out = Vec::new();

    // Tetragon's hook, containerd, cgroupfs driver: the raw kubelet path.
    let p = Ids::new(1);
    let dir = p.cgroupfs("besteffort", "");
    out.push(Case {
        what: "Tetragon hook, containerd, cgroupfs",
        request: tetragon(
            &dir,
            containerd_annotations(&p.uid, "web-0", "shop", "nginx", img),
        ),
        want: want(&p.cid, &p.uid, "web-0", "shop", "nginx", img),
        dir,
    });

    // Tetragon's hook, containerd, systemd driver: it sends runc's expansion; the id is in
    // the scope's name.
    let p = Ids::new(2);
    let (_, dir) = p.systemd(Some("besteffort"), "cri-containerd");
    out.push(Case {
        what: "Tetragon hook, containerd, systemd (expanded path)",
        request: tetragon(
            &dir,
            containerd_annotations(&p.uid, "web-1", "shop", "nginx", img),
        ),
        want: want(&p.cid, &p.uid, "web-1", "shop", "nginx", img),
        dir,
    });

    // Tetragon's hook, CRI-O, cgroupfs driver.
    let p = Ids::new(3);
    let dir = p.cgroupfs("burstable", "crio-");
    let a = crio_annotations(&p.cid, &p.uid, "app-7d9", "team-a", "app", crio_img);
    out.push(Case {
        what: "Tetragon hook, CRI-O, cgroupfs",
        request: tetragon(&dir, a),
        want: want(&p.cid, &p.uid, "app-7d9", "team-a", "app", crio_img),
        dir,
    });

    // Tetragon's hook, CRI-O, systemd driver.
    let p = Ids::new(4);
    let (_, dir) = p.systemd(Some("burstable"), "crio");
    let a = crio_annotations(&p.cid, &p.uid, "app-1", "team-a", "app", crio_img);
    out.push(Case {
        what: "Tetragon hook, CRI-O, systemd (expanded path)",
        request: tetragon(&dir, a),
        want: want(&p.cid, &p.uid, "app-1", "team-a", "app", crio_img),
        dir,
    });

    // The NRI plugin's Synchronize report: the runtime's raw systemd cgroupsPath, the
    // fields from the NRI pod and container, CRI-O's annotations.
    let p = Ids::new(5);
    let (raw, dir) = p.systemd(None, "crio");
    out.push(Case {
        what: "raw systemd slice:prefix:name, fields filled",
        request: CreateContainer {
            cgroups_path: raw,
            container_id: p.cid.clone(),
            container_name: "db".into(),
            pod_name: "db-0".into(),
            pod_uid: p.uid.clone(),
            pod_namespace: "data".into(),
            container_image: "localhost/db:3".into(),
            annotations: crio_annotations(&p.cid, &p.uid, "db-0", "data", "db", "localhost/db:3"),
            ..Default::default()
        },
        want: want(&p.cid, &p.uid, "db-0", "data", "db", "localhost/db:3"),
        dir,
    });

    // Our hook, containerd, systemd driver: every field filled, the expanded path, our
    // labels annotation (believed: the agent runs with --trust-label-annotation).
    let p = Ids::new(6);
    let (_, dir) = p.systemd(Some("besteffort"), "cri-containerd");
    let mut annotations = containerd_annotations(&p.uid, "web-2", "shop", "nginx", img);
    annotations.insert(
        rthooks_api::POD_LABELS_ANNOTATION.into(),
        r#"{"app":"web","tier":"frontend"}"#.into(),
    );
    out.push(Case {
        what: "our hook, containerd, systemd, labels annotation",
        request: CreateContainer {
            cgroups_path: dir.clone(),
            root_dir: "/run/containerd/bundle/rootfs".into(),
            annotations,
            container_name: "nginx".into(),
            container_id: p.cid.clone(),
            pod_name: "web-2".into(),
            pod_uid: p.uid.clone(),
            pod_namespace: "shop".into(),
            container_image: img.into(),
            mounts: vec![],
        },
        want: Want {
            labels: vec![
                ("app".into(), "web".into()),
                ("tier".into(), "frontend".into()),
            ],
            ..want(&p.cid, &p.uid, "web-2", "shop", "nginx", img)
        },
        dir,
    });

    // The raw systemd path with fields empty and no UID annotation: the pod UID comes from
    // kubelet's slice (`_` back to `-`), the container id from the scope.
    let p = Ids::new(7);
    let (raw, dir) = p.systemd(None, "cri-containerd");
    let a = map(&[
        ("io.kubernetes.cri.container-name", "side"),
        ("io.kubernetes.cri.sandbox-namespace", "shop"),
    ]);
    out.push(Case {
        what: "raw systemd path, no UID annotation",
        request: tetragon(&raw, a),
        want: Want {
            container_id: p.cid.clone(),
            container_name: "side".into(),
            pod_uid: p.uid.clone(),
            pod_namespace: "shop".into(),
            ..Default::default()
        },
        dir,
    });

    // No Kubernetes at all (plain runc): no annotations, a leaf that is no id; an odd
    // but certain spelling of the directory (`//`, `.`, trailing `/`).
    let t = Ids::new(8).top;
    out.push(Case {
        what: "plain runc, no annotations, odd spelling",
        request: tetragon(&format!("//{t}/./ctr-a/"), HashMap::new()),
        want: Want {
            container_id: "ctr-a".into(),
            ..Default::default()
        },
        dir: format!("/{t}/ctr-a"),
    });
    out
}

#[test]
fn raw_requests_register_with_the_right_cgroup_and_identity() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&["--trust-label-annotation"]);
    let cases = cases();
    let trees: Vec<(Tree, PathBuf)> = cases.iter().map(|c| Tree::create(&c.dir)).collect();
    for c in &cases {
        agent
            .runtime_hook(c.request.clone())
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", c.what, agent.log()));
    }
    let listed = agent.containers();
    for (c, (_, dir)) in cases.iter().zip(&trees) {
        let id = kernel_cgroup_id(dir);
        let got: &v1::Container = listed
            .iter()
            .find(|x| x.cgroup_id == id)
            .unwrap_or_else(|| {
                panic!("{}: cgroup {id} ({}) not listed: {listed:?}", c.what, c.dir)
            });
        assert_eq!(got.cgroup_path, c.dir.trim_start_matches('/'), "{}", c.what);
        let mut labels: Vec<(String, String)> = got.pod_labels.clone().into_iter().collect();
        labels.sort();
        let got_identity = Want {
            container_id: got.container_id.clone(),
            container_name: got.container_name.clone(),
            image: got.image.clone(),
            pod_name: got.pod_name.clone(),
            pod_uid: got.pod_uid.clone(),
            pod_namespace: got.pod_namespace.clone(),
            labels,
        };
        assert_eq!(got_identity, c.want, "{}", c.what);
        eprintln!(
            "{}: {} → cgroup id {id}, {:?}",
            c.what, c.request.cgroups_path, c.want
        );
    }
}

#[test]
fn uncertain_paths_are_refused_and_register_nothing() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&[]);
    let t = Ids::new(20).top;
    let (_tree, _) = Tree::create(&format!("/{t}/a/b"));
    for (path, why) in [
        (format!("/{t}/a/../a/b"), "`..`"),
        (format!("/{t}/a/b/../../../.."), "`..` above the root"),
        ("/".to_string(), "the root"),
        (format!("{t}--a.slice:x:y"), "`--` in a slice"),
        (
            format!("system.slice:x:{t}--a.slice"),
            "`--` in a slice unit",
        ),
        (format!("/{t}/missing"), "no such cgroup"),
    ] {
        let e = agent
            .runtime_hook(tetragon(&path, HashMap::new()))
            .expect_err(why);
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{why}: {e}");
        assert!(
            e.message().contains(&path),
            "{why}: the message names the path: {e}"
        );
    }
    assert!(agent.containers().is_empty(), "{:?}", agent.containers());
}
