//! Kernel integration tests: the real agent, its real eBPF programs on the running kernel
//! (sigkill mode on hosts that refuse LSM programs), real cgroups and real execs.
mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn write_policy(agent: &Agent, file: &str, yaml: &str) {
    let tmp = agent.policy_dir().join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(tmp, agent.policy_dir().join(file)).unwrap();
}

fn wait_policies(agent: &Agent, n: usize) {
    wait_for("policy count", WAIT, || {
        (agent.policies().len() == n).then_some(())
    });
}

/// An agent that trusts the labels annotation, a victim binary, and a file policy denying
/// it to pods labelled app=web (loaded through the watched directory).
fn agent_with_deny_file() -> (Agent, Victim) {
    let agent = Agent::start(&["--trust-label-annotation"]);
    let victim = Victim::new();
    write_policy(
        &agent,
        "deny.yaml",
        &policy_yaml("deny-victim", "web", &victim.path, "Deny"),
    );
    wait_policies(&agent, 1);
    (agent, victim)
}

#[test]
fn denied_binary_never_runs_and_the_event_names_the_pod() {
    if !kernel_tests_possible() {
        return;
    }
    let (agent, victim) = agent_with_deny_file();

    let pod = Cgroup::new("rthooks-pod");
    let other = Cgroup::new("rthooks-other");
    agent
        .runtime_hook(hook_request(&pod, "c-web", r#"{"app":"web"}"#))
        .unwrap();
    let listed = agent.containers();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].cgroup_id, pod.id());
    assert_eq!(listed[0].policies, ["deny-victim"]);

    for how in ["absolute", "symlink", "relative"] {
        let (outcome, ran) = victim.run(&pod, how);
        assert!(
            agent.denied(&outcome),
            "{how}: expected a deny ({} mode), got {outcome:?}",
            agent.mode()
        );
        assert!(!ran, "{how}: the denied binary ran a line of its own");
    }
    let (outcome, ran) = victim.run(&other, "absolute");
    assert!(
        outcome.succeeded() && ran,
        "unrelated cgroup must run it: {outcome:?}"
    );

    // crun's child cgroup, or a process stepping into a nested cgroup, stays covered.
    let nested = pod.child("nested");
    let (outcome, ran) = victim.run(&nested, "absolute");
    assert!(
        agent.denied(&outcome) && !ran,
        "nested cgroup escaped the policy: {outcome:?}"
    );

    let events = wait_for("events", WAIT, || {
        let e = agent.events();
        (e.len() >= 4).then_some(e)
    });
    let e = &events[0];
    // sigkill mode carries a Deny out as a kill and reports it so.
    assert_eq!(e["action"], agent.deny_action(), "{e}");
    assert_eq!(e["binary"], victim.path.to_str().unwrap());
    assert_eq!(e["container"]["pod_name"], "web-0");
    assert_eq!(e["container"]["pod_namespace"], "shop");
    assert_eq!(e["container"]["pod_labels"]["app"], "web");
    assert_eq!(e["policies"][0], "file:deny-victim:deny");
}

#[test]
fn audit_reports_without_stopping_and_kill_kills() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&["--trust-label-annotation"]);
    let victim = Victim::new();
    agent
        .add_policy(&policy_yaml("audit-victim", "web", &victim.path, "Audit"))
        .unwrap();
    let pod = Cgroup::new("rthooks-pod");
    agent
        .runtime_hook(hook_request(&pod, "c-audit", r#"{"app":"web"}"#))
        .unwrap();
    let (outcome, ran) = victim.run(&pod, "absolute");
    assert!(
        outcome.succeeded() && ran,
        "audit must not stop the binary: {outcome:?}"
    );
    let e = wait_for("audit event", WAIT, || agent.events().into_iter().next());
    assert_eq!(e["action"], "audit");

    // A second policy with Kill on the same binary: the strongest action wins, and the
    // matching audit is still reported with it.
    agent
        .add_policy(&policy_yaml("kill-victim", "web", &victim.path, "Kill"))
        .unwrap();
    let (outcome, ran) = victim.run(&pod, "absolute");
    assert!(matches!(outcome, Outcome::Killed) && !ran, "{outcome:?}");
    let e = wait_for("kill event", WAIT, || agent.events().into_iter().nth(1));
    assert_eq!(e["action"], "kill");
    let policies: Vec<String> = e["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        policies.contains(&"api:kill-victim:kill".to_string())
            && policies.contains(&"api:audit-victim:audit".to_string()),
        "{policies:?}"
    );
}

#[test]
fn policy_stops_applying_when_labels_change_or_the_policy_goes() {
    if !kernel_tests_possible() {
        return;
    }
    let (agent, victim) = agent_with_deny_file();
    let pod = Cgroup::new("rthooks-pod");
    agent
        .runtime_hook(hook_request(&pod, "c1", r#"{"app":"web"}"#))
        .unwrap();
    assert!(agent.denied(&victim.run(&pod, "absolute").0));

    // Dry run lists the container without loading anything.
    let selected = agent.check_policy(&policy_yaml("other", "web", &victim.path, "Deny"));
    assert_eq!(selected.len(), 1);
    assert_eq!(agent.policies().len(), 1);

    // New labels for the same container: the selector no longer matches.
    agent
        .runtime_hook(hook_request(&pod, "c1", r#"{"app":"db"}"#))
        .unwrap();
    let (outcome, ran) = victim.run(&pod, "absolute");
    assert!(
        outcome.succeeded() && ran,
        "label change must lift the policy: {outcome:?}"
    );
    assert_eq!(agent.map_entries("containers"), 0);

    agent
        .runtime_hook(hook_request(&pod, "c1", r#"{"app":"web"}"#))
        .unwrap();
    assert!(agent.denied(&victim.run(&pod, "absolute").0));
    // Policy file removed: the policy and its map entries go.
    std::fs::remove_file(agent.policy_dir().join("deny.yaml")).unwrap();
    wait_policies(&agent, 0);
    let (outcome, ran) = victim.run(&pod, "absolute");
    assert!(
        outcome.succeeded() && ran,
        "deleted policy still applied: {outcome:?}"
    );
    assert_eq!(
        (
            agent.map_entries("containers"),
            agent.map_entries("binaries")
        ),
        (0, 0)
    );
}

#[test]
fn spoofed_label_annotation_is_ignored_unless_trusted() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&[]);
    let victim = Victim::new();
    agent
        .add_policy(&policy_yaml("deny-victim", "web", &victim.path, "Deny"))
        .unwrap();
    let pod = Cgroup::new("rthooks-pod");
    agent
        .runtime_hook(hook_request(&pod, "c-spoof", r#"{"app":"web"}"#))
        .unwrap();
    let c = &agent.containers()[0];
    assert!(
        c.pod_labels.is_empty(),
        "untrusted annotation was believed: {:?}",
        c.pod_labels
    );
    assert!(c.policies.is_empty());
    let (outcome, ran) = victim.run(&pod, "absolute");
    assert!(outcome.succeeded() && ran, "{outcome:?}");
}

#[test]
fn removed_cgroups_leave_no_entries_behind() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&["--trust-label-annotation"]);
    let victim = Victim::new();
    agent
        .add_policy(&policy_yaml("deny-victim", "web", &victim.path, "Deny"))
        .unwrap();
    let before = agent.map_entries("containers");
    for i in 0..50 {
        let pod = Cgroup::new("rthooks-cycle");
        agent
            .runtime_hook(hook_request(
                &pod,
                &format!("cycle-{i}"),
                r#"{"app":"web"}"#,
            ))
            .unwrap();
        assert_eq!(agent.map_entries("containers"), before + 1);
        pod.remove();
        // The BPF cgroup_rmdir program drops the entry; the agent forgets the container.
        wait_for("entry removal", WAIT, || {
            (agent.map_entries("containers") == before && agent.containers().is_empty())
                .then_some(())
        });
    }
    assert!(std::fs::read_dir(agent.dir.path().join("state/containers"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn enforcement_survives_an_agent_crash_and_restart() {
    if !kernel_tests_possible() {
        return;
    }
    let (mut agent, victim) = agent_with_deny_file();
    let api_policy = policy_yaml(
        "audit-other",
        "web",
        std::path::Path::new("/bin/other"),
        "Audit",
    );
    agent.add_policy(&api_policy).unwrap();
    let pod = Cgroup::new("rthooks-pod");
    agent
        .runtime_hook(hook_request(&pod, "c-restart", r#"{"app":"web"}"#))
        .unwrap();
    let before = agent.policies();

    let mode = agent.mode();
    agent.kill();
    for _ in 0..3 {
        let (outcome, ran) = victim.run(&pod, "absolute");
        let denied = match mode.as_str() {
            "lsm" => matches!(outcome, Outcome::ExecDenied),
            _ => matches!(outcome, Outcome::Killed),
        };
        assert!(
            denied && !ran,
            "enforcement stopped while the agent was down: {outcome:?}"
        );
    }
    agent.spawn();
    let mut after = agent.policies();
    let mut before = before;
    before.sort_by_key(|p| p.slot);
    after.sort_by_key(|p| p.slot);
    assert_eq!(
        before.iter().map(|p| (&p.name, p.slot)).collect::<Vec<_>>(),
        after.iter().map(|p| (&p.name, p.slot)).collect::<Vec<_>>(),
        "policy slots must survive the restart"
    );
    let c = agent.containers();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].cgroup_id, pod.id());
    assert!(agent.denied(&victim.run(&pod, "absolute").0));
    assert_eq!(agent.map_entries("containers"), 1);
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    if !kernel_tests_possible() {
        return;
    }
    let agent = Agent::start(&["--trust-label-annotation"]);
    let pod = Cgroup::new("rthooks-pod");
    let mut cases = Vec::new();
    let mut r = hook_request(&pod, "x", "{}");
    r.cgroups_path = "/no/such/cgroup".into();
    cases.push(("unknown cgroup", r));
    let mut r = hook_request(&pod, "x", "{}");
    r.cgroups_path = format!("{}/../../..", pod.relative);
    cases.push(("path traversal", r));
    let mut r = hook_request(&pod, "x", "{}");
    r.annotations.insert("big".into(), "x".repeat(1 << 20));
    cases.push(("1 MiB of annotations", r));
    cases.push((
        "labels not a JSON object of strings",
        hook_request(&pod, "x", r#"{"app": 7}"#),
    ));
    cases.push((
        "invalid label value",
        hook_request(&pod, "x", r#"{"app": "a b\u00e9"}"#),
    ));
    let mut r = hook_request(&pod, "x", "{}");
    r.cgroups_path = "/".into();
    cases.push(("the root cgroup", r));
    let mut r = hook_request(&pod, "x", "{}");
    r.cgroups_path = "/sys".into();
    cases.push(("not a cgroup", r));
    for (what, req) in cases {
        let err = agent.runtime_hook(req).expect_err(what);
        assert!(!err.message().is_empty(), "{what}: no message");
        assert!(agent.containers().is_empty(), "{what}: state changed");
    }
    assert_eq!(agent.map_entries("containers"), 0);
    assert!(agent.add_policy("apiVersion: v1\n").is_err());
    assert!(agent.policies().is_empty());
}

/// Label bytes that are not UTF-8, sent on the wire as the Tetragon message would carry
/// them (a peer that does not validate its strings): the agent refuses the request.
#[test]
fn invalid_utf8_on_the_wire_is_refused() {
    if !kernel_tests_possible() {
        return;
    }
    // Same field numbers as tetragon.CreateContainer / RuntimeHookRequest, with bytes
    // where the real messages have strings.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawCreateContainer {
        #[prost(string, tag = "1")]
        cgroups_path: String,
        #[prost(map = "string, bytes", tag = "3")]
        annotations: std::collections::HashMap<String, Vec<u8>>,
        #[prost(bytes = "vec", tag = "5")]
        container_id: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawRequest {
        #[prost(message, optional, tag = "1")]
        create_container: Option<RawCreateContainer>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Empty {}

    let agent = Agent::start(&["--trust-label-annotation"]);
    let pod = Cgroup::new("rthooks-pod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = agent.socket.to_str().unwrap().to_string();
    let cases = [
        (b"{\"app\":\"\xff\xfe\"}".to_vec(), b"ok".to_vec()),
        (b"{\"app\":\"web\"}".to_vec(), b"id-\xc3\x28".to_vec()),
    ];
    for (labels, id) in cases {
        let req = RawRequest {
            create_container: Some(RawCreateContainer {
                cgroups_path: pod.relative.clone(),
                annotations: [(rthooks_api::POD_LABELS_ANNOTATION.to_string(), labels)].into(),
                container_id: id,
            }),
        };
        let result: Result<tonic::Response<Empty>, tonic::Status> = rt.block_on(async {
            let ch = rthooks_api::client::connect_unix(&socket, std::time::Duration::from_secs(5))
                .await
                .unwrap();
            let mut grpc = tonic::client::Grpc::new(ch);
            grpc.ready().await.unwrap();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/tetragon.FineGuidanceSensors/RuntimeHook",
            );
            grpc.unary(
                tonic::Request::new(req),
                path,
                tonic_prost::ProstCodec::<RawRequest, Empty>::default(),
            )
            .await
        });
        let err = result.expect_err("invalid UTF-8 accepted");
        assert!(!err.message().is_empty());
        assert!(agent.containers().is_empty(), "state changed");
    }
    assert_eq!(agent.map_entries("containers"), 0);
}
