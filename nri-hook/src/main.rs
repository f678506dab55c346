//! `rthooks-nri-hook`: the containerd NRI plugin that puts `rthooks-oci-hook` into every
//! container's spec. Runs as a daemon dialing the NRI socket (reconnecting whenever the
//! runtime restarts) or as a plugin the runtime launches itself (`NRI_PLUGIN_SOCKET`).

use anyhow::Context as _;
use clap::Parser;
use rthooks_nri_hook::nri::{Runner, RunnerConfig, DEFAULT_SOCKET};
use rthooks_nri_hook::rthooks::{
    AgentSink, HookSpec, RthooksPlugin, DEFAULT_AGENT_ADDRESS, DEFAULT_HOOK_PATH,
    DEFAULT_HOOK_TIMEOUT_SECS,
};

#[derive(Parser, Debug)]
#[command(name = "rthooks-nri-hook", version, about)]
struct Args {
    /// NRI socket to connect to (ignored when the runtime launched us with NRI_PLUGIN_SOCKET).
    #[arg(long, env = "RTHOOKS_NRI_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: String,
    /// Plugin name used for registration (NRI_PLUGIN_NAME wins when set by the runtime).
    #[arg(long, env = "RTHOOKS_NRI_NAME", default_value = "rthooks")]
    name: String,
    /// Plugin index: plugins are called in ascending order (NRI_PLUGIN_IDX wins).
    #[arg(long, env = "RTHOOKS_NRI_IDX", default_value = "10")]
    idx: String,
    /// Path of the OCI hook to inject.
    #[arg(long, env = "RTHOOKS_HOOK_PATH", default_value = DEFAULT_HOOK_PATH)]
    hook_path: String,
    /// The hook's argv (argv[0] first), comma-separated.
    #[arg(
        long,
        env = "RTHOOKS_HOOK_ARGS",
        value_delimiter = ',',
        default_value = "rthooks-oci-hook,createRuntime"
    )]
    hook_args: Vec<String>,
    /// Environment for the hook (KEY=value), repeatable.
    #[arg(long = "hook-env", env = "RTHOOKS_HOOK_ENV", value_delimiter = ',')]
    hook_env: Vec<String>,
    /// The hook's OCI timeout in seconds.
    #[arg(long, env = "RTHOOKS_HOOK_TIMEOUT", default_value_t = DEFAULT_HOOK_TIMEOUT_SECS)]
    hook_timeout: i64,
    /// The agent's gRPC address, for Synchronize/RemoveContainer reports ("" or "none" to
    /// disable).
    #[arg(long, env = "RTHOOKS_AGENT_ADDRESS", default_value = DEFAULT_AGENT_ADDRESS)]
    agent_address: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RTHOOKS_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
