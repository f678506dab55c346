//! The pod labels annotation our NRI plugin adds to each container's spec (neither
//! containerd nor CRI-O puts a pod's labels there), and the Kubernetes rules for label keys
//! and values.
use std::collections::{BTreeMap, HashMap};

/// The pod's labels as a JSON object of strings.
pub const POD_LABELS_ANNOTATION: &str = "rthooks.io/pod-labels";

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("annotation {POD_LABELS_ANNOTATION}: not a JSON object of strings: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("annotation {POD_LABELS_ANNOTATION}: invalid label {key:?}={value:?}")]
    Invalid { key: String, value: String },
}

/// Parses the annotation's value: a JSON object of strings whose keys and values are
/// valid Kubernetes label keys and values.
pub fn parse(json: &str) -> Result<Labels, LabelsError> {
    let labels: Labels = serde_json::from_str(json).map_err(LabelsError::NotJson)?;
    if let Some((k, v)) = labels
        .iter()
        .find(|(k, v)| !valid_key(k) || !valid_value(v))
    {
        return Err(LabelsError::Invalid {
            key: k.clone(),
            value: v.clone(),
        });
    }
    Ok(labels)
}

/// The labels the annotation carries: None without it.
pub fn from_annotations(
    annotations: &HashMap<String, String>,
) -> Option<Result<Labels, LabelsError>> {
    annotations.get(POD_LABELS_ANNOTATION).map(|v| parse(v))
}

/// Labels containerd, CRI-O or kubelet add to a sandbox's CRI labels that are not the
/// pod's Kubernetes labels (policies select on the labels the Kubernetes API shows).
/// CRI-O adds `io.kubernetes.container.name: POD` (its infra container's name).
pub fn is_runtime_label(key: &str) -> bool {
    key.starts_with("io.cri-containerd.")
        || matches!(
            key,
            "io.kubernetes.pod.name"
                | "io.kubernetes.pod.namespace"
                | "io.kubernetes.pod.uid"
                | "io.kubernetes.container.name"
        )
}

/// The annotation's value for a pod's CRI labels: a JSON object with sorted keys (stable
/// across calls), without the runtime's and kubelet's bookkeeping labels.
pub fn annotation_value(sandbox_labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<&String, &String> = sandbox_labels
        .iter()
        .filter(|(k, _)| !is_runtime_label(k))
        .collect();
    serde_json::to_string(&sorted).expect("a map of strings serializes")
}

fn valid_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `[prefix/]name`: the prefix a DNS subdomain of at most 253 bytes, the name at most 63
/// alphanumeric, `-`, `_`, `.` bytes beginning and ending alphanumeric.
pub fn valid_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => {
            prefix.len() <= 253
                && prefix.split('.').all(|p| valid_name(p, 63))
                && valid_name(name, 63)
        }
        None => valid_name(k, 63),
    }
}

/// Empty, or a name as in [`valid_key`].
pub fn valid_value(v: &str) -> bool {
    v.is_empty() || valid_name(v, 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_and_bad_annotations() {
        let l = parse(r#"{"app":"web","app.kubernetes.io/name":"x","empty":""}"#).unwrap();
        assert_eq!(l["app"], "web");
        for bad in [
            r#"{"app": 1}"#,
            r#"["a"]"#,
            r#"{"app":"a b"}"#,
            r#"{"-x":"y"}"#,
            r#"{"a/b/c":"y"}"#,
            "\u{fffd}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse(r#"{"app":"a b"}"#),
            Err(LabelsError::Invalid { key, .. }) if key == "app"
        ));
    }

    #[test]
    fn label_keys_and_values() {
        assert!(valid_key("app.kubernetes.io/name"));
        assert!(!valid_key("a/b/c"));
        assert!(!valid_key(&"a".repeat(64)));
        assert!(!valid_key(&format!("{}/x", "a.".repeat(127) + "a")));
        assert!(valid_value(""));
        assert!(!valid_value("-a"));
    }

    #[test]
    fn annotation_value_drops_bookkeeping_and_sorts() {
        let l: HashMap<String, String> = [
            ("tier", "frontend"),
            ("app", "web"),
            ("io.cri-containerd.kind", "sandbox"),
            ("io.kubernetes.pod.uid", "u"),
            // CRI-O's sandboxes.
            ("io.kubernetes.container.name", "POD"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let v = annotation_value(&l);
        assert_eq!(v, r#"{"app":"web","tier":"frontend"}"#);
        assert_eq!(parse(&v).unwrap().len(), 2);
    }
}
