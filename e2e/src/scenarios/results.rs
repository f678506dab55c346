//! The one results writer: JSON lines in the format of `vm/README.md` (a plan line
//! first, then `scenario, runtime, result, reason, detail, seconds, enforcement_mode,
//! uname` per scenario).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;

/// A scenario's verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// "pass", "fail" or "skip".
    pub result: &'static str,
    /// Why (fail/skip).
    pub reason: String,
    /// What was seen.
    pub detail: String,
}

impl Verdict {
    pub(super) fn pass(detail: impl Into<String>) -> Self {
        Verdict {
            result: "pass",
            reason: String::new(),
            detail: detail.into(),
        }
    }
    pub(super) fn fail(reason: impl Into<String>) -> Self {
        Verdict {
            result: "fail",
            reason: reason.into(),
            detail: String::new(),
        }
    }
    pub(super) fn skip(reason: impl Into<String>) -> Self {
        Verdict {
            result: "skip",
            reason: reason.into(),
            detail: String::new(),
        }
    }
    /// With what was seen beside the reason.
    pub(super) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// The running kernel's release, for every line.
pub(super) fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The results file scenarios append their lines to.
pub(super) struct Results {
    file: PathBuf,
}

impl Results {
    pub(super) fn new(file: &Path) -> Self {
        Results {
            file: file.to_path_buf(),
        }
    }

    /// The directory the file is in (failed scenarios keep their logs below it).
    pub(super) fn dir(&self) -> Option<&Path> {
        self.file.parent()
    }

    pub(super) fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)?;
        writeln!(f, "{v}")?;
        Ok(())
    }
}

/// A scenario's result line.
pub(super) fn line(
    scenario: &str,
    runtime: &str,
    v: &Verdict,
    secs: f64,
    mode: &str,
    uname: &str,
) -> serde_json::Value {
    json!({
        "scenario": scenario, "runtime": runtime, "result": v.result, "reason": v.reason,
        "detail": v.detail, "seconds": (secs * 100.0).round() / 100.0,
        "enforcement_mode": mode, "uname": uname,
    })
}
