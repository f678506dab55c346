//! A private CRI-O for tests: the binaries of `RTHOOKS_CRIO_DIR` (`crio`, `pinns`,
//! `conmon`; `cargo xtask e2e` sets it, see `xtask/src/vm/crio.rs`), with its store, run
//! state, sockets, hooks directory and NRI socket in a temporary directory, the cgroupfs
//! manager, runc or crun as the runtime, and the test images imported into its store.
//!
//! CRI-O asks the runtime for `oomScoreAdj` -998 on sandboxes, which fails where root
//! lacks CAP_SYS_RESOURCE (the development hosts): the runtime CRI-O is given is a wrapper
//! that clamps a negative `oomScoreAdj` in the bundle's config.json to 0 (and for crun
//! relabels the spec's version, see [`runtime_wrapper`]), then execs the real runtime.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::command::run;
use crate::cri::Cri;
use crate::daemon::Daemon;
use crate::images;

/// The environment variable naming the directory with CRI-O's binaries.
pub const CRIO_DIR_ENV: &str = "RTHOOKS_CRIO_DIR";

/// The binaries CRI-O needs.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `crio`.
    pub crio: PathBuf,
    /// `pinns` (creates the pod's namespaces).
    pub pinns: PathBuf,
    /// `conmon` (monitors each container).
    pub conmon: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`; an error names the first one missing.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let b = Binaries {
            crio: dir.join("crio"),
            pinns: dir.join("pinns"),
            conmon: dir.join("conmon"),
        };
        for p in [&b.crio, &b.pinns, &b.conmon] {
            if !p.is_file() {
                bail!("{} is missing (from {CRIO_DIR_ENV})", p.display());
            }
        }
        Ok(b)
    }

    /// The binaries in `$RTHOOKS_CRIO_DIR`: `Ok(None)` when it is not set.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var_os(CRIO_DIR_ENV).filter(|d| !d.is_empty()) {
            Some(dir) => Self::in_dir(Path::new(&dir)).map(Some),
            None => Ok(None),
        }
    }
}

/// The OCI runtime CRI-O runs containers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OciRuntime {
    /// runc (the host's).
    Runc,
    /// crun (the guest userland's; it refuses a hybrid cgroup host).
    Crun,
}

impl OciRuntime {
    /// Both.
    pub const ALL: [OciRuntime; 2] = [OciRuntime::Runc, OciRuntime::Crun];

    /// Its name (also CRI-O's runtime handler name).
    pub fn name(self) -> &'static str {
        match self {
            OciRuntime::Runc => "runc",
            OciRuntime::Crun => "crun",
        }
    }

    /// The binary: runc as containerd's harness finds it; crun from the guest userland
    /// (`$RTHOOKS_USERLAND/runtimes`), else from PATH.
    pub fn binary(self) -> Result<PathBuf> {
        match self {
            OciRuntime::Runc => Ok(crate::containerd::runc()),
            OciRuntime::Crun => {
                let userland = std::env::var_os("RTHOOKS_USERLAND")
                    .map(|u| PathBuf::from(u).join("runtimes/usr/bin/crun"));
                let path = std::env::var("PATH").unwrap_or_default();
                userland
                    .into_iter()
                    .chain(path.split(':').map(|d| Path::new(d).join("crun")))
                    .find(|p| p.is_file())
                    .context("crun is not installed (nor in $RTHOOKS_USERLAND/runtimes)")
            }
        }
    }
}

/// Settings for [`Crio::prepare`].
#[derive(Clone, Debug)]
pub struct Options {
    /// The runtime (CRI-O's default runtime).
    pub runtime: OciRuntime,
    /// CRI-O's NRI, with its socket in the temp dir.
    pub nri: bool,
}

impl Options {
    /// `runtime`, NRI off.
    pub fn new(runtime: OciRuntime) -> Self {
        Options {
            runtime,
            nri: false,
        }
    }
}

/// A private CRI-O, prepared (config written, images imported) or running (stopped, its
/// leftovers cleaned up and its directory removed on drop).
pub struct Crio {
    /// Options it was prepared with.
    pub options: Options,
    /// Binaries.
    pub bins: Binaries,
    daemon: Daemon,
}

impl Crio {
    /// Writes the config, the runtime wrapper and the signature policy, and imports the
    /// test images into the store, without starting CRI-O (so that a caller can install
    /// hooks first); then [`Crio::launch`].
    pub async fn prepare(bins: Binaries, options: Options) -> Result<Self> {
        let (pause, busybox) = tokio::task::spawn_blocking(|| -> Result<_> {
            Ok((images::pause_tar()?, images::busybox_tar()?))
        })
        .await??;
        let mut daemon = Daemon::new("crio", "rthc-", "conmon")?;
        let (config, config_dir) = (daemon.dir().join("crio.conf"), daemon.dir().join("conf.d"));
        daemon.set_command(
            &bins.crio,
            &[
                "--config".as_ref(),
                config.as_os_str(),
                "--config-dir".as_ref(),
                config_dir.as_os_str(),
            ],
            &[],
        );
        let c = Crio {
            options: options.clone(),
            bins,
            daemon,
        };
        for d in [
            "root",
            "runroot",
            "runtime-root",
            "hooks.d",
            "conf.d",
            "cni",
            "ns",
            "attach",
            "exits",
            "nri-plugins",
            "nri-conf",
            "podman-tmp",
        ] {
            fs::create_dir_all(c.dir().join(d))?;
        }
        fs::write(
            c.policy_path(),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        let runtime = options.runtime.binary()?;
        let wrapper = c.dir().join(format!("{}-wrapper", options.runtime.name()));
        fs::write(
            &wrapper,
            runtime_wrapper(&runtime, options.runtime.spec_version()),
        )?;
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
        fs::write(c.config_path(), c.config_toml(&wrapper))?;
        c.import(&pause, images::PAUSE_IMAGE)?;
        c.import(&busybox, images::BUSYBOX_IMAGE)?;
        Ok(c)
    }

    /// Starts a [`Crio::prepare`]d CRI-O and waits until it reports RuntimeReady.
    pub async fn launch(&mut self) -> Result<()> {
        self.daemon.start()?;
        self.wait_up().await
    }

    /// Everything lives here (a temporary directory).
    pub fn dir(&self) -> &Path {
        self.daemon.dir()
    }

    /// CRI-O's CRI socket.
    pub fn socket(&self) -> PathBuf {
        self.daemon.socket()
    }

    /// The NRI socket plugins connect to.
    pub fn nri_socket(&self) -> PathBuf {
        self.dir().join("nri.sock")
    }

    /// The hooks.d directory CRI-O reads.
    pub fn hooks_dir(&self) -> PathBuf {
        self.dir().join("hooks.d")
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("crio.conf")
    }

    /// CRI-O's log file.
    pub fn log_path(&self) -> PathBuf {
        self.daemon.log_path()
    }

    /// The directory pods log to.
    pub fn pod_log_root(&self) -> PathBuf {
        self.daemon.pod_log_root()
    }

    fn policy_path(&self) -> PathBuf {
        self.dir().join("policy.json")
    }

    /// The config: only what differs from CRI-O's defaults, every path in the temp dir.
    fn config_toml(&self, runtime: &Path) -> String {
        let d = self.dir().display();
        let name = self.options.runtime.name();
        format!(
            r#"[crio]
root = "{d}/root"
runroot = "{d}/runroot"
storage_driver = "vfs"
log_dir = "{d}/logs"
version_file = "{d}/version"
version_file_persist = "{d}/version-persist"
clean_shutdown_file = "{d}/clean.shutdown"

[crio.api]
listen = "{d}/crio.sock"

[crio.runtime]
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
default_runtime = "{name}"
hooks_dir = ["{d}/hooks.d"]
pinns_path = "{pinns}"
namespaces_dir = "{d}/ns"
container_attach_socket_dir = "{d}/attach"
container_exits_dir = "{d}/exits"
# The guests have neither iptables nor nftables, and host-network pods map no ports.
disable_hostport_mapping = true

[crio.runtime.runtimes.{name}]
runtime_path = "{runtime}"
runtime_type = "oci"
runtime_root = "{d}/runtime-root"
monitor_path = "{conmon}"
monitor_cgroup = "pod"

[crio.image]
pause_image = "{pause}"
signature_policy = "{d}/policy.json"

[crio.network]
network_dir = "{d}/cni"
plugin_dirs = ["{d}/cni"]

[crio.nri]
enable_nri = {nri}
nri_listen = "{d}/nri.sock"
nri_plugin_dir = "{d}/nri-plugins"
nri_plugin_config_dir = "{d}/nri-conf"
nri_plugin_request_timeout = "{request_timeout}s"
"#,
            pinns = self.bins.pinns.display(),
            conmon = self.bins.conmon.display(),
            runtime = runtime.display(),
            pause = images::PAUSE_IMAGE,
            nri = self.options.nri,
            // As for containerd: NRI fails open on a late answer, and TCG is slow.
            request_timeout = crate::timing::secs(2).as_secs(),
        )
    }

    /// Imports an OCI layout tarball (tag `1`) into CRI-O's store as `name`, with podman
    /// on the same store (CRI-O has no import of its own and no registry is reachable).
    fn import(&self, tar: &Path, name: &str) -> Result<()> {
        let d = self.dir();
        let podman = |args: &[&str]| {
            let mut cmd = Command::new(podman());
            cmd.arg("--root")
                .arg(d.join("root"))
                .arg("--runroot")
                .arg(d.join("runroot"))
                .arg("--tmpdir")
                .arg(d.join("podman-tmp"))
                .args([
                    "--storage-driver",
                    "vfs",
                    "--cgroup-manager",
                    "cgroupfs",
                    "--events-backend",
                    "none",
                ])
                .args(args);
            cmd
        };
        let archive = format!("oci-archive:{}", tar.display());
        let policy = self.policy_path().display().to_string();
        let out = podman(&["pull", "-q", "--signature-policy", &policy, &archive])
            .output()
            .context("running podman")?;
        if !out.status.success() {
            bail!(
                "podman pull {archive} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The archive's own reference (`1`) becomes `localhost/1:latest`; CRI-O names an
        // image by its first name, so only ours may be left.
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        run(&mut podman(&["tag", &id, name])).with_context(|| format!("podman tag {name}"))?;
        run(&mut podman(&["untag", &id, "localhost/1:latest"]))
            .with_context(|| format!("podman untag {name}'s archive name"))
    }

    async fn wait_up(&mut self) -> Result<()> {
        let deadline = Instant::now() + crate::timing::secs(30);
        self.daemon.wait_ready(deadline).await
    }

    /// A CRI client for this CRI-O.
    pub async fn cri(&self) -> Result<Cri> {
        self.daemon.cri().await
    }

    /// The last `n` lines of CRI-O's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.daemon.log_tail(n)
    }

    /// Stops CRI-O (SIGTERM, then SIGKILL after 10 s). Containers keep running under
    /// their conmon, as on a real node.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Stops and starts CRI-O again with the same store, state and sockets (it reads its
    /// hooks directory again).
    pub async fn restart(&mut self) -> Result<()> {
        self.daemon.restart()?;
        self.wait_up().await
    }
}

/// The podman that imports images: the guest userland's, else PATH's.
fn podman() -> PathBuf {
    std::env::var_os("RTHOOKS_USERLAND")
        .map(|u| PathBuf::from(u).join("runtimes/usr/bin/podman"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("podman"))
}

/// The runtime wrapper (see the module docs). CRI-O's conmon calls the runtime as
/// `<runtime> [global flags] create --bundle DIR …`; the spec may be indented. With `spec_version`, the bundle's `ociVersion` is
/// relabelled too: bookworm's crun 1.8.1 refuses every version but 1.0.x ("unknown
/// version specified"), and CRI-O 1.37 writes a 1.2 spec.
fn runtime_wrapper(runtime: &Path, spec_version: Option<&str>) -> String {
    let mut edits = vec![r#"s/"oomScoreAdj":[[:space:]]*-[0-9]*/"oomScoreAdj":0/"#.to_string()];
    if let Some(v) = spec_version {
        edits.push(format!(
            r#"s/"ociVersion":[[:space:]]*"[^"]*"/"ociVersion":"{v}"/"#
        ));
    }
    let sed = edits
        .iter()
        .map(|e| format!("-e '{e}'"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"#!/bin/sh
# Written by rthooks-e2e: clamp a negative oomScoreAdj (CRI-O's -998 for sandboxes needs
# CAP_SYS_RESOURCE){relabel}, then run {runtime}.
prev=
for a in "$@"; do
    case $prev in
    --bundle | -b) sed -i {sed} "$a/config.json" ;;
    esac
    case $a in
    --bundle=*) sed -i {sed} "${{a#--bundle=}}/config.json" ;;
    esac
    prev=$a
done
exec '{runtime}' "$@"
"#,
        relabel = if spec_version.is_some() {
            "; relabel the spec's version for this runtime"
        } else {
            ""
        },
        runtime = runtime.display()
    )
}

impl OciRuntime {
    /// The spec version this runtime must be told (see [`runtime_wrapper`]).
    fn spec_version(self) -> Option<&'static str> {
        match self {
            OciRuntime::Runc => None,
            OciRuntime::Crun => Some("1.0.2"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_clamps_negative_oom_score_adj_relabels_the_version_and_runs_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        fs::create_dir_all(&bundle).unwrap();
        let spec = r#"{"ociVersion":"1.2.1","process":{"oomScoreAdj":-998,"args":["/pause"]},"x":{"oomScoreAdj":5}}"#;
        // A stand-in runtime that prints what it was given.
        let runtime = dir.path().join("runtime");
        fs::write(&runtime, "#!/bin/sh\necho \"ran: $*\"\n").unwrap();
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o755)).unwrap();
        let wrapper = dir.path().join("wrapper");
        fs::write(&wrapper, runtime_wrapper(&runtime, Some("1.0.2"))).unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        for form in [
            vec![
                "--root".to_string(),
                "/r".into(),
                "create".into(),
                "--bundle".into(),
                bundle.display().to_string(),
                "id".into(),
            ],
            vec![
                "create".into(),
                format!("--bundle={}", bundle.display()),
                "id".into(),
            ],
        ] {
            fs::write(bundle.join("config.json"), spec).unwrap();
            let out = Command::new(&wrapper).args(&form).output().unwrap();
            assert!(out.status.success());
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                format!("ran: {}", form.join(" "))
            );
            let got = fs::read_to_string(bundle.join("config.json")).unwrap();
            assert_eq!(
                got,
                r#"{"ociVersion":"1.0.2","process":{"oomScoreAdj":0,"args":["/pause"]},"x":{"oomScoreAdj":5}}"#
            );
        }
        // Indented, as CRI-O may write it.
        fs::write(
            bundle.join("config.json"),
            "{\n  \"ociVersion\": \"1.2.1\",\n  \"oomScoreAdj\": -998\n}",
        )
        .unwrap();
        let out = Command::new(&wrapper)
            .args(["create", "--bundle"])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            fs::read_to_string(bundle.join("config.json")).unwrap(),
            "{\n  \"ociVersion\":\"1.0.2\",\n  \"oomScoreAdj\":0\n}"
        );
        // Other commands leave config files alone.
        fs::write(bundle.join("config.json"), spec).unwrap();
        Command::new(&wrapper)
            .args(["state", "id"])
            .output()
            .unwrap();
        assert_eq!(
            fs::read_to_string(bundle.join("config.json")).unwrap(),
            spec
        );
    }
}
