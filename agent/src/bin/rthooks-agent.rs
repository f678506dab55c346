use rthooks_agent::{config, AgentConfig};

#[tokio::main]
async fn main() {
    let cfg: AgentConfig =
        match config::parse_with_file(std::env::args_os().collect(), "config", "RTHOOKS_CONFIG") {
            Ok(c) => c,
            Err(e) => {
                eprintln!("rthooks-agent: {:#}", anyhow::Error::from(e));
                std::process::exit(2);
            }
        };
    rthooks_agent::init_logging(cfg.log_format, &cfg.log_level);
    if let Err(e) = rthooks_agent::run(cfg).await {
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}
