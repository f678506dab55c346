//! As root, with real runc and the real agent: the hook registers a container before it
//! runs, with the cgroup id of the container's own process; with the agent stopped the
//! failure rule refuses or allows by namespace.
mod common;

use common::*;

#[test]
fn runc_container_is_registered_with_its_cgroup_id() {
    if !root_prereqs(&["runc"]) {
        return;
    }
    let agent = Agent::start();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("hook.log");
    let c = RuncContainer::new(
        tmp.path(),
        BundleSpec {
            namespace: Some("shop"),
            labels: Some(r#"{"app":"web","tier":"frontend"}"#),
            poststop: true,
            hook_args: vec![
                format!("--grpc-address={}", agent.address()),
                format!("--log-fname={}", log.display()),
                "--config-file=/nonexistent/rthooks-oci-hook.json".into(),
            ],
        },
    );
    let out = c.run();
    assert!(
        out.status.success(),
        "runc run failed: {out:?}\nhook log: {:?}\nagent log:\n{}",
        log_lines(&log),
        agent.log()
    );
    let pid = c.pid();
    let (cg_path, cg_id) = cgroup_id_of_pid(pid);
    assert!(rthooks_oci_hook::container::CgroupPath::clean(&format!(
        "{}/{}",
        c.cgroup_parent, c.id
    ))
    .unwrap()
    .contains(&cg_path));

    let lines = log_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["decision"], "registered", "{}", lines[0]);
    assert_eq!(lines[0]["container_id"], c.id.as_str());

    let list = agent.containers();
    let got = list
        .iter()
        .find(|x| x.container_id == c.id)
        .unwrap_or_else(|| panic!("agent does not list {}: {list:?}\n{}", c.id, agent.log()));
    assert_eq!(
        got.cgroup_id, cg_id,
        "cgroup id of /proc/{pid}/cgroup ({cg_path})"
    );
    assert_eq!(got.pod_namespace, "shop");
    assert_eq!(got.pod_name, "pod-0");
    assert_eq!(got.container_name, "sleeper");
    assert_eq!(
        got.pod_labels.get("tier").map(String::as_str),
        Some("frontend")
    );
    eprintln!(
        "registered {} with cgroup id {cg_id} ({cg_path}) in {} ms",
        c.id, lines[0]["total_ms"]
    );

    if let Some(list) = agent.rthooksctl_containers() {
        let c = list
            .iter()
            .find(|x| x["container_id"] == c.id.as_str())
            .unwrap_or_else(|| panic!("rthooksctl does not list it: {list:?}"));
        assert_eq!(c["cgroup_id"], cg_id);
    }

    // poststop tells the agent the container is gone.
    let out = c.delete();
    assert!(out.status.success(), "runc delete: {out:?}");
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["stage"], "poststop");
    assert_eq!(lines[1]["decision"], "removed", "{}", lines[1]);
    assert!(!agent.containers().iter().any(|x| x.container_id == c.id));
}

#[test]
fn agent_down_refuses_normal_namespaces_and_allows_listed_ones() {
    if !root_prereqs(&["runc"]) {
        return;
    }
    // A stopped agent leaves its socket file behind: connections are refused.
    let mut agent = Agent::start();
    agent.stop();
    assert!(agent.socket.exists());
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("hook.log");
    let args = || {
        vec![
            format!("--grpc-address={}", agent.address()),
            format!("--log-fname={}", log.display()),
            "--config-file=/nonexistent/rthooks-oci-hook.json".into(),
        ]
    };
    let refused = RuncContainer::new(
        tmp.path(),
        BundleSpec {
            namespace: Some("shop"),
            labels: None,
            poststop: false,
            hook_args: args(),
        },
    );
    let out = refused.run();
    assert!(
        !out.status.success(),
        "a container in `shop` must not start without the agent: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing container"),
        "runc's error carries the hook's reason: {stderr}"
    );

    let allowed = RuncContainer::new(
        tmp.path(),
        BundleSpec {
            namespace: Some("kube-system"),
            labels: None,
            poststop: false,
            hook_args: args(),
        },
    );
    let out = allowed.run();
    assert!(
        out.status.success(),
        "kube-system is allowed on failure: {out:?}"
    );
    assert!(allowed.pid() > 0);

    // No namespace annotation at all: not allowed.
    let anonymous = RuncContainer::new(
        tmp.path(),
        BundleSpec {
            namespace: None,
            labels: None,
            poststop: false,
            hook_args: args(),
        },
    );
    assert!(!anonymous.run().status.success());

    let decisions: Vec<String> = log_lines(&log)
        .iter()
        .map(|l| l["decision"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(decisions, ["refused", "allowed-unregistered", "refused"]);
}
