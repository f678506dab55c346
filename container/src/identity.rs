//! Who a container is: the fields a sender filled in, else the runtime's annotations
//! ([`crate::annotations`]), else what kubelet encoded in its cgroup path.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::annotations::{self as keys, first};
use crate::cgroup::CgroupPath;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerIdentity {
    pub container_id: String,
    pub container_name: String,
    pub image: String,
    pub pod_name: String,
    pub pod_uid: String,
    /// Empty when nothing names it.
    pub pod_namespace: String,
    pub pod_labels: BTreeMap<String, String>,
}

/// Kubernetes caps all annotations of an object at 256 KiB; more did not come from a
/// kubelet.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// Longer identity fields are not something a runtime produced.
pub const MAX_FIELD_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "annotations are {size} bytes, more than the {MAX_ANNOTATIONS_BYTES} Kubernetes allows"
    )]
    AnnotationsTooLarge { size: usize },
    #[error("{field} is longer than {MAX_FIELD_LEN} bytes or holds control characters")]
    BadField { field: &'static str },
}

impl ContainerIdentity {
    /// Fills each empty field from `annotations` (containerd's key, then CRI-O's; for the
    /// namespace then `extra_namespace_keys`), then from `cgroup`: the pod UID kubelet put
    /// in it, and the container id in its leaf (or the leaf itself, the next best stable
    /// name). Labels are left alone: whether the labels annotation is believed is the
    /// caller's decision ([`crate::labels::from_annotations`]).
    pub fn complete(
        mut self,
        annotations: &HashMap<String, String>,
        cgroup: Option<&CgroupPath>,
        extra_namespace_keys: &[String],
    ) -> ContainerIdentity {
        let fill = |field: &mut String, value: Option<&str>| {
            if field.is_empty() {
                if let Some(v) = value {
                    *field = v.to_owned();
                }
            }
        };
        fill(
            &mut self.container_id,
            first(annotations, keys::CONTAINER_ID_KEYS)
                .or_else(|| cgroup.and_then(|c| c.container_id().or(c.leaf()))),
        );
        fill(
            &mut self.container_name,
            first(annotations, keys::CONTAINER_NAME_KEYS),
        );
        fill(&mut self.image, first(annotations, keys::IMAGE_KEYS));
        fill(&mut self.pod_name, first(annotations, keys::POD_NAME_KEYS));
        if self.pod_uid.is_empty() {
            self.pod_uid = first(annotations, keys::POD_UID_KEYS)
                .map(str::to_owned)
                .or_else(|| cgroup.and_then(CgroupPath::pod_uid))
                .unwrap_or_default();
        }
        fill(
            &mut self.pod_namespace,
            first(annotations, keys::POD_NAMESPACE_KEYS)
                .or_else(|| first(annotations, extra_namespace_keys)),
        );
        self
    }

    /// Refuses fields no runtime produces: over [`MAX_FIELD_LEN`] bytes or with control
    /// characters (they would end up in logs and events).
    pub fn validate(&self) -> Result<(), IdentityError> {
        for (field, v) in [
            ("containerID", &self.container_id),
            ("containerName", &self.container_name),
            ("containerImage", &self.image),
            ("podName", &self.pod_name),
            ("podUID", &self.pod_uid),
            ("podNamespace", &self.pod_namespace),
        ] {
            if v.len() > MAX_FIELD_LEN || v.chars().any(char::is_control) {
                return Err(IdentityError::BadField { field });
            }
        }
        Ok(())
    }
}

/// Refuses annotations larger than Kubernetes allows, before anything parses them.
pub fn check_annotations_size(annotations: &HashMap<String, String>) -> Result<(), IdentityError> {
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ANNOTATIONS_BYTES {
        return Err(IdentityError::AnnotationsTooLarge { size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{containerd, crio};
    use crate::CgroupsPath;

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn from(a: &HashMap<String, String>, cgroup: Option<&str>) -> ContainerIdentity {
        let cg = cgroup.map(|c| CgroupsPath::parse(c).unwrap().dir());
        ContainerIdentity::default().complete(a, cg.as_ref(), &[])
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
        ]);
        let id = from(&a, Some("/kubepods/besteffort/podx/0123456789abcdef"));
        assert_eq!(
            id,
            ContainerIdentity {
                container_id: "0123456789abcdef".into(),
                container_name: "nginx".into(),
                image: "docker.io/library/nginx:1.27".into(),
                pod_name: "web-0".into(),
                pod_uid: "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f".into(),
                pod_namespace: "shop".into(),
                pod_labels: BTreeMap::new(),
            }
        );
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
        let id = from(
            &a,
            Some("/kubepods/pod22222222-2222-3333-4444-555555555555/crio-0123456789abcdef"),
        );
        assert_eq!(
            id.container_id, "deadbeefdeadbeef",
            "the annotation before the path"
        );
        assert_eq!(
            id.pod_uid, "11111111-2222-3333-4444-555555555555",
            "the annotation before the path"
        );
        assert_eq!(
            (
                id.container_name.as_str(),
                id.image.as_str(),
                id.pod_name.as_str(),
                id.pod_namespace.as_str()
            ),
            ("app", "quay.io/x/app:2", "app-7d9", "team-a")
        );
    }

    #[test]
    fn explicit_fields_win_and_empty_values_say_nothing() {
        let a = ann(&[
            (containerd::CONTAINER_NAME, ""),
            (crio::CONTAINER_NAME, "from-crio"),
            (containerd::SANDBOX_NAMESPACE, "annotated"),
        ]);
        let explicit = ContainerIdentity {
            pod_namespace: "explicit".into(),
            ..Default::default()
        };
        let id = explicit.complete(&a, None, &[]);
        assert_eq!(id.pod_namespace, "explicit");
        assert_eq!(id.container_name, "from-crio");
    }

    #[test]
    fn systemd_path_gives_pod_uid_and_container_id() {
        let id = from(
            &HashMap::new(),
            Some("kubepods-besteffort-pod8d7b6c6a_2c4e_4f1e_9d3b_0a1b2c3d4e5f.slice:cri-containerd:0123456789abcdef"),
        );
        assert_eq!(id.pod_uid, "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f");
        assert_eq!(id.container_id, "0123456789abcdef");
        assert_eq!(id.pod_namespace, "");
        // A leaf that carries no id: the leaf itself.
        assert_eq!(
            from(&HashMap::new(), Some("/test/ctr-a")).container_id,
            "ctr-a"
        );
    }

    #[test]
    fn namespace_keys_in_order() {
        let keys = vec!["custom/ns".to_string()];
        let a = ann(&[
            ("custom/ns", "mine"),
            (containerd::SANDBOX_NAMESPACE, "other"),
        ]);
        let id = ContainerIdentity::default().complete(&a, None, &keys);
        assert_eq!(id.pod_namespace, "other", "the runtime's own key wins");
        let a = ann(&[("custom/ns", "mine")]);
        let id = ContainerIdentity::default().complete(&a, None, &keys);
        assert_eq!(id.pod_namespace, "mine");
        let a = ann(&[
            (crio::POD_NAMESPACE, "kube-system"),
            (containerd::SANDBOX_NAMESPACE, "shop"),
        ]);
        assert_eq!(
            from(&a, None).pod_namespace,
            "shop",
            "containerd's key before CRI-O's"
        );
    }

    #[test]
    fn validation() {
        let big = ann(&[("k", &"v".repeat(MAX_ANNOTATIONS_BYTES))]);
        assert!(matches!(
            check_annotations_size(&big),
            Err(IdentityError::AnnotationsTooLarge { .. })
        ));
        let id = from(&ann(&[(containerd::CONTAINER_NAME, "a\nb")]), None);
        assert!(matches!(
            id.validate(),
            Err(IdentityError::BadField {
                field: "containerName"
            })
        ));
        assert!(from(&ann(&[(containerd::CONTAINER_NAME, "ok")]), None)
            .validate()
            .is_ok());
    }
}
