//! The whole rthooks node stack on a private containerd, CRI-O, or an OCI runtime without
//! CRI (runc/crun bundles, podman): `rthooks-agent` (own pin directory, policy directory
//! and events file), and the real `rthooks-oci-hook` put into containers by
//! `rthooks-nri-hook` registered with the runtime's NRI, by containerd's base spec, by
//! hooks.d (CRI-O, podman), or by the bundle's `config.json`. Binaries come from a build directory
//! (`target/debug`, or `RTHOOKS_BIN_DIR` in the VM guests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::containerd::{Containerd, Options, Release};
use crate::cri::Cri;
use crate::crio::Crio;
use crate::kube::AgentApi;
use crate::oci::{Engine, HookCommand, OciNode};
use crate::timing::wait_until;
use rthooks_testkit::{Agent, AgentSpec};

/// How the hook gets into containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPath {
    /// `rthooks-nri-hook` injects it (NRI on).
    Nri,
    /// containerd's `base_runtime_spec` carries it, as `rthooks-setup install
    /// containerd-base-spec` sets up; NRI off, no plugin.
    BaseSpec,
    /// CRI-O or podman reads it from hooks.d, as `rthooks-setup install hooks-d` writes
    /// it; NRI off, no plugin.
    HooksD,
    /// The bundle's `config.json` names it (runc, crun run by whatever wrote the bundle).
    Bundle,
}

impl HookPath {
    /// Whether the hook's request carries the pod's labels (only our NRI plugin adds them).
    pub fn carries_labels(self) -> bool {
        self == HookPath::Nri
    }
}

/// The CRI runtime a stack runs on.
pub enum Runtime {
    /// containerd.
    Containerd(Containerd),
    /// CRI-O.
    Crio(Crio),
    /// An OCI runtime without CRI.
    Oci(OciNode),
}

/// How to prepare the runtime of a stack.
#[derive(Clone, Debug)]
pub enum RuntimeOptions {
    /// containerd.
    Containerd(Options),
    /// CRI-O with these binaries.
    Crio(crate::crio::Binaries, crate::crio::Options),
    /// runc/crun bundles or podman, without CRI (no NRI).
    Oci(Engine),
}

impl Runtime {
    async fn prepare(options: RuntimeOptions, nri: bool) -> Result<Self> {
        Ok(match options {
            RuntimeOptions::Containerd(mut o) => {
                o.nri = nri;
                Runtime::Containerd(Containerd::prepare(o).await?)
            }
            RuntimeOptions::Crio(bins, mut o) => {
                o.nri = nri;
                Runtime::Crio(Crio::prepare(bins, o).await?)
            }
            RuntimeOptions::Oci(engine) => Runtime::Oci(OciNode::prepare(engine).await?),
        })
    }

    async fn launch(&mut self) -> Result<()> {
        match self {
            Runtime::Containerd(c) => c.launch().await,
            Runtime::Crio(c) => c.launch().await,
            // Each container is its own runtime process.
            Runtime::Oci(_) => Ok(()),
        }
    }

    /// A CRI client.
    pub async fn cri(&self) -> Result<Cri> {
        match self {
            Runtime::Containerd(c) => c.cri().await,
            Runtime::Crio(c) => c.cri().await,
            Runtime::Oci(n) => bail!("{} has no CRI", n.engine.name()),
        }
    }

    /// Stops and starts the runtime again with the same state (containers keep running).
    pub async fn restart(&mut self) -> Result<()> {
        match self {
            Runtime::Containerd(c) => c.restart().await,
            Runtime::Crio(c) => c.restart().await,
            Runtime::Oci(n) => bail!("{} has no daemon to restart", n.engine.name()),
        }
    }

    /// The runtime's log file.
    pub fn log_path(&self) -> PathBuf {
        match self {
            Runtime::Containerd(c) => c.log_path(),
            Runtime::Crio(c) => c.log_path(),
            Runtime::Oci(n) => n.log_path(),
        }
    }

    /// The NRI socket plugins connect to (none listens without CRI).
    pub fn nri_socket(&self) -> PathBuf {
        match self {
            Runtime::Containerd(c) => c.nri_socket(),
            Runtime::Crio(c) => c.nri_socket(),
            Runtime::Oci(n) => n.dir.path().join("no-nri.sock"),
        }
    }

    /// The last component of a container's cgroup path with the cgroupfs driver: the id
    /// (containerd), `crio-<id>` (CRI-O).
    pub fn cgroup_leaf(&self, id: &str) -> String {
        match self {
            Runtime::Containerd(_) | Runtime::Oci(_) => id.to_string(),
            Runtime::Crio(_) => format!("crio-{id}"),
        }
    }

    /// `containerd`, `crio`, `runc`, `crun` or `podman` (log file names).
    pub fn name(&self) -> &'static str {
        match self {
            Runtime::Containerd(_) => "containerd",
            Runtime::Crio(_) => "crio",
            Runtime::Oci(n) => n.engine.name(),
        }
    }

    /// The hooks.d directory the runtime reads (CRI-O, podman).
    fn hooks_dir(&self) -> Result<PathBuf> {
        match self {
            Runtime::Crio(c) => Ok(c.hooks_dir()),
            Runtime::Oci(n) if n.engine == Engine::Podman => Ok(n.hooks_dir()),
            _ => bail!("{} reads no hooks.d", self.name()),
        }
    }
}

/// Paths of the rthooks binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `rthooks-agent`.
    pub agent: PathBuf,
    /// `rthooksctl`.
    pub ctl: PathBuf,
    /// `rthooks-oci-hook`.
    pub hook: PathBuf,
    /// `rthooks-setup` (the installers).
    pub setup: PathBuf,
    /// `rthooks-nri-hook`.
    pub nri: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`; an error names the first one missing.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let b = Binaries {
            agent: dir.join("rthooks-agent"),
            ctl: dir.join("rthooksctl"),
            hook: dir.join("rthooks-oci-hook"),
            setup: dir.join("rthooks-setup"),
            nri: dir.join("rthooks-nri-hook"),
        };
        for p in [&b.agent, &b.ctl, &b.hook, &b.setup, &b.nri] {
            if !p.is_file() {
                bail!("{} is not built", p.display());
            }
        }
        Ok(b)
    }
}

/// A child process stopped with SIGTERM (then SIGKILL) on drop.
pub struct Proc {
    child: Child,
    /// Its stderr log.
    pub log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log.with_extension("out"))?)
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Proc { child, log })
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Stops it (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&mut self) {
        crate::daemon::terminate(&mut self.child);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running stack. Dropping it stops the plugin and the agent, removes the agent's
/// pins, then tears the runtime down.
pub struct Stack {
    /// Binaries used.
    pub bins: Binaries,
    /// The agent's address (`unix:///...`).
    pub address: String,
    /// Scratch directory (policies, logs, events, agent state).
    pub dir: tempfile::TempDir,
    /// The agent, when running (the test kit's launcher, as in the agent's own tests).
    pub agent: Option<Agent>,
    /// The NRI plugin, when running.
    pub plugin: Option<Proc>,
    pin_dir: PathBuf,
    /// How the hook gets into containers.
    pub hook_path: HookPath,
    /// Whether the hook is in place (the plugin registered, or the hooks.d file
    /// installed and read by the runtime).
    hooks_on: bool,
    /// The Kubernetes API the agent takes pod labels from (instead of trusting the
    /// labels annotation), when it has one.
    pub kube: Option<AgentApi>,
    /// The runtime (dropped last).
    pub runtime: Runtime,
}

impl Stack {
    /// Starts containerd `release`, writes `policies` (file name, YAML), then the agent and
    /// the NRI plugin; returns once the plugin has registered.
    pub async fn start(
        release: Release,
        bins: Binaries,
        policies: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_with(
            RuntimeOptions::Containerd(Options::new(release)),
            HookPath::Nri,
            bins,
            policies,
        )
        .await
    }

    /// Like [`Stack::start`], with the runtime `options` and the hook put in by `path`.
    pub async fn start_with(
        options: RuntimeOptions,
        path: HookPath,
        bins: Binaries,
        policies: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_with_api(options, path, bins, policies, None).await
    }

    /// Like [`Stack::start_with`], the agent using the Kubernetes API `kube` when given.
    pub async fn start_with_api(
        options: RuntimeOptions,
        path: HookPath,
        bins: Binaries,
        policies: &[(&str, &str)],
        kube: Option<AgentApi>,
    ) -> Result<Self> {
        let runtime = Runtime::prepare(options, path == HookPath::Nri).await?;
        let base =
            std::env::var_os("RTHOOKS_TMP").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let dir = tempfile::Builder::new().prefix("rths-").tempdir_in(base)?;
        std::fs::create_dir_all(dir.path().join("policies"))?;
        for (name, yaml) in policies {
            std::fs::write(dir.path().join("policies").join(name), yaml)?;
        }
        let address = format!("unix://{}", dir.path().join("agent.sock").display());
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/rthooks-e2e-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        ));
        let mut stack = Stack {
            bins,
            address,
            dir,
            agent: None,
            plugin: None,
            pin_dir,
            hook_path: path,
            hooks_on: false,
            kube,
            runtime,
        };
        match path {
            HookPath::BaseSpec => stack.install_base_spec()?,
            HookPath::HooksD => stack.install_hooks_d()?,
            HookPath::Bundle => {
                let hook = HookCommand {
                    path: stack.bins.hook.clone(),
                    args: stack.hook_flags().to_vec(),
                    timeout: crate::timing::secs(5).as_secs(),
                };
                let Runtime::Oci(node) = &mut stack.runtime else {
                    bail!("a hook in the bundle needs runc or crun without CRI");
                };
                node.hook = Some(hook);
            }
            HookPath::Nri => {}
        }
        stack.runtime.launch().await?;
        stack.start_agent().await?;
        if path == HookPath::Nri {
            stack.start_plugin().await?;
        }
        stack.hooks_on = true;
        Ok(stack)
    }

    /// Takes the hook away from new containers: the NRI plugin stops, or the hooks.d file
    /// is uninstalled and CRI-O restarted to forget it (its file watch is asynchronous).
    /// `cri` is reconnected when the runtime restarts.
    pub async fn disable_hooks(&mut self, cri: &mut Cri) -> Result<()> {
        match self.hook_path {
            HookPath::Nri => self.stop_plugin(),
            HookPath::HooksD => {
                self.setup_hooks_d("uninstall")?;
                self.runtime.restart().await?;
                *cri = self.runtime.cri().await?;
            }
            HookPath::BaseSpec | HookPath::Bundle => {
                bail!("the base spec or a bundle's hook cannot be taken away")
            }
        }
        self.hooks_on = false;
        Ok(())
    }

    /// Puts the hook back for new containers after [`Stack::disable_hooks`] (or after a
    /// scenario stopped the plugin); nothing when it is in place.
    pub async fn enable_hooks(&mut self, cri: &mut Cri) -> Result<()> {
        match self.hook_path {
            HookPath::Nri if self.plugin.is_none() => self.start_plugin().await?,
            HookPath::HooksD if !self.hooks_on => {
                self.install_hooks_d()?;
                self.runtime.restart().await?;
                *cri = self.runtime.cri().await?;
            }
            _ => {}
        }
        self.hooks_on = true;
        Ok(())
    }

    /// The hook's arguments after the stage: our agent, a log in the scratch dir, and the
    /// default 2 s deadline stretched like every wait here: a TCG guest is an order of
    /// magnitude slower than a node, and a late answer fails the container closed.
    fn hook_flags(&self) -> [String; 3] {
        [
            format!("--grpc-address={}", self.address),
            format!("--log-fname={}", self.dir.path().join("hook.log").display()),
            format!("--grpc-timeout={}s", crate::timing::secs(2).as_secs()),
        ]
    }

    /// The base spec that `install_base_spec` wrote.
    pub fn base_spec_path(&self) -> PathBuf {
        self.dir.path().join("base-spec.json")
    }

    /// Runs the real installer (`rthooks-setup install containerd-base-spec`) against
    /// the prepared, not yet running containerd's config: the spec comes from that
    /// release's `ctr oci spec`, the hook is copied into the scratch dir.
    fn install_base_spec(&self) -> Result<()> {
        let Runtime::Containerd(containerd) = &self.runtime else {
            bail!("containerd's base spec needs containerd");
        };
        let d = self.dir.path();
        let mut cmd = Command::new(&self.bins.setup);
        cmd.args(["install", "containerd-base-spec", "--install-dir"])
            .arg(d.join("opt"))
            .arg("--binary")
            .arg(&self.bins.hook)
            .arg("--state-dir")
            .arg(d.join("install-state"))
            .arg("--containerd-config")
            .arg(containerd.config_path())
            .arg("--base-spec")
            .arg(self.base_spec_path())
            .arg("--ctr")
            .arg(&containerd.bins.ctr)
            .arg("--hook-timeout")
            .arg(crate::timing::secs(5).as_secs().to_string());
        for f in self.hook_flags() {
            cmd.arg(format!("--hook-arg={f}"));
        }
        crate::command::run(&mut cmd).context("install containerd-base-spec")
    }

    fn install_hooks_d(&self) -> Result<()> {
        self.setup_hooks_d("install")
    }

    /// The real installer, `rthooks-setup install|uninstall hooks-d`, on the runtime's
    /// hooks directory (CRI-O's, podman's); the hook is copied into the scratch dir.
    fn setup_hooks_d(&self, action: &str) -> Result<()> {
        let hooks_dir = self.runtime.hooks_dir()?;
        let d = self.dir.path();
        let mut cmd = Command::new(&self.bins.setup);
        cmd.args([action, "hooks-d", "--hooks-dir"])
            .arg(hooks_dir)
            .arg("--install-dir")
            .arg(d.join("opt"))
            .arg("--state-dir")
            .arg(d.join("install-state"));
        if action == "install" {
            cmd.arg("--binary")
                .arg(&self.bins.hook)
                .arg("--hook-timeout")
                .arg(crate::timing::secs(5).as_secs().to_string());
            for f in self.hook_flags() {
                cmd.arg(format!("--hook-arg={f}"));
            }
        }
        crate::command::run(&mut cmd).with_context(|| format!("rthooks-setup {action} hooks-d"))
    }

    /// The events file the agent writes (JSON lines).
    pub fn events_file(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    /// Starts the agent and waits for its socket.
    pub async fn start_agent(&mut self) -> Result<()> {
        let d = self.dir.path();
        let sock = d.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let api_flags: Vec<String> = self
            .kube
            .as_ref()
            .map(|api| api.agent_flags())
            .unwrap_or_else(|| vec!["--trust-label-annotation".into()]);
        let agent = start_agent(agent_spec(&self.bins, &self.pin_dir, d).args(api_flags)).await?;
        debug_assert_eq!(agent.address(), self.address);
        let agent = self.agent.insert(agent);
        if let Some(api) = &self.kube {
            // Until its pod store has listed, registrations without trusted labels fail.
            if let Err(e) = api.wait_ready().await {
                bail!("{e:#}:\n{}", agent.log());
            }
        }
        Ok(())
    }

    /// Stops the agent (SIGTERM; its pins stay: enforcement goes on without it).
    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.terminate(Duration::from_secs(10));
        }
    }

    /// Starts the NRI plugin and waits for its registration.
    pub async fn start_plugin(&mut self) -> Result<()> {
        let d = self.dir.path();
        let [addr, log, deadline] = self.hook_flags();
        let hook_args = format!("rthooks-oci-hook,createRuntime,{addr},{log},{deadline}");
        let proc = Proc::spawn(
            Command::new(&self.bins.nri)
                .arg("--socket")
                .arg(self.runtime.nri_socket())
                .arg("--hook-path")
                .arg(&self.bins.hook)
                .arg("--hook-args")
                .arg(hook_args)
                .arg("--hook-timeout")
                .arg(crate::timing::secs(5).as_secs().to_string())
                .arg("--agent-address")
                .arg(&self.address),
            d.join("nri-hook.log"),
        )?;
        self.plugin = Some(proc);
        if !wait_until(Duration::from_secs(30), || self.registrations() >= 1).await {
            bail!(
                "the NRI plugin did not register:\n{}",
                self.plugin.as_ref().unwrap().log_text()
            );
        }
        Ok(())
    }

    /// How often the running plugin has registered with containerd (once per connection).
    pub fn registrations(&self) -> usize {
        self.plugin.as_ref().map_or(0, |p| {
            p.log_text()
                .lines()
                .filter(|l| l.contains("registered") && l.contains("runtime="))
                .count()
        })
    }

    /// Stops the NRI plugin.
    pub fn stop_plugin(&mut self) {
        self.plugin.take();
    }

    /// `rthooksctl -o json containers` (empty when the agent does not answer).
    pub fn containers(&self) -> Vec<serde_json::Value> {
        self.ctl_json(&["containers"])
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The agent's entry for container `id`.
    pub fn container(&self, id: &str) -> Option<serde_json::Value> {
        self.containers()
            .into_iter()
            .find(|c| c["container_id"] == id)
    }

    /// `rthooksctl -o json status`.
    pub fn status(&self) -> Option<serde_json::Value> {
        self.ctl_json(&["status"])
    }

    /// `rthooksctl -o json debug maps`: what the agent's pinned maps hold, read from the
    /// kernel (also while the agent is down).
    pub fn debug_maps(&self) -> Result<serde_json::Value> {
        let out = Command::new(&self.bins.ctl)
            .args(["-o", "json", "debug", "maps", "--bpf-pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .context("rthooksctl debug maps")?;
        if !out.status.success() {
            bail!(
                "rthooksctl debug maps: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn ctl_json(&self, cmd: &[&str]) -> Option<serde_json::Value> {
        let out = Command::new(&self.bins.ctl)
            .args(["--address", &self.address, "-o", "json"])
            .args(cmd)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Tells the agent about a container through its `rthooks.v1` API (`ReportContainer`,
    /// `hook_ran = false`), as an integration that learns identities from the Kubernetes
    /// API after the start would.
    pub async fn report_container(
        &self,
        container: rthooks_api::tetragon::CreateContainer,
        source: &str,
    ) -> Result<()> {
        let channel =
            rthooks_api::client::connect_unix(&self.address, Duration::from_secs(5)).await?;
        rthooks_api::v1::agent_client::AgentClient::new(channel)
            .report_container(rthooks_api::v1::ReportContainerRequest {
                container: Some(container),
                source: source.into(),
                hook_ran: false,
            })
            .await
            .context("ReportContainer")?;
        Ok(())
    }

    /// The hook's log (what it did per container, and why it failed).
    pub fn hook_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hook.log")).unwrap_or_default()
    }

    /// Enforcement events so far that mention `needle` (e.g. a container id).
    pub fn events_about(&self, needle: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.events_file())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// `rthooks-agent` with everything of its own in `dir` (socket `agent.sock`, policies
/// `policies/`, written before: it loads them before it answers; state, events as JSON
/// lines in `events.jsonl`, log `agent.log`) and its pins in `pin_dir`, which outlive it
/// (enforcement goes on without the agent; whoever pins unpins). Starting again with the
/// same `dir` is a restart (same state, pins and policies).
pub fn agent_spec(bins: &Binaries, pin_dir: &Path, dir: &Path) -> AgentSpec {
    AgentSpec::new(&bins.agent)
        .dir(dir)
        .pin_dir(pin_dir)
        .keep_pins()
}

/// Starts the agent `spec` says and waits for its socket, off the async threads (the
/// launcher polls; under TCG the agent takes seconds to load its programs).
pub async fn start_agent(spec: AgentSpec) -> Result<Agent> {
    Ok(tokio::task::spawn_blocking(move || spec.start()).await??)
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.plugin.take();
        self.stop_agent();
        // Detach the programs: nothing of the test may keep enforcing.
        let _ = Command::new(&self.bins.agent)
            .arg("--unpin")
            .arg("--bpf-pin-dir")
            .arg(&self.pin_dir)
            .output();
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}
