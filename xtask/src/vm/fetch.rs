//! Debian packages through a private apt configuration under `~/.cache/rthooks/apt`:
//! the host's own apt state is never read or changed, and no root privileges beyond
//! writing the cache are needed.
//!
//! Every `.deb` is checked against the SHA-256 apt's signed metadata gives for it, both
//! when it is downloaded and when a cached copy is reused; unpacked trees carry a stamp
//! naming the exact files they came from.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::util::cache_dir;

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

/// An exclusive `flock` on `<cache>/apt.lock`, the lock the e2e crate's fetcher takes
/// too: both download into `<cache>/debs`, and neither may replace a file the other is
/// writing or verifying.
pub struct CacheLock {
    _lock: Flock<std::fs::File>,
}

impl CacheLock {
    pub fn acquire() -> Result<Self> {
        std::fs::create_dir_all(cache_dir())?;
        Self::at(&cache_dir().join("apt.lock"), "another fetch is running")
    }

    /// Blocks until `path` is locked, saying why when it has to wait.
    pub fn at(path: &Path, holder: &str) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let flock_err = |e| anyhow::anyhow!("flock {}: {e}", path.display());
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, Errno::EWOULDBLOCK)) => {
                eprintln!("vm: waiting for {} ({holder})", path.display());
                Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| flock_err(e))?
            }
            Err((_, e)) => return Err(flock_err(e)),
        };
        Ok(CacheLock { _lock: lock })
    }
}

/// One resolved package file, as apt's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deb {
    pub package: String,
    pub suite: String,
    pub filename: String,
    pub version: String,
    pub size: u64,
    pub sha256: String,
}

pub struct Apt {
    dir: PathBuf,
    updated: std::cell::Cell<bool>,
}

/// What a fetch did, for the progress report.
#[derive(Debug, Default, Clone, Copy)]
pub struct FetchStats {
    pub downloaded_bytes: u64,
    pub cached_bytes: u64,
    pub seconds: f64,
}

impl Apt {
    /// Writes the private sources list for `suites` and refreshes the package lists when
    /// they are missing or the list changed.
    pub fn new(suites: &[String]) -> Result<Self> {
        let dir = cache_dir().join("apt");
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
        ] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        if !Path::new(KEYRING).exists() {
            bail!("{KEYRING} is missing (Debian package debian-archive-keyring)");
        }
        let (main, security) = host_mirrors()?;
        let list = sources_list(&main, &security, suites);
        std::fs::write(dir.join("etc/sources.list"), &list)?;
        let apt = Apt {
            dir,
            updated: std::cell::Cell::new(false),
        };
        let stamp = apt.dir.join("lists.stamp");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(list.as_str()) {
            apt.update()?;
            std::fs::write(&stamp, &list)?;
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

    pub fn update(&self) -> Result<()> {
        eprintln!(
            "vm: refreshing the private apt lists ({})",
            self.dir.display()
        );
        let out = self
            .command("apt-get")
            .args(["-q", "update"])
            .output()
            .context("running apt-get update")?;
        let err = String::from_utf8_lossy(&out.stderr);
        // apt-get update exits 0 even when a suite could not be fetched.
        if !out.status.success()
            || err
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W: Failed"))
        {
            bail!("apt-get update failed:\n{err}");
        }
        let _ = std::fs::remove_file(self.dir.join("resolved.json"));
        let _ = std::fs::remove_file(self.dir.join("closures.json"));
        self.updated.set(true);
        Ok(())
    }

    /// Resolves `package/suite` pairs to files, refreshing the lists once when apt does
    /// not know a package (the lists may predate a suite's newest upload).
    pub fn resolve(&self, wanted: &[(String, String)]) -> Result<Vec<Deb>> {
        match self.resolve_once(wanted) {
            Ok(debs) => Ok(debs),
            Err(e) if !self.updated.get() => {
                eprintln!("vm: {e:#}; refreshing the lists and trying again");
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
        let mut memo: std::collections::BTreeMap<String, (String, u64, String)> =
            std::fs::read_to_string(&memo_path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
        let key = |p: &str, s: &str| format!("{p}/{s}");
        if !wanted.iter().all(|(p, s)| memo.contains_key(&key(p, s))) {
            for (deb, (p, s)) in self.ask_apt(wanted)?.into_iter().zip(wanted) {
                memo.insert(key(p, s), (deb.filename, deb.size, deb.sha256));
            }
            std::fs::write(&memo_path, serde_json::to_string_pretty(&memo)?)?;
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
        let out = cmd
            .output()
            .context("running apt-get download --print-uris")?;
        if !out.status.success() {
            bail!(
                "apt cannot resolve {}: {}",
                wanted
                    .iter()
                    .map(|(p, s)| format!("{p}/{s}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let printed = parse_print_uris(&String::from_utf8_lossy(&out.stdout))?;
        wanted
            .iter()
            .map(|(package, suite)| {
                let (filename, size, sha256) = printed
                    .iter()
                    .find(|(f, _, _)| f.starts_with(&format!("{package}_")))
                    .with_context(|| format!("apt printed no file for {package}/{suite}"))?;
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
        let mut memo: std::collections::BTreeMap<String, Vec<String>> =
            std::fs::read_to_string(&memo_path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
        let key = format!("{suite}: {}", roots.join(" "));
        if let Some(names) = memo.get(&key) {
            return Ok(names.clone());
        }
        let out = self
            .command("apt-cache")
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
            .args(roots)
            .output()
            .context("running apt-cache depends")?;
        if !out.status.success() {
            bail!(
                "apt-cache depends {}: {}",
                roots.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let names = parse_depends_closure(&String::from_utf8_lossy(&out.stdout));
        if let Some(missing) = roots.iter().find(|r| !names.iter().any(|n| n == *r)) {
            bail!("apt does not know {missing} in {suite}");
        }
        memo.insert(key, names.clone());
        std::fs::write(&memo_path, serde_json::to_string_pretty(&memo)?)?;
        Ok(names)
    }

    /// Downloads what is not cached yet, in one apt-get call (a few hundred packages
    /// would otherwise cost a second each); returns the verified local files, in the
    /// order of `debs`.
    pub fn fetch(&self, debs: &[Deb], stats: &mut FetchStats) -> Result<Vec<PathBuf>> {
        let start = Instant::now();
        let dir = cache_dir().join("debs");
        let partial = dir.join("partial");
        std::fs::create_dir_all(&partial)?;
        let mut missing = Vec::new();
        for deb in debs {
            let path = dir.join(&deb.filename);
            if path.exists() {
                if verify(&path, deb).is_ok() {
                    stats.cached_bytes += deb.size;
                    continue;
                }
                eprintln!(
                    "vm: cached {} does not match apt's hash; fetching again",
                    deb.filename
                );
                std::fs::remove_file(&path)?;
            }
            missing.push(deb);
        }
        if !missing.is_empty() {
            let bytes: u64 = missing.iter().map(|d| d.size).sum();
            eprintln!(
                "vm: downloading {} ({:.1} MB)",
                if missing.len() == 1 {
                    missing[0].filename.clone()
                } else {
                    format!("{} packages", missing.len())
                },
                bytes as f64 / 1e6
            );
            for e in std::fs::read_dir(&partial)? {
                let _ = std::fs::remove_file(e?.path());
            }
            let out = self
                .command("apt-get")
                .args(["-q", "download"])
                .args(missing.iter().map(|d| format!("{}/{}", d.package, d.suite)))
                .current_dir(&partial)
                .output()
                .context("running apt-get download")?;
            if !out.status.success() {
                bail!(
                    "apt-get download {} failed: {}",
                    missing
                        .iter()
                        .map(|d| d.package.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let got: Vec<PathBuf> = std::fs::read_dir(&partial)?
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
                    .with_context(|| {
                        format!("apt-get download left no file for {}", deb.package)
                    })?;
                verify(file, deb)?;
                std::fs::rename(file, dir.join(&deb.filename))?;
                stats.downloaded_bytes += deb.size;
            }
        }
        stats.seconds += start.elapsed().as_secs_f64();
        Ok(debs.iter().map(|d| dir.join(&d.filename)).collect())
    }
}

fn verify(path: &Path, deb: &Deb) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    if len != deb.size {
        bail!("{}: {len} bytes, apt says {}", path.display(), deb.size);
    }
    let out = crate::util::output(Command::new("sha256sum").arg(path))
        .with_context(|| format!("sha256sum {}", path.display()))?;
    let got = out.split_whitespace().next().unwrap_or_default();
    if !got.eq_ignore_ascii_case(&deb.sha256) {
        bail!("{}: sha256 {got}, apt says {}", path.display(), deb.sha256);
    }
    Ok(())
}

/// `dpkg -x` every file into `dest`, unless `dest` already holds exactly these files.
pub fn unpack(debs: &[PathBuf], dest: &Path) -> Result<bool> {
    let stamp_text: String = debs
        .iter()
        .map(|p| format!("{}\n", p.file_name().unwrap().to_string_lossy()))
        .collect();
    let stamp = dest.join(".rthooks-unpacked");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str()) {
        return Ok(false);
    }
    let tmp = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for deb in debs {
        crate::util::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    }
    std::fs::write(tmp.join(".rthooks-unpacked"), stamp_text)?;
    let _ = std::fs::remove_dir_all(dest);
    std::fs::rename(&tmp, dest)?;
    Ok(true)
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
            bail!("unexpected apt output line: {line}");
        };
        let Some(hex) = hash.strip_prefix("SHA256:") else {
            bail!("apt gave no SHA256 for {file}: {line}");
        };
        out.push((
            file.to_string(),
            size.parse().with_context(|| format!("size in {line}"))?,
            hex.to_string(),
        ));
    }
    Ok(out)
}

/// `busybox-static_1%3a1.37.0-6+b9_amd64.deb` → `1:1.37.0-6+b9`.
pub fn version_from_filename(file: &str) -> Result<String> {
    let parts: Vec<&str> = file.trim_end_matches(".deb").split('_').collect();
    let [_, version, _] = parts.as_slice() else {
        bail!("unexpected package file name {file}");
    };
    Ok(version.replace("%3a", ":").replace("%3A", ":"))
}

/// The Debian archive and security archive the host itself uses, so nothing in git names
/// a mirror. `RTHOOKS_DEBIAN_MIRROR` / `RTHOOKS_DEBIAN_SECURITY_MIRROR` override them.
fn host_mirrors() -> Result<(String, String)> {
    let mut entries = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
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
    let main = main.context(
        "no Debian archive in the host's apt sources; set RTHOOKS_DEBIAN_MIRROR to its URL",
    )?;
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

pub fn sources_list(main: &str, security: &str, suites: &[String]) -> String {
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
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join(".rthooks-unpacked"), "a_1_amd64.deb\n").unwrap();
        assert!(!unpack(&[PathBuf::from("/nonexistent/a_1_amd64.deb")], &dest).unwrap());
    }
}
