use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// `~/.cache/rthooks` (or `$RTHOOKS_CACHE`): downloads and tools kept outside git. Defined
/// once, in the test kit, where the tests look for what xtask built.
pub use rthooks_testkit::cache_dir;

/// Runs a command, inheriting stdio; fails with the command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// `cargo <args>` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(workspace_root()))
}

/// Runs a command and returns its stdout, or `None` when it cannot run or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `$CARGO_TARGET_DIR` (relative to the workspace root) or `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The 1-, 5- and 15-minute load averages, for a benchmark's report.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `p` quantile of `sorted`: the element at `len * p` (None when empty).
pub fn quantile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(last))
        .copied()
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` on a hybrid host, else
/// `/sys/fs/cgroup`.
pub fn cgroup_v2_root() -> &'static std::path::Path {
    let unified = std::path::Path::new("/sys/fs/cgroup/unified");
    if unified.is_dir() {
        unified
    } else {
        std::path::Path::new("/sys/fs/cgroup")
    }
}

/// One test executable cargo built: its target's name (`enforcement` for
/// `agent/tests/enforcement.rs`, the crate name for unit tests) and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    pub name: String,
    pub executable: PathBuf,
}

/// Builds the test executables `cargo test --no-run <args>` selects and returns them, as
/// cargo's JSON messages name them: the `executable` of each `compiler-artifact` with
/// `profile.test`. The deps directory holds one file per build of a test (other feature
/// sets, older sources), so the newest file there need not be this build's. Diagnostics
/// still reach the terminal (`json-render-diagnostics`).
pub fn test_binaries(args: &[&str]) -> Result<Vec<TestBinary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .args(args)
    .current_dir(workspace_root())
    .stderr(std::process::Stdio::inherit());
    let out = cmd
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    test_binaries_in(&String::from_utf8_lossy(&out.stdout))
}

/// The test executables in cargo's JSON messages (one object a line).
fn test_binaries_in(messages: &str) -> Result<Vec<TestBinary>> {
    let mut found = Vec::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let m: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo message {line}"))?;
        if m["reason"] != "compiler-artifact" || m["profile"]["test"] != true {
            continue;
        }
        let Some(executable) = m["executable"].as_str() else {
            continue;
        };
        found.push(TestBinary {
            name: m["target"]["name"].as_str().unwrap_or_default().to_string(),
            executable: PathBuf::from(executable),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_binaries_are_the_test_profile_artifacts_with_an_executable() {
        // Shaped as cargo 1.95 prints them (fields trimmed).
        let messages = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/agent#rthooks-agent@0.1.0","target":{"kind":["lib"],"crate_types":["lib"],"name":"rthooks_agent"},"profile":{"test":false},"executable":null,"fresh":true}
{"reason":"compiler-artifact","target":{"kind":["test"],"crate_types":["bin"],"name":"enforcement"},"profile":{"test":true},"executable":"/w/target/debug/deps/enforcement-1f2e","fresh":false}
{"reason":"compiler-artifact","target":{"kind":["bin"],"crate_types":["bin"],"name":"rthooksctl"},"profile":{"test":false},"executable":"/w/target/debug/rthooksctl","fresh":true}
{"reason":"compiler-artifact","target":{"kind":["lib"],"crate_types":["lib"],"name":"rthooks_agent"},"profile":{"test":true},"executable":"/w/target/debug/deps/rthooks_agent-aa01","fresh":true}
{"reason":"build-finished","success":true}
"#;
        assert_eq!(
            test_binaries_in(messages).unwrap(),
            [
                TestBinary {
                    name: "enforcement".into(),
                    executable: "/w/target/debug/deps/enforcement-1f2e".into(),
                },
                TestBinary {
                    name: "rthooks_agent".into(),
                    executable: "/w/target/debug/deps/rthooks_agent-aa01".into(),
                },
            ]
        );
        assert!(test_binaries_in("{not json\n").is_err());
    }
}
