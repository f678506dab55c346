//! `cargo xtask run-agent`: build and start the agent on this machine with the sample
//! policies from `deploy/policies`, events on stdout and metrics on 127.0.0.1:9810.
//! Started through the shared launcher (`rthooks-testkit`), like the tests and benches.
use anyhow::{bail, Context, Result};
use rthooks_testkit::{AgentSpec, Output};

use crate::util::{cargo, workspace_root};

/// The agent's own defaults, so that `rthooksctl` finds it without `--address`.
const SOCKET: &str = "/run/rthooks/agent.sock";
const PIN_DIR: &str = "/sys/fs/bpf/rthooks";

pub fn run_agent(extra: &[String]) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
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
    let run_dir = root.join("target/run");
    let mut agent = AgentSpec::new(root.join("target/release/rthooks-agent"))
        .dir(&run_dir)
        .socket(SOCKET)
        .pin_dir(PIN_DIR)
        // Enforcement outlives the agent by design; `rthooks-agent --unpin` removes it.
        .keep_pins()
        .policy_dir(root.join("deploy/policies"))
        .state_dir(run_dir.join("state"))
        .events_file("-")
        .output(Output::Inherit)
        .arg("--metrics-address=127.0.0.1:9810")
        .args(extra)
        .start()?;
    eprintln!(
        "rthooks-agent is serving {} with the policies in deploy/policies (events below, \
         metrics on http://127.0.0.1:9810/metrics);\n\
         in another shell: target/release/rthooksctl status | containers | policies list | events",
        agent.address()
    );
    let status = agent.wait().context("waiting for the agent")?;
    match status {
        Some(s) if !s.success() => bail!("rthooks-agent exited with {s}"),
        _ => Ok(()),
    }
}
