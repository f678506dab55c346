//! Running the tools the harness drives (umoci, podman, the installers).

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `cmd`; on failure the error holds its status and output.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
