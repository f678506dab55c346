//! `vm/kernels.toml`: the kernel matrix and the guest userland.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(rename = "kernel", default)]
    pub kernels: Vec<Kernel>,
    #[serde(rename = "userland", default)]
    pub userland: Vec<Userland>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// The matrix's name for it (`--kernel`, the `kernel` field of the results).
    pub name: String,
    /// Debian suite, e.g. `bookworm`, `trixie-backports`, `sid`.
    pub suite: String,
    /// The image package, or (7.x) the `linux-binary-*` and `linux-modules-*` pair.
    pub packages: Vec<String>,
    /// Extra kernel command line.
    #[serde(default)]
    pub append: String,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Userland {
    pub name: String,
    pub suite: String,
    pub packages: Vec<String>,
    /// The resolved version must start with this, so a suite moving on is noticed
    /// instead of silently testing another release.
    #[serde(default)]
    pub version_prefix: Option<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for k in &self.kernels {
            if !seen.insert(k.name.as_str()) {
                bail!("kernel {:?} is listed twice", k.name);
            }
            if k.packages.is_empty() {
                bail!("kernel {:?} has no packages", k.name);
            }
            check_suite(&k.suite)?;
        }
        if self.kernels.iter().filter(|k| k.default).count() > 1 {
            bail!("more than one kernel has default = true");
        }
        let mut seen = std::collections::HashSet::new();
        for u in &self.userland {
            if !seen.insert(u.name.as_str()) {
                bail!("userland {:?} is listed twice", u.name);
            }
            if u.packages.is_empty() {
                bail!("userland {:?} has no packages", u.name);
            }
            check_suite(&u.suite)?;
        }
        Ok(())
    }

    /// The kernels named on the command line, all of them, or the default one.
    pub fn select(&self, names: &[String], all: bool) -> Result<Vec<Kernel>> {
        if all {
            return Ok(self.kernels.clone());
        }
        if names.is_empty() {
            let k = self
                .kernels
                .iter()
                .find(|k| k.default)
                .or_else(|| self.kernels.first())
                .context("kernels.toml lists no kernel")?;
            return Ok(vec![k.clone()]);
        }
        names
            .iter()
            .map(|n| {
                self.kernels
                    .iter()
                    .find(|k| &k.name == n)
                    .cloned()
                    .with_context(|| {
                        let known: Vec<&str> =
                            self.kernels.iter().map(|k| k.name.as_str()).collect();
                        format!(
                            "unknown kernel {n:?}; kernels.toml has {}",
                            known.join(", ")
                        )
                    })
            })
            .collect()
    }

    /// Every suite any entry needs, in first-use order.
    pub fn suites(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let all = self
            .kernels
            .iter()
            .map(|k| &k.suite)
            .chain(self.userland.iter().map(|u| &u.suite));
        for s in all {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }
}

fn check_suite(suite: &str) -> Result<()> {
    if suite.is_empty() || !suite.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        bail!("bad suite name {suite:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[kernel]]
name = "5.10"
suite = "bullseye"
packages = ["linux-image-5.10.0-32-amd64"]

[[kernel]]
name = "5.10-lsm-bpf"
suite = "bullseye"
packages = ["linux-image-5.10.0-32-amd64"]
append = "lsm=lockdown,capability,yama,apparmor,bpf"

[[kernel]]
name = "7.2"
suite = "sid"
packages = ["linux-binary-7.2.13+deb14-amd64", "linux-modules-7.2.13+deb14-amd64"]
default = true

[[userland]]
name = "containerd-2.1"
suite = "sid"
packages = ["containerd"]
version_prefix = "2.1.9"
"#;

    #[test]
    fn parses_kernels_and_userland() {
        let c = Config::parse(SAMPLE).unwrap();
        assert_eq!(c.kernels.len(), 3);
        assert_eq!(
            c.kernels[1].append,
            "lsm=lockdown,capability,yama,apparmor,bpf"
        );
        assert_eq!(c.kernels[0].append, "");
        assert_eq!(c.kernels[2].packages.len(), 2);
        assert_eq!(c.userland[0].version_prefix.as_deref(), Some("2.1.9"));
        assert_eq!(c.suites(), ["bullseye", "sid"]);
    }

    #[test]
    fn selects_default_named_or_all() {
        let c = Config::parse(SAMPLE).unwrap();
        assert_eq!(c.select(&[], false).unwrap()[0].name, "7.2");
        assert_eq!(c.select(&[], true).unwrap().len(), 3);
        let picked = c
            .select(&["5.10-lsm-bpf".into(), "5.10".into()], false)
            .unwrap();
        assert_eq!(picked[0].name, "5.10-lsm-bpf");
        assert_eq!(picked[1].name, "5.10");
        let err = c.select(&["9.9".into()], false).unwrap_err().to_string();
        assert!(err.contains("unknown kernel \"9.9\""), "{err}");
    }

    #[test]
    fn rejects_mistakes() {
        assert!(
            Config::parse("[[kernel]]\nname = \"a\"\nsuite = \"sid\"\npackages = []\n").is_err()
        );
        assert!(
            Config::parse("[[kernel]]\nname = \"a\"\nsuite = \"s id\"\npackages = [\"x\"]\n")
                .is_err()
        );
        assert!(Config::parse(
            "[[kernel]]\nname = \"a\"\nsuite = \"sid\"\npackages = [\"x\"]\nbogus = 1\n"
        )
        .is_err());
        let twice = "[[kernel]]\nname = \"a\"\nsuite = \"sid\"\npackages = [\"x\"]\n".repeat(2);
        assert!(Config::parse(&twice).is_err());
    }

    #[test]
    fn the_real_matrix_parses_and_covers_the_issue() {
        let path = crate::util::workspace_root().join("vm/kernels.toml");
        let c = Config::load(&path).unwrap();
        let names: Vec<&str> = c.kernels.iter().map(|k| k.name.as_str()).collect();
        for want in ["5.10", "5.10-lsm-bpf", "6.1", "6.12"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(names.iter().any(|n| n.starts_with("6.1")
            && n.len() == 4
            && n[2..].parse::<u32>().is_ok_and(|m| (16..=19).contains(&m))));
        assert!(names.iter().any(|n| n.starts_with("7.")));
        assert!(c.kernels.iter().any(|k| k.append.contains("bpf")));
        assert_eq!(c.select(&[], false).unwrap()[0].name, "6.12");
    }
}
