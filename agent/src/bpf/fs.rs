//! The pseudo file systems loading depends on: bpffs for the pins, securityfs for the
//! list of active LSMs. Hosts that never ran a BPF tool often have neither mounted.
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::statfs::statfs;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_FS: &str = "/sys/fs/bpf";
const SECURITY_FS: &str = "/sys/kernel/security";

pub fn is_bpffs(dir: &Path) -> bool {
    statfs(dir).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts the BPF file system at /sys/fs/bpf when `dir` is below it and nothing is
/// mounted there yet (as Cilium does).
pub fn ensure_bpffs(dir: &Path) {
    let default = Path::new(BPF_FS);
    if dir.starts_with(default) && default.is_dir() && !is_bpffs(default) {
        match mount(
            Some("bpf"),
            default,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => tracing::info!("mounted the BPF file system at /sys/fs/bpf"),
            Err(e) => tracing::warn!(error = %e, "mounting /sys/fs/bpf failed"),
        }
    }
}

/// Is `bpf` among the active LSMs? On kernels booted without it (5.10's default), an LSM
/// program loads and attaches without error but is never called, so attaching is no proof.
pub fn bpf_lsm_active() -> Result<bool, String> {
    let path = Path::new(SECURITY_FS).join("lsm");
    if !path.exists() && Path::new(SECURITY_FS).is_dir() {
        // A failure shows in the read below, with the hint.
        let _ = mount(
            Some("securityfs"),
            SECURITY_FS,
            Some("securityfs"),
            MsFlags::empty(),
            None::<&str>,
        );
    }
    std::fs::read_to_string(&path)
        .map(|s| s.trim().split(',').any(|l| l == "bpf"))
        .map_err(|e| {
            format!(
                "cannot read {}: {e} (is securityfs mounted?)",
                path.display()
            )
        })
}
