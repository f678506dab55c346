//! `rthooks-nri-hook`: the containerd NRI plugin that puts `rthooks-oci-hook` into every
//! container's spec. Runs as a daemon dialing the NRI socket (reconnecting whenever the
//! runtime restarts) or as a plugin the runtime launches itself (`NRI_PLUGIN_SOCKET`).

use anyhow::Context as _;
use rthooks_nri_hook::nri::{Runner, RunnerConfig};
use rthooks_nri_hook::rthooks::{AgentSink, HookSpec, RthooksPlugin};

fn main() -> anyhow::Result<()> {
    let args = match rthooks_nri_hook::config::parse(std::env::args_os()) {
        Ok(a) => a,
        Err(rthooks_nri_hook::config::ConfigError::Flags(e)) => e.exit(),
        Err(e) => {
            eprintln!("rthooks-nri-hook: {:#}", anyhow::Error::from(e));
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        // Plain text when logging to a file or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Take NRI_PLUGIN_SOCKET before any thread starts (it owns an fd and edits the env).
    let config = RunnerConfig::new(&args.name, &args.idx, &args.socket)
        .with_env()
        .context("pre-launched plugin environment")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = match args.agent_address.as_str() {
            "" | "none" => AgentSink::disabled(),
            a => AgentSink::spawn(a.to_string()),
        };
        let hook = HookSpec {
            path: args.hook_path,
            args: args.hook_args,
            env: args.hook_env,
            timeout_secs: args.hook_timeout,
        };
        tracing::info!(?hook, endpoint = ?config.endpoint, "starting rthooks NRI plugin");
        let runner = Runner::new(RthooksPlugin::new(hook, agent), config);
        runner.run_until(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
