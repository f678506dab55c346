//! The CRDs under deploy/crds are exactly what the policy types generate.
use rthooks_policy::resources::{crd_files, CRD_DIR};

#[test]
fn deploy_crds_match_the_policy_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_DIR);
    let files = crd_files();
    assert_eq!(files.len(), 2);
    let mut generated = Vec::new();
    for (name, want) in files {
        let have = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            have == want,
            "{CRD_DIR}/{name} does not match the policy types in policy/src: run `cargo xtask codegen` and commit the result"
        );
        generated.push(name);
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    generated.sort();
    assert_eq!(
        on_disk, generated,
        "{CRD_DIR} holds files the policy types do not generate: run `cargo xtask codegen`"
    );
}
