//! `--runner vng`: virtme-ng, the kernel developers' way to boot a kernel against the
//! host's own userland. It builds its own initramfs from the kernel's modules, so it
//! boots trees and packages our initramfs builder knows nothing about; our guest-side
//! `vm/guest/vng-init` then runs the same job and speaks the same console protocol as
//! `vm/guest/init`, so results, deadlines and the matrix are the runner's business only.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{cache_dir, output, run};

/// The release we test against; pinned so a new upstream release cannot change the
/// guests under us.
pub const VERSION: &str = "1.42";

/// The `vng` to run: `$RTHOOKS_VNG`, else our own pinned install in a virtualenv under
/// the cache (created on first use: PyPI is reachable from these machines).
pub fn ensure() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("RTHOOKS_VNG") {
        return Ok(PathBuf::from(p));
    }
    // vng runs depmod on the kernel's modules to pick what its initramfs needs, and
    // needs busybox for its fallback init.
    crate::setup::apt_install(&["kmod", "busybox-static", "python3-venv"])?;
    let venv = cache_dir().join("virtme-ng");
    let vng = venv.join("bin/vng");
    let installed = output(Command::new(&vng).arg("--version"))
        .is_some_and(|v| v.split_whitespace().any(|w| w == VERSION));
    if installed {
        return Ok(vng);
    }
    eprintln!("vm: installing virtme-ng {VERSION} into {}", venv.display());
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("creating the virtme-ng virtualenv")?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("virtme-ng=={VERSION}"),
    ]))
    .context("installing virtme-ng from PyPI")?;
    Ok(vng)
}
