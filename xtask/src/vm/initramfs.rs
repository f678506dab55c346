//! The guest's initramfs: static busybox, the few modules needed to reach the host over
//! 9p (Debian builds them as modules), and our init script from `vm/guest/`.
//!
//! The host has no kmod tools, so module dependencies are read from each module's
//! `.modinfo` section (`depends=`) directly.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The guest mounts the host root and the results directory over virtio-9p and layers
/// writable overlays onto it.
pub const WANTED_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
/// Loaded when the kernel has them as modules; tests that need them skip otherwise (the
/// agent's kernel tests register a binfmt_misc handler).
pub const OPTIONAL_MODULES: &[&str] = &["binfmt_misc"];

/// A kernel unpacked from its Debian package(s).
#[derive(Debug, Clone)]
pub struct KernelTree {
    pub vmlinuz: PathBuf,
    /// `…/lib/modules/<release>` (under `usr/` from trixie on).
    pub modules: PathBuf,
    pub release: String,
}

impl KernelTree {
    /// Up to 6.x the image is `boot/vmlinuz-<release>`; the 7.x split packages put it
    /// at `usr/lib/modules/<release>/vmlinuz`.
    pub fn find(root: &Path) -> Result<Self> {
        let in_boot = std::fs::read_dir(root.join("boot"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find_map(|p| {
                let release = p
                    .file_name()?
                    .to_str()?
                    .strip_prefix("vmlinuz-")?
                    .to_string();
                Some((p, release))
            });
        let in_modules = || {
            ["usr/lib/modules", "lib/modules"]
                .iter()
                .flat_map(|d| std::fs::read_dir(root.join(d)).into_iter().flatten())
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.join("vmlinuz").is_file())
                .map(|p| {
                    (
                        p.join("vmlinuz"),
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                    )
                })
        };
        let (vmlinuz, release) = in_boot.or_else(in_modules).with_context(|| {
            format!(
                "no kernel image (boot/vmlinuz-* or lib/modules/*/vmlinuz) in {}",
                root.display()
            )
        })?;
        let modules = ["usr/lib/modules", "lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&release))
            .find(|p| p.is_dir())
            .with_context(|| format!("no modules for {release} under {}", root.display()))?;
        Ok(KernelTree {
            vmlinuz,
            modules,
            release,
        })
    }
}

impl KernelTree {
    /// A tree the user built (`make`): its modules, if any, are `*.ko` files in the tree.
    pub fn from_build_tree(dir: &Path) -> Result<Self> {
        let vmlinuz = dir.join("arch/x86/boot/bzImage");
        if !vmlinuz.is_file() {
            bail!("{} is missing: build the kernel first", vmlinuz.display());
        }
        let release = std::fs::read_to_string(dir.join("include/config/kernel.release"))
            .with_context(|| format!("{} has no include/config/kernel.release", dir.display()))?
            .trim()
            .to_string();
        Ok(KernelTree {
            vmlinuz,
            modules: dir.to_path_buf(),
            release,
        })
    }
}

/// Module name → file, for every module the kernel ships (names normalised to `_`).
fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    // A package's lib/modules/<release>/kernel, or a whole build tree.
    let top = if modules.join("kernel").is_dir() {
        modules.join("kernel")
    } else {
        modules.to_path_buf()
    };
    let mut stack = vec![top];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = e?.path();
            if path.is_symlink() {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path) {
                index.insert(name, path);
            }
        }
    }
    Ok(index)
}

/// `…/9pnet_virtio.ko.xz` → `9pnet_virtio`.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// `None` when the package does not say (the 7.x split packages ship no
/// `modules.builtin`): a module that is not shipped is then assumed built in.
fn builtin_modules(modules: &Path) -> Option<HashSet<String>> {
    let text = std::fs::read_to_string(modules.join("modules.builtin")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| module_name(Path::new(l)))
            .collect(),
    )
}

/// The uncompressed module file.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return Ok(std::fs::read(path)?);
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -d {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

/// The wanted modules and their dependencies, dependencies first, uncompressed.
fn resolve_modules(modules: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let index = module_index(modules)?;
    let builtin = builtin_modules(modules);
    let mut order = Vec::new();
    let mut done = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &Option<HashSet<String>>,
        done: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if !done.insert(name.to_string()) || builtin.as_ref().is_some_and(|b| b.contains(name)) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            if builtin.is_none() {
                return Ok(());
            }
            bail!("the kernel has no module {name} (neither built in nor shipped)");
        };
        let ko = read_module(path)?;
        for dep in module_depends(&ko) {
            visit(&dep, index, builtin, done, order)?;
        }
        order.push((name.to_string(), ko));
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &builtin, &mut done, &mut order)?;
    }
    Ok(order)
}

/// Builds `out` (gzip'd newc cpio) unless it is newer than its inputs and holds the
/// modules wanted now.
pub fn build(kernel: &KernelTree, busybox: &Path, init: &Path, out: &Path) -> Result<bool> {
    let newest_input = [busybox, init, kernel.vmlinuz.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max();
    let module_stamp = out.with_extension("modules");
    let wanted = format!("{WANTED_MODULES:?} {OPTIONAL_MODULES:?}");
    if let (Ok(m), Some(newest)) = (
        std::fs::metadata(out).and_then(|m| m.modified()),
        newest_input,
    ) {
        if m >= newest && std::fs::read_to_string(&module_stamp).ok() == Some(wanted.clone()) {
            return Ok(false);
        }
    }
    let staging = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&staging);
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "host",
        "results",
        "lib/modules",
    ] {
        std::fs::create_dir_all(staging.join(d))?;
    }
    copy_exec(busybox, &staging.join("bin/busybox"))?;
    copy_exec(init, &staging.join("init"))?;
    let mut list = String::new();
    let mut modules = resolve_modules(&kernel.modules, WANTED_MODULES)?;
    for optional in OPTIONAL_MODULES {
        for (name, ko) in resolve_modules(&kernel.modules, &[optional]).unwrap_or_default() {
            if !modules.iter().any(|(n, _)| *n == name) {
                modules.push((name, ko));
            }
        }
    }
    for (name, ko) in modules {
        std::fs::write(staging.join(format!("lib/modules/{name}.ko")), ko)?;
        list.push_str(&name);
        list.push('\n');
    }
    std::fs::write(staging.join("lib/modules/order"), list)?;
    std::fs::write(staging.join("etc-release"), format!("{}\n", kernel.release))?;
    let tmp = out.with_extension("partial");
    // Owners are forced to root: the files were written by whoever runs xtask.
    let script = "find . -print0 | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 > \"$1\"";
    crate::util::run(
        Command::new("sh")
            .args(["-ec", script, "sh"])
            .arg(&tmp)
            .current_dir(&staging),
    )?;
    std::fs::rename(&tmp, out)?;
    std::fs::write(&module_stamp, wanted)?;
    std::fs::remove_dir_all(&staging)?;
    Ok(true)
}

fn copy_exec(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_depends() {
        assert_eq!(
            module_name(Path::new("a/9pnet_virtio.ko.xz")).as_deref(),
            Some("9pnet_virtio")
        );
        assert_eq!(
            module_name(Path::new("kernel/fs/fscache/fs-cache.ko")).as_deref(),
            Some("fs_cache")
        );
        assert_eq!(module_name(Path::new("a/x.ko.zst")).as_deref(), Some("x"));
        assert_eq!(module_name(Path::new("modules.order")), None);
        let ko = b"\x7fELF....\0license=GPL\0depends=9pnet,netfs\0name=9p\0";
        assert_eq!(module_depends(ko), ["9pnet", "netfs"]);
        assert!(module_depends(b"\0depends=\0name=x\0").is_empty());
        assert!(module_depends(b"nothing").is_empty());
    }

    #[test]
    fn finds_the_image_in_boot_or_beside_the_modules() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::create_dir_all(old.join("boot")).unwrap();
        std::fs::create_dir_all(old.join("lib/modules/5.10.0-32-amd64/kernel")).unwrap();
        std::fs::write(old.join("boot/vmlinuz-5.10.0-32-amd64"), "").unwrap();
        let t = KernelTree::find(&old).unwrap();
        assert_eq!(t.release, "5.10.0-32-amd64");
        assert!(t.modules.ends_with("lib/modules/5.10.0-32-amd64"));
        let split = dir.path().join("split");
        std::fs::create_dir_all(split.join("usr/lib/modules/7.2.13+deb14-amd64")).unwrap();
        std::fs::write(split.join("usr/lib/modules/7.2.13+deb14-amd64/vmlinuz"), "").unwrap();
        let t = KernelTree::find(&split).unwrap();
        assert_eq!(t.release, "7.2.13+deb14-amd64");
        assert!(t
            .vmlinuz
            .ends_with("usr/lib/modules/7.2.13+deb14-amd64/vmlinuz"));
        assert!(KernelTree::find(dir.path()).is_err());
    }

    #[test]
    fn a_build_tree_is_a_kernel_tree() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        assert!(KernelTree::from_build_tree(t).is_err());
        std::fs::create_dir_all(t.join("arch/x86/boot")).unwrap();
        std::fs::create_dir_all(t.join("include/config")).unwrap();
        std::fs::create_dir_all(t.join("fs/overlayfs")).unwrap();
        std::fs::write(t.join("arch/x86/boot/bzImage"), "").unwrap();
        std::fs::write(t.join("include/config/kernel.release"), "7.4.0-rc1+\n").unwrap();
        std::fs::write(t.join("fs/overlayfs/overlay.ko"), "\0depends=\0").unwrap();
        std::fs::write(
            t.join("modules.builtin"),
            "fs/9p/9p.ko\nnet/9p/9pnet.ko\nnet/9p/9pnet_virtio.ko\ndrivers/virtio/virtio_pci.ko\n",
        )
        .unwrap();
        let k = KernelTree::from_build_tree(t).unwrap();
        assert_eq!(k.release, "7.4.0-rc1+");
        let got: Vec<String> = resolve_modules(&k.modules, WANTED_MODULES)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, ["overlay"]);
    }

    #[test]
    fn resolves_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path();
        std::fs::create_dir_all(m.join("kernel/fs/9p")).unwrap();
        std::fs::write(m.join("kernel/fs/9p/9p.ko"), b"\0depends=9pnet,netfs\0").unwrap();
        std::fs::write(m.join("kernel/fs/9p/9pnet.ko"), b"\0depends=\0").unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/fs/netfs/netfs.ko\n").unwrap();
        let got: Vec<String> = resolve_modules(m, &["9p", "9pnet"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, ["9pnet", "9p"]);
        let err = resolve_modules(m, &["overlay"]).unwrap_err().to_string();
        assert!(err.contains("no module overlay"), "{err}");
        std::fs::remove_file(m.join("modules.builtin")).unwrap();
        let got: Vec<String> = resolve_modules(m, &["virtio_pci", "9p"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            got,
            ["9pnet", "9p"],
            "without modules.builtin, unshipped means built in"
        );
    }
}
