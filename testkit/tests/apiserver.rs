//! The test API server (etcd + apiextensions-apiserver built by `cargo xtask setup`) starts,
//! serves a CustomResourceDefinition until it is Established, serves its resources, records
//! what it served in the audit log, and comes back after a restart with its data.
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use rthooks_testkit::apiserver::{unavailable, TestApiServer};

fn widget_crd() -> CustomResourceDefinition {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.rthooks.io"},
        "spec": {
            "group": "test.rthooks.io",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "properties": {"spec": {"type": "object",
                        "properties": {"size": {"type": "integer", "minimum": 1}}}}}}}]
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn serves_custom_resources_and_survives_a_restart() {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let audit = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("apiserver-audit/smoke.log");
    // What an earlier run left: not part of this run's log.
    std::fs::create_dir_all(audit.parent().unwrap()).unwrap();
    std::fs::write(&audit, "{\"stage\":\"ResponseComplete\",\"verb\":\"earlier-run\",\"objectRef\":{\"resource\":\"widgets\"}}\n").unwrap();
    let mut server = TestApiServer::start(&audit).await.unwrap();
    let client = server.client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &widget_crd())
        .await
        .unwrap();
    let established = await_condition(
        crds,
        "widgets.test.rthooks.io",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(Duration::from_secs(60), established)
        .await
        .expect("the CRD is Established within 60 s")
        .unwrap();

    let gvk = GroupVersionKind::gvk("test.rthooks.io", "v1", "Widget");
    let resource = ApiResource::from_gvk(&gvk);
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let widget = |name: &str, size: i64| -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "test.rthooks.io/v1", "kind": "Widget",
            "metadata": {"name": name}, "spec": {"size": size}
        }))
        .unwrap()
    };
    widgets
        .create(&PostParams::default(), &widget("a", 3))
        .await
        .unwrap();
    // The schema is enforced by the server itself, naming the field.
    let refused = widgets
        .create(&PostParams::default(), &widget("b", 0))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("spec.size"), "{refused}");

    // A control-plane outage: the same etcd, a new server process.
    server.stop_apiserver();
    assert!(
        widgets.get("a").await.is_err(),
        "the stopped server still answered"
    );
    server.start_apiserver().await.unwrap();
    let a = widgets.get("a").await.unwrap();
    assert_eq!(a.data["spec"]["size"], 3);

    // This run's requests, before and after the restart, and nothing older.
    assert_eq!(server.audit_log(), audit);
    let records = rthooks_testkit::apiserver::read_audit_log(&audit).unwrap();
    let widget_requests: Vec<(&str, &str, u16)> = records
        .iter()
        .filter(|r| r.resource == "widgets")
        .map(|r| (r.verb.as_str(), r.api_group.as_str(), r.code))
        .collect();
    assert_eq!(
        widget_requests,
        [
            ("create", "test.rthooks.io", 201),
            ("create", "test.rthooks.io", 422),
            ("get", "test.rthooks.io", 200),
        ],
        "{records:?}"
    );
}
