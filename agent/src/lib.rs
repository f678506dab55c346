//! rthooks-agent: the node agent library. The binary (`src/bin/rthooks-agent.rs`) only
//! parses its configuration and calls [`run`].
//!
//! Modules by concept: [`cgroup`] (cgroupsPath → cgroup id), [`identity`] (who a
//! container is), [`policy`] (schema and selectors, re-exported from `rthooks-policy`), [`state`] (the model and the exact map
//! diff), [`bpf`] (loading, attaching and pinning the programs in [`bpf::programs`], the
//! exec hook point in [`bpf::mode`], the map writer in [`bpf::maps`]), [`btf`] (kernel
//! layout for the programs),
//! [`server`] (gRPC), [`events`], [`metrics`], [`config`], [`yaml`] (the one YAML dialect, also from `rthooks-policy`),
//! [`kube`] (the Kubernetes API connection; the pod and namespace sources).
pub mod agent;
pub mod bpf;
pub mod btf;
pub mod cgroup;
pub mod config;
pub mod error;
pub mod events;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod server;
pub mod state;

/// The policy schema lives in its own crate (`policy/`), shared with the CRDs.
pub use rthooks_policy as policy;
pub use rthooks_policy::yaml;

use std::sync::Arc;

pub use config::AgentConfig;
pub use error::Error;

/// Runs the agent until SIGINT/SIGTERM. Pinned programs stay attached afterwards.
pub async fn run(config: AgentConfig) -> Result<(), Error> {
    if config.unpin {
        bpf::unpin_all(&config.bpf_pin_dir).map_err(|e| Error::io(&config.bpf_pin_dir, e))?;
        tracing::info!(dir = %config.bpf_pin_dir.display(), "unpinned: programs detached, enforcement stopped");
        return Ok(());
    }
    let socket = rthooks_api::client::socket_path(&config.grpc_address)
        .ok_or_else(|| Error::GrpcAddress(config.grpc_address.clone()))?;
    // A bad Kubernetes configuration stops the agent before it loads anything.
    let kube = connect_kube(&config.kube).await?;
    let cgroup_root = match &config.cgroup_root {
        Some(r) => r.clone(),
        None => cgroup::detect_root()?,
    };
    let bpf::Loaded {
        programs,
        maps,
        events: ring,
    } = bpf::load(&config.bpf_pin_dir, config.enforcement)?;
    tracing::info!(
        mode = programs.mode.as_str(),
        reason = %programs.mode_reason,
        pins = %config.bpf_pin_dir.display(),
        "eBPF programs attached"
    );
    let agent = Arc::new(agent::Agent::new(
        Box::new(maps),
        programs.mode,
        programs.mode_reason.clone(),
        &config.state_dir,
        cgroup_root.clone(),
        config.policy_dir.clone(),
        config.trust_label_annotation,
    )?);
    agent.sync_policy_dir();
    if let Some((client, node)) = kube {
        watch_kube(&config.kube, client, &node, &agent);
    }

    let events_out: Option<Box<dyn std::io::Write + Send>> = match &config.events_file {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
        Some(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io(p, e))?,
        )),
    };
    tokio::spawn(events::run(agent.clone(), ring, events_out));

    {
        let agent = agent.clone();
        let every = config.policy_poll;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let a = agent.clone();
                let _ = tokio::task::spawn_blocking(move || a.sync_policy_dir()).await;
            }
        });
    }
    {
        let agent = agent.clone();
        let every = config.reconcile_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let a = agent.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || a.reconcile()).await {
                    if n > 0 {
                        tracing::info!(
                            dropped = n,
                            "reconciliation dropped containers whose cgroup is gone"
                        );
                    }
                }
            }
        });
    }
    if let Some(addr) = config.metrics_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let agent = agent.clone();
        let ready = agent.clone();
        tokio::spawn(metrics::serve(
            listener,
            move || agent.metrics().render(&agent.gauges()),
            move || ready.readiness(),
        ));
        tracing::info!(%addr, "metrics on /metrics, health on /healthz and /readyz");
    }

    let listener = server::bind(&socket)?;
    let incoming = server::authorized_incoming(listener, config.allow_uids.clone());
    let (hooks, api) = server::services(agent.clone());
    tracing::info!(socket = %socket.display(), "serving RuntimeHook and rthooks.v1.Agent");
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down; pinned programs keep enforcing");
        let _ = stopping_tx.send(true);
    };
    let server = tonic::transport::Server::builder()
        .add_service(hooks)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown);
    // Graceful shutdown waits for every connection, and event streams never end on their
    // own: give in-flight calls a moment, then leave (nothing is lost, the pins enforce).
    let grace = async move {
        let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    tokio::select! {
        result = server => result.map_err(Error::Serve)?,
        _ = grace => {}
    }
    let _ = std::fs::remove_file(&socket);
    // The programs stay attached through their pins; their fds lived until here.
    drop(programs);
    Ok(())
}

/// The API client and this node's name, when the agent uses the Kubernetes API.
async fn connect_kube(args: &kube::KubeArgs) -> Result<Option<(::kube::Client, String)>, Error> {
    let connection = args.connection();
    let Some(client) = kube::client::connect(&connection).await? else {
        tracing::info!("no Kubernetes API (not in a cluster, no --kubeconfig): labels only from registration requests");
        return Ok(None);
    };
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(kube::KubeError::NoNodeName)?;
    tracing::info!(?connection, %node, "using the Kubernetes API");
    Ok(Some((client, node)))
}

/// Starts the pod and namespace sources and the policy watch.
fn watch_kube(
    args: &kube::KubeArgs,
    client: ::kube::Client,
    node: &str,
    agent: &Arc<agent::Agent>,
) {
    let resources = args.resources();
    tracing::info!(%node, pods = %resources.pods.api_version, wait = ?args.pod_label_wait, "watching this node's pods and the namespaces");
    let pods = kube::pods::PodSource::spawn(
        client.clone(),
        resources.pods,
        node,
        args.pod_label_wait,
        agent.clone(),
    );
    agent.attach_pods(pods);
    let namespaces = kube::namespaces::NamespaceSource::spawn(
        client.clone(),
        resources.namespaces,
        agent.clone(),
    );
    agent.attach_namespaces(namespaces);
    kube::events::start(args, client.clone(), node, agent.clone());
    // kpolicy: RuntimePolicy / NamespacedRuntimePolicy beside the files and the API.
    kube::policies::spawn(client, node, agent.clone());
}

/// Sets up `tracing` (text or JSON on stderr).
pub fn init_logging(format: config::LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: redirected to a file or a journal
    // they make the log unreadable and ungreppable.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
}
