//! One hook invocation, from argv to exit code.
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::config::{Config, Parsed};
use crate::error::Error;
use crate::log::{Level, LogFile};
use crate::policy::FailurePolicy;
use crate::{agent, state};
use rthooks_container::{labels, CgroupPath, CgroupsPath, ContainerIdentity};

/// The OCI hook stages this binary accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    CreateRuntime,
    CreateContainer,
    Poststop,
}

impl Stage {
    pub fn parse(s: &str) -> Result<Stage, String> {
        match s {
            "createRuntime" => Ok(Stage::CreateRuntime),
            "createContainer" => Ok(Stage::CreateContainer),
            "poststop" => Ok(Stage::Poststop),
            other => Err(format!(
                "rthooks-oci-hook: unsupported hook stage {other:?}: expected createRuntime (registers the container), \
                 createContainer or poststop; a container created with this hook is NOT registered"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::Poststop => "poststop",
        }
    }
}

/// What the process should do at exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: i32,
    pub stdout: Option<String>,
    /// One line for the runtime's error message when the container is refused.
    pub stderr: Option<String>,
    /// The log line written (or that would have been), for tests.
    pub log_line: Value,
}

/// Runs one invocation. `stdin` is the runtime's state JSON, `cwd` the working directory.
pub fn run(parsed: Parsed, stdin: impl Read, cwd: Option<PathBuf>) -> Outcome {
    let start = Instant::now();
    let c = &parsed.config;
    let mut warnings = parsed.warnings.clone();
    let level_threshold = Level::parse(&c.log_level).unwrap_or_else(|| {
        warnings.push(format!("unknown --log-level {:?}, using info", c.log_level));
        Level::Info
    });
    if parsed.just_print_config {
        // The failure rule is only compiled when a container fails (compiling a CEL
        // expression costs about a millisecond, half of a registration); here is where
        // an admin learns that it does not compile.
        warnings.extend(policy_warnings(c).1);
        let mut out = c.to_json();
        out.push('\n');
        let stderr = (!warnings.is_empty()).then(|| warnings.join("\n"));
        return Outcome {
            exit_code: i32::from(stderr.is_some()),
            stdout: Some(out),
            stderr,
            log_line: Value::Null,
        };
    }

    let mut line = Map::new();
    line.insert("time".into(), json!(crate::log::rfc3339_now()));
    let stage = match parsed.stage.as_deref().map(Stage::parse) {
        Some(Ok(s)) => s,
        unusable => {
            let e = match unusable {
                Some(Err(e)) => e,
                _ => "rthooks-oci-hook: missing hook stage argument (createRuntime, createContainer or poststop)"
                    .to_owned(),
            };
            return finish(
                c,
                line,
                start,
                Level::Error,
                level_threshold,
                "error",
                &e,
                warnings,
                2,
                Some(e.clone()),
            );
        }
    };
    line.insert("stage".into(), json!(stage.as_str()));

    match stage {
        Stage::CreateContainer => finish(
            c,
            line,
            start,
            Level::Info,
            level_threshold,
            "nothing-to-do",
            "createContainer needs no action",
            warnings,
            0,
            None,
        ),
        Stage::Poststop => poststop(c, stdin, line, start, level_threshold, warnings),
        Stage::CreateRuntime => {
            create_runtime(c, stdin, cwd, line, start, level_threshold, warnings)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn policy_warnings(c: &Config) -> (FailurePolicy, Vec<String>) {
    let (policy, errors) = FailurePolicy::from_config(c);
    let w = errors
        .iter()
        .map(|e| format!("{e}; using the allow lists instead"))
        .collect();
    (policy, w)
}

#[allow(clippy::too_many_arguments)]
fn create_runtime(
    c: &Config,
    stdin: impl Read,
    cwd: Option<PathBuf>,
    mut line: Map<String, Value>,
    start: Instant,
    threshold: Level,
    mut warnings: Vec<String>,
) -> Outcome {
    let (st, state_err) = match state::read_state(stdin) {
        Ok(s) => (s, None),
        Err(e) => (None, Some(e)),
    };
    let bundle = state::load_bundle(st.as_ref(), cwd.as_deref());
    let annotations: HashMap<String, String> = match &bundle {
        Ok(b) => b.spec.annotations.clone(),
        Err(_) => st
            .as_ref()
            .map(|s| s.annotations.clone())
            .unwrap_or_default(),
    };
    let state_id = st.as_ref().and_then(|s| s.id.as_deref());
    let resolved = bundle
        .as_ref()
        .ok()
        .map(|b| match b.spec.cgroups_path.as_deref() {
            None | Some("") => Err(Error::NoCgroupsPath),
            Some(p) => CgroupsPath::parse(p)
                .map(|p| p.dir())
                .map_err(Error::CgroupsPath),
        });
    let cg: Option<&CgroupPath> = resolved.as_ref().and_then(|r| r.as_ref().ok());
    let identity = ContainerIdentity {
        container_id: state_id.unwrap_or_default().to_owned(),
        ..Default::default()
    }
    .complete(&annotations, cg, &c.annotations_namespace_key);
    add_identity(&mut line, &identity);
    // The agent decides whether it believes the labels; a bad annotation is worth a
    // warning here, where the container's log is.
    if let Some(Err(e)) = labels::from_annotations(&annotations) {
        warnings.push(e.to_string());
    }
    if let Some(cg) = cg {
        line.insert("cgroups_path".into(), json!(cg.as_str()));
    }
    if let Ok(b) = &bundle {
        line.insert("config".into(), json!(b.config_path));
        line.insert("root_dir".into(), json!(b.root_dir));
        if let Some(e) = &b.strict_parse_error {
            warnings.push(format!(
                "oci-spec rejected {} ({e}); read it leniently",
                b.config_path.display()
            ));
        }
    }
    if threshold <= Level::Debug {
        line.insert("annotations".into(), json!(annotations));
    }

    // The first problem that stops us from registering, if any.
    let input_error: Option<String> = match (&bundle, &resolved) {
        (Err(e), _) => Some(match &state_err {
            Some(se) => format!("{se}; and {e}"),
            None => e.to_string(),
        }),
        (Ok(_), Some(Err(e))) => Some(e.to_string()),
        _ => {
            if let Some(se) = &state_err {
                warnings.push(format!(
                    "{se}; found config.json in the working directory instead"
                ));
            }
            None
        }
    };

    let ready = match (&bundle, cg) {
        (Ok(b), Some(cg)) => Some((b, cg)),
        _ => None,
    };
    let error = match (input_error, ready) {
        (Some(e), _) => e,
        (None, None) => "no bundle or cgroup path".to_owned(),
        (None, Some((bundle, cg))) => {
            if c.disable_grpc {
                return finish(
                    c,
                    line,
                    start,
                    Level::Info,
                    threshold,
                    "not-sent",
                    "--disable-grpc is set; the agent was not contacted",
                    warnings,
                    0,
                    None,
                );
            }
            let req = agent::create_container_request(bundle, cg, &identity, &annotations);
            tracing::debug!(address = %c.grpc_address, cgroup = %cg, id = %identity.container_id, "calling RuntimeHook");
            let t = Instant::now();
            let r = agent::runtime_hook(&c.grpc_address, c.grpc_timeout, req);
            line.insert("agent_ms".into(), json!(ms(t.elapsed())));
            match r {
                Ok(()) => {
                    return finish(
                        c,
                        line,
                        start,
                        Level::Info,
                        threshold,
                        "registered",
                        "the agent registered the container",
                        warnings,
                        0,
                        None,
                    )
                }
                Err(e) => e.to_string(),
            }
        }
    };
    line.insert("error".into(), json!(error));
    let (policy, policy_warnings) = policy_warnings(c);
    warnings.extend(policy_warnings);
    let d = policy.decide(&annotations);
    if d.fail {
        let who = if identity.container_id.is_empty() {
            "container".to_owned()
        } else {
            format!("container {}", identity.container_id)
        };
        let msg = format!(
            "rthooks-oci-hook: refusing {who}: {error}; {} (log: {})",
            d.reason,
            c.log_fname.display()
        );
        finish(
            c,
            line,
            start,
            Level::Error,
            threshold,
            "refused",
            &d.reason,
            warnings,
            1,
            Some(msg),
        )
    } else {
        finish(
            c,
            line,
            start,
            Level::Warn,
            threshold,
            "allowed-unregistered",
            &d.reason,
            warnings,
            0,
            None,
        )
    }
}

fn poststop(
    c: &Config,
    stdin: impl Read,
    mut line: Map<String, Value>,
    start: Instant,
    threshold: Level,
    warnings: Vec<String>,
) -> Outcome {
    // Best effort: the container is gone either way, and the agent also reaps cgroups
    // that disappear.
    let id = state::read_state(stdin).ok().flatten().and_then(|s| s.id);
    let Some(id) = id else {
        return finish(
            c,
            line,
            start,
            Level::Info,
            threshold,
            "nothing-to-do",
            "no container id in the state",
            warnings,
            0,
            None,
        );
    };
    line.insert("container_id".into(), json!(id));
    if c.disable_grpc {
        return finish(
            c,
            line,
            start,
            Level::Info,
            threshold,
            "not-sent",
            "--disable-grpc is set",
            warnings,
            0,
            None,
        );
    }
    let timeout = c.grpc_timeout.min(Duration::from_secs(1));
    let r = agent::remove_container(&c.grpc_address, timeout, &id);
    match r {
        Ok(true) => finish(
            c,
            line,
            start,
            Level::Info,
            threshold,
            "removed",
            "the agent forgot the container",
            warnings,
            0,
            None,
        ),
        Ok(false) => finish(
            c,
            line,
            start,
            Level::Info,
            threshold,
            "removed",
            "the agent did not know the container",
            warnings,
            0,
            None,
        ),
        Err(e) => {
            line.insert("error".into(), json!(e.to_string()));
            finish(
                c,
                line,
                start,
                Level::Warn,
                threshold,
                "remove-failed",
                "ignored at poststop",
                warnings,
                0,
                None,
            )
        }
    }
}

fn add_identity(line: &mut Map<String, Value>, id: &ContainerIdentity) {
    for (k, v) in [
        ("container_id", &id.container_id),
        ("container_name", &id.container_name),
        ("pod_namespace", &id.pod_namespace),
        ("pod_name", &id.pod_name),
        ("pod_uid", &id.pod_uid),
        ("image", &id.image),
    ] {
        if !v.is_empty() {
            line.insert(k.into(), json!(v));
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[allow(clippy::too_many_arguments)]
fn finish(
    c: &Config,
    mut line: Map<String, Value>,
    start: Instant,
    level: Level,
    threshold: Level,
    decision: &str,
    reason: &str,
    warnings: Vec<String>,
    exit_code: i32,
    stderr: Option<String>,
) -> Outcome {
    line.insert("level".into(), json!(level.as_str()));
    line.insert("decision".into(), json!(decision));
    line.insert("reason".into(), json!(reason));
    if !warnings.is_empty() {
        line.insert("warnings".into(), json!(warnings));
    }
    line.insert("exit_code".into(), json!(exit_code));
    line.insert("total_ms".into(), json!(ms(start.elapsed())));
    line.insert("hook_pid".into(), json!(std::process::id()));
    let line = Value::Object(line);
    let mut stderr = stderr;
    if level >= threshold {
        let log = LogFile::new(
            &c.log_fname,
            c.log_max_size.saturating_mul(1 << 20),
            c.log_max_backups,
        );
        if let Err(e) = log.append(&line.to_string()) {
            // The log is for humans; failing to write it must not change the decision.
            let note = format!(
                "rthooks-oci-hook: cannot write log {}: {e}",
                c.log_fname.display()
            );
            stderr = Some(match stderr {
                Some(s) => format!("{s}\n{note}"),
                None => note,
            });
        }
    }
    Outcome {
        exit_code,
        stdout: None,
        stderr,
        log_line: line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn parsed(dir: &std::path::Path, args: &[&str]) -> Parsed {
        let log = dir.join("hook.log");
        let mut v = vec![
            "rthooks-oci-hook",
            "--grpc-address",
            "unix:///nonexistent/agent.sock",
            "--log-fname",
            log.to_str().unwrap(),
            "--config-file",
            "/nonexistent/c.json",
        ];
        v.extend_from_slice(args);
        config::parse(v.into_iter().map(str::to_owned).collect::<Vec<_>>()).unwrap()
    }

    fn bundle(dir: &std::path::Path, cfg: &str) -> String {
        std::fs::write(dir.join("config.json"), cfg).unwrap();
        format!(r#"{{"id":"c1","bundle":{:?}}}"#, dir.display())
    }

    fn log_lines(dir: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("hook.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn stages() {
        let d = tempfile::tempdir().unwrap();
        let out = run(parsed(d.path(), &["createContainer"]), &b""[..], None);
        assert_eq!(
            (out.exit_code, out.log_line["decision"].as_str()),
            (0, Some("nothing-to-do"))
        );
        let out = run(parsed(d.path(), &["poststop"]), &b""[..], None);
        assert_eq!(out.exit_code, 0);
        let out = run(parsed(d.path(), &["prestart"]), &b""[..], None);
        assert_eq!(out.exit_code, 2);
        assert!(out
            .stderr
            .unwrap()
            .contains("unsupported hook stage \"prestart\""));
        let out = run(parsed(d.path(), &[]), &b""[..], None);
        assert_eq!(out.exit_code, 2);
        assert_eq!(log_lines(d.path()).len(), 4);
    }

    #[test]
    fn bad_inputs_give_one_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let ns = r#""annotations":{"io.kubernetes.cri.sandbox-namespace":"shop"}"#;
        let cases: Vec<(Option<String>, &str)> = vec![
            (
                Some(format!(r#"{{"ociVersion":"1.0.2",{ns}}}"#)),
                "no linux.cgroupsPath",
            ),
            (
                Some(format!(
                    r#"{{"ociVersion":"1.0.2","linux":{{"cgroupsPath":"a:b:c"}},{ns}}}"#
                )),
                "is not a slice",
            ),
            (
                Some("{truncated".to_owned()),
                "not a valid OCI runtime spec",
            ),
            (None, "no config.json in the bundle"),
        ];
        for (cfg, want) in cases {
            let stdin = match cfg {
                Some(cfg) => bundle(d.path(), &cfg),
                None => r#"{"id":"c1","bundle":"/nonexistent/bundle"}"#.to_owned(),
            };
            let out = run(parsed(d.path(), &["createRuntime"]), stdin.as_bytes(), None);
            assert_eq!(out.exit_code, 1, "{want}");
            let err = out.stderr.unwrap();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(want), "{err} lacks {want}");
        }
        // A huge config.json is refused without reading it all.
        let f = std::fs::File::create(d.path().join("config.json")).unwrap();
        f.set_len(crate::state::MAX_CONFIG_BYTES + 1).unwrap();
        let stdin = format!(r#"{{"id":"c1","bundle":{:?}}}"#, d.path().display());
        let out = run(parsed(d.path(), &["createRuntime"]), stdin.as_bytes(), None);
        assert!(out.stderr.unwrap().contains("is larger than"));
        // An unreadable config (a directory in its place).
        std::fs::remove_file(d.path().join("config.json")).unwrap();
        std::fs::create_dir(d.path().join("config.json")).unwrap();
        let out = run(parsed(d.path(), &["createRuntime"]), stdin.as_bytes(), None);
        assert_eq!(out.exit_code, 1);
        assert!(out.stderr.unwrap().contains("reading"));
    }

    #[test]
    fn state_annotations_decide_when_config_is_unusable() {
        let d = tempfile::tempdir().unwrap();
        let stdin = r#"{"id":"c1","bundle":"/nonexistent","annotations":{"io.kubernetes.pod.namespace":"kube-system"}}"#;
        let out = run(parsed(d.path(), &["createRuntime"]), stdin.as_bytes(), None);
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert_eq!(out.log_line["decision"], "allowed-unregistered");
    }

    #[test]
    fn log_level_filters_lines() {
        let d = tempfile::tempdir().unwrap();
        run(
            parsed(d.path(), &["createContainer", "--log-level", "error"]),
            &b""[..],
            None,
        );
        assert!(log_lines(d.path()).is_empty());
        run(
            parsed(d.path(), &["createRuntime", "--log-level", "error"]),
            &b""[..],
            Some(d.path().to_owned()),
        );
        assert_eq!(log_lines(d.path()).len(), 1, "refusals are errors");
        let out = run(
            parsed(d.path(), &["createContainer", "--log-level", "loud"]),
            &b""[..],
            None,
        );
        let w = out.log_line["warnings"].as_array().unwrap();
        assert!(
            w.iter()
                .any(|w| w.as_str().unwrap().contains("unknown --log-level")),
            "{w:?}"
        );
    }
}
