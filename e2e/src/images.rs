//! Test images built locally (no registry is reachable): a static `pause` compiled with
//! `gcc -static`, and busybox from Debian's `busybox-static`, each packed with `umoci` into
//! an OCI layout tarball under `~/.cache/rthooks/images/` (built once).

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use rthooks_testkit::cache_dir;
use rthooks_testkit::debian::{self, CacheLock, BUSYBOX_STATIC};

use crate::command::run;

/// The sandbox image name the containerd configs pin.
pub const PAUSE_IMAGE: &str = "localhost/pause:1";
/// A busybox image (`/bin/busybox` plus applet links); default command `/bin/sh`.
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:1";

const PAUSE_C: &str = r#"
#include <signal.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
int main(void) {
    signal(SIGINT, quit);
    signal(SIGTERM, quit);
    for (;;) pause();
}
"#;

/// Applets linked in the busybox image; tests exec distinct binaries, so keep the list
/// short and predictable.
const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "echo", "ls", "true", "false", "id", "env", "touch", "wget", "nc",
];

/// Packs `rootfs_files` (path inside the image → host file, or a symlink target with
/// `link:`) into an OCI layout tarball `out` with tag `1`.
fn pack(out: &Path, files: &[(&str, String)], entrypoint: &[&str], cmd: &[&str]) -> Result<()> {
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    let bundle = work.path().join("bundle");
    let img = format!("{}:1", layout.display());
    run(Command::new("umoci")
        .arg("init")
        .arg("--layout")
        .arg(&layout))?;
    run(Command::new("umoci").args(["new", "--image", &img]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &img])
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    for (dest, src) in files {
        let target = rootfs.join(dest.trim_start_matches('/'));
        fs::create_dir_all(target.parent().unwrap())?;
        if let Some(link) = src.strip_prefix("link:") {
            symlink(link, &target)?;
        } else {
            fs::copy(src, &target).with_context(|| format!("copy {src}"))?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
        }
    }
    run(Command::new("umoci")
        .args(["repack", "--image", &img])
        .arg(&bundle))?;
    let mut config = Command::new("umoci");
    config.args(["config", "--image", &img]);
    for e in entrypoint {
        config.arg(format!("--config.entrypoint={e}"));
    }
    for c in cmd {
        config.arg(format!("--config.cmd={c}"));
    }
    run(&mut config)?;
    let tmp = out.with_extension("tmp");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tmp)
        .arg("."))?;
    fs::rename(&tmp, out)?;
    Ok(())
}

/// The pause image tarball (built once).
pub fn pause_tar() -> Result<PathBuf> {
    let dir = cache_dir().join("images");
    let out = dir.join("pause.tar");
    if out.exists() {
        return Ok(out);
    }
    let _lock = CacheLock::at(&dir.join("build.lock"), "another image build")?;
    if out.exists() {
        return Ok(out);
    }
    let work = tempfile::tempdir()?;
    let src = work.path().join("pause.c");
    let bin = work.path().join("pause");
    fs::write(&src, PAUSE_C)?;
    run(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src))?;
    pack(
        &out,
        &[("/pause", bin.display().to_string())],
        &["/pause"],
        &[],
    )?;
    Ok(out)
}

/// The busybox image tarball (built once).
pub fn busybox_tar() -> Result<PathBuf> {
    let dir = cache_dir().join("images");
    let out = dir.join("busybox.tar");
    if out.exists() {
        return Ok(out);
    }
    let bb = busybox_binary()?;
    let _lock = CacheLock::at(&dir.join("build.lock"), "another image build")?;
    if out.exists() {
        return Ok(out);
    }
    let mut files = vec![("/bin/busybox", bb.display().to_string())];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("/bin/{a}")).collect();
    for l in &links {
        files.push((l.as_str(), "link:busybox".to_string()));
    }
    pack(&out, &files, &[], &["/bin/sh"])?;
    Ok(out)
}

/// The static busybox (Debian's `busybox-static`, unpacked once) every test image and
/// rootfs is made of.
pub fn busybox_binary() -> Result<PathBuf> {
    let root = debian::unpacked(&BUSYBOX_STATIC)?;
    debian::find_file(&root, "busybox").context("busybox not in busybox-static")
}
