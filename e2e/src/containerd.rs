//! A private containerd for tests: Debian's containerd (1.7.24 from trixie or 2.1.9 from
//! sid, unpacked with `dpkg -x`), with its root, state, sockets and NRI socket in a
//! temporary directory, NRI enabled, the host's runc, and locally built images.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use rthooks_e2e::containerd::{Containerd, Release};
//! use rthooks_e2e::cri::{ContainerSpec, PodSpec};
//! let mut ctrd = Containerd::start(Release::V2_1).await?;
//! let mut cri = ctrd.cri().await?;
//! let pod = cri.run_pod(&PodSpec::new("web", "default").label("app", "web")).await?;
//! let id = cri.create_container(&pod, &ContainerSpec {
//!     name: "sh".into(),
//!     image: rthooks_e2e::images::BUSYBOX_IMAGE.into(),
//!     command: vec!["/bin/sleep".into(), "60".into()],
//!     ..Default::default()
//! }).await?;
//! cri.start_container(&id).await?;
//! cri.remove_pod(&pod).await?;
//! ctrd.stop();
//! # Ok(()) }
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cri::Cri;
use crate::daemon::Daemon;
use crate::debian::{self, Package};
use crate::images;

/// The containerd releases the suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// 1.7.24 (Debian trixie): NRI must be enabled in the config.
    V1_7,
    /// 2.1.9 (Debian sid): NRI on by default.
    V2_1,
}

impl Release {
    /// Both, newest first.
    pub const ALL: [Release; 2] = [Release::V2_1, Release::V1_7];

    /// The Debian package.
    pub fn package(self) -> Package {
        match self {
            Release::V1_7 => Package {
                name: "containerd",
                suite: "trixie",
                version_prefix: "1.7.24",
            },
            Release::V2_1 => Package {
                name: "containerd",
                suite: "sid",
                version_prefix: "2.1.9",
            },
        }
    }
}

/// Whether this process can run containers (root).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Paths of the unpacked containerd binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `containerd`.
    pub containerd: PathBuf,
    /// `ctr`.
    pub ctr: PathBuf,
    /// The directory holding `containerd-shim-runc-v2` (put on PATH).
    pub bin_dir: PathBuf,
}

/// Downloads/unpacks (cached) the release and returns its binaries.
pub fn binaries(release: Release) -> Result<Binaries> {
    let root = debian::unpacked(&release.package())?;
    let containerd = debian::find_file(&root, "containerd").context("no containerd binary")?;
    let ctr = debian::find_file(&root, "ctr").context("no ctr binary")?;
    let bin_dir = containerd.parent().unwrap().to_path_buf();
    Ok(Binaries {
        containerd,
        ctr,
        bin_dir,
    })
}

/// The host's runc (`RTHOOKS_RUNC`, else from PATH, else `/usr/sbin/runc`).
pub fn runc() -> PathBuf {
    if let Some(p) = std::env::var_os("RTHOOKS_RUNC") {
        return p.into();
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
    {
        let p = Path::new(dir).join("runc");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/runc")
}

/// An NRI plugin containerd launches itself at start (and after each restart).
#[derive(Clone, Debug)]
pub struct PrelaunchedPlugin {
    /// Two-digit index (call order).
    pub idx: String,
    /// Name.
    pub name: String,
    /// The executable (linked into the plugin directory as `<idx>-<name>`).
    pub binary: PathBuf,
    /// Its configuration (`<idx>-<name>.conf`), passed to it in Configure.
    pub config: Option<String>,
}

/// Settings for [`Containerd::start_with`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Which containerd.
    pub release: Release,
    /// Enable NRI (with its socket in the temp dir).
    pub nri: bool,
    /// Import the pause and busybox images.
    pub images: bool,
    /// NRI plugins for containerd to launch.
    pub prelaunched: Vec<PrelaunchedPlugin>,
    /// runc with `SystemdCgroup = true` (needs a running systemd).
    pub systemd_cgroup: bool,
}

impl Options {
    /// NRI on, images imported.
    pub fn new(release: Release) -> Self {
        Options {
            release,
            nri: true,
            images: true,
            prelaunched: Vec::new(),
            systemd_cgroup: false,
        }
    }
}

/// A running private containerd (stopped, its leftovers cleaned up and its directory
/// removed on drop).
pub struct Containerd {
    /// Options it was started with.
    pub options: Options,
    /// Binaries.
    pub bins: Binaries,
    daemon: Daemon,
    /// Image tarballs (and base names) imported once containerd is up.
    pending_images: Vec<(PathBuf, &'static str)>,
}

impl Containerd {
    /// Starts `release` with NRI enabled and the test images imported.
    pub async fn start(release: Release) -> Result<Self> {
        Self::start_with(Options::new(release)).await
    }

    /// Starts containerd as `options` say.
    pub async fn start_with(options: Options) -> Result<Self> {
        let mut c = Self::prepare(options).await?;
        c.launch().await?;
        Ok(c)
    }

    /// Creates the directory and writes the config without starting containerd, so a
    /// caller can change the config first (e.g. an installer); then [`Containerd::launch`].
    pub async fn prepare(options: Options) -> Result<Self> {
        let bins = tokio::task::spawn_blocking(move || binaries(options.release)).await??;
        let (pause, busybox) = if options.images {
            tokio::task::spawn_blocking(|| -> Result<_> {
                Ok((Some(images::pause_tar()?), Some(images::busybox_tar()?)))
            })
            .await??
        } else {
            (None, None)
        };
        let mut daemon = Daemon::new("containerd", "rthd-", "containerd-shim")?;
        let path = format!(
            "{}:{}",
            bins.bin_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
        );
        let config = daemon.dir().join("config.toml");
        daemon.set_command(
            &bins.containerd,
            &["--config".as_ref(), config.as_os_str()],
            &[("PATH", &path)],
        );
        let mut c = Containerd {
            options: options.clone(),
            bins,
            daemon,
            pending_images: Vec::new(),
        };
        for d in [
            "root",
            "state",
            "runc",
            "cni/bin",
            "cni/conf",
            "nri-plugins",
            "nri-conf",
        ] {
            fs::create_dir_all(c.dir().join(d))?;
        }
        for p in &options.prelaunched {
            let file = format!("{}-{}", p.idx, p.name);
            std::os::unix::fs::symlink(&p.binary, c.dir().join("nri-plugins").join(&file))?;
            if let Some(conf) = &p.config {
                fs::write(c.dir().join("nri-conf").join(format!("{file}.conf")), conf)?;
            }
        }
        fs::write(c.config_path(), c.config_toml())?;
        for (tar, base) in [(pause, "localhost/pause"), (busybox, "localhost/busybox")] {
            if let Some(tar) = tar {
                c.pending_images.push((tar, base));
            }
        }
        Ok(c)
    }

    /// Starts a [`Containerd::prepare`]d containerd and imports the images.
    pub async fn launch(&mut self) -> Result<()> {
        self.daemon.start()?;
        self.wait_up().await?;
        for (tar, base) in std::mem::take(&mut self.pending_images) {
            self.import(&tar, base)?;
        }
        Ok(())
    }

    /// Everything lives here (a temporary directory).
    pub fn dir(&self) -> &Path {
        self.daemon.dir()
    }

    /// containerd's gRPC (CRI) socket.
    pub fn socket(&self) -> PathBuf {
        self.daemon.socket()
    }

    /// The NRI socket plugins connect to.
    pub fn nri_socket(&self) -> PathBuf {
        self.dir().join("nri.sock")
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("config.toml")
    }

    /// containerd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.daemon.log_path()
    }

    /// The directory pods log to.
    pub fn pod_log_root(&self) -> PathBuf {
        self.daemon.pod_log_root()
    }

    /// The config for this release (1.7 and 2.x name the CRI settings differently).
    pub fn config_toml(&self) -> String {
        let d = self.dir().display();
        let runc = runc();
        let runc = runc.display();
        let nri = format!(
            r#"
[plugins."io.containerd.nri.v1.nri"]
  disable = {disable}
  socket_path = "{d}/nri.sock"
  plugin_path = "{d}/nri-plugins"
  plugin_config_path = "{d}/nri-conf"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "{request_timeout}s"
"#,
            disable = !self.options.nri,
            // NRI fails open: a plugin that answers CreateContainer late is dropped and the
            // container is created without its adjustment (no hook). 2 s on a node; a TCG
            // guest is an order of magnitude slower, so the deadline stretches like ours.
            request_timeout = crate::timing::secs(2).as_secs()
        );
        let common = format!(
            r#"root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"
"#
        );
        match self.options.release {
            Release::V2_1 => format!(
                r#"version = 3
{common}
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  enable_cdi = false

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  Root = "{d}/runc"
  SystemdCgroup = {systemd}

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{d}/cni/bin"]
  conf_dir = "{d}/cni/conf"
{nri}"#,
                pause = images::PAUSE_IMAGE,
                systemd = self.options.systemd_cgroup
            ),
            Release::V1_7 => format!(
                r#"version = 2
{common}
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_cdi = false

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  Root = "{d}/runc"
  SystemdCgroup = {systemd}

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{d}/cni/bin"
  conf_dir = "{d}/cni/conf"
{nri}"#,
                pause = images::PAUSE_IMAGE,
                systemd = self.options.systemd_cgroup
            ),
        }
    }

    async fn wait_up(&mut self) -> Result<()> {
        // Stretched in VM guests: containerd 1.7 on 5.10 under TCG needs 20–30 s to start;
        // then up to 30 s more until it reports ready.
        let deadline = Instant::now() + crate::timing::secs(30) + Duration::from_secs(30);
        self.daemon.wait_ready(deadline).await
    }

    /// A CRI client for this containerd.
    pub async fn cri(&self) -> Result<Cri> {
        self.daemon.cri().await
    }

    /// `ctr -n k8s.io image import --base-name <base> <tar>` (tag from the layout: `1`).
    pub fn import(&self, tar: &Path, base_name: &str) -> Result<()> {
        let out = Command::new(&self.bins.ctr)
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "import", "--base-name", base_name])
            .arg(tar)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr import {} failed: {}",
                tar.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The last `n` lines of containerd's log.
    pub fn log_tail(&self, n: usize) -> String {
        self.daemon.log_tail(n)
    }

    /// Stops containerd (SIGTERM, then SIGKILL after 10 s). Containers keep running in
    /// their shims, as on a real node.
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Stops and starts containerd again with the same root, state and sockets.
    pub async fn restart(&mut self) -> Result<()> {
        self.daemon.restart()?;
        self.wait_up().await
    }
}
