//! The annotation keys container runtimes put in a container's OCI spec, and the order in
//! which rthooks reads them.
use std::collections::HashMap;

/// containerd's CRI plugin (`io.kubernetes.cri.*`).
pub mod containerd {
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
}

/// CRI-O.
pub mod crio {
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri-o.ImageName";
    pub const CONTAINER_ID: &str = "io.kubernetes.cri-o.ContainerID";
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
}

// containerd's keys first: containerd writes `io.kubernetes.cri.*` itself, after any pod
// annotations it passes through, so a pod cannot forge them there; CRI-O's `io.kubernetes.*`
// keys are also pod-annotation-shaped.
pub const CONTAINER_NAME_KEYS: &[&str] = &[containerd::CONTAINER_NAME, crio::CONTAINER_NAME];
pub const IMAGE_KEYS: &[&str] = &[containerd::IMAGE_NAME, crio::IMAGE_NAME];
pub const POD_NAME_KEYS: &[&str] = &[containerd::SANDBOX_NAME, crio::POD_NAME];
pub const POD_UID_KEYS: &[&str] = &[containerd::SANDBOX_UID, crio::POD_UID];
pub const POD_NAMESPACE_KEYS: &[&str] = &[containerd::SANDBOX_NAMESPACE, crio::POD_NAMESPACE];
/// containerd names no container id in annotations (the runtime's state carries it).
pub const CONTAINER_ID_KEYS: &[&str] = &[crio::CONTAINER_ID];

/// The value of the first of `keys` that is present with a non-empty value: an empty
/// annotation says nothing, so the next key (or source) is asked.
pub fn first<K: AsRef<str>>(
    annotations: &HashMap<String, String>,
    keys: impl IntoIterator<Item = K>,
) -> Option<&str> {
    keys.into_iter().find_map(|k| {
        annotations
            .get(k.as_ref())
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_skips_absent_and_empty_values() {
        let a: HashMap<String, String> = [
            (containerd::SANDBOX_NAMESPACE.to_string(), String::new()),
            (crio::POD_NAMESPACE.to_string(), "team-a".to_string()),
        ]
        .into();
        assert_eq!(first(&a, POD_NAMESPACE_KEYS), Some("team-a"));
        assert_eq!(first(&a, IMAGE_KEYS), None);
        assert_eq!(first(&a, ["custom/ns"]), None);
    }
}
