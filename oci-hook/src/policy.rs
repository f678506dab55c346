//! The failure rule: what to do with a container when the agent could not register it.
//!
//! Tetragon's semantics: fail closed, unless the pod's namespace (from the configured
//! annotation keys) is in the allow list or matches one of the regexes (substring match,
//! as RE2's `matches`). A CEL expression, when set, replaces both: the container fails
//! exactly when it evaluates to `true`. No namespace annotation means "not allowed".
use std::collections::HashMap;

use regex::Regex;

use crate::config::Config;
use crate::error::{CelError, Error, Result};

/// What the failure rule decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// True: refuse the container (non-zero exit).
    pub fail: bool,
    /// Why, for the log line and the runtime's error message.
    pub reason: String,
}

enum Rule {
    FailOpen,
    AllowList {
        namespaces: Vec<String>,
        regexes: Vec<Regex>,
    },
    Cel(Box<cel::Program>),
}

/// A compiled failure rule.
pub struct FailurePolicy {
    rule: Rule,
    namespace_keys: Vec<String>,
}

impl std::fmt::Debug for FailurePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = match &self.rule {
            Rule::FailOpen => "fail-open",
            Rule::AllowList { .. } => "allow-list",
            Rule::Cel(_) => "cel",
        };
        f.debug_struct("FailurePolicy").field("rule", &r).finish()
    }
}

/// Compiles a CEL expression, turning a parser panic on odd input (a third-party parser)
/// into errors: a bad expression must never crash the hook.
pub fn compile_cel(expr: &str) -> Result<cel::Program> {
    let res = std::panic::catch_unwind(|| cel::Program::compile(expr));
    match res {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(Error::Cel {
            expr: expr.to_owned(),
            source: e.into(),
        }),
        Err(_) => Err(Error::Cel {
            expr: expr.to_owned(),
            source: CelError::ParserCrashed,
        }),
    }
}

impl FailurePolicy {
    /// Builds the rule from the configuration. Invalid parts (a CEL expression that does
    /// not compile, a bad regex) are returned as errors *and* replaced by the nearest
    /// safe rule, so one typo does not refuse every container on the node, including the
    /// agent's own (Tetragon's known deadlock).
    pub fn from_config(c: &Config) -> (FailurePolicy, Vec<Error>) {
        let mut errors = Vec::new();
        let namespace_keys = c.annotations_namespace_key.clone();
        if c.fail_open {
            return (
                FailurePolicy {
                    rule: Rule::FailOpen,
                    namespace_keys,
                },
                errors,
            );
        }
        if let Some(expr) = &c.fail_cel_expr {
            match compile_cel(expr) {
                Ok(p) => {
                    return (
                        FailurePolicy {
                            rule: Rule::Cel(Box::new(p)),
                            namespace_keys,
                        },
                        errors,
                    )
                }
                Err(e) => errors.push(e),
            }
        }
        let regexes = c
            .fail_allow_namespaces_regex
            .iter()
            .filter_map(|r| match Regex::new(r) {
                Ok(re) => Some(re),
                Err(e) => {
                    errors.push(Error::Regex {
                        regex: r.clone(),
                        source: e,
                    });
                    None
                }
            })
            .collect();
        (
            FailurePolicy {
                rule: Rule::AllowList {
                    namespaces: c.fail_allow_namespaces.clone(),
                    regexes,
                },
                namespace_keys,
            },
            errors,
        )
    }

    /// Decides for a container with these annotations.
    pub fn decide(&self, annotations: &HashMap<String, String>) -> Decision {
        match &self.rule {
            Rule::FailOpen => Decision {
                fail: false,
                reason: "--fail-open is set".into(),
            },
            Rule::AllowList {
                namespaces,
                regexes,
            } => {
                // Every namespace key present must be allowed, not just the first: a
                // runtime that passes pod annotations through could otherwise let a pod
                // claim `kube-system` under the key we happen to read first.
                let present: Vec<(&String, &str)> = self
                    .namespace_keys
                    .iter()
                    .filter_map(|k| annotations.get(k).map(|v| (k, v.as_str())))
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
                if present.is_empty() {
                    return Decision {
                        fail: true,
                        reason: format!(
                            "no pod namespace annotation ({}) to check against the allow list",
                            self.namespace_keys.join(", ")
                        ),
                    };
                }
                let mut why = Vec::new();
                for (key, ns) in present {
                    if namespaces.iter().any(|n| n == ns) {
                        why.push(format!("namespace {ns:?} is in the allow list"));
                    } else if let Some(re) = regexes.iter().find(|re| re.is_match(ns)) {
                        why.push(format!(
                            "namespace {ns:?} matches allow regex {:?}",
                            re.as_str()
                        ));
                    } else {
                        return Decision {
                            fail: true,
                            reason: format!("namespace {ns:?} ({key}) is not in the allow list"),
                        };
                    }
                }
                why.dedup();
                Decision {
                    fail: false,
                    reason: why.join("; "),
                }
            }
            Rule::Cel(p) => self.decide_cel(p, annotations),
        }
    }

    fn decide_cel(&self, p: &cel::Program, annotations: &HashMap<String, String>) -> Decision {
        let run = || {
            let mut ctx = cel::Context::default();
            ctx.add_variable_from_value("annotations", annotations.clone());
            ctx.add_variable_from_value("annotations_namespace_keys", self.namespace_keys.clone());
            ctx.add_variable_from_value(
                "annotations_namespace_key",
                self.namespace_keys.first().cloned().unwrap_or_default(),
            );
            p.execute(&ctx).map_err(|e| e.to_string())
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(cel::Value::Bool(true))) => Decision {
                fail: true,
                reason: "--fail-cel-expr is true".into(),
            },
            Ok(Ok(cel::Value::Bool(false))) => Decision {
                fail: false,
                reason: "--fail-cel-expr is false".into(),
            },
            Ok(Ok(v)) => Decision {
                fail: true,
                reason: format!("--fail-cel-expr gave a non-boolean ({v:?}); failing"),
            },
            Ok(Err(e)) => Decision {
                fail: true,
                reason: format!("--fail-cel-expr failed to evaluate ({e}); failing"),
            },
            Err(_) => Decision {
                fail: true,
                reason: "--fail-cel-expr evaluation crashed; failing".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn cfg(extra: &[&str]) -> Config {
        let mut a = vec!["h", "--config-file", "/nonexistent/x.json"];
        a.extend_from_slice(extra);
        config::parse(a).unwrap().config
    }

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CRI_NS: &str = "io.kubernetes.cri.sandbox-namespace";
    const CRIO_NS: &str = "io.kubernetes.pod.namespace";

    fn decide(extra: &[&str], a: &[(&str, &str)]) -> Decision {
        let (p, errs) = FailurePolicy::from_config(&cfg(extra));
        assert!(errs.is_empty(), "{errs:?}");
        p.decide(&ann(a))
    }

    #[test]
    fn default_allow_list() {
        assert!(!decide(&[], &[(CRI_NS, "kube-system")]).fail);
        assert!(!decide(&[], &[(CRIO_NS, "rthooks")]).fail);
        assert!(decide(&[], &[(CRI_NS, "default")]).fail);
        // No namespace annotation: not allowed.
        let d = decide(&[], &[("io.kubernetes.cri.container-name", "x")]);
        assert!(d.fail);
        assert!(d.reason.contains("no pod namespace"), "{}", d.reason);
        // Empty namespace value counts as missing.
        assert!(decide(&[], &[(CRI_NS, "")]).fail);
    }

    #[test]
    fn custom_list_and_regex() {
        let f = [
            "--fail-allow-namespaces",
            "infra",
            "--fail-allow-namespaces-regex",
            "^team-[a-z]+$,sandbox",
        ];
        assert!(!decide(&f, &[(CRI_NS, "infra")]).fail);
        assert!(
            decide(&f, &[(CRI_NS, "kube-system")]).fail,
            "custom list replaces the default"
        );
        assert!(!decide(&f, &[(CRI_NS, "team-web")]).fail);
        assert!(decide(&f, &[(CRI_NS, "team-web2")]).fail);
        // Regexes match substrings unless anchored (RE2 `matches`, as Tetragon).
        assert!(!decide(&f, &[(CRI_NS, "my-sandbox-1")]).fail);
    }

    #[test]
    fn every_present_namespace_key_must_allow() {
        let both = |a: &str, b: &str| decide(&[], &[(CRIO_NS, a), (CRI_NS, b)]);
        assert!(both("kube-system", "default").fail);
        assert!(both("default", "kube-system").fail);
        assert!(!both("kube-system", "kube-system").fail);
        assert!(!both("kube-system", "rthooks").fail);
    }

    #[test]
    fn namespace_keys_are_respected() {
        let f = ["--annotations-namespace-key", "example.com/ns"];
        assert!(!decide(&f, &[("example.com/ns", "kube-system")]).fail);
        assert!(decide(&f, &[(CRI_NS, "kube-system")]).fail);
    }

    #[test]
    fn cel_replaces_lists() {
        let f = [
            "--fail-cel-expr",
            r#"!(annotations_namespace_keys.exists(k, k in annotations && annotations[k] == "dev"))"#,
        ];
        assert!(!decide(&f, &[(CRI_NS, "dev")]).fail);
        assert!(
            decide(&f, &[(CRI_NS, "kube-system")]).fail,
            "allow list ignored with CEL"
        );
        let d = decide(&["--fail-cel-expr", "false"], &[]);
        assert!(!d.fail);
        // Tetragon's example shape: fail unless the image annotation says otherwise.
        let f = [
            "--fail-cel-expr",
            r#"!("io.kubernetes.cri.image-name" in annotations && annotations["io.kubernetes.cri.image-name"].startsWith("registry.k8s.io/"))"#,
        ];
        assert!(
            !decide(
                &f,
                &[("io.kubernetes.cri.image-name", "registry.k8s.io/pause:3.9")]
            )
            .fail
        );
        assert!(decide(&f, &[]).fail);
    }

    #[test]
    fn cel_errors_fail_closed() {
        // Non-boolean and evaluation errors fail.
        assert!(decide(&["--fail-cel-expr", "1 + 1"], &[]).fail);
        assert!(decide(&["--fail-cel-expr", "annotations['missing'] == 'x'"], &[]).fail);
        // A CEL expression that does not compile falls back to the allow list.
        let (p, errs) = FailurePolicy::from_config(&cfg(&["--fail-cel-expr", "(((("]));
        assert_eq!(errs.len(), 1);
        assert!(!p.decide(&ann(&[(CRI_NS, "kube-system")])).fail);
        assert!(p.decide(&ann(&[(CRI_NS, "default")])).fail);
    }

    #[test]
    fn bad_regex_is_reported_and_skipped() {
        let (p, errs) =
            FailurePolicy::from_config(&cfg(&["--fail-allow-namespaces-regex", "team-(,^ok$"]));
        assert_eq!(errs.len(), 1);
        assert!(!p.decide(&ann(&[(CRI_NS, "ok")])).fail);
    }

    #[test]
    fn fail_open() {
        let d = decide(&["--fail-open"], &[]);
        assert!(!d.fail);
        assert!(
            !decide(
                &["--fail-open", "--fail-cel-expr", "true"],
                &[(CRI_NS, "default")]
            )
            .fail
        );
    }
}
