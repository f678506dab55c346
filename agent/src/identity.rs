//! A container's identity, taken from a RuntimeHook request: explicit fields first, then
//! the containerd and CRI-O annotations, and pod labels from our NRI plugin's annotation
//! when the agent is configured to trust it.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::Error;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerIdentity {
    pub container_id: String,
    pub container_name: String,
    pub image: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub pod_namespace: String,
    pub pod_labels: BTreeMap<String, String>,
}

/// Kubernetes caps all annotations of an object at 256 KiB; anything larger did not come
/// from a kubelet and is refused before it is parsed.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
const MAX_ID_LEN: usize = 1024;

const CONTAINER_NAME_KEYS: &[&str] = &[
    "io.kubernetes.cri.container-name",
    "io.kubernetes.container.name",
];
const IMAGE_KEYS: &[&str] = &[
    "io.kubernetes.cri.image-name",
    "io.kubernetes.cri-o.ImageName",
];
const POD_NAME_KEYS: &[&str] = &["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"];
const POD_UID_KEYS: &[&str] = &["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"];
const POD_NAMESPACE_KEYS: &[&str] = &[
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.pod.namespace",
];
const CONTAINER_ID_KEYS: &[&str] = &["io.kubernetes.cri-o.ContainerID"];

/// The raw fields of a `tetragon.CreateContainer` request that identity is built from.
pub struct RequestFields<'a> {
    pub container_id: &'a str,
    pub container_name: &'a str,
    pub image: &'a str,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
    pub pod_namespace: &'a str,
    pub annotations: &'a HashMap<String, String>,
}

fn pick(explicit: &str, annotations: &HashMap<String, String>, keys: &[&str]) -> String {
    if !explicit.is_empty() {
        return explicit.to_string();
    }
    keys.iter()
        .find_map(|k| annotations.get(*k))
        .cloned()
        .unwrap_or_default()
}

impl ContainerIdentity {
    /// Builds and validates an identity. `trust_label_annotation` decides whether
    /// `rthooks.io/pod-labels` is believed: only where our NRI plugin always overwrites it,
    /// otherwise a pod could pick its own labels and step out of a deny policy.
    pub fn from_request(
        f: &RequestFields<'_>,
        trust_label_annotation: bool,
    ) -> Result<Self, Error> {
        let size: usize = f.annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_ANNOTATIONS_BYTES {
            return Err(Error::InvalidRequest(format!(
                "annotations are {size} bytes, more than the {MAX_ANNOTATIONS_BYTES} Kubernetes allows"
            )));
        }
        let id = Self {
            container_id: pick(f.container_id, f.annotations, CONTAINER_ID_KEYS),
            container_name: pick(f.container_name, f.annotations, CONTAINER_NAME_KEYS),
            image: pick(f.image, f.annotations, IMAGE_KEYS),
            pod_name: pick(f.pod_name, f.annotations, POD_NAME_KEYS),
            pod_uid: pick(f.pod_uid, f.annotations, POD_UID_KEYS),
            pod_namespace: pick(f.pod_namespace, f.annotations, POD_NAMESPACE_KEYS),
            pod_labels: match f.annotations.get(rthooks_api::POD_LABELS_ANNOTATION) {
                Some(json) if trust_label_annotation => parse_labels(json)?,
                _ => BTreeMap::new(),
            },
        };
        for (what, v) in [
            ("containerID", &id.container_id),
            ("containerName", &id.container_name),
            ("containerImage", &id.image),
            ("podName", &id.pod_name),
            ("podUID", &id.pod_uid),
            ("podNamespace", &id.pod_namespace),
        ] {
            if v.len() > MAX_ID_LEN || v.chars().any(char::is_control) {
                return Err(Error::InvalidRequest(format!(
                    "{what} is longer than {MAX_ID_LEN} bytes or holds control characters"
                )));
            }
        }
        Ok(id)
    }
}

/// `{"app":"web",...}`: a JSON object of strings, keys and values valid Kubernetes label
/// keys/values.
pub fn parse_labels(json: &str) -> Result<BTreeMap<String, String>, Error> {
    let labels: BTreeMap<String, String> = serde_json::from_str(json).map_err(|e| {
        Error::InvalidRequest(format!(
            "annotation {}: not a JSON object of strings: {e}",
            rthooks_api::POD_LABELS_ANNOTATION
        ))
    })?;
    for (k, v) in &labels {
        if !valid_label_key(k) || !valid_label_value(v) {
            return Err(Error::InvalidRequest(format!(
                "annotation {}: invalid label {k:?}={v:?}",
                rthooks_api::POD_LABELS_ANNOTATION
            )));
        }
    }
    Ok(labels)
}

fn valid_label_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn valid_label_key(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => {
            prefix.len() <= 253
                && prefix.split('.').all(|p| valid_label_name(p, 63))
                && valid_label_name(name, 63)
        }
        None => valid_label_name(k, 63),
    }
}

fn valid_label_value(v: &str) -> bool {
    v.is_empty() || valid_label_name(v, 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(annotations: &HashMap<String, String>) -> RequestFields<'_> {
        RequestFields {
            container_id: "",
            container_name: "",
            image: "",
            pod_name: "",
            pod_uid: "",
            pod_namespace: "",
            annotations,
        }
    }

    #[test]
    fn containerd_and_crio_annotations() {
        let containerd: HashMap<String, String> = [
            ("io.kubernetes.cri.container-name", "nginx"),
            ("io.kubernetes.cri.image-name", "docker.io/library/nginx:1"),
            ("io.kubernetes.cri.sandbox-name", "web-1"),
            ("io.kubernetes.cri.sandbox-uid", "u-1"),
            ("io.kubernetes.cri.sandbox-namespace", "prod"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let id = ContainerIdentity::from_request(&fields(&containerd), false).unwrap();
        assert_eq!(
            (
                id.container_name.as_str(),
                id.pod_name.as_str(),
                id.pod_namespace.as_str()
            ),
            ("nginx", "web-1", "prod")
        );
        let crio: HashMap<String, String> = [
            ("io.kubernetes.container.name", "c"),
            ("io.kubernetes.cri-o.ImageName", "img"),
            ("io.kubernetes.cri-o.ContainerID", "abc"),
            ("io.kubernetes.pod.name", "p"),
            ("io.kubernetes.pod.uid", "u"),
            ("io.kubernetes.pod.namespace", "ns"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let id = ContainerIdentity::from_request(&fields(&crio), false).unwrap();
        assert_eq!(
            (id.container_id.as_str(), id.image.as_str()),
            ("abc", "img")
        );
    }

    #[test]
    fn labels_only_when_trusted() {
        let a: HashMap<String, String> = [(
            rthooks_api::POD_LABELS_ANNOTATION.to_string(),
            r#"{"app":"web"}"#.to_string(),
        )]
        .into();
        assert!(ContainerIdentity::from_request(&fields(&a), false)
            .unwrap()
            .pod_labels
            .is_empty());
        assert_eq!(
            ContainerIdentity::from_request(&fields(&a), true)
                .unwrap()
                .pod_labels["app"],
            "web"
        );
    }

    #[test]
    fn bad_requests_are_refused() {
        let big: HashMap<String, String> = [("k".to_string(), "v".repeat(1 << 20))].into();
        assert!(ContainerIdentity::from_request(&fields(&big), false)
            .unwrap_err()
            .to_string()
            .contains("annotations are"));
        for bad in [
            r#"{"app": 1}"#,
            r#"["a"]"#,
            r#"{"app":"a b"}"#,
            r#"{"-x":"y"}"#,
            "\u{fffd}",
        ] {
            let a: HashMap<String, String> = [(
                rthooks_api::POD_LABELS_ANNOTATION.to_string(),
                bad.to_string(),
            )]
            .into();
            assert!(
                ContainerIdentity::from_request(&fields(&a), true).is_err(),
                "{bad}"
            );
        }
        let ctl: HashMap<String, String> = [(
            "io.kubernetes.cri.container-name".to_string(),
            "a\nb".to_string(),
        )]
        .into();
        assert!(ContainerIdentity::from_request(&fields(&ctl), false).is_err());
    }

    #[test]
    fn label_keys_with_prefixes() {
        assert!(valid_label_key("app.kubernetes.io/name"));
        assert!(!valid_label_key("a/b/c"));
        assert!(!valid_label_key(&"a".repeat(64)));
        assert!(valid_label_value(""));
    }
}
