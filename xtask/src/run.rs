//! `cargo xtask run-agent`: build and start the agent on this machine with the sample
//! policies from `deploy/policies`, events on stdout and metrics on 127.0.0.1:9810.
use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{cargo, run, workspace_root};

pub fn run_agent(extra: &[String]) -> Result<()> {
    if effective_uid() != 0 {
        bail!("the agent loads eBPF programs: run as root");
    }
    cargo(&[
        "build",
        "--release",
        "-p",
        "rthooks-agent",
        "-p",
        "rthooks-oci-hook",
    ])?;
    let root = workspace_root();
    let state = root.join("target/run/state");
    std::fs::create_dir_all(&state)?;
    eprintln!(
        "starting rthooks-agent with the policies in deploy/policies (events below, metrics on http://127.0.0.1:9810/metrics);\n\
         in another shell: target/release/rthooksctl status | containers | policies list | events"
    );
    run(Command::new(root.join("target/release/rthooks-agent"))
        .arg(format!(
            "--policy-dir={}",
            root.join("deploy/policies").display()
        ))
        .arg(format!("--state-dir={}", state.display()))
        .arg("--events-file=-")
        .arg("--metrics-address=127.0.0.1:9810")
        .args(extra))
}

fn effective_uid() -> u32 {
    // Read from /proc to avoid a libc dependency in xtask.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}
