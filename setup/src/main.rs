//! `rthooks-setup install|uninstall hooks-d|containerd-base-spec|containerd-nri [flags]`
//! (run by an admin or the DaemonSet's installer container).
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = rthooks_setup::Cli::parse();
    match rthooks_setup::run(&cli) {
        Ok(report) => {
            for line in report {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rthooks-setup: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
