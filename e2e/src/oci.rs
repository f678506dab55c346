//! The OCI hook without CRI: runc or crun running bundles whose `config.json` names the
//! hook (as whatever calls the runtime would write it), or podman reading our hooks.d
//! file (`rthooks-setup install hooks-d`). The runtimes are the guest userland's
//! (`$RTHOOKS_USERLAND/runtimes`, unpacked by `cargo xtask vm`): bookworm's, built for the
//! host's C library.
//!
//! The rootfs is busybox: `/bin/sh`, `/bin/sleep`, … are links to `/bin/busybox`, the
//! binary the policies name (the kernel resolves the links, so an applet *is*
//! `/bin/busybox`); `/bin/busybox-ok` is a copy at another path, which no policy names,
//! for containers that must keep running. Every container gets a host directory at
//! `/shared`, so its first line can leave a file there. Identity travels as a CRI runtime
//! puts it into the spec: containerd's annotation keys and our pod-labels annotation.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rthooks_container::annotations::containerd as keys;
use tokio::process::Command;

use crate::cri::PodSpec;
use crate::crio::OciRuntime;

/// The image podman runs: the bundles' rootfs, imported.
const PODMAN_IMAGE: &str = "localhost/bb:1";

/// What starts the containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// `runc run` / `crun run` of a bundle, the hook in its `config.json`.
    Bundle(OciRuntime),
    /// podman (on runc), the hook from hooks.d.
    Podman,
}

impl Engine {
    /// The matrix's runtime column.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Bundle(r) => r.name(),
            Engine::Podman => "podman",
        }
    }
}

/// A binary of the guest userland's runtimes (`runc`, `crun`, `podman`, `conmon`).
pub fn userland_binary(name: &str) -> Result<PathBuf> {
    let userland = std::env::var_os("RTHOOKS_USERLAND")
        .map(PathBuf::from)
        .context("RTHOOKS_USERLAND is not set (cargo xtask e2e sets it in the guests)")?;
    ["usr/sbin", "usr/bin"]
        .iter()
        .map(|d| userland.join("runtimes").join(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is not unpacked (cargo xtask vm)"))
}

/// The hook as a bundle's `createRuntime` entry names it.
#[derive(Clone, Debug)]
pub struct HookCommand {
    /// `rthooks-oci-hook`.
    pub path: PathBuf,
    /// Its arguments after the stage.
    pub args: Vec<String>,
    /// The OCI hook timeout, seconds.
    pub timeout: u64,
}

/// What a container run or exec returned.
#[derive(Clone, Debug)]
pub struct Ran {
    /// The exit status (137: killed by SIGKILL; -1: no status).
    pub rc: i32,
    /// Its output and the runtime's, together.
    pub out: String,
}

/// A directory of containers run by one engine: rootfs, bundles, runtime state, podman's
/// store. Containers left running are removed on drop, and their cgroups with them.
pub struct OciNode {
    /// Which engine.
    pub engine: Engine,
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// runc or crun (podman's runtime: runc).
    runtime: PathBuf,
    podman: Option<PathBuf>,
    conmon: Option<PathBuf>,
    /// The engine's version, for the detail.
    pub version: String,
    /// The cgroup below which every container's goes (`/<cgroup>/<name>`).
    cgroup: String,
    /// The hook bundles name (set by the stack before the first container; none: a
    /// plain bundle).
    pub hook: Option<HookCommand>,
    /// The bundle runtimes' base spec (`runc spec`).
    base_spec: serde_json::Value,
    started: Mutex<Vec<String>>,
}

impl OciNode {
    /// Makes the rootfs, the base spec (bundles) or the imported image (podman).
    pub async fn prepare(engine: Engine) -> Result<Self> {
        let base =
            std::env::var_os("RTHOOKS_TMP").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix(&format!("rths-{}-", engine.name()))
            .tempdir_in(base)?;
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::create_dir_all(rootfs.join("shared"))?;
        let busybox = crate::images::busybox_binary()?;
        std::fs::copy(&busybox, rootfs.join("bin/busybox"))?;
        std::fs::copy(&busybox, rootfs.join("bin/busybox-ok"))?;
        for applet in ["sh", "sleep", "cat", "echo", "true"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
        }
        let runtime = match engine {
            Engine::Bundle(r) => userland_binary(r.name())?,
            Engine::Podman => userland_binary("runc")?,
        };
        let cgroup = format!(
            "rthooks-e2e-{}-{}",
            engine.name(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let mut node = OciNode {
            engine,
            runtime,
            podman: None,
            conmon: None,
            version: String::new(),
            cgroup,
            hook: None,
            base_spec: serde_json::Value::Null,
            started: Mutex::new(Vec::new()),
            dir,
        };
        match engine {
            Engine::Bundle(_) => {
                let d = node.dir.path();
                let spec = run_ok(Command::new(&node.runtime).arg("spec").current_dir(d)).await;
                spec.with_context(|| format!("{} spec", engine.name()))?;
                node.base_spec = serde_json::from_slice(&std::fs::read(d.join("config.json"))?)?;
                std::fs::remove_file(d.join("config.json"))?;
                let v = run_ok(Command::new(&node.runtime).arg("--version")).await?;
                node.version = v.lines().next().unwrap_or_default().to_string();
            }
            Engine::Podman => {
                std::fs::create_dir_all(node.hooks_dir())?;
                node.podman = Some(userland_binary("podman")?);
                node.conmon = Some(userland_binary("conmon")?);
                let tar = node.dir.path().join("rootfs.tar");
                run_ok(
                    Command::new("tar")
                        .arg("-C")
                        .arg(&rootfs)
                        .arg("-cf")
                        .arg(&tar)
                        .arg("."),
                )
                .await?;
                run_ok(node.podman().args(["import"]).arg(&tar).arg(PODMAN_IMAGE))
                    .await
                    .context("podman import")?;
                node.version = run_ok(node.podman().arg("--version"))
                    .await?
                    .trim()
                    .to_string();
            }
        }
        Ok(node)
    }

    /// Where podman reads hooks from (our installer writes there).
    pub fn hooks_dir(&self) -> PathBuf {
        self.dir.path().join("hooks.d")
    }

    /// A fresh directory to mount at `/shared` (writable for every container user).
    pub fn shared_dir(&self, tag: &str) -> Result<PathBuf> {
        let d = self.dir.path().join(format!("shared-{tag}"));
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        Ok(d)
    }

    /// The engine's log (nothing of its own: runtimes report in their output).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("runtime.log")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The engine's command line up to the subcommand (blocking, for drop).
    fn engine_command(&self) -> std::process::Command {
        match self.engine {
            Engine::Bundle(_) => self.bundle_command(),
            Engine::Podman => self.podman_command(),
        }
    }

    fn bundle_command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.runtime);
        c.arg("--root").arg(self.state_dir());
        c
    }

    fn bundle_runtime(&self) -> Command {
        self.bundle_command().into()
    }

    fn podman(&self) -> Command {
        self.podman_command().into()
    }

    fn podman_command(&self) -> std::process::Command {
        let d = self.dir.path();
        let mut c = std::process::Command::new(self.podman.as_ref().expect("podman"));
        c.arg("--root")
            .arg(d.join("pm/root"))
            .arg("--runroot")
            .arg(d.join("pm/runroot"))
            .arg("--tmpdir")
            .arg(d.join("pm/tmp"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--conmon"])
            .arg(self.conmon.as_ref().expect("conmon"))
            .arg("--runtime")
            .arg(&self.runtime)
            .arg("--hooks-dir")
            .arg(self.hooks_dir());
        c
    }

    /// The annotations a CRI runtime would put into container `name`'s spec for `pod`.
    fn annotations(name: &str, pod: &PodSpec) -> serde_json::Map<String, serde_json::Value> {
        let labels: serde_json::Map<_, _> = pod
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        [
            (keys::CONTAINER_TYPE, "container".to_string()),
            (keys::CONTAINER_NAME, name.to_string()),
            (keys::IMAGE_NAME, PODMAN_IMAGE.to_string()),
            (keys::SANDBOX_NAME, pod.name.clone()),
            (keys::SANDBOX_UID, pod.uid.clone()),
            (keys::SANDBOX_NAMESPACE, pod.namespace.clone()),
            (
                rthooks_container::labels::POD_LABELS_ANNOTATION,
                serde_json::Value::Object(labels).to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect()
    }

    /// Writes container `name`'s bundle: the base spec with `args`, the read-only
    /// rootfs, its cgroup, the identity annotations, the hook and `/shared`.
    fn bundle(&self, name: &str, pod: &PodSpec, shared: &Path, args: &[&str]) -> Result<PathBuf> {
        let b = self.dir.path().join("b").join(name);
        std::fs::create_dir_all(&b)?;
        let mut spec = self.base_spec.clone();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = args.into();
        spec["root"] =
            serde_json::json!({"path": self.dir.path().join("rootfs"), "readonly": true});
        spec["linux"]["cgroupsPath"] = format!("/{}/{name}", self.cgroup).into();
        spec["annotations"] = Self::annotations(name, pod).into();
        if let Some(hook) = &self.hook {
            let mut hook_args = vec!["rthooks-oci-hook".to_string(), "createRuntime".into()];
            hook_args.extend(hook.args.iter().cloned());
            spec["hooks"] = serde_json::json!({"createRuntime": [
                {"path": hook.path, "args": hook_args, "timeout": hook.timeout}
            ]});
        }
        let mount = serde_json::json!({"destination": "/shared", "type": "bind",
            "source": shared, "options": ["rbind", "rw"]});
        spec["mounts"]
            .as_array_mut()
            .context("the base spec has no mounts")?
            .push(mount);
        std::fs::write(b.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
        Ok(b)
    }

    /// podman's `run` arguments for container `name` of `pod`. podman parses
    /// `--annotation` as CSV: a value with quotes or commas (JSON) is quoted.
    fn podman_run_args(name: &str, pod: &PodSpec, shared: &Path) -> Vec<String> {
        let mut a = vec![
            "--name".to_string(),
            name.into(),
            "--network".into(),
            "none".into(),
            "-v".into(),
            format!("{}:/shared:rw", shared.display()),
        ];
        for (k, v) in Self::annotations(name, pod) {
            let v = v.as_str().unwrap_or_default().to_string();
            a.push("--annotation".into());
            if v.contains(['"', ',']) {
                a.push(format!("\"{k}={}\"", v.replace('"', "\"\"")));
            } else {
                a.push(format!("{k}={v}"));
            }
        }
        a
    }

    /// The command that runs container `name` of `pod`: in the foreground (podman removes
    /// it when it ends), or `detached`.
    fn run_command(
        &self,
        name: &str,
        pod: &PodSpec,
        shared: &Path,
        args: &[&str],
        detached: bool,
    ) -> Result<Command> {
        let how = if detached { "-d" } else { "--rm" };
        Ok(match self.engine {
            Engine::Bundle(_) => {
                let b = self.bundle(name, pod, shared, args)?;
                let mut c = self.bundle_runtime();
                c.arg("run");
                if detached {
                    c.arg("-d");
                }
                c.arg("--bundle").arg(b).arg(name);
                c
            }
            Engine::Podman => {
                let mut c = self.podman();
                c.args(["run", how])
                    .args(Self::podman_run_args(name, pod, shared))
                    .arg(PODMAN_IMAGE)
                    .args(args);
                c
            }
        })
    }

    /// Runs a fresh container in the foreground and removes it afterwards.
    pub async fn run(
        &self,
        name: &str,
        pod: &PodSpec,
        shared: &Path,
        args: &[&str],
    ) -> Result<Ran> {
        let mut ran = self.run_all(pod, shared, &[(name, args.to_vec())]).await?;
        Ok(ran.remove(0))
    }

    /// Runs fresh containers `(name, args)` of `pod` at once, each in the foreground, and
    /// removes them; what each returned, in order.
    pub async fn run_all<S: AsRef<str>>(
        &self,
        pod: &PodSpec,
        shared: &Path,
        runs: &[(S, Vec<S>)],
    ) -> Result<Vec<Ran>> {
        let mut children = Vec::new();
        for (name, args) in runs {
            let name = name.as_ref();
            let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
            let mut cmd = self.run_command(name, pod, shared, &args, false)?;
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawning {cmd:?}"))?;
            children.push((name, child));
        }
        let mut out = Vec::new();
        for (name, child) in children {
            let ran = ran_of(child.wait_with_output().await?);
            let _ = match self.engine {
                Engine::Bundle(_) => {
                    output(self.bundle_runtime().args(["delete", "-f", name])).await
                }
                Engine::Podman => output(self.podman().args(["rm", "-f", "-t", "0", name])).await,
            };
            tracing::info!(name, rc = ran.rc, out = ran.out, "ran");
            out.push(ran);
        }
        Ok(out)
    }

    /// Starts a container left running (removed by [`OciNode::remove`] or on drop).
    pub async fn start(
        &self,
        name: &str,
        pod: &PodSpec,
        shared: &Path,
        args: &[&str],
    ) -> Result<Ran> {
        self.started.lock().unwrap().push(name.to_string());
        // The container inherits these descriptors: a file, not a pipe, or reading them
        // would wait for the container to end.
        let out_file = self.dir.path().join(format!("{name}.out"));
        let out = std::fs::File::create(&out_file)?;
        let mut cmd = self.run_command(name, pod, shared, args, true)?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .await
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Ran {
            rc: status.code().unwrap_or(-1),
            out: std::fs::read_to_string(&out_file).unwrap_or_default(),
        })
    }

    /// Runs `args` in running container `name` through the engine's exec.
    pub async fn exec(&self, name: &str, args: &[&str]) -> Result<Ran> {
        let mut cmd = match self.engine {
            Engine::Bundle(_) => self.bundle_runtime(),
            Engine::Podman => self.podman(),
        };
        output(cmd.arg("exec").arg(name).args(args)).await
    }

    /// Whether container `name`'s process is alive.
    pub async fn running(&self, name: &str) -> bool {
        match self.engine {
            Engine::Bundle(_) => output(self.bundle_runtime().args(["state", name]))
                .await
                .ok()
                .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.out).ok())
                .is_some_and(|s| s["status"] == "running"),
            Engine::Podman => {
                output(
                    self.podman()
                        .args(["inspect", "-f", "{{.State.Running}}", name]),
                )
                .await
                .is_ok_and(|r| r.out.trim() == "true")
            }
        }
    }

    /// Kills and deletes container `name` (its cgroup goes away).
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.started.lock().unwrap().retain(|n| n != name);
        let r = match self.engine {
            Engine::Bundle(_) => {
                let _ = output(self.bundle_runtime().args(["kill", name, "KILL"])).await;
                output(self.bundle_runtime().args(["delete", "-f", name])).await?
            }
            Engine::Podman => output(self.podman().args(["rm", "-f", "-t", "0", name])).await?,
        };
        if r.rc != 0 {
            bail!("removing {name}: exit {}: {}", r.rc, r.out);
        }
        Ok(())
    }

    /// Removes every container still started (a failed scenario's).
    pub async fn remove_all(&self) {
        let names = std::mem::take(&mut *self.started.lock().unwrap());
        for n in names {
            let _ = self.remove(&n).await;
        }
    }
}

impl Drop for OciNode {
    fn drop(&mut self) {
        for name in self.started.lock().unwrap().drain(..) {
            let rm: &[&str] = match self.engine {
                Engine::Bundle(_) => &["delete", "-f"],
                Engine::Podman => &["rm", "-f", "-t", "0"],
            };
            let _ = self.engine_command().args(rm).arg(&name).output();
        }
        // The containers' cgroups, deepest first (bundles: /<cgroup>/<name>).
        let root = Path::new("/sys/fs/cgroup").join(&self.cgroup);
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&root);
    }
}

/// Runs `cmd` to its end (stdin closed); its exit status and output, stderr after stdout.
async fn output(cmd: &mut Command) -> Result<Ran> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("spawning {cmd:?}"))?;
    Ok(ran_of(out))
}

/// A finished process's status (a signal `s` as the shell's `128 + s`) and output.
fn ran_of(out: std::process::Output) -> Ran {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let signal = std::os::unix::process::ExitStatusExt::signal(&out.status);
    Ran {
        rc: out.status.code().or(signal.map(|s| 128 + s)).unwrap_or(-1),
        out: text,
    }
}

/// Runs `cmd`, which must succeed; its stdout.
async fn run_ok(cmd: &mut Command) -> Result<String> {
    let r = output(cmd).await?;
    if r.rc != 0 {
        bail!("{cmd:?}: exit {}: {}", r.rc, r.out);
    }
    Ok(r.out)
}
