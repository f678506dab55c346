//! The pod source against a real Kubernetes API server (etcd + apiextensions-apiserver
//! from `cargo xtask setup`) and the real agent with its real BPF programs: labels of
//! registrations that carry no trusted labels come from this node's pods, label changes
//! flip map entries both ways, mirror pods label static pods, deleted pods drop their
//! entries, a relist after compaction converges, a restarted agent rebuilds and finds a
//! container it never registered, and an unreachable API makes registrations fail fast.
//!
//! The server serves no core resources: pods are a Pod-shaped custom resource in the
//! test group `core.test.rthooks.io` (DESIGN.md), which the agent is pointed at with
//! `--kube-core-group`. Every request the agent made is in the audit logs under
//! `target/tmp/apiserver-audit/`.
mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::json;

#[test]
fn labels_come_from_this_nodes_pods_and_follow_them() {
    let Some(cluster) = Cluster::start("labels") else {
        return;
    };
    let metrics = free_address();
    let victim = Victim::new();
    let agent = cluster.ready_agent(&metrics, &victim, &[]);

    // A pod in the store: the registration takes its labels, not the pod's own claim.
    let uid = cluster.create_pod("shop", "web-0", NODE, json!({"app": "web"}));
    let web = Cgroup::new("rthooks-kpods-web");
    register_once_listed(&agent, request(&web, "ctr-web", "shop", "web-0", &uid));
    assert_eq!(labels_of(&agent, "ctr-web"), app("web"));
    let (outcome, ran) = victim.run(&web, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");

    // The pod loses its label: the container is released; it gains it back: denied again.
    let entries_before = agent.map_entries("containers");
    cluster.set_labels("shop", "web-0", json!({"app": null, "tier": "front"}));
    wait_for("the label removal applied", Duration::from_secs(30), || {
        (labels_of(&agent, "ctr-web") == Some(vec![("tier".into(), "front".into())])).then_some(())
    });
    assert_eq!(agent.map_entries("containers"), entries_before - 1);
    let (outcome, ran) = victim.run(&web, "absolute");
    assert!(outcome.succeeded() && ran, "released: {outcome:?}");
    cluster.set_labels("shop", "web-0", json!({"app": "web", "tier": null}));
    wait_for(
        "the label addition applied",
        Duration::from_secs(30),
        || (labels_of(&agent, "ctr-web") == app("web")).then_some(()),
    );
    assert_eq!(agent.map_entries("containers"), entries_before);
    let (outcome, ran) = victim.run(&web, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");

    // A pod of another node is not in this node's store: its registration waits out the
    // bound and fails, leaving the hook's failure rule to decide.
    let other_uid = cluster.create_pod("shop", "web-1", "node-b", json!({"app": "web"}));
    let other = Cgroup::new("rthooks-kpods-other");
    let refused = agent
        .runtime_hook(request(&other, "ctr-other", "shop", "web-1", &other_uid))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("not in the agent's pod store after 3s"),
        "{refused:?}"
    );
    assert!(labels_of(&agent, "ctr-other").is_none());

    // A registration for a pod that appears while it waits gets its labels.
    let late = Cgroup::new("rthooks-kpods-late");
    let socket = agent.address();
    let late_req = request(&late, "ctr-late", "shop", "late-0", "");
    let waiting = std::thread::spawn(move || hook_call(&socket, late_req));
    wait_for("the registration waiting", Duration::from_secs(30), || {
        agent
            .log()
            .contains("waiting for pod shop/late-0")
            .then_some(())
    });
    cluster.create_pod("shop", "late-0", NODE, json!({"app": "web"}));
    waiting
        .join()
        .unwrap()
        .expect("the waiting registration succeeds");
    assert_eq!(labels_of(&agent, "ctr-late"), app("web"));
    assert_eq!(
        metric(
            &metrics,
            "rthooks_pod_label_lookups_total{result=\"waited\"}"
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &metrics,
            "rthooks_pod_label_lookups_total{result=\"not_found\"}"
        ),
        Some(1)
    );

    // A static pod's container carries the static pod's UID; its mirror pod in the API
    // (another UID, the static one in the mirror annotation) gives it its labels.
    let static_cg = Cgroup::new("rthooks-kpods-static");
    let mirror = pod(
        &format!("etcd-{NODE}"),
        NODE,
        json!({"app": "web"}),
        json!({"kubernetes.io/config.mirror": "static-pod-hash"}),
        json!({}),
    );
    cluster.create("kube-system", mirror);
    wait_for(
        "the mirror pod in the store",
        Duration::from_secs(30),
        || {
            agent
                .runtime_hook(request(
                    &static_cg,
                    "ctr-static",
                    "kube-system",
                    &format!("etcd-{NODE}"),
                    "static-pod-hash",
                ))
                .ok()
        },
    );
    assert_eq!(labels_of(&agent, "ctr-static"), app("web"));
    let (outcome, ran) = victim.run(&static_cg, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");

    // namespaceSelector: the namespace's labels select its pods' containers, and a change
    // of them flips the container's entry both ways.
    let payments = format!(
        "apiVersion: rthooks.io/v1alpha1\nkind: RuntimePolicy\nmetadata: {{name: deny-payments}}\n\
         spec:\n  namespaceSelector: {{matchLabels: {{team: payments}}}}\n\
         \x20 rules: [{{binaries: [{}], action: Deny}}]\n",
        victim.path.display()
    );
    agent.add_policy(&payments).unwrap();
    let till_uid = cluster.create_pod("pay", "till-0", NODE, json!({}));
    let till = Cgroup::new("rthooks-kpods-till");
    wait_for(
        "till-0 in the agent's store",
        Duration::from_secs(30),
        || {
            agent
                .runtime_hook(request(&till, "ctr-till", "pay", "till-0", &till_uid))
                .ok()
        },
    );
    let policies_of = |id: &str| {
        agent
            .containers()
            .into_iter()
            .find(|c| c.container_id == id)
            .map(|c| c.policies)
            .unwrap_or_default()
    };
    assert!(
        policies_of("ctr-till").is_empty(),
        "namespace not labelled yet"
    );
    let (outcome, ran) = victim.run(&till, "absolute");
    assert!(outcome.succeeded() && ran, "{outcome:?}");
    cluster.create_namespace("pay", json!({"team": "payments"}));
    wait_for(
        "the namespace's labels applied",
        Duration::from_secs(30),
        || (policies_of("ctr-till") == ["deny-payments"]).then_some(()),
    );
    let (outcome, ran) = victim.run(&till, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");
    cluster.set_namespace_labels("pay", json!({"team": "search"}));
    wait_for(
        "the namespace's label change applied",
        Duration::from_secs(30),
        || policies_of("ctr-till").is_empty().then_some(()),
    );
    let (outcome, ran) = victim.run(&till, "absolute");
    assert!(outcome.succeeded() && ran, "{outcome:?}");
    cluster.set_namespace_labels("pay", json!({"team": "payments"}));
    wait_for(
        "the namespace's label change back applied",
        Duration::from_secs(30),
        || (policies_of("ctr-till") == ["deny-payments"]).then_some(()),
    );
    let (outcome, ran) = victim.run(&till, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");

    // A pod deleted: its container is forgotten and its map entry dropped.
    let entries = agent.map_entries("containers");
    cluster.delete_pod("shop", "web-0");
    wait_for(
        "web-0's container forgotten",
        Duration::from_secs(30),
        || labels_of(&agent, "ctr-web").is_none().then_some(()),
    );
    assert_eq!(agent.map_entries("containers"), entries - 1);
    let (outcome, ran) = victim.run(&web, "absolute");
    assert!(outcome.succeeded() && ran, "{outcome:?}");
}

#[test]
fn outages_relists_and_restarts_converge() {
    let Some(mut cluster) = Cluster::start("outages") else {
        return;
    };
    let metrics = free_address();
    let victim = Victim::new();
    let mut agent = cluster.ready_agent(&metrics, &victim, &[]);
    let a_uid = cluster.create_pod("shop", "a", NODE, json!({"app": "web"}));
    let b_uid = cluster.create_pod("shop", "b", NODE, json!({"app": "web"}));
    let (a, b) = (
        Cgroup::new("rthooks-kpods-a"),
        Cgroup::new("rthooks-kpods-b"),
    );
    for (cg, id, name, uid) in [(&a, "ctr-a", "a", &a_uid), (&b, "ctr-b", "b", &b_uid)] {
        wait_for(
            "the pod in the agent's store",
            Duration::from_secs(30),
            || agent.runtime_hook(request(cg, id, "shop", name, uid)).ok(),
        );
    }

    // The server stops: readiness says why, registrations fail at once (no wait), and
    // everything comes back by itself with the server.
    cluster.server.stop_apiserver();
    // Each source notices on its own watch: wait for the pods' one.
    wait_for(
        "readiness to report the outage",
        Duration::from_secs(60),
        || {
            http_get(&metrics, "/readyz").filter(|(status, why)| {
                status.contains(" 503 ") && why.contains("Kubernetes API (pods): unreachable")
            })
        },
    );
    assert_eq!(metric(&metrics, "rthooks_kube_pods_synced "), Some(0));
    let a2 = a.child("second");
    let refused = agent
        .runtime_hook(request(&a2, "ctr-a2", "shop", "a", &a_uid))
        .unwrap_err();
    assert!(refused.message().contains("(no wait)"), "{refused:?}");
    assert_eq!(
        metric(
            &metrics,
            "rthooks_pod_label_lookups_total{result=\"api_unavailable\"}"
        ),
        Some(1)
    );
    cluster
        .rt
        .block_on(cluster.server.start_apiserver())
        .unwrap();
    wait_ready(&metrics);
    agent
        .runtime_hook(request(&a2, "ctr-a2", "shop", "a", &a_uid))
        .unwrap();
    assert_eq!(labels_of(&agent, "ctr-a2"), app("web"));

    // Changes the agent misses (it is stopped), history compacted, the watch broken: the
    // watch cannot resume (410 Gone), the agent relists, and its maps converge.
    // The server is restarted before the changes, so that no event of them can already
    // sit in the stopped agent's socket; a write the agent does not watch (another node's
    // pod) moves the restarted server's watch cache past the agent's resourceVersion.
    signal(&agent, nix::sys::signal::Signal::SIGSTOP);
    cluster.create_pod("shop", "elsewhere", "node-b", json!({}));
    cluster.server.stop_apiserver();
    cluster
        .rt
        .block_on(cluster.server.start_apiserver())
        .unwrap();
    cluster.set_labels("shop", "a", json!({"app": "db"}));
    cluster.delete_pod("shop", "b");
    cluster.server.compact_etcd().unwrap();
    signal(&agent, nix::sys::signal::Signal::SIGCONT);
    wait_for("the relist to converge", Duration::from_secs(60), || {
        (labels_of(&agent, "ctr-a") == app("db") && labels_of(&agent, "ctr-b").is_none())
            .then_some(())
    });
    assert_eq!(labels_of(&agent, "ctr-a2"), app("db"));
    let log = agent.log();
    assert!(
        log.contains("410") || log.contains("too old resource version") || log.contains("Expired"),
        "the watch did not end with 410 Gone:\n{log}"
    );
    let (outcome, ran) = victim.run(&a, "absolute");
    assert!(
        outcome.succeeded() && ran,
        "released by the relist: {outcome:?}"
    );

    // The agent restarted, with a container started while it was down (the hook failed
    // open): the maps are rebuilt from the store and the container is found and reported.
    agent.kill();
    cluster.set_labels("shop", "a", json!({"app": "web"}));
    let running = json!({"containerStatuses": [{"name": "app", "image": "localhost/web:1",
        "containerID": "containerd://ctr-unregistered", "state": {"running": {}}}]});
    let c_uid = cluster.create(
        "shop",
        pod("c", NODE, json!({"app": "web"}), json!({}), running),
    );
    let kubepods = Cgroup::new("rthooks-kpods-kubepods");
    let c_pod = kubepods.child(&format!("pod{c_uid}"));
    let c_ctr = c_pod.child("ctr-unregistered");
    agent.spawn();
    wait_ready(&metrics);
    wait_for(
        "the unregistered container found",
        Duration::from_secs(60),
        || {
            agent
                .containers()
                .into_iter()
                .find(|c| c.container_id == "ctr-unregistered")
        },
    );
    let found = agent
        .containers()
        .into_iter()
        .find(|c| c.container_id == "ctr-unregistered")
        .unwrap();
    assert!(!found.covered);
    assert_eq!(found.source, "kube-discovery");
    assert_eq!(found.cgroup_id, c_ctr.id());
    assert_eq!(found.pod_name, "c");
    assert_eq!(
        metric(&metrics, "rthooks_containers_discovered_total "),
        Some(1)
    );
    let (outcome, ran) = victim.run(&c_ctr, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");
    wait_for("a's labels rebuilt", Duration::from_secs(30), || {
        (labels_of(&agent, "ctr-a") == app("web")).then_some(())
    });
    let (outcome, ran) = victim.run(&a, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");
    let listing = Command::new(env!("CARGO_BIN_EXE_rthooksctl"))
        .arg(format!("--address=unix://{}", agent.socket.display()))
        .arg("containers")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with("ctr-unregiste"))
        .unwrap_or_else(|| panic!("rthooksctl containers:\n{listing}"));
    assert!(line.contains(" NO "), "reported as not covered: {line}");
}
