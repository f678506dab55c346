//! Container and pod identity from runtime annotations.
//!
//! containerd's CRI plugin and CRI-O use different keys; our NRI plugin adds the pod's
//! labels (which neither runtime puts in the spec) as [`POD_LABELS_ANNOTATION`].
use std::collections::{BTreeMap, HashMap};

pub use rthooks_api::POD_LABELS_ANNOTATION;

use crate::cgroup;

/// containerd CRI annotation keys.
pub mod containerd {
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
}

/// CRI-O annotation keys.
pub mod crio {
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri-o.ImageName";
    pub const CONTAINER_ID: &str = "io.kubernetes.cri-o.ContainerID";
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
}

/// Who a container is, as far as the runtime told us.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Identity {
    pub container_id: String,
    pub container_name: String,
    pub image: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// Empty when no namespace key is present: the failure rule then does not allow.
    pub pod_namespace: String,
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// Why the labels annotation was ignored, if it was present but not a JSON object of
    /// strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels_error: Option<String>,
}

fn first<'a>(a: &'a HashMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| a.get(*k).map(String::as_str).filter(|v| !v.is_empty()))
}

/// The pod namespace per the configured annotation keys (first present, non-empty wins).
pub fn namespace<'a>(annotations: &'a HashMap<String, String>, keys: &[String]) -> Option<&'a str> {
    keys.iter().find_map(|k| {
        annotations
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    })
}

/// Parses the pod labels annotation.
pub fn parse_labels(v: &str) -> Result<BTreeMap<String, String>, String> {
    serde_json::from_str(v)
        .map_err(|e| format!("{POD_LABELS_ANNOTATION} is not a JSON object of strings: {e}"))
}

impl Identity {
    /// Builds the identity. `state_id` is the runtime's container id (stdin state);
    /// `cgroup_path` the resolved cgroup path, used for the pod UID when no annotation
    /// carries it; `namespace_keys` the `--annotations-namespace-key` list.
    pub fn from_annotations(
        annotations: &HashMap<String, String>,
        state_id: Option<&str>,
        cgroup_path: Option<&str>,
        namespace_keys: &[String],
    ) -> Identity {
        let a = annotations;
        let container_id = state_id
            .filter(|s| !s.is_empty())
            .or_else(|| first(a, &[crio::CONTAINER_ID]))
            .map(str::to_owned)
            .or_else(|| cgroup_path.and_then(cgroup::container_id_from_path))
            .unwrap_or_default();
        let pod_uid = first(a, &[containerd::SANDBOX_UID, crio::POD_UID])
            .map(str::to_owned)
            .or_else(|| cgroup_path.and_then(cgroup::pod_uid_from_path))
            .unwrap_or_default();
        // The runtime's own keys first: containerd writes `io.kubernetes.cri.*` itself
        // after any pod annotations it passes through, so a pod cannot forge them; the
        // configured keys serve runtimes that use other ones.
        let pod_namespace = first(a, &[containerd::SANDBOX_NAMESPACE, crio::POD_NAMESPACE])
            .or_else(|| namespace(a, namespace_keys))
            .unwrap_or_default()
            .to_owned();
        let (pod_labels, labels_error) = match a.get(POD_LABELS_ANNOTATION) {
            None => (None, None),
            Some(v) => match parse_labels(v) {
                Ok(l) => (Some(l), None),
                Err(e) => (None, Some(e)),
            },
        };
        Identity {
            container_id,
            container_name: first(a, &[containerd::CONTAINER_NAME, crio::CONTAINER_NAME])
                .unwrap_or_default()
                .to_owned(),
            image: first(a, &[containerd::IMAGE_NAME, crio::IMAGE_NAME])
                .unwrap_or_default()
                .to_owned(),
            pod_name: first(a, &[containerd::SANDBOX_NAME, crio::POD_NAME])
                .unwrap_or_default()
                .to_owned(),
            pod_uid,
            pod_namespace,
            pod_labels,
            labels_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn keys() -> Vec<String> {
        vec![
            crio::POD_NAMESPACE.into(),
            containerd::SANDBOX_NAMESPACE.into(),
        ]
    }

    #[test]
    fn containerd_annotations() {
        let a = ann(&[
            (containerd::CONTAINER_NAME, "nginx"),
            (containerd::CONTAINER_TYPE, "container"),
            (containerd::IMAGE_NAME, "docker.io/library/nginx:1.27"),
            (containerd::SANDBOX_NAME, "web-0"),
            (
                containerd::SANDBOX_UID,
                "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f",
            ),
            (containerd::SANDBOX_NAMESPACE, "shop"),
            (POD_LABELS_ANNOTATION, r#"{"app":"web","tier":"frontend"}"#),
        ]);
        let id = Identity::from_annotations(&a, Some("c1"), None, &keys());
        assert_eq!(id.container_id, "c1");
        assert_eq!(id.container_name, "nginx");
        assert_eq!(id.image, "docker.io/library/nginx:1.27");
        assert_eq!(id.pod_name, "web-0");
        assert_eq!(id.pod_uid, "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f");
        assert_eq!(id.pod_namespace, "shop");
        assert_eq!(id.pod_labels.unwrap()["tier"], "frontend");
    }

    #[test]
    fn crio_annotations() {
        let a = ann(&[
            (crio::CONTAINER_NAME, "app"),
            (crio::IMAGE_NAME, "quay.io/x/app:2"),
            (crio::CONTAINER_ID, "deadbeefdeadbeef"),
            (crio::POD_NAME, "app-7d9"),
            (crio::POD_UID, "11111111-2222-3333-4444-555555555555"),
            (crio::POD_NAMESPACE, "team-a"),
        ]);
        let id = Identity::from_annotations(&a, None, None, &keys());
        assert_eq!(id.container_id, "deadbeefdeadbeef");
        assert_eq!(id.container_name, "app");
        assert_eq!(id.image, "quay.io/x/app:2");
        assert_eq!(id.pod_name, "app-7d9");
        assert_eq!(id.pod_namespace, "team-a");
        assert_eq!(id.pod_labels, None);
    }

    #[test]
    fn pod_uid_from_systemd_path_when_no_annotation() {
        let p = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod8d7b6c6a_2c4e_4f1e_9d3b_0a1b2c3d4e5f.slice/cri-containerd-0123456789abcdef.scope";
        let id = Identity::from_annotations(&HashMap::new(), None, Some(p), &keys());
        assert_eq!(id.pod_uid, "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f");
        assert_eq!(id.container_id, "0123456789abcdef");
        assert_eq!(id.pod_namespace, "");
    }

    #[test]
    fn namespace_key_order_and_bad_labels() {
        let a = ann(&[
            ("custom/ns", "mine"),
            (containerd::SANDBOX_NAMESPACE, "other"),
            (POD_LABELS_ANNOTATION, "[1,2]"),
        ]);
        let id = Identity::from_annotations(&a, None, None, &["custom/ns".into()]);
        assert_eq!(id.pod_namespace, "other", "the runtime's own key wins");
        assert!(id.pod_labels.is_none());
        assert!(id.labels_error.is_some());
        let a = ann(&[("custom/ns", "mine")]);
        let id = Identity::from_annotations(&a, None, None, &["custom/ns".into()]);
        assert_eq!(id.pod_namespace, "mine");
        // containerd with pod annotations passed through: its own key wins.
        let a = ann(&[
            (crio::POD_NAMESPACE, "kube-system"),
            (containerd::SANDBOX_NAMESPACE, "shop"),
        ]);
        assert_eq!(
            Identity::from_annotations(&a, None, None, &keys()).pod_namespace,
            "shop"
        );
    }
}
