//! The one Debian fetcher of xtask (kernels, guest userland, the test API server's
//! sources) and the e2e harness (containerd releases, busybox-static): packages through a
//! private apt configuration under the cache ([`crate::cache_dir`]), so the host's own apt
//! state is never read or changed and no root privileges beyond writing the cache are
//! needed.
//!
//! Every `.deb` is checked against the SHA-256 apt's signed metadata gives for it, both
//! when it is downloaded and when a cached copy is reused; unpacked trees carry a stamp
//! naming the exact files they came from.
//!
//! Cache layout: `debs/` the verified package files (shared), `apt/` xtask's apt state
//! (the suites of `vm/kernels.toml`), `apt-e2e/` the e2e harness's ([`E2E_SUITES`]; apart,
//! so that neither rewrites the other's sources list and refreshes its lists), `userland/`
//! unpacked trees, `apt.lock` the lock around all of it.
//!
//! The mirrors are the ones the host's apt already uses (or `RTHOOKS_DEBIAN_MIRROR`,
//! `RTHOOKS_DEBIAN_SECURITY_MIRROR`), so no host name is baked in here.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::cache_dir;

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Debian codenames and aliases, to tell the host's Debian entries from third-party ones.
const DEBIAN_SUITES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// The suites of the e2e harness's apt state (`apt-e2e/`).
pub const E2E_SUITES: &[&str] = &["trixie", "sid"];

/// Why fetching or unpacking failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory of the cache could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool (apt-get, apt-cache, dpkg-deb, sha256sum) could not be started.
    #[error("running {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{command} failed ({status}):\n{output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed.
        output: String,
    },
    /// `flock` on a lock file failed.
    #[error("flock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// apt cannot give what was asked for (an unknown package, a version not in the
    /// suite, output of an unexpected shape, no mirror).
    #[error("{0}")]
    Apt(String),
    /// A package file is not the one apt's metadata describes.
    #[error("{}: {what}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// How it differs.
        what: String,
    },
}

/// The result of this module's functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs `cmd` for its output; a failure to start it is an error, its exit status is not.
fn output_of(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output().map_err(|source| Error::Spawn {
        command: format!("{cmd:?}"),
        source,
    })
}

/// Runs `cmd`; when it fails the error holds its status and output.
fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = output_of(cmd)?;
    if !out.status.success() {
        return Err(Error::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(out)
}

/// An exclusive `flock` on a file, released on drop: xtask and the test binaries (and
/// their threads) download into the same `<cache>/debs`, and none may replace a file
/// another is writing or verifying, nor run apt or dpkg over another.
pub struct CacheLock {
    _lock: Flock<fs::File>,
}

impl CacheLock {
    /// `<cache>/apt.lock`, the lock around the package cache.
    pub fn acquire() -> Result<Self> {
        Self::at(&cache_dir().join("apt.lock"), "another fetch is running")
    }

    /// Blocks until `path` is locked, saying on stderr why (`holder`) when it has to wait.
    pub fn at(path: &Path, holder: &str) -> Result<Self> {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let lock_err = |source| Error::Lock {
            path: path.to_path_buf(),
            source,
        };
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, Errno::EWOULDBLOCK)) => {
                eprintln!("waiting for {} ({holder})", path.display());
                Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| lock_err(e))?
            }
            Err((_, e)) => return Err(lock_err(e)),
        };
        Ok(CacheLock { _lock: lock })
    }
}

/// One resolved package file, as apt's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deb {
    /// The package name.
    pub package: String,
    /// The suite it comes from.
    pub suite: String,
    /// The file name `apt-get download` gives it.
    pub filename: String,
    /// Its Debian version (epoch included).
    pub version: String,
    /// Bytes.
    pub size: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

/// A private apt configuration (sources list, lists, cache) in one directory.
pub struct Apt {
    dir: PathBuf,
    updated: std::cell::Cell<bool>,
}

/// What a fetch did, for the progress report.
#[derive(Debug, Default, Clone, Copy)]
pub struct FetchStats {
    /// Bytes downloaded.
    pub downloaded_bytes: u64,
    /// Bytes found in the cache (and verified).
    pub cached_bytes: u64,
    /// Seconds spent.
    pub seconds: f64,
}

impl Apt {
    /// xtask's apt state, `<cache>/apt`, for `suites` (see [`Apt::in_dir`]).
    pub fn new(suites: &[String]) -> Result<Self> {
        Self::in_dir(&cache_dir().join("apt"), suites)
    }

    /// Apt state in `dir`: writes the private sources list for `suites` and refreshes
    /// the package lists when they are missing or the list changed.
    pub fn in_dir(dir: &Path, suites: &[String]) -> Result<Self> {
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
        ] {
            fs::create_dir_all(dir.join(sub)).map_err(io(dir))?;
        }
        if !Path::new(KEYRING).exists() {
            return Err(Error::Apt(format!(
                "{KEYRING} is missing (Debian package debian-archive-keyring)"
            )));
        }
        let (main, security) = host_mirrors()?;
        let list = sources_list(&main, &security, suites);
        let sources = dir.join("etc/sources.list");
        fs::write(&sources, &list).map_err(io(&sources))?;
        let apt = Apt {
            dir: dir.to_path_buf(),
            updated: std::cell::Cell::new(false),
        };
        let stamp = apt.dir.join("lists.stamp");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(list.as_str()) {
            apt.update()?;
            fs::write(&stamp, &list).map_err(io(&stamp))?;
        }
        Ok(apt)
    }

    fn command(&self, tool: &str) -> Command {
        let d = &self.dir;
        let mut cmd = Command::new(tool);
        for (k, v) in [
            (
                "Dir::Etc::SourceList",
                d.join("etc/sources.list").display().to_string(),
            ),
            (
                "Dir::Etc::SourceParts",
                d.join("etc/sources.list.d").display().to_string(),
            ),
            ("Dir::State::Lists", d.join("lists").display().to_string()),
            ("Dir::Cache", d.join("cache").display().to_string()),
            ("Dir::State::status", "/dev/null".into()),
            ("APT::Architecture", "amd64".into()),
            ("APT::Architectures", "amd64".into()),
            // apt drops to `_apt` for downloads, which cannot write into root's home.
            ("APT::Sandbox::User", "root".into()),
            ("Acquire::Languages", "none".into()),
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".into(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled",
                "false".into(),
            ),
            (
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled",
                "false".into(),
            ),
        ] {
            cmd.arg("-o").arg(format!("{k}={v}"));
        }
        cmd
    }

    /// `apt-get update` in this state (and forgets what was resolved with the old lists).
    pub fn update(&self) -> Result<()> {
        eprintln!(
            "debian: refreshing the private apt lists ({})",
            self.dir.display()
        );
        let out = output_of(self.command("apt-get").args(["-q", "update"]))?;
        let err = String::from_utf8_lossy(&out.stderr);
        // apt-get update exits 0 even when a suite could not be fetched.
        if !out.status.success()
            || err
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W: Failed"))
        {
            return Err(Error::Apt(format!("apt-get update failed:\n{err}")));
        }
        let _ = fs::remove_file(self.dir.join("resolved.json"));
        let _ = fs::remove_file(self.dir.join("closures.json"));
        self.updated.set(true);
        Ok(())
    }

    /// Resolves `package/suite` pairs to files, refreshing the lists once when apt does
    /// not know a package (the lists may predate a suite's newest upload).
    pub fn resolve(&self, wanted: &[(String, String)]) -> Result<Vec<Deb>> {
        match self.resolve_once(wanted) {
            Ok(debs) => Ok(debs),
            Err(e) if !self.updated.get() => {
                eprintln!("debian: {e}; refreshing the lists and trying again");
                self.update()?;
                self.resolve_once(wanted)
            }
            Err(e) => Err(e),
        }
    }

    /// Resolutions are remembered until the next `apt-get update`: asking apt costs
    /// seconds per call, and a second run should do nothing.
    fn resolve_once(&self, wanted: &[(String, String)]) -> Result<Vec<Deb>> {
        let memo_path = self.dir.join("resolved.json");
        let mut memo: BTreeMap<String, (String, u64, String)> = read_memo(&memo_path);
        let key = |p: &str, s: &str| format!("{p}/{s}");
        if !wanted.iter().all(|(p, s)| memo.contains_key(&key(p, s))) {
            for (deb, (p, s)) in self.ask_apt(wanted)?.into_iter().zip(wanted) {
                memo.insert(key(p, s), (deb.filename, deb.size, deb.sha256));
            }
            write_memo(&memo_path, &memo)?;
        }
        wanted
            .iter()
            .map(|(package, suite)| {
                let (filename, size, sha256) = memo[&key(package, suite)].clone();
                Ok(Deb {
                    package: package.clone(),
                    suite: suite.clone(),
                    version: version_from_filename(&filename)?,
                    filename,
                    size,
                    sha256,
                })
            })
            .collect()
    }

    fn ask_apt(&self, wanted: &[(String, String)]) -> Result<Vec<Deb>> {
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "download", "--print-uris"]);
        cmd.args(wanted.iter().map(|(p, s)| format!("{p}/{s}")));
        let out = output_of(&mut cmd)?;
        if !out.status.success() {
            return Err(Error::Apt(format!(
                "apt cannot resolve {}: {}",
                wanted
                    .iter()
                    .map(|(p, s)| format!("{p}/{s}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let printed = parse_print_uris(&String::from_utf8_lossy(&out.stdout))?;
        wanted
            .iter()
            .map(|(package, suite)| {
                let (filename, size, sha256) = printed
                    .iter()
                    .find(|(f, _, _)| f.starts_with(&format!("{package}_")))
                    .ok_or_else(|| {
                        Error::Apt(format!("apt printed no file for {package}/{suite}"))
                    })?;
                Ok(Deb {
                    package: package.clone(),
                    suite: suite.clone(),
                    version: version_from_filename(filename)?,
                    filename: filename.clone(),
                    size: *size,
                    sha256: sha256.clone(),
                })
            })
            .collect()
    }

    /// Every package `roots` need in `suite`, recursively (Depends only, as `dpkg -x`
    /// into a private root needs no maintainer scripts), the roots included. Remembered
    /// until the next `apt-get update`, like [`Apt::resolve`]: apt takes ~15 s for a tree
    /// of a few hundred packages.
    pub fn depends_closure(&self, roots: &[&str], suite: &str) -> Result<Vec<String>> {
        let memo_path = self.dir.join("closures.json");
        let mut memo: BTreeMap<String, Vec<String>> = read_memo(&memo_path);
        let key = format!("{suite}: {}", roots.join(" "));
        if let Some(names) = memo.get(&key) {
            return Ok(names.clone());
        }
        let out = output_of(
            self.command("apt-cache")
                // Candidates from `suite`, not whichever suite has the highest version.
                .arg("-o")
                .arg(format!("APT::Default-Release={suite}"))
                .args([
                    "depends",
                    "--recurse",
                    "--no-recommends",
                    "--no-suggests",
                    "--no-conflicts",
                    "--no-breaks",
                    "--no-replaces",
                    "--no-enhances",
                ])
                .args(roots),
        )?;
        if !out.status.success() {
            return Err(Error::Apt(format!(
                "apt-cache depends {}: {}",
                roots.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let names = parse_depends_closure(&String::from_utf8_lossy(&out.stdout));
        if let Some(missing) = roots.iter().find(|r| !names.iter().any(|n| n == *r)) {
            return Err(Error::Apt(format!(
                "apt does not know {missing} in {suite}"
            )));
        }
        memo.insert(key, names.clone());
        write_memo(&memo_path, &memo)?;
        Ok(names)
    }

    /// Downloads what is not cached yet, in one apt-get call (a few hundred packages
    /// would otherwise cost a second each); returns the verified local files, in the
    /// order of `debs`.
    pub fn fetch(&self, debs: &[Deb], stats: &mut FetchStats) -> Result<Vec<PathBuf>> {
        let start = Instant::now();
        let dir = debs_dir();
        let partial = dir.join("partial");
        fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut missing = Vec::new();
        for deb in debs {
            let path = dir.join(&deb.filename);
            if path.exists() {
                if verify(&path, deb).is_ok() {
                    stats.cached_bytes += deb.size;
                    continue;
                }
                eprintln!(
                    "debian: cached {} does not match apt's hash; fetching again",
                    deb.filename
                );
                fs::remove_file(&path).map_err(io(&path))?;
            }
            missing.push(deb);
        }
        if !missing.is_empty() {
            let bytes: u64 = missing.iter().map(|d| d.size).sum();
            eprintln!(
                "debian: downloading {} ({:.1} MB)",
                if missing.len() == 1 {
                    missing[0].filename.clone()
                } else {
                    format!("{} packages", missing.len())
                },
                bytes as f64 / 1e6
            );
            for e in fs::read_dir(&partial).map_err(io(&partial))? {
                let _ = fs::remove_file(e.map_err(io(&partial))?.path());
            }
            run(self
                .command("apt-get")
                .args(["-q", "download"])
                .args(missing.iter().map(|d| format!("{}/{}", d.package, d.suite)))
                .current_dir(&partial))?;
            let got: Vec<PathBuf> = fs::read_dir(&partial)
                .map_err(io(&partial))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            for deb in missing {
                // Package names hold no `_`: the prefix names exactly one file.
                let file = got
                    .iter()
                    .find(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n.starts_with(&format!("{}_", deb.package)) && n.ends_with(".deb")
                        })
                    })
                    .ok_or_else(|| {
                        Error::Apt(format!("apt-get download left no file for {}", deb.package))
                    })?;
                verify(file, deb)?;
                let to = dir.join(&deb.filename);
                fs::rename(file, &to).map_err(io(&to))?;
                stats.downloaded_bytes += deb.size;
            }
        }
        stats.seconds += start.elapsed().as_secs_f64();
        Ok(debs.iter().map(|d| dir.join(&d.filename)).collect())
    }
}

/// `<cache>/debs`: the verified package files.
fn debs_dir() -> PathBuf {
    cache_dir().join("debs")
}

fn read_memo<T: serde::de::DeserializeOwned + Default>(path: &Path) -> T {
    fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn write_memo<T: serde::Serialize>(path: &Path, memo: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(memo).expect("a map of strings serialises");
    fs::write(path, text).map_err(io(path))
}

fn verify(path: &Path, deb: &Deb) -> Result<()> {
    let len = fs::metadata(path).map_err(io(path))?.len();
    if len != deb.size {
        return Err(Error::Mismatch {
            path: path.to_path_buf(),
            what: format!("{len} bytes, apt says {}", deb.size),
        });
    }
    let out = run(Command::new("sha256sum").arg(path))?;
    let out = String::from_utf8_lossy(&out.stdout);
    let got = out.split_whitespace().next().unwrap_or_default();
    if !got.eq_ignore_ascii_case(&deb.sha256) {
        return Err(Error::Mismatch {
            path: path.to_path_buf(),
            what: format!("sha256 {got}, apt says {}", deb.sha256),
        });
    }
    Ok(())
}

/// `dpkg -x` every file into `dest`, unless `dest` already holds exactly these files;
/// true when it unpacked.
pub fn unpack(debs: &[PathBuf], dest: &Path) -> Result<bool> {
    let stamp_text: String = debs
        .iter()
        .map(|p| format!("{}\n", p.file_name().unwrap_or_default().to_string_lossy()))
        .collect();
    let stamp = dest.join(".rthooks-unpacked");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        return Ok(false);
    }
    let tmp = dest.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    }
    let tmp_stamp = tmp.join(".rthooks-unpacked");
    fs::write(&tmp_stamp, stamp_text).map_err(io(&tmp_stamp))?;
    let _ = fs::remove_dir_all(dest);
    fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(true)
}

/// A Debian package the e2e harness pins by suite and upstream version prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Package {
    /// Binary package name, e.g. `containerd`.
    pub name: &'static str,
    /// Suite, one of [`E2E_SUITES`].
    pub suite: &'static str,
    /// The upstream version must start with this (e.g. `1.7.24`).
    pub version_prefix: &'static str,
}

/// busybox-static from trixie: the e2e harness's busybox image, and the initramfs's shell.
pub const BUSYBOX_STATIC: Package = Package {
    name: "busybox-static",
    suite: "trixie",
    version_prefix: "1.37",
};

/// Downloads (once, verified) and unpacks (once) `pkg` into
/// `<cache>/userland/<name>-<prefix>-<suite>`; returns that root (holding `usr/bin/...`).
/// An unpacked tree is returned without asking apt or taking the lock: the VM guests
/// see the cache read-only and have no network.
pub fn unpacked(pkg: &Package) -> Result<PathBuf> {
    let cache = cache_dir();
    let dest = cache
        .join("userland")
        .join(format!("{}-{}-{}", pkg.name, pkg.version_prefix, pkg.suite));
    let done = dest.join(".rthooks-complete");
    if done.exists() {
        return Ok(dest);
    }
    let _lock = CacheLock::acquire()?;
    if done.exists() {
        return Ok(dest);
    }
    let suites: Vec<String> = E2E_SUITES.iter().map(|s| s.to_string()).collect();
    let apt = Apt::in_dir(&cache.join("apt-e2e"), &suites)?;
    let deb = apt
        .resolve(&[(pkg.name.to_string(), pkg.suite.to_string())])?
        .remove(0);
    let upstream = deb
        .version
        .split_once(':')
        .map_or(&*deb.version, |(_, v)| v);
    if !upstream.starts_with(pkg.version_prefix) {
        return Err(Error::Apt(format!(
            "{} in {} is {}, not {}*",
            pkg.name, pkg.suite, deb.version, pkg.version_prefix
        )));
    }
    let file = apt.fetch(&[deb], &mut FetchStats::default())?.remove(0);
    unpack(std::slice::from_ref(&file), &dest)?;
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    fs::write(&done, name.as_bytes()).map_err(io(&done))?;
    Ok(dest)
}

/// Finds a file named `name` under an unpacked `root` (packages move binaries between
/// `bin/`, `usr/bin/` and `usr/sbin/` across releases).
pub fn find_file(root: &Path, name: &str) -> Option<PathBuf> {
    for sub in ["usr/bin", "usr/sbin", "bin", "sbin", "usr/libexec"] {
        let p = root.join(sub).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// The package names in `apt-cache depends --recurse` output: unindented lines, less
/// virtual packages (`<name>`), which some real package in the list provides.
pub fn parse_depends_closure(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Lines of `apt-get download --print-uris`: `'URL' FILE SIZE SHA256:HEX`.
pub fn parse_print_uris(text: &str) -> Result<Vec<(String, u64, String)>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('\'')) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, file, size, hash, ..] = fields.as_slice() else {
            return Err(Error::Apt(format!("unexpected apt output line: {line}")));
        };
        let Some(hex) = hash.strip_prefix("SHA256:") else {
            return Err(Error::Apt(format!("apt gave no SHA256 for {file}: {line}")));
        };
        let size = size
            .parse()
            .map_err(|_| Error::Apt(format!("no size in apt output line: {line}")))?;
        out.push((file.to_string(), size, hex.to_string()));
    }
    Ok(out)
}

/// `busybox-static_1%3a1.37.0-6+b9_amd64.deb` → `1:1.37.0-6+b9`.
pub fn version_from_filename(file: &str) -> Result<String> {
    let parts: Vec<&str> = file.trim_end_matches(".deb").split('_').collect();
    let [_, version, _] = parts.as_slice() else {
        return Err(Error::Apt(format!("unexpected package file name {file}")));
    };
    Ok(version.replace("%3a", ":").replace("%3A", ":"))
}

/// The Debian archive and security archive the host itself uses, so nothing in git names
/// a mirror. `RTHOOKS_DEBIAN_MIRROR` / `RTHOOKS_DEBIAN_SECURITY_MIRROR` override them.
fn host_mirrors() -> Result<(String, String)> {
    let mut entries = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => entries.extend(parse_deb822(&text)),
            Some("list") => entries.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    let (main, security) = pick_mirrors(&entries);
    let main = std::env::var("RTHOOKS_DEBIAN_MIRROR").ok().or(main);
    let security = std::env::var("RTHOOKS_DEBIAN_SECURITY_MIRROR")
        .ok()
        .or(security);
    let main = main.ok_or_else(|| {
        Error::Apt(
            "no Debian archive in the host's apt sources; set RTHOOKS_DEBIAN_MIRROR to its URL"
                .into(),
        )
    })?;
    let security = security.unwrap_or_else(|| format!("{}-security", main.trim_end_matches('/')));
    Ok((main, security))
}

/// (URI, suites) of the `deb` entries of a deb822 `.sources` file.
pub fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut types = String::new();
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in stanza.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = v.to_string(),
                "uris" => uris = v.split_whitespace().map(String::from).collect(),
                "suites" => suites = v.split_whitespace().map(String::from).collect(),
                "enabled" => enabled = v != "no",
                _ => {}
            }
        }
        if enabled && types.split_whitespace().any(|t| t == "deb") {
            out.extend(uris.into_iter().map(|u| (u, suites.clone())));
        }
    }
    out
}

/// (URI, [suite]) of the `deb` lines of a one-line-style `.list` file.
pub fn parse_one_line(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push((uri.to_string(), vec![suite.to_string()]));
        }
    }
    out
}

/// The first Debian archive and the first Debian security archive among `entries`.
pub fn pick_mirrors(entries: &[(String, Vec<String>)]) -> (Option<String>, Option<String>) {
    let base = |s: &str| s.split(['-', '/']).next().unwrap_or("").to_string();
    let debian = |suites: &[String]| {
        suites
            .iter()
            .any(|s| DEBIAN_SUITES.contains(&base(s).as_str()))
    };
    let is_security = |suites: &[String]| {
        suites
            .iter()
            .any(|s| s.ends_with("-security") || s.ends_with("/updates"))
    };
    let main = entries
        .iter()
        .find(|(_, s)| debian(s) && !is_security(s))
        .map(|(u, _)| u.trim_end_matches('/').to_string());
    let security = entries
        .iter()
        .find(|(_, s)| debian(s) && is_security(s))
        .map(|(u, _)| u.trim_end_matches('/').to_string());
    (main, security)
}

/// The private sources list: `suites` from `main`, `*-security` ones from `security`.
pub fn sources_list(main: &str, security: &str, suites: &[String]) -> String {
    // This text is also the lists' stamp: any change to it refreshes every cache's lists.
    let mut out = String::from("# Written by cargo xtask vm from the host's apt sources.\n");
    for suite in suites {
        let uri = if suite.ends_with("-security") {
            security
        } else {
            main
        };
        out.push_str(&format!(
            "deb [arch=amd64 signed-by={KEYRING}] {uri} {suite} main\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_closure_keeps_real_packages_once() {
        let text =
            "golang-go\n  Depends: golang-1.26-go\n  Depends: <golang-src>\n    golang-1.26-src\n\
golang-1.26-go\n  Depends: golang-1.26-src\n<golang-src>\ngolang-1.26-src\ngolang-go\n";
        assert_eq!(
            parse_depends_closure(text),
            ["golang-1.26-go", "golang-1.26-src", "golang-go"]
        );
    }

    #[test]
    fn parses_print_uris() {
        let text = "'http://m/debian/pool/main/b/busybox/busybox-static_1%3a1.37.0-6%2bb9_amd64.deb' busybox-static_1%3a1.37.0-6+b9_amd64.deb 955316 SHA256:598a\n\
                    'http://m/x/containerd_2.1.9%2bds1-5_amd64.deb' containerd_2.1.9+ds1-5_amd64.deb 29547080 SHA256:2dda\n";
        let got = parse_print_uris(text).unwrap();
        assert_eq!(
            got[0],
            (
                "busybox-static_1%3a1.37.0-6+b9_amd64.deb".into(),
                955316,
                "598a".into()
            )
        );
        assert_eq!(got[1].1, 29547080);
        assert_eq!(version_from_filename(&got[0].0).unwrap(), "1:1.37.0-6+b9");
        assert_eq!(version_from_filename(&got[1].0).unwrap(), "2.1.9+ds1-5");
        assert!(parse_print_uris("'u' f 12 MD5Sum:aa\n").is_err());
    }

    #[test]
    fn finds_debian_mirrors_in_host_sources() {
        let deb822 = "Types: deb\n# comment\nURIs: http://a/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://a/debian-security\nSuites: bookworm-security\n\n\
                      Types: deb\nURIs: https://vendor/x\nSuites: nodistro\n";
        let (m, s) = pick_mirrors(&parse_deb822(deb822));
        assert_eq!(m.as_deref(), Some("http://a/debian"));
        assert_eq!(s.as_deref(), Some("http://a/debian-security"));
        let one = "deb https://vendor/apt cloud-sdk main\ndeb [arch=amd64] http://b/debian/ trixie main\n# deb http://c/debian sid main\n";
        let (m, s) = pick_mirrors(&parse_one_line(one));
        assert_eq!(m.as_deref(), Some("http://b/debian"));
        assert_eq!(s, None);
    }

    #[test]
    fn sources_list_sends_security_suites_to_the_security_archive() {
        let l = sources_list(
            "http://a/debian",
            "http://a/debian-security",
            &["sid".into(), "bookworm-security".into()],
        );
        assert!(l.contains("] http://a/debian sid main\n"));
        assert!(l.contains("] http://a/debian-security bookworm-security main\n"));
    }

    #[test]
    fn unpack_is_skipped_when_the_stamp_matches() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        fs::create_dir_all(&dest).unwrap();
        fs::write(dest.join(".rthooks-unpacked"), "a_1_amd64.deb\n").unwrap();
        assert!(!unpack(&[PathBuf::from("/nonexistent/a_1_amd64.deb")], &dest).unwrap());
    }
}
