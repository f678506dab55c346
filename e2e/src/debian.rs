//! Debian packages as test userland: `apt-get download` with a private apt configuration
//! (its own sources list, lists and cache under `~/.cache/rthooks/apt-e2e`), unpacked with
//! `dpkg -x` into `~/.cache/rthooks/userland/`. Everything is cached: a second run does
//! not touch the network.
//!
//! The mirror is the one the host's apt already uses (or `RTHOOKS_DEBIAN_MIRROR`), so no
//! host name is baked in here.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// A Debian package pinned by suite and upstream version prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Package {
    /// Binary package name, e.g. `containerd`.
    pub name: &'static str,
    /// Suite, e.g. `trixie` or `sid`.
    pub suite: &'static str,
    /// The Debian version must start with this (e.g. `1.7.24`).
    pub version_prefix: &'static str,
}

/// The suites the private sources list offers.
pub const SUITES: &[&str] = &["trixie", "sid"];

/// `$RTHOOKS_CACHE`, else the parent of `$RTHOOKS_USERLAND` (set in the VM guests, whose
/// `HOME` is not the host's), else `~/.cache/rthooks`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RTHOOKS_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(parent) = std::env::var_os("RTHOOKS_USERLAND")
        .map(PathBuf::from)
        .and_then(|u| u.parent().map(PathBuf::from))
    {
        return parent;
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/rthooks")
}

/// An exclusive lock on a file, released on drop: test binaries and threads fetching the
/// same cache concurrently must not run apt or dpkg over each other.
pub struct FileLock {
    // Held for its flock; dropping it unlocks and closes the file.
    _lock: Flock<fs::File>,
}

impl FileLock {
    /// Blocks until `path` is locked.
    pub fn acquire(path: &Path) -> Result<Self> {
        if let Some(p) = path.parent() {
            fs::create_dir_all(p)?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("flock {}: {e}", path.display()))?;
        Ok(FileLock { _lock: lock })
    }
}

/// The Debian mirror: `RTHOOKS_DEBIAN_MIRROR`, else the first `.../debian` URI of the
/// host's apt sources.
pub fn mirror() -> Result<String> {
    if let Ok(m) = std::env::var("RTHOOKS_DEBIAN_MIRROR") {
        return Ok(m.trim_end_matches('/').to_string());
    }
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                texts.push(fs::read_to_string(&p).unwrap_or_default());
            }
        }
    }
    for t in &texts {
        for line in t.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            for word in line.split_whitespace() {
                let w = word.trim_end_matches('/');
                if (w.starts_with("http://") || w.starts_with("https://")) && w.ends_with("/debian")
                {
                    return Ok(w.to_string());
                }
            }
        }
    }
    bail!("no Debian mirror in /etc/apt sources; set RTHOOKS_DEBIAN_MIRROR")
}

struct Apt {
    root: PathBuf,
}

impl Apt {
    fn new() -> Result<Self> {
        // Our own apt state: other tools (the VM builder) keep theirs under `apt/` with other
        // suites, and apt must not run twice over one lists directory.
        let root = cache_dir().join("apt-e2e");
        for d in ["lists/partial", "cache/archives/partial", "etc"] {
            fs::create_dir_all(root.join(d))?;
        }
        let sources = root.join("etc/sources.list");
        if !sources.exists() {
            let m = mirror()?;
            let text: String = SUITES
                .iter()
                .map(|s| {
                    format!(
                        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {m} {s} main\n"
                    )
                })
                .collect();
            fs::write(&sources, text)?;
        }
        Ok(Apt { root })
    }

    fn cmd(&self, prog: &str) -> Command {
        let r = &self.root;
        let mut c = Command::new(prog);
        c.arg(format!(
            "-oDir::Etc::SourceList={}",
            r.join("etc/sources.list").display()
        ))
        .arg("-oDir::Etc::SourceParts=/nonexistent")
        .arg(format!("-oDir::State::Lists={}", r.join("lists").display()))
        .arg(format!("-oDir::Cache={}", r.join("cache").display()))
        .arg("-oDebug::NoLocking=1")
        .arg("-oAPT::Sandbox::User=root")
        // Only the Packages indexes are needed, not the AppStream metadata.
        .arg("-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false")
        .arg("-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false")
        .arg("-oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false");
        c
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.root.join("lists")).is_ok_and(|rd| {
            let names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            SUITES.iter().all(|s| {
                names
                    .iter()
                    .any(|n| n.contains(&format!("_{s}_")) && n.contains("_Packages"))
            })
        })
    }

    fn update(&self) -> Result<()> {
        run(self.cmd("apt-get").arg("-q").arg("update"))
    }

    fn version_of(&self, pkg: &Package) -> Result<Option<String>> {
        let out = self
            .cmd("apt-cache")
            .arg("madison")
            .arg(pkg.name)
            .output()
            .context("apt-cache madison")?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            if cols.len() >= 3
                && cols[0] == pkg.name
                && cols[1]
                    .split_once(':')
                    .map_or(cols[1], |(_, v)| v)
                    .starts_with(pkg.version_prefix)
                && cols[2]
                    .split_whitespace()
                    .any(|w| w.starts_with(&format!("{}/", pkg.suite)))
            {
                return Ok(Some(cols[1].to_string()));
            }
        }
        Ok(None)
    }
}

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

/// Downloads (once) and unpacks (once) `pkg`; returns the unpacked root (the `dpkg -x`
/// target, holding `usr/bin/...`).
pub fn unpacked(pkg: &Package) -> Result<PathBuf> {
    let cache = cache_dir();
    let dest = cache
        .join("userland")
        .join(format!("{}-{}-{}", pkg.name, pkg.version_prefix, pkg.suite));
    let done = dest.join(".rthooks-complete");
    if done.exists() {
        return Ok(dest);
    }
    let _lock = FileLock::acquire(&cache.join("apt.lock"))?;
    if done.exists() {
        return Ok(dest);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = find_deb(&debs, pkg)?;
    let deb = match deb {
        Some(d) => d,
        None => {
            let apt = Apt::new()?;
            if !apt.has_lists() {
                apt.update()?;
            }
            let version = match apt.version_of(pkg)? {
                Some(v) => v,
                None => {
                    // The lists may be older than the archive: refresh once.
                    apt.update()?;
                    apt.version_of(pkg)?.with_context(|| {
                        format!(
                            "{} {}* not found in {}",
                            pkg.name, pkg.version_prefix, pkg.suite
                        )
                    })?
                }
            };
            run(apt
                .cmd("apt-get")
                .current_dir(&debs)
                .arg("-q")
                .arg("download")
                .arg(format!("{}={}", pkg.name, version)))?;
            find_deb(&debs, pkg)?.with_context(|| format!("downloaded {} not found", pkg.name))?
        }
    };
    let tmp = dest.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest)?;
    fs::write(&done, deb.file_name().unwrap().to_string_lossy().as_bytes())?;
    Ok(dest)
}

fn find_deb(dir: &Path, pkg: &Package) -> Result<Option<PathBuf>> {
    // apt-get download names files <name>_<version with ':' as %3a>_<arch>.deb.
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(rest) = n.strip_prefix(&format!("{}_", pkg.name)) {
            let version = rest.split('_').next().unwrap_or("").replace("%3a", ":");
            let upstream = version.split_once(':').map_or(version.as_str(), |(_, v)| v);
            if n.ends_with(".deb") && upstream.starts_with(pkg.version_prefix) {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

/// Finds a file named `name` under `root` (packages move binaries between `bin/`,
/// `usr/bin/` and `usr/sbin/` across releases).
pub fn find_file(root: &Path, name: &str) -> Option<PathBuf> {
    for sub in ["usr/bin", "usr/sbin", "bin", "sbin", "usr/libexec"] {
        let p = root.join(sub).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}
