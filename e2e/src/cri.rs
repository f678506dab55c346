//! A CRI v1 client that drives a runtime the way kubelet does: host-network pod sandboxes
//! (no CNI needed) with kubelet-style cgroup parents, containers from local images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use rthooks_container::annotations::crio as kubelet_labels;
use tonic::transport::{Channel, Endpoint, Uri};

/// A pod to create.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// UID (also names the pod's cgroup).
    pub uid: String,
    /// Pod labels (kubelet passes the pod's labels here).
    pub labels: HashMap<String, String>,
    /// Pod annotations.
    pub annotations: HashMap<String, String>,
    /// The kubelet runs with the systemd cgroup driver: the cgroup parent is a slice
    /// (`kubepods-besteffort-pod<uid>.slice`) instead of a cgroupfs path.
    pub systemd: bool,
}

impl PodSpec {
    /// A pod with a UID derived from its name and the time.
    pub fn new(name: &str, namespace: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            uid: format!("{:08x}-{name}", (nanos & 0xffff_ffff) as u32),
            ..Default::default()
        }
    }

    /// Adds a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// kubelet's cgroup parent for a BestEffort pod: a cgroupfs path, or with the systemd
    /// driver a slice name (kubelet escapes `-` in the UID as `_`).
    pub fn cgroup_parent(&self) -> String {
        if self.systemd {
            format!(
                "kubepods-besteffort-pod{}.slice",
                self.uid.replace('-', "_")
            )
        } else {
            format!("/kubepods/besteffort/pod{}", self.uid)
        }
    }

    /// The labels kubelet adds to the pod's sandbox and to each of its containers.
    pub fn kubelet_labels(&self) -> [(String, String); 3] {
        [
            (kubelet_labels::POD_NAME.into(), self.name.clone()),
            (kubelet_labels::POD_NAMESPACE.into(), self.namespace.clone()),
            (kubelet_labels::POD_UID.into(), self.uid.clone()),
        ]
    }

    /// The pod's cgroup directory below the cgroup root (what [`remove_cgroup_tree`]
    /// takes): the slice name expanded as systemd does with the systemd driver.
    pub fn cgroup_dir(&self) -> String {
        if self.systemd {
            rthooks_container::cgroup::expand_slice(&self.cgroup_parent())
                .expect("kubelet's pod slice name is a valid slice")
                .to_string()
        } else {
            self.cgroup_parent()
        }
    }
}

/// A running pod sandbox.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Sandbox id.
    pub id: String,
    /// What it was created from.
    pub spec: PodSpec,
    config: cri::PodSandboxConfig,
}

/// A container to create.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Image reference (e.g. [`crate::images::BUSYBOX_IMAGE`]).
    pub image: String,
    /// Command (entrypoint override).
    pub command: Vec<String>,
    /// Container annotations.
    pub annotations: HashMap<String, String>,
    /// Bind mounts (kubelet's hostPath volumes).
    pub mounts: Vec<HostMount>,
}

/// A hostPath-style bind mount.
#[derive(Clone, Debug, Default)]
pub struct HostMount {
    /// The path on the node (a file or a directory).
    pub host_path: PathBuf,
    /// Where it appears in the container.
    pub container_path: String,
    /// Mounted read-only.
    pub readonly: bool,
}

/// CRI clients on one socket.
#[derive(Clone)]
pub struct Cri {
    /// RuntimeService.
    pub runtime: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub images: ImageServiceClient<Channel>,
    log_root: PathBuf,
    /// Cgroup parents of the pods this client created (shared with the harness, which
    /// cleans up whatever a failing test leaves).
    pod_cgroups: Arc<Mutex<Vec<String>>>,
}

impl Cri {
    /// Connects to the CRI socket; pod logs go under `log_root`.
    pub async fn connect(socket: &Path, log_root: &Path) -> Result<Self> {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .with_context(|| format!("connecting to CRI at {}", socket.display()))?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            log_root: log_root.to_path_buf(),
            pod_cgroups: Arc::default(),
        })
    }

    /// Records created pods' cgroups in `registry`.
    pub fn tracking(mut self, registry: Arc<Mutex<Vec<String>>>) -> Self {
        self.pod_cgroups = registry;
        self
    }

    /// Waits until the runtime reports RuntimeReady (NetworkReady may stay false: pods
    /// here use the host network).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self
                .runtime
                .status(cri::StatusRequest { verbose: false })
                .await;
            if let Ok(r) = &r {
                let ready = r.get_ref().status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.r#type == "RuntimeReady" && c.status)
                });
                if ready {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("CRI runtime not ready after {timeout:?}: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// RunPodSandbox: host network, container PID namespace, kubelet-style cgroup parent,
    /// the pod's labels plus kubelet's own (CRI-O copies a sandbox's and a container's
    /// labels into its annotations: that is where its `io.kubernetes.pod.*` keys come from).
    pub async fn run_pod(&mut self, spec: &PodSpec) -> Result<Pod> {
        let log_dir = self.log_root.join(&spec.uid);
        std::fs::create_dir_all(&log_dir)?;
        let ns = cri::NamespaceOption {
            network: cri::NamespaceMode::Node as i32,
            pid: cri::NamespaceMode::Container as i32,
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: log_dir.display().to_string(),
            labels: spec
                .labels
                .clone()
                .into_iter()
                .chain(spec.kubelet_labels())
                .collect(),
            annotations: spec.annotations.clone(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: spec.cgroup_parent(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .context("RunPodSandbox")?;
        self.pod_cgroups.lock().unwrap().push(spec.cgroup_dir());
        Ok(Pod {
            id: r.into_inner().pod_sandbox_id,
            spec: spec.clone(),
            config,
        })
    }

    /// CreateContainer in `pod`; returns the container id.
    pub async fn create_container(&mut self, pod: &Pod, spec: &ContainerSpec) -> Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: spec.image.clone(),
                user_specified_image: spec.image.clone(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            labels: pod
                .spec
                .kubelet_labels()
                .into_iter()
                .chain([(kubelet_labels::CONTAINER_NAME.into(), spec.name.clone())])
                .collect(),
            annotations: spec.annotations.clone(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| cri::Mount {
                    host_path: m.host_path.display().to_string(),
                    container_path: m.container_path.clone(),
                    readonly: m.readonly,
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", spec.name),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .context("CreateContainer")?;
        Ok(r.into_inner().container_id)
    }

    /// StartContainer.
    pub async fn start_container(&mut self, id: &str) -> Result<()> {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .context("StartContainer")?;
        Ok(())
    }

    /// ContainerStatus (verbose); `info["info"]` is containerd's JSON with `runtimeSpec`.
    pub async fn container_status(
        &mut self,
        id: &str,
    ) -> Result<(cri::ContainerStatus, HashMap<String, String>)> {
        let r = self
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            })
            .await
            .context("ContainerStatus")?
            .into_inner();
        Ok((r.status.context("no status")?, r.info))
    }

    /// The container's OCI runtime spec as containerd generated it (after NRI
    /// adjustments).
    pub async fn container_spec(&mut self, id: &str) -> Result<serde_json::Value> {
        let (_, info) = self.container_status(id).await?;
        let raw = info.get("info").context("no verbose info")?;
        let v: serde_json::Value = serde_json::from_str(raw)?;
        let spec = v.get("runtimeSpec").context("no runtimeSpec in info")?;
        Ok(spec.clone())
    }

    /// ExecSync: runs `cmd` in the container and waits for it (at most `timeout`
    /// seconds). Returns the exit code and the combined output; a refused exec (e.g. an
    /// LSM denying it) is an error, as kubelet sees it.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> Result<(i32, String)> {
        let r = self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            })
            .await
            .context("ExecSync")?
            .into_inner();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        Ok((r.exit_code, out))
    }

    /// StopContainer (timeout in seconds).
    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<()> {
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await
            .context("StopContainer")?;
        Ok(())
    }

    /// RemoveContainer.
    pub async fn remove_container(&mut self, id: &str) -> Result<()> {
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .context("RemoveContainer")?;
        Ok(())
    }

    /// Stops and removes a pod (and its containers), then removes its cgroups and log
    /// directory, which kubelet (not the runtime) would clean up.
    pub async fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .context("StopPodSandbox")?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            })
            .await
            .context("RemovePodSandbox")?;
        let cg = pod.spec.cgroup_dir();
        remove_cgroup_tree(&cg);
        self.pod_cgroups.lock().unwrap().retain(|c| *c != cg);
        let _ = std::fs::remove_dir_all(self.log_root.join(&pod.spec.uid));
        Ok(())
    }

    /// Stops and removes every pod the runtime knows (test teardown).
    pub async fn remove_all_pods(&mut self) -> Result<()> {
        let pods = self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items;
        for p in pods {
            let _ = self
                .runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await;
            let _ = self
                .runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: p.id.clone(),
                })
                .await;
            if let Some(uid) = p.metadata.map(|m| m.uid) {
                remove_cgroup_tree(&format!("/kubepods/besteffort/pod{uid}"));
            }
        }
        Ok(())
    }
}

/// Removes `path` (a cgroup path like `/kubepods/besteffort/pod<uid>`) from every mounted
/// cgroup hierarchy, children first. Empty parents that we created (`/kubepods/...`) are
/// left alone: other tests may use them concurrently.
pub fn remove_cgroup_tree(path: &str) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in mounts.lines() {
        let (pre, post) = match line.split_once(" - ") {
            Some(x) => x,
            None => continue,
        };
        let fstype = post.split_whitespace().next().unwrap_or("");
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let Some(mp) = pre.split_whitespace().nth(4) else {
            continue;
        };
        let dir = Path::new(mp).join(path.trim_start_matches('/'));
        rmdir_tree(&dir);
    }
}

/// Kills every process left in the cgroup tree `path` (in every hierarchy), then removes
/// it: for pods whose runtime died before it could stop them.
pub fn kill_cgroup_tree(path: &str) {
    for _ in 0..50 {
        let pids = cgroup_pids(path);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_cgroup_tree(path);
}

fn cgroup_pids(path: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for root in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ] {
        collect_pids(
            &Path::new(root).join(path.trim_start_matches('/')),
            &mut pids,
        );
        if !pids.is_empty() {
            break;
        }
    }
    pids
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}
