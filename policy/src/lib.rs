//! Policies: the schema of DESIGN.md ("Policies") that policy files, the agent's API and
//! the custom resources share, its validation, and selector matching with Kubernetes
//! LabelSelector semantics. [`yaml`] is the one YAML dialect (policies and the agent's
//! config file).
use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use rthooks_container::ContainerIdentity;

pub mod resources;
pub mod yaml;

pub use resources::{
    NamespacedPolicySpec, NamespacedRuntimePolicy, NodePolicyStatus, PolicyStatus,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid policy: {0}")]
    Invalid(String),
    /// The parser's message names the line and column.
    #[error("invalid policy: YAML: {0}")]
    Yaml(#[source] Box<yaml::Error>),
}

pub const API_VERSION: &str = "rthooks.io/v1alpha1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyKind {
    /// Cluster-wide.
    RuntimePolicy,
    /// Applies only to pods in `metadata.namespace`.
    NamespacedRuntimePolicy,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub api_version: String,
    pub kind: PolicyKind,
    pub metadata: Metadata,
    pub spec: PolicySpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

// The one spec of policy files, the agent's API and both custom resources (the derive
// makes `RuntimePolicy`; `NamespacedRuntimePolicy` wraps the same type). Doc comments here
// become the CRDs' descriptions.
/// What a policy selects (pods, then their containers) and what happens when those
/// containers execute the binaries its rules name.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "rthooks.io",
    version = "v1alpha1",
    kind = "RuntimePolicy",
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "rtp",
    category = "rthooks",
    doc = "An rthooks runtime policy for pods in every namespace: the binaries its rules name are denied, killed or audited in the containers it selects.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// The pods, by their labels (a Kubernetes LabelSelector). Absent: every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// On the labels of the pod's namespace (from the Kubernetes API; a namespace the
    /// agent has no labels for has none). Absent: any namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The containers of those pods, by the keys `name` (container name) and `image`
    /// (repository, no tag). Absent: every container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "(!has(self.matchLabels) || self.matchLabels.all(k, k == 'name' || k == 'image')) && (!has(self.matchExpressions) || self.matchExpressions.all(r, r.key == 'name' || r.key == 'image'))",
        "message": "containerSelector keys are name and image"
    }]))]
    pub container_selector: Option<LabelSelector>,
    /// What to do, and to which binaries; at least one rule.
    #[schemars(length(min = 1))]
    pub rules: Vec<Rule>,
}

/// A Kubernetes LabelSelector: every matchLabels pair and every expression must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

/// One expression of a LabelSelector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(self.operator == 'In' || self.operator == 'NotIn') == (has(self.values) && size(self.values) > 0)",
    "message": "operators In and NotIn need values; Exists and DoesNotExist take none"
}]))]
pub struct Requirement {
    #[schemars(length(min = 1))]
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Binaries and the action taken when a selected container executes one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Absolute, normalised paths of executed files as the kernel resolves them (symlinks
    /// followed). At least one.
    #[schemars(
        length(min = 1),
        inner(length(max = 4095), pattern(BINARY_PATH_PATTERN))
    )]
    pub binaries: Vec<String>,
    pub action: RuleAction,
}

/// Deny > Kill > Audit when several policies name one exec.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum RuleAction {
    Audit,
    Kill,
    Deny,
}

impl RuleAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            RuleAction::Audit => "audit",
            RuleAction::Kill => "kill",
            RuleAction::Deny => "deny",
        }
    }
}

/// Where a policy comes from. Each origin names its own policies: a file, the agent's API
/// and Kubernetes may each hold a policy of the same name without replacing another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// The policy directory.
    File,
    /// The agent's gRPC API (`rthooksctl policies add`).
    Api,
    /// A `RuntimePolicy` or `NamespacedRuntimePolicy` resource.
    Kubernetes,
}

impl Origin {
    pub fn as_str(&self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Api => "api",
            Origin::Kubernetes => "kubernetes",
        }
    }
}

/// Identifies a policy: (origin, namespace, name); cluster-wide policies have no
/// namespace. Displayed without the origin (`ns/name`), as events and listings name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyKey {
    pub origin: Origin,
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl LabelSelector {
    /// Kubernetes semantics: every matchLabels pair and every expression must hold; an
    /// empty selector matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    fn validate(&self, what: &str, allowed_keys: Option<&[&str]>) -> Result<(), String> {
        let keys = self
            .match_labels
            .keys()
            .chain(self.match_expressions.iter().map(|r| &r.key));
        for key in keys {
            if key.is_empty() {
                return Err(format!("{what}: empty key"));
            }
            if let Some(allowed) = allowed_keys {
                if !allowed.contains(&key.as_str()) {
                    return Err(format!(
                        "{what}: unknown key {key:?} (allowed: {})",
                        allowed.join(", ")
                    ));
                }
            }
        }
        for r in &self.match_expressions {
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(format!(
                        "{what}: operator {:?} on {:?} needs values",
                        r.operator, r.key
                    ))
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(format!(
                        "{what}: operator {:?} on {:?} takes no values",
                        r.operator, r.key
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // As in Kubernetes: a missing key satisfies NotIn.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl Policy {
    /// Its key when it comes from `origin`.
    pub fn key(&self, origin: Origin) -> PolicyKey {
        PolicyKey {
            origin,
            namespace: match self.kind {
                PolicyKind::RuntimePolicy => None,
                PolicyKind::NamespacedRuntimePolicy => self.metadata.namespace.clone(),
            },
            name: self.metadata.name.clone(),
        }
    }

    /// Does this policy select the container?
    pub fn selects(&self, c: &ContainerIdentity) -> bool {
        self.selects_in(c, &BTreeMap::new())
    }

    /// Whether it selects `c`, whose namespace has `namespace_labels`.
    pub fn selects_in(
        &self,
        c: &ContainerIdentity,
        namespace_labels: &BTreeMap<String, String>,
    ) -> bool {
        if let Some(sel) = &self.spec.namespace_selector {
            if !sel.matches(namespace_labels) {
                return false;
            }
        }
        if self.kind == PolicyKind::NamespacedRuntimePolicy
            && self.metadata.namespace.as_deref() != Some(c.pod_namespace.as_str())
        {
            return false;
        }
        if let Some(sel) = &self.spec.pod_selector {
            if !sel.matches(&c.pod_labels) {
                return false;
            }
        }
        if let Some(sel) = &self.spec.container_selector {
            let attrs = BTreeMap::from([
                ("name".to_string(), c.container_name.clone()),
                ("image".to_string(), image_repository(&c.image).to_string()),
            ]);
            if !sel.matches(&attrs) {
                return false;
            }
        }
        true
    }

    /// Binaries with the strongest action this policy gives each (a binary named in two
    /// rules of one policy takes the stronger).
    pub fn binary_actions(&self) -> BTreeMap<String, RuleAction> {
        let mut out: BTreeMap<String, RuleAction> = BTreeMap::new();
        for rule in &self.spec.rules {
            for b in &rule.binaries {
                let e = out.entry(b.clone()).or_insert(rule.action);
                *e = (*e).max(rule.action);
            }
        }
        out
    }

    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Error::Invalid(format!("{}: {m}", self.metadata.name));
        if self.api_version != API_VERSION {
            return Err(bad(format!(
                "apiVersion {:?}, expected {API_VERSION:?}",
                self.api_version
            )));
        }
        if !valid_name(&self.metadata.name) {
            return Err(Error::Invalid(format!(
                "metadata.name {:?} must be a DNS subdomain name (lowercase letters, digits, '-', '.'; at most 253)",
                self.metadata.name
            )));
        }
        if self.kind == PolicyKind::NamespacedRuntimePolicy
            && self.metadata.namespace.as_deref().is_none_or(str::is_empty)
        {
            return Err(bad(
                "a NamespacedRuntimePolicy needs metadata.namespace".into()
            ));
        }
        if let Some(sel) = &self.spec.pod_selector {
            sel.validate("podSelector", None).map_err(bad)?;
        }
        if let Some(sel) = &self.spec.container_selector {
            sel.validate("containerSelector", Some(&["name", "image"]))
                .map_err(bad)?;
        }
        if self.spec.rules.is_empty() {
            return Err(bad("spec.rules is empty".into()));
        }
        for rule in &self.spec.rules {
            if rule.binaries.is_empty() {
                return Err(bad("a rule has no binaries".into()));
            }
            for b in &rule.binaries {
                if !valid_binary_path(b) {
                    return Err(bad(format!(
                        "binary {b:?} must be an absolute, normalised path (no '.', '..' or '//')"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// [`valid_binary_path`] for the API server (RE2, as OpenAPI `pattern`; a CEL rule over
/// the list would exceed the server's cost budget): `/`-separated components that are not
/// empty, `.` or `..`. Lengths are checked by the schema's `maxLength` and, per component,
/// by the agent.
pub const BINARY_PATH_PATTERN: &str = r"^(/([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+))+$";

/// Kernel-resolved paths are absolute and normalised; a rule written otherwise could never
/// match, so it is refused rather than silently ignored.
pub fn valid_binary_path(p: &str) -> bool {
    p.len() > 1
        && p.len() < 4096
        && p.starts_with('/')
        && !p.ends_with('/')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255)
        && !p.contains('\0')
}

/// The repository part of an image reference: no tag, no digest
/// (`docker.io/library/nginx:1.25` → `docker.io/library/nginx`,
/// `localhost:5000/app@sha256:…` → `localhost:5000/app`).
pub fn image_repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    match without_digest[last_slash..].find(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    }
}

/// Parses every YAML document in `text` (`---` separated; empty ones are skipped) as a
/// policy and validates it. A YAML or schema error names its line and column; a policy
/// that parses but is not valid names the policy.
pub fn parse_policies(text: &str) -> Result<Vec<Policy>, Error> {
    let policies: Vec<Policy> = yaml::from_documents(text).map_err(|e| Error::Yaml(Box::new(e)))?;
    if policies.is_empty() {
        return Err(Error::Invalid("no policy in the document".into()));
    }
    for p in &policies {
        p.validate()?;
    }
    Ok(policies)
}

/// A policy as YAML, for the API's listings.
pub fn to_yaml(policy: &Policy) -> String {
    yaml::to_string(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn container(ns: &str, l: &[(&str, &str)], name: &str, image: &str) -> ContainerIdentity {
        ContainerIdentity {
            container_id: "c1".into(),
            container_name: name.into(),
            image: image.into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            pod_namespace: ns.into(),
            pod_labels: labels(l),
        }
    }

    const SAMPLE: &str = r#"
apiVersion: rthooks.io/v1alpha1
kind: RuntimePolicy
metadata:
  name: deny-curl
spec:
  podSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: tier, operator: In, values: [frontend]}]
  containerSelector:
    matchExpressions: [{key: name, operator: In, values: [nginx]}]
  rules:
    - binaries: [/usr/bin/curl, /usr/bin/nc]
      action: Deny
    - binaries: [/usr/bin/nc]
      action: Audit
"#;

    #[test]
    fn selector_semantics() {
        let l = labels(&[("app", "web"), ("tier", "frontend")]);
        let req = |op, vals: &[&str]| Requirement {
            key: "tier".into(),
            operator: op,
            values: vals.iter().map(|s| s.to_string()).collect(),
        };
        assert!(req(Operator::In, &["frontend", "x"]).matches(&l));
        assert!(!req(Operator::In, &["backend"]).matches(&l));
        assert!(!req(Operator::NotIn, &["frontend"]).matches(&l));
        assert!(req(Operator::NotIn, &["frontend"]).matches(&labels(&[])));
        assert!(req(Operator::Exists, &[]).matches(&l));
        assert!(!req(Operator::DoesNotExist, &[]).matches(&l));
        assert!(req(Operator::DoesNotExist, &[]).matches(&labels(&[("app", "web")])));
        assert!(LabelSelector::default().matches(&labels(&[])));
        let sel = LabelSelector {
            match_labels: labels(&[("app", "web")]),
            match_expressions: vec![req(Operator::In, &["frontend"])],
        };
        assert!(sel.matches(&l));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "backend")])));
        assert!(!sel.matches(&labels(&[("tier", "frontend")])));
    }

    #[test]
    fn policy_selects_by_pod_labels_container_and_namespace() {
        let p = &parse_policies(SAMPLE).unwrap()[0];
        let web = [("app", "web"), ("tier", "frontend")];
        assert!(p.selects(&container("default", &web, "nginx", "docker.io/nginx:1.25")));
        assert!(!p.selects(&container("default", &web, "sidecar", "nginx")));
        assert!(!p.selects(&container("default", &[("app", "web")], "nginx", "nginx")));
        let mut ns = p.clone();
        ns.kind = PolicyKind::NamespacedRuntimePolicy;
        ns.metadata.namespace = Some("prod".into());
        assert!(!ns.selects(&container("default", &web, "nginx", "nginx")));
        assert!(ns.selects(&container("prod", &web, "nginx", "nginx")));
        assert_eq!(ns.key(Origin::Kubernetes).to_string(), "prod/deny-curl");
    }

    #[test]
    fn namespace_selector_matches_the_namespaces_labels() {
        let text = SAMPLE.replace(
            "spec:\n",
            "spec:\n  namespaceSelector:\n    matchLabels: {team: payments}\n",
        );
        let p = &parse_policies(&text).unwrap()[0];
        assert!(p.spec.namespace_selector.is_some(), "{text}");
        let web = container(
            "shop",
            &[("app", "web"), ("tier", "frontend")],
            "nginx",
            "nginx",
        );
        let labels = |team: &str| BTreeMap::from([("team".to_string(), team.to_string())]);
        assert!(p.selects_in(&web, &labels("payments")));
        assert!(!p.selects_in(&web, &labels("search")));
        assert!(!p.selects(&web), "no namespace labels known: not selected");
        // Without the field, any namespace.
        let any = &parse_policies(SAMPLE).unwrap()[0];
        assert!(any.selects_in(&web, &labels("search")));
        assert!(to_yaml(p).contains("namespaceSelector"));
    }

    #[test]
    fn image_selector_uses_repository_without_tag() {
        let text = SAMPLE.replace(
            "{key: name, operator: In, values: [nginx]}",
            "{key: image, operator: In, values: [localhost:5000/app]}",
        );
        let p = &parse_policies(&text).unwrap()[0];
        let web = [("app", "web"), ("tier", "frontend")];
        assert!(p.selects(&container("d", &web, "x", "localhost:5000/app:v1")));
        assert!(p.selects(&container("d", &web, "x", "localhost:5000/app@sha256:ab")));
        assert!(!p.selects(&container("d", &web, "x", "localhost:5000/other:v1")));
        assert_eq!(image_repository("nginx"), "nginx");
        assert_eq!(
            image_repository("docker.io/library/nginx:1"),
            "docker.io/library/nginx"
        );
    }

    #[test]
    fn strongest_action_per_binary() {
        let p = &parse_policies(SAMPLE).unwrap()[0];
        let a = p.binary_actions();
        assert_eq!(a["/usr/bin/nc"], RuleAction::Deny);
        assert_eq!(a["/usr/bin/curl"], RuleAction::Deny);
    }

    #[test]
    fn invalid_policies_are_refused_with_reasons() {
        let cases = [
            (SAMPLE.replace("rthooks.io/v1alpha1", "v1"), "apiVersion"),
            (SAMPLE.replace("/usr/bin/curl", "usr/bin/curl"), "absolute"),
            (
                SAMPLE.replace("/usr/bin/curl", "/usr/../bin/curl"),
                "absolute",
            ),
            (
                SAMPLE.replace("action: Deny", "action: Block"),
                "unknown variant `Block`",
            ),
            (SAMPLE.replace("name: deny-curl", "name: Deny_Curl"), "DNS"),
            (
                SAMPLE.replace("values: [frontend]", "values: []"),
                "needs values",
            ),
            (SAMPLE.replace("key: name,", "key: pod,"), "unknown key"),
            (
                SAMPLE.replace("kind: RuntimePolicy", "kind: NamespacedRuntimePolicy"),
                "namespace",
            ),
            ("".to_string(), "no policy"),
            ("{".to_string(), "YAML"),
        ];
        for (text, want) in cases {
            let err = parse_policies(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn the_sample_policies_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/policies");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            n += parse_policies(&text).unwrap().len();
        }
        assert!(n >= 2, "{n} sample policies");
    }

    #[test]
    fn yaml_errors_name_the_line_on_one_line() {
        let text = SAMPLE.replace("action: Deny", "action: Block");
        let err = parse_policies(&text).unwrap_err().to_string();
        assert!(err.contains("at line 14, column 15"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn multi_document_files() {
        let two = format!("{SAMPLE}\n---\n{}", SAMPLE.replace("deny-curl", "other"));
        let ps = parse_policies(&two).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[1].metadata.name, "other");
        // Empty documents (a leading `---`, a trailing one, comments only) are skipped.
        let padded = format!("---\n# comment only\n---\n{two}\n---\n");
        assert_eq!(parse_policies(&padded).unwrap(), ps);
        // What the API lists parses back to the same policy.
        assert_eq!(
            parse_policies(&to_yaml(&ps[0])).unwrap(),
            vec![ps[0].clone()]
        );
    }
}
