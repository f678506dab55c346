//! The invocation log: JSON lines in a size-rotated file.
//!
//! Runtimes swallow a hook's stderr unless it fails, so every invocation leaves one line
//! here. Many hook processes run at once (a node starting dozens of pods), hence:
//! each line is one `write(2)` on an `O_APPEND` descriptor (the kernel serialises appends
//! to a regular file, so lines never interleave), and rotation happens under an exclusive
//! `flock` on a side lock file with the size re-checked after taking it, so two processes
//! cannot both rotate and lose a generation.
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Log levels, Go slog names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "debug" | "trace" => Some(Level::Debug),
            "info" | "" => Some(Level::Info),
            "warn" | "warning" => Some(Level::Warn),
            "error" => Some(Level::Error),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// A size-rotated log file (`path`, `path.1` … `path.<backups>`).
#[derive(Debug, Clone)]
pub struct LogFile {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub backups: u32,
}

impl LogFile {
    pub fn new(path: impl Into<PathBuf>, max_bytes: u64, backups: u32) -> Self {
        LogFile {
            path: path.into(),
            max_bytes: max_bytes.max(4096),
            backups,
        }
    }

    /// Appends one line (a trailing newline is added).
    pub fn append(&self, line: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if let Ok(md) = std::fs::metadata(&self.path) {
            if md.len() + buf.len() as u64 > self.max_bytes {
                self.rotate(buf.len() as u64)?;
            }
        }
        let mut f = match self.open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = self.path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                self.open()?
            }
            r => r?,
        };
        // One write call for the whole line; see the module comment.
        let n = f.write(&buf)?;
        if n != buf.len() {
            f.write_all(&buf[n..])?;
        }
        Ok(())
    }

    fn open(&self) -> io::Result<File> {
        OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&self.path)
    }

    fn backup(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn lock_path(&self) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(".lock");
        PathBuf::from(s)
    }

    fn rotate(&self, incoming: u64) -> io::Result<()> {
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(self.lock_path())?;
        // Dropping it unlocks and closes the file.
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io::Error::from(errno))?;
        // Someone else may have rotated while we waited for the lock.
        let still_big = std::fs::metadata(&self.path)
            .map(|m| m.len() + incoming > self.max_bytes)
            .unwrap_or(false);
        if still_big {
            if self.backups == 0 {
                remove_if_exists(&self.path)?;
            } else {
                for i in (1..self.backups).rev() {
                    rename_if_exists(&self.backup(i), &self.backup(i + 1))?;
                }
                rename_if_exists(&self.path, &self.backup(1))?;
            }
        }
        drop(lock);
        Ok(())
    }
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// RFC 3339 UTC timestamp with microseconds, without a date library.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_micros())
}

pub fn rfc3339(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(
            rfc3339(1_795_000_000, 123_456),
            "2026-11-18T11:06:40.123456Z"
        );
    }

    #[test]
    fn levels() {
        assert_eq!(Level::parse("WARN"), Some(Level::Warn));
        assert_eq!(Level::parse("nope"), None);
        assert!(Level::Debug < Level::Error);
    }

    #[test]
    fn creates_dir_and_rotates() {
        let d = tempfile::tempdir().unwrap();
        let log = LogFile::new(d.path().join("sub/hook.log"), 4096, 2);
        let line = "x".repeat(1000);
        for _ in 0..20 {
            log.append(&line).unwrap();
        }
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(log.path.clone()) <= 4096);
        assert!(size(log.backup(1)) > 0);
        assert!(size(log.backup(2)) > 0);
        assert!(!log.backup(3).exists());
    }

    #[test]
    fn zero_backups_truncates_by_removal() {
        let d = tempfile::tempdir().unwrap();
        let log = LogFile::new(d.path().join("hook.log"), 4096, 0);
        for _ in 0..20 {
            log.append(&"y".repeat(1000)).unwrap();
        }
        assert!(std::fs::metadata(&log.path).unwrap().len() <= 4096);
        assert!(!log.backup(1).exists());
    }

    #[test]
    fn concurrent_writers_do_not_lose_or_interleave_lines() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("hook.log");
        // Large enough that nothing rotates away: every line must be found.
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = LogFile::new(path.clone(), 64 << 20, 3);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let line = format!(
                            "{{\"t\":{t},\"i\":{i},\"pad\":\"{}\"}}",
                            "p".repeat(300 + t * 50)
                        );
                        log.append(&line).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1600);
        for l in lines {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }

    #[test]
    fn concurrent_rotation_keeps_lines_whole() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("hook.log");
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let log = LogFile::new(path.clone(), 16 << 10, 50);
                std::thread::spawn(move || {
                    for i in 0..150 {
                        log.append(&format!(
                            "{{\"t\":{t},\"i\":{i},\"p\":\"{}\"}}",
                            "q".repeat(200)
                        ))
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut total = 0;
        for entry in std::fs::read_dir(d.path()).unwrap() {
            let p = entry.unwrap().path();
            if p.extension().is_some_and(|e| e == "lock") {
                continue;
            }
            for l in std::fs::read_to_string(&p).unwrap().lines() {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
                total += 1;
            }
        }
        assert_eq!(total, 900, "50 backups are enough to keep every line");
    }
}
