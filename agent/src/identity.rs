//! A container's identity from a RuntimeHook request: the shared rule of
//! [`rthooks_container::identity`] (request fields, then annotations, then the cgroup
//! path), the agent's limits, and its own decision on the pod labels annotation.
use rthooks_api::tetragon::CreateContainer;
use rthooks_container::{identity, labels, CgroupPath};

pub use rthooks_container::ContainerIdentity;

use crate::error::Error;

/// Builds and validates the identity of the container in `cgroup`.
/// `trust_label_annotation` decides whether `rthooks.io/pod-labels` is believed: only where
/// our NRI plugin always overwrites it, otherwise a pod could pick its own labels and step
/// out of a deny policy.
pub fn from_request(
    req: &CreateContainer,
    cgroup: &CgroupPath,
    trust_label_annotation: bool,
) -> Result<ContainerIdentity, Error> {
    let invalid = |e: &dyn std::fmt::Display| Error::InvalidRequest(e.to_string());
    identity::check_annotations_size(&req.annotations).map_err(|e| invalid(&e))?;
    let mut id = ContainerIdentity {
        container_id: req.container_id.clone(),
        container_name: req.container_name.clone(),
        image: req.container_image.clone(),
        pod_name: req.pod_name.clone(),
        pod_uid: req.pod_uid.clone(),
        pod_namespace: req.pod_namespace.clone(),
        pod_labels: Default::default(),
    }
    .complete(&req.annotations, Some(cgroup), &[]);
    if trust_label_annotation {
        if let Some(parsed) = labels::from_annotations(&req.annotations) {
            id.pod_labels = parsed.map_err(|e| invalid(&e))?;
        }
    }
    id.validate().map_err(|e| invalid(&e))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rthooks_container::POD_LABELS_ANNOTATION;

    fn request(annotations: &[(&str, &str)]) -> CreateContainer {
        CreateContainer {
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn cgroup() -> CgroupPath {
        CgroupPath::clean("/test/ctr").unwrap()
    }

    #[test]
    fn labels_only_when_trusted() {
        let r = request(&[(POD_LABELS_ANNOTATION, r#"{"app":"web"}"#)]);
        assert!(from_request(&r, &cgroup(), false)
            .unwrap()
            .pod_labels
            .is_empty());
        assert_eq!(
            from_request(&r, &cgroup(), true).unwrap().pod_labels["app"],
            "web"
        );
        let bad = request(&[(POD_LABELS_ANNOTATION, r#"{"app":"a b"}"#)]);
        assert!(
            from_request(&bad, &cgroup(), false).is_ok(),
            "ignored when untrusted"
        );
        let e = from_request(&bad, &cgroup(), true).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
    }

    #[test]
    fn bad_requests_are_refused() {
        let big = request(&[("k", &"v".repeat(1 << 20))]);
        assert!(from_request(&big, &cgroup(), false)
            .unwrap_err()
            .to_string()
            .contains("annotations are"));
        let ctl = request(&[("io.kubernetes.cri.container-name", "a\nb")]);
        assert!(from_request(&ctl, &cgroup(), false).is_err());
    }

    #[test]
    fn fields_before_annotations_before_the_cgroup() {
        let mut r = request(&[("io.kubernetes.cri.container-name", "annotated")]);
        r.container_name = "sent".into();
        let id = from_request(&r, &cgroup(), false).unwrap();
        assert_eq!(id.container_name, "sent");
        assert_eq!(
            id.container_id, "ctr",
            "the cgroup leaf when nothing names the id"
        );
    }
}
