//! The generated CRDs (the files under deploy/crds, as a user applies them) against a real
//! API server: both are accepted and Established, a valid policy of each kind is stored,
//! every invalid policy is refused by the server with the bad field named, and per-node
//! status entries applied under two field managers stay side by side.
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use rthooks_policy::resources::{crd_files, status_field_manager, CRD_DIR};
use rthooks_policy::{NamespacedRuntimePolicy, RuntimePolicy};
use rthooks_testkit::apiserver::{unavailable, TestApiServer};
use serde_json::{json, Value};

fn deployed_crds() -> Vec<CustomResourceDefinition> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_DIR);
    crd_files()
        .into_iter()
        .map(|(name, _)| {
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            rthooks_policy::yaml::from_str(&text).unwrap()
        })
        .collect()
}

fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "rthooks.io/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

fn valid_spec() -> Value {
    json!({
        "podSelector": {"matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend"]}]},
        "containerSelector": {"matchExpressions": [{"key": "name", "operator": "In", "values": ["nginx"]}]},
        "rules": [{"binaries": ["/usr/bin/curl", "/usr/bin/nc"], "action": "Deny"}]
    })
}

/// `valid_spec` with the value at `pointer` replaced.
fn spec_with(pointer: &str, value: Value) -> Value {
    let mut spec = valid_spec();
    *spec.pointer_mut(pointer).unwrap() = value;
    spec
}

#[tokio::test]
async fn the_api_server_takes_the_crds_and_refuses_bad_policies_naming_the_field() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let audit =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("apiserver-audit/policy-crds.log");
    let server = TestApiServer::start(&audit).await.unwrap();
    server.install_crds(&deployed_crds()).await.unwrap();
    let client = server.client().await.unwrap();

    let cluster_res = ApiResource::erase::<RuntimePolicy>(&());
    let ns_res = ApiResource::erase::<NamespacedRuntimePolicy>(&());
    let cluster: Api<DynamicObject> = Api::all_with(client.clone(), &cluster_res);
    let namespaced: Api<DynamicObject> = Api::namespaced_with(client.clone(), "prod", &ns_res);
    let pp = PostParams::default();

    cluster
        .create(&pp, &object("RuntimePolicy", "good", valid_spec()))
        .await
        .unwrap();
    namespaced
        .create(
            &pp,
            &object("NamespacedRuntimePolicy", "good", valid_spec()),
        )
        .await
        .unwrap();
    // What the server stores reads back as the typed resource and a valid policy.
    let typed: Api<RuntimePolicy> = Api::all(client.clone());
    let stored = typed.get("good").await.unwrap().to_policy();
    stored.validate().unwrap();
    assert_eq!(stored.metadata.name, "good");

    let cases = [
        (
            spec_with("/rules/0/action", json!("Block")),
            "spec.rules[0].action",
        ),
        (spec_with("/rules", json!([])), "spec.rules"),
        (
            spec_with("/rules/0/binaries", json!([])),
            "spec.rules[0].binaries",
        ),
        (
            spec_with("/rules/0/binaries/1", json!("usr/bin/nc")),
            "spec.rules[0].binaries",
        ),
        (
            spec_with("/rules/0/binaries/1", json!("/usr/../bin/nc")),
            "spec.rules[0].binaries",
        ),
        (
            spec_with("/rules/0/binaries/1", json!("/usr/bin/")),
            "spec.rules[0].binaries",
        ),
        (
            spec_with("/podSelector/matchExpressions/0/values", json!([])),
            "spec.podSelector.matchExpressions[0]",
        ),
        (
            spec_with("/podSelector/matchExpressions/0/operator", json!("Near")),
            "spec.podSelector.matchExpressions[0].operator",
        ),
        (
            spec_with("/containerSelector/matchExpressions/0/key", json!("pod")),
            "spec.containerSelector",
        ),
    ];
    for (i, (spec, field)) in cases.into_iter().enumerate() {
        let name = format!("bad-{i}");
        for (api, kind) in [
            (&cluster, "RuntimePolicy"),
            (&namespaced, "NamespacedRuntimePolicy"),
        ] {
            let refused = api
                .create(&pp, &object(kind, &name, spec.clone()))
                .await
                .expect_err(&format!("{kind} {name} ({field}) was accepted"));
            let message = refused.to_string();
            assert!(
                message.contains(field),
                "{kind} {name}: {field:?} not named in {message:?}"
            );
        }
    }

    // Two agents' entries, each under its own field manager, stay side by side; a second
    // apply by one replaces only its own entry.
    let apply_status = |node: &str, containers: u64| {
        let patch = json!({
            "apiVersion": "rthooks.io/v1alpha1", "kind": "RuntimePolicy",
            "status": {"nodes": [{"node": node, "loaded": true, "containers": containers,
                "observedGeneration": 1}]}
        });
        let params = PatchParams::apply(&status_field_manager(node));
        let cluster = cluster.clone();
        async move {
            cluster
                .patch_status("good", &params, &Patch::Apply(patch))
                .await
                .unwrap()
        }
    };
    apply_status("node-a", 1).await;
    apply_status("node-b", 2).await;
    apply_status("node-a", 3).await;
    let status = typed.get("good").await.unwrap().status.unwrap();
    let mut nodes: Vec<(String, u64)> = status
        .nodes
        .iter()
        .map(|n| (n.node.clone(), n.containers))
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [("node-a".to_string(), 3), ("node-b".to_string(), 2)]
    );
}
