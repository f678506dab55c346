//! The real plugin binary against a real containerd (Debian's 2.1.9 and 1.7.24), driven
//! through CRI as kubelet would, with a fake agent recording what the plugin reports:
//!
//! * a container created before the plugin runs is reported by Synchronize as not covered;
//! * the plugin registers; a new container's spec holds our createRuntime hook and the pod
//!   labels annotation (replacing a spoofed value); the hook runs when it starts;
//! * containerd restarts → the plugin re-registers and the next container is covered too;
//! * RemoveContainer reaches the agent.
//!
//! Needs root (containers); skipped with a message otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rthooks_api::v1;
use rthooks_api::v1::agent_server::{Agent, AgentServer};
use rthooks_e2e::containerd::{is_root, Containerd, Options, PrelaunchedPlugin, Release};
use rthooks_e2e::cri::{ContainerSpec, Cri, Pod, PodSpec};
use rthooks_e2e::images::BUSYBOX_IMAGE;
use tonic::{Request, Response, Status};

const LABELS: &str = "rthooks.io/pod-labels";

#[derive(Debug, Clone)]
enum Call {
    Report(Box<v1::ReportContainerRequest>),
    Remove(String),
}

#[derive(Clone, Default)]
struct FakeAgent {
    calls: Arc<Mutex<Vec<Call>>>,
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn list_containers(
        &self,
        _: Request<v1::ListContainersRequest>,
    ) -> Result<Response<v1::ListContainersResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn report_container(
        &self,
        r: Request<v1::ReportContainerRequest>,
    ) -> Result<Response<v1::ReportContainerResponse>, Status> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Report(Box::new(r.into_inner())));
        Ok(Response::new(Default::default()))
    }
    async fn remove_container(
        &self,
        r: Request<v1::RemoveContainerRequest>,
    ) -> Result<Response<v1::RemoveContainerResponse>, Status> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Remove(r.into_inner().container_id));
        Ok(Response::new(v1::RemoveContainerResponse { removed: true }))
    }
    async fn list_policies(
        &self,
        _: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
    async fn add_policy(
        &self,
        _: Request<v1::AddPolicyRequest>,
    ) -> Result<Response<v1::AddPolicyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_policy(
        &self,
        _: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn check_policy(
        &self,
        _: Request<v1::CheckPolicyRequest>,
    ) -> Result<Response<v1::CheckPolicyResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type GetEventsStream = tokio_stream::Empty<Result<v1::Event, Status>>;
    async fn get_events(
        &self,
        _: Request<v1::GetEventsRequest>,
    ) -> Result<Response<Self::GetEventsStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }
}

impl FakeAgent {
    fn serve(&self, socket: &Path) {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let svc = AgentServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .unwrap();
        });
    }

    fn reports_for(&self, id: &str) -> Vec<v1::ReportContainerRequest> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter_map(|c| match c {
                Call::Report(r) if r.container.as_ref().is_some_and(|c| c.container_id == id) => {
                    Some((**r).clone())
                }
                _ => None,
            })
            .collect()
    }

    fn removed(&self, id: &str) -> bool {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| matches!(c, Call::Remove(r) if r == id))
    }
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct PluginProcess {
    child: Child,
    log: PathBuf,
}

impl PluginProcess {
    fn start(dir: &Path, nri_socket: &Path, hook: &Path, agent: &Path) -> Self {
        let log = dir.join("plugin.log");
        let child = Command::new(env!("CARGO_BIN_EXE_rthooks-nri-hook"))
            .arg("--socket")
            .arg(nri_socket)
            .arg("--hook-path")
            .arg(hook)
            .arg("--hook-args")
            .arg("rthooks-oci-hook,createRuntime")
            .arg("--agent-address")
            .arg(format!("unix://{}", agent.display()))
            .arg("--log")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        PluginProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn registrations(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("registered") && l.contains("runtime="))
            .count()
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        // SIGTERM (a clean stop) to our own child, by pid: not reaped yet, so it is ours.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn write_hook(dir: &Path) -> (PathBuf, PathBuf) {
    let record = dir.join("hook-runs.log");
    let hook = dir.join("hook.sh");
    // Records argv and the state JSON runc passes on stdin; exits 0 so the container
    // starts.
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nstate=$(cat)\nprintf '%s\\t%s\\n' \"$*\" \"$state\" >> {}\n",
            record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (hook, record)
}

fn sleeper(name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["/bin/sleep".into(), "600".into()],
        annotations: HashMap::new(),
        ..Default::default()
    }
}

async fn create_timed(cri: &mut Cri, pod: &Pod, spec: &ContainerSpec) -> (String, Duration) {
    let t = Instant::now();
    let id = cri
        .create_container(pod, spec)
        .await
        .expect("CreateContainer");
    (id, t.elapsed())
}

fn assert_covered(spec: &serde_json::Value, hook: &Path, labels_json: &str) {
    let hooks = spec["hooks"]["createRuntime"]
        .as_array()
        .expect("createRuntime hooks");
    let ours: Vec<_> = hooks
        .iter()
        .filter(|h| h["path"] == hook.display().to_string())
        .collect();
    assert_eq!(ours.len(), 1, "our hook once in {hooks:?}");
    assert_eq!(
        ours[0]["args"],
        serde_json::json!(["rthooks-oci-hook", "createRuntime"])
    );
    assert_eq!(ours[0]["timeout"], 5);
    assert_eq!(
        spec["annotations"][LABELS], labels_json,
        "labels annotation"
    );
}

async fn plugin_against(release: Release) {
    if !is_root() {
        eprintln!("skipping: the containerd NRI test needs root");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("rthn-")
        .tempdir_in("/tmp")
        .unwrap();
    let (hook, record) = write_hook(dir.path());
    let agent = FakeAgent::default();
    let agent_sock = dir.path().join("agent.sock");

    let mut ctrd = Containerd::start(release).await.expect("containerd");
    let mut cri = ctrd.cri().await.unwrap();

    // Before the plugin: a container nobody injected a hook into.
    let early_pod = cri
        .run_pod(&PodSpec::new("early", "default").label("app", "early"))
        .await
        .unwrap();
    let (early, t_plain) = create_timed(&mut cri, &early_pod, &sleeper("early")).await;
    cri.start_container(&early).await.unwrap();

    let plugin = PluginProcess::start(dir.path(), &ctrd.nri_socket(), &hook, &agent_sock);
    eventually("plugin registration", Duration::from_secs(20), || {
        plugin.registrations() >= 1
    })
    .await;
    // The agent comes up after the plugin (as at node boot): Synchronize's reports wait
    // in the plugin's queue until it answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(agent.calls.lock().unwrap().is_empty());
    agent.serve(&agent_sock);

    // Synchronize reported the early container as not covered, with its identity.
    eventually(
        "sync report of the early container",
        Duration::from_secs(10),
        || !agent.reports_for(&early).is_empty(),
    )
    .await;
    let r = &agent.reports_for(&early)[0];
    assert_eq!(r.source, "nri-sync");
    assert!(
        !r.hook_ran,
        "early container must be reported as not covered"
    );
    let c = r.container.as_ref().unwrap();
    assert_eq!(c.pod_name, "early");
    assert_eq!(c.pod_namespace, "default");
    assert_eq!(c.pod_uid, early_pod.spec.uid);
    assert_eq!(c.container_name, "early");
    assert_eq!(
        c.cgroups_path,
        format!("{}/{early}", early_pod.spec.cgroup_parent())
    );
    assert_eq!(c.annotations[LABELS], r#"{"app":"early"}"#);

    // A pod with labels; the container tries to bring its own labels annotation.
    let web = cri
        .run_pod(
            &PodSpec::new("web", "prod")
                .label("app", "web")
                .label("tier", "frontend"),
        )
        .await
        .unwrap();
    let want_labels = r#"{"app":"web","tier":"frontend"}"#;
    let mut spoof = sleeper("nginx");
    spoof
        .annotations
        .insert(LABELS.into(), r#"{"app":"evil"}"#.into());
    let (c1, t_plugin) = create_timed(&mut cri, &web, &spoof).await;
    assert_covered(&cri.container_spec(&c1).await.unwrap(), &hook, want_labels);
    cri.start_container(&c1).await.unwrap();
    let runs = std::fs::read_to_string(&record).unwrap_or_default();
    let run = runs
        .lines()
        .find(|l| l.contains(&c1))
        .expect("hook ran for the new container");
    assert!(
        run.starts_with("createRuntime\t"),
        "argv after argv[0]: {run}"
    );
    assert!(
        run.contains(r#"rthooks.io/pod-labels":"{\"app\":\"web\",\"tier\":\"frontend\"}"#),
        "labels reach the hook: {run}"
    );
    assert!(!runs.contains(&early), "no hook for the early container");

    // containerd restarts: the plugin reconnects and registers again.
    let t = Instant::now();
    ctrd.restart().await.expect("containerd restart");
    let mut cri = ctrd.cri().await.unwrap();
    eventually("plugin re-registration", Duration::from_secs(30), || {
        plugin.registrations() >= 2
    })
    .await;
    let t_rereg = t.elapsed();
    // The new Synchronize knows c1 carries our hook.
    eventually("second sync report of c1", Duration::from_secs(10), || {
        !agent.reports_for(&c1).is_empty()
    })
    .await;
    assert!(
        agent.reports_for(&c1).iter().all(|r| r.hook_ran),
        "c1 has our hook"
    );

    let (c2, t_plugin2) = create_timed(&mut cri, &web, &sleeper("sidecar")).await;
    assert_covered(&cri.container_spec(&c2).await.unwrap(), &hook, want_labels);
    cri.start_container(&c2).await.unwrap();
    assert!(
        std::fs::read_to_string(&record).unwrap().contains(&c2),
        "hook ran after restart"
    );

    // RemoveContainer reaches the agent.
    cri.stop_container(&c2, 0).await.unwrap();
    cri.remove_container(&c2).await.unwrap();
    eventually(
        "RemoveContainer at the agent",
        Duration::from_secs(10),
        || agent.removed(&c2),
    )
    .await;

    cri.remove_pod(&web).await.unwrap();
    cri.remove_pod(&early_pod).await.unwrap();
    eprintln!(
        "{release:?}: CreateContainer without plugin {t_plain:?}, with plugin {t_plugin:?} / {t_plugin2:?}; \
         restart→re-registered {t_rereg:?}; whole test {:?}",
        started.elapsed()
    );
    let log = plugin.log();
    drop(plugin);
    assert!(!log.contains("ERROR"), "plugin logged errors:\n{log}");
    assert!(
        log.contains("agent unreachable"),
        "the late agent was noticed:\n{log}"
    );
    // The plugin's own time to answer CreateContainer (its debug log).
    let answers: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("CreateContainer answered"))
        .filter_map(|l| {
            l.split("elapsed_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(
        answers.len(),
        2,
        "two containers created while the plugin ran:\n{log}"
    );
    eprintln!("{release:?}: plugin answered CreateContainer in {answers:?} µs");
    assert!(
        answers.iter().all(|us| *us < 100_000),
        "well inside containerd's 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nri_plugin_with_containerd_2_1() {
    plugin_against(Release::V2_1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nri_plugin_with_containerd_1_7() {
    plugin_against(Release::V1_7).await;
}

/// Processes running the plugin as containerd launched it from `plugin_dir`.
fn prelaunched_pids(plugin_dir: &Path) -> Vec<i32> {
    let needle = plugin_dir.join("10-rthooks").display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let argv0 = cmd.split(|b| *b == 0).next()?;
            (argv0 == needle.as_bytes()).then_some(pid)
        })
        .collect()
}

/// containerd launches the plugin itself (NRI_PLUGIN_SOCKET/NAME/IDX, empty environment);
/// the plugin takes its settings from the runtime's plugin configuration file.
async fn prelaunched_by(release: Release) {
    if !is_root() {
        eprintln!("skipping: the containerd NRI test needs root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("rthp-")
        .tempdir_in("/tmp")
        .unwrap();
    let (hook, record) = write_hook(dir.path());
    let config = serde_json::json!({
        "hook_path": hook.display().to_string(),
        "hook_args": ["rthooks-oci-hook", "createRuntime"],
        "agent_address": "none",
    });
    let mut opts = Options::new(release);
    opts.prelaunched.push(PrelaunchedPlugin {
        idx: "10".into(),
        name: "rthooks".into(),
        binary: env!("CARGO_BIN_EXE_rthooks-nri-hook").into(),
        config: Some(config.to_string()),
    });
    let mut ctrd = Containerd::start_with(opts).await.expect("containerd");
    let plugin_dir = ctrd.dir().join("nri-plugins");
    eventually(
        "pre-launched plugin running",
        Duration::from_secs(10),
        || prelaunched_pids(&plugin_dir).len() == 1,
    )
    .await;
    let mut cri = ctrd.cri().await.unwrap();
    let pod = cri
        .run_pod(&PodSpec::new("pre", "default").label("app", "pre"))
        .await
        .unwrap();
    let want = r#"{"app":"pre"}"#;
    let c1 = cri.create_container(&pod, &sleeper("one")).await.unwrap();
    assert_covered(&cri.container_spec(&c1).await.unwrap(), &hook, want);
    cri.start_container(&c1).await.unwrap();
    assert!(std::fs::read_to_string(&record).unwrap().contains(&c1));

    // A restart relaunches the plugin; the old instance exits with its connection.
    let before = prelaunched_pids(&plugin_dir);
    ctrd.restart().await.unwrap();
    eventually(
        "plugin relaunched, old one gone",
        Duration::from_secs(10),
        || {
            let now = prelaunched_pids(&plugin_dir);
            now.len() == 1 && now != before
        },
    )
    .await;
    let mut cri = ctrd.cri().await.unwrap();
    let c2 = cri.create_container(&pod, &sleeper("two")).await.unwrap();
    assert_covered(&cri.container_spec(&c2).await.unwrap(), &hook, want);
    cri.remove_pod(&pod).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelaunched_by_containerd_2_1() {
    prelaunched_by(Release::V2_1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelaunched_by_containerd_1_7() {
    prelaunched_by(Release::V1_7).await;
}
