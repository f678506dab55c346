//! ttrpc over the mux, both sides in-process: a fake runtime (serving `Runtime` on
//! connection 2, calling `Plugin` on connection 1) against the real [`Runner`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use protobuf::{EnumOrUnknown, MessageField};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use ttrpc::r#async::transport::{Listener, Socket};
use ttrpc::r#async::TtrpcContext;

use super::api::{self, nri_ttrpc, Event};
use super::mux::{Mux, MuxEnd, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use super::{EventMask, Plugin, PluginResult, Runner, RunnerConfig};

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl Plugin for Arc<Recorder> {
    fn events(&self) -> EventMask {
        EventMask::of(&[
            Event::CREATE_CONTAINER,
            Event::REMOVE_CONTAINER,
            Event::UPDATE_POD_SANDBOX,
        ])
    }

    async fn synchronize(
        &self,
        pods: Vec<api::PodSandbox>,
        containers: Vec<api::Container>,
    ) -> PluginResult<Vec<api::ContainerUpdate>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("sync {} {}", pods.len(), containers.len()));
        Ok(Vec::new())
    }

    async fn create_container(
        &self,
        pod: &api::PodSandbox,
        ctr: &api::Container,
    ) -> PluginResult<api::CreateContainerResponse> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("create {}/{}", pod.name, ctr.name));
        let mut adjust = api::ContainerAdjustment::new();
        adjust.annotations.insert("seen".into(), ctr.name.clone());
        let mut rsp = api::CreateContainerResponse::new();
        rsp.adjust = MessageField::some(adjust);
        Ok(rsp)
    }

    async fn remove_container(
        &self,
        _pod: &api::PodSandbox,
        ctr: &api::Container,
    ) -> PluginResult<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("remove {}", ctr.id));
        Ok(())
    }
}

struct FakeRuntime {
    registered: mpsc::UnboundedSender<(String, String)>,
}

#[async_trait]
impl nri_ttrpc::Runtime for FakeRuntime {
    async fn register_plugin(
        &self,
        _ctx: &TtrpcContext,
        req: api::RegisterPluginRequest,
    ) -> ttrpc::Result<api::Empty> {
        let _ = self.registered.send((req.plugin_name, req.plugin_idx));
        Ok(api::Empty::new())
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
}

fn container(id: &str, name: &str) -> api::Container {
    let mut c = api::Container::new();
    c.id = id.into();
    c.name = name.into();
    c
}

#[tokio::test]
async fn ttrpc_round_trip_over_the_mux() {
    let (plugin_side, runtime_side) = UnixStream::pair().unwrap();
    let recorder = Arc::new(Recorder::default());
    let runner = Runner::new(
        recorder.clone(),
        RunnerConfig::new("test", "42", "/nonexistent"),
    );
    let session = tokio::spawn(async move { runner.session(plugin_side).await });

    // The runtime's half: serve Runtime on conn 2, call Plugin on conn 1.
    let mut mux = Mux::new(runtime_side, &[PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN]);
    let (reg_tx, mut reg_rx) = mpsc::unbounded_channel();
    let runtime: Arc<dyn nri_ttrpc::Runtime + Send + Sync> =
        Arc::new(FakeRuntime { registered: reg_tx });
    let conn2 = mux.take(RUNTIME_SERVICE_CONN).unwrap();
    let mut server = ttrpc::r#async::Server::new()
        .register_service(nri_ttrpc::create_runtime(runtime))
        .add_listener(Listener::new(futures::stream::iter([Ok::<
            _,
            std::io::Error,
        >(conn2)])));
    server.start().await.unwrap();
    let plugin = nri_ttrpc::PluginClient::new(ttrpc::r#async::Client::new(Socket::new(
        mux.take(PLUGIN_SERVICE_CONN).unwrap(),
    )));

    let (name, idx) = tokio::time::timeout(Duration::from_secs(5), reg_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((name.as_str(), idx.as_str()), ("test", "42"));

    // An old runtime (no NRI_version): UPDATE_POD_SANDBOX is not offered.
    let mut cfg = api::ConfigureRequest::new();
    cfg.runtime_name = "fake".into();
    let rsp = plugin.configure(ctx(), &cfg).await.unwrap();
    assert_eq!(
        EventMask(rsp.events),
        EventMask::of(&[Event::CREATE_CONTAINER, Event::REMOVE_CONTAINER])
    );

    // A split Synchronize is joined before the plugin sees it.
    let mut part = api::SynchronizeRequest::new();
    part.containers.push(container("a", "one"));
    part.more = true;
    assert!(plugin.synchronize(ctx(), &part).await.unwrap().more);
    let mut last = api::SynchronizeRequest::new();
    last.containers.push(container("b", "two"));
    last.pods.push(api::PodSandbox::new());
    assert!(!plugin.synchronize(ctx(), &last).await.unwrap().more);

    // CreateContainer answers with the plugin's adjustment; a large request (several mux
    // frames) goes through too.
    let mut req = api::CreateContainerRequest::new();
    let mut pod = api::PodSandbox::new();
    pod.name = "pod".into();
    for i in 0..2000 {
        pod.labels.insert(format!("label-{i}"), "x".repeat(20));
    }
    req.pod = MessageField::some(pod);
    req.container = MessageField::some(container("c", "ctr"));
    let started = std::time::Instant::now();
    let rsp = plugin.create_container(ctx(), &req).await.unwrap();
    eprintln!(
        "CreateContainer round trip (~90 KB request): {:?}",
        started.elapsed()
    );
    assert_eq!(rsp.adjust.annotations["seen"], "ctr");

    // Older runtimes deliver RemoveContainer as a StateChange.
    let mut ev = api::StateChangeEvent::new();
    ev.event = EnumOrUnknown::new(Event::REMOVE_CONTAINER);
    ev.container = MessageField::some(container("c", "ctr"));
    plugin.state_change(ctx(), &ev).await.unwrap();
    // Newer ones call the method.
    let mut rm = api::RemoveContainerRequest::new();
    rm.container = MessageField::some(container("d", "ctr"));
    plugin.remove_container(ctx(), &rm).await.unwrap();

    assert_eq!(
        *recorder.calls.lock().unwrap(),
        ["sync 1 2", "create pod/ctr", "remove c", "remove d"]
    );

    // The runtime goes away: the session ends and says how.
    drop(plugin);
    drop(server);
    mux.close();
    drop(mux);
    let end = tokio::time::timeout(Duration::from_secs(5), session)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(end, MuxEnd::Eof | MuxEnd::Error(_)), "{end:?}");
}

#[tokio::test]
async fn runner_reconnects_after_the_runtime_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nri.sock");
    let mut cfg = RunnerConfig::new("rc", "10", &sock);
    cfg.backoff_initial = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(100);
    let runner = Runner::new(Arc::new(Recorder::default()), cfg);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run_until(async {
        let _ = stop_rx.await;
    }));

    // The socket appears late (runtime still starting): the runner keeps trying.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for round in 0..2 {
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let (stream, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut mux = Mux::new(stream, &[PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN]);
        let (reg_tx, mut reg_rx) = mpsc::unbounded_channel();
        let runtime: Arc<dyn nri_ttrpc::Runtime + Send + Sync> =
            Arc::new(FakeRuntime { registered: reg_tx });
        let conn2 = mux.take(RUNTIME_SERVICE_CONN).unwrap();
        let mut server = ttrpc::r#async::Server::new()
            .register_service(nri_ttrpc::create_runtime(runtime))
            .add_listener(Listener::new(futures::stream::iter([Ok::<
                _,
                std::io::Error,
            >(conn2)])));
        server.start().await.unwrap();
        let plugin = nri_ttrpc::PluginClient::new(ttrpc::r#async::Client::new(Socket::new(
            mux.take(PLUGIN_SERVICE_CONN).unwrap(),
        )));
        let reg = tokio::time::timeout(Duration::from_secs(5), reg_rx.recv()).await;
        assert!(matches!(reg, Ok(Some(_))), "round {round}: no registration");
        plugin
            .configure(ctx(), &api::ConfigureRequest::new())
            .await
            .unwrap();
        // "Restart" the runtime.
        drop(plugin);
        drop(server);
        drop(mux);
        drop(listener);
        std::fs::remove_file(&sock).unwrap();
    }
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Tests that edit the process environment take turns.
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// The pre-launched mode: the runtime passes a connected socket as an fd number in
/// NRI_PLUGIN_SOCKET with the name and index; the runner uses it once and returns when the
/// runtime closes it (the runtime relaunches plugins itself).
#[tokio::test]
async fn prelaunched_socket_from_the_environment() {
    use std::os::fd::IntoRawFd;
    let (plugin_side, runtime_side) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = plugin_side.into_raw_fd();
    let env_guard = ENV_LOCK.lock().unwrap();
    std::env::set_var(super::ENV_PLUGIN_SOCKET, fd.to_string());
    std::env::set_var(super::ENV_PLUGIN_NAME, "fromenv");
    std::env::set_var(super::ENV_PLUGIN_IDX, "07");
    let cfg = RunnerConfig::new("default", "99", "/nonexistent")
        .with_env()
        .unwrap();
    std::env::remove_var(super::ENV_PLUGIN_NAME);
    std::env::remove_var(super::ENV_PLUGIN_IDX);
    assert!(
        std::env::var(super::ENV_PLUGIN_SOCKET).is_err(),
        "fd taken once"
    );
    drop(env_guard);
    assert!(matches!(cfg.endpoint, super::Endpoint::PreConnected(_)));
    assert_eq!((cfg.name.as_str(), cfg.idx.as_str()), ("fromenv", "07"));
    let task = tokio::spawn(
        Runner::new(Arc::new(Recorder::default()), cfg).run_until(std::future::pending()),
    );

    runtime_side.set_nonblocking(true).unwrap();
    let mut mux = Mux::new(
        UnixStream::from_std(runtime_side).unwrap(),
        &[PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN],
    );
    let (reg_tx, mut reg_rx) = mpsc::unbounded_channel();
    let runtime: Arc<dyn nri_ttrpc::Runtime + Send + Sync> =
        Arc::new(FakeRuntime { registered: reg_tx });
    let conn2 = mux.take(RUNTIME_SERVICE_CONN).unwrap();
    let mut server = ttrpc::r#async::Server::new()
        .register_service(nri_ttrpc::create_runtime(runtime))
        .add_listener(Listener::new(futures::stream::iter([Ok::<
            _,
            std::io::Error,
        >(conn2)])));
    server.start().await.unwrap();
    let plugin = nri_ttrpc::PluginClient::new(ttrpc::r#async::Client::new(Socket::new(
        mux.take(PLUGIN_SERVICE_CONN).unwrap(),
    )));
    let reg = tokio::time::timeout(Duration::from_secs(5), reg_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reg, ("fromenv".to_string(), "07".to_string()));
    plugin
        .configure(ctx(), &api::ConfigureRequest::new())
        .await
        .unwrap();
    drop(plugin);
    drop(server);
    drop(mux);
    // No reconnect in this mode: the runner returns.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("runner returns when the pre-connected socket closes")
        .unwrap()
        .unwrap();
}

#[test]
fn a_bad_prelaunched_fd_is_an_error() {
    let _env = ENV_LOCK.lock().unwrap();
    std::env::set_var(super::ENV_PLUGIN_SOCKET, "not-a-number");
    let r = RunnerConfig::new("a", "10", "/x").with_env();
    std::env::remove_var(super::ENV_PLUGIN_SOCKET);
    assert!(matches!(
        r,
        Err(super::NriError::PrelaunchedSocketNotANumber { .. })
    ));
    // A number, but no such descriptor: the cause is the kernel's answer.
    std::env::set_var(super::ENV_PLUGIN_SOCKET, "987654");
    let r = RunnerConfig::new("a", "10", "/x").with_env();
    std::env::remove_var(super::ENV_PLUGIN_SOCKET);
    assert!(matches!(
        r,
        Err(super::NriError::PrelaunchedSocketNotOpen {
            fd: 987654,
            source: nix::Error::EBADF
        })
    ));
}
