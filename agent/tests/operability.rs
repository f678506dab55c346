//! Operability of the real agent: metrics and health endpoints, the event stream, JSON
//! logs, rthooksctl, and containers reported without a hook.
mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rthooks_api::v1;

/// An open `GetEvents` stream from the agent at `socket`.
fn subscribe_events(rt: &tokio::runtime::Runtime, socket: &str) -> tonic::Streaming<v1::Event> {
    rt.block_on(async {
        let ch = rthooks_api::client::connect_unix(socket, Duration::from_secs(5))
            .await
            .unwrap();
        v1::agent_client::AgentClient::new(ch)
            .get_events(v1::GetEventsRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

fn rthooksctl(agent: &Agent, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rthooksctl"))
        .arg(format!("--address=unix://{}", agent.socket.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rthooksctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn metrics_events_stream_logs_and_cli() {
    if !kernel_tests_possible() {
        return;
    }
    let addr = free_address();
    let agent = Agent::start(&[
        "--trust-label-annotation",
        "--log-format=json",
        &format!("--metrics-address={addr}"),
    ]);
    let victim = Victim::new();
    let policy_file = victim.dir.path().join("p.yaml");
    std::fs::write(
        &policy_file,
        policy_yaml("deny-victim", "web", &victim.path, "Deny"),
    )
    .unwrap();
    assert!(
        rthooksctl(&agent, &["policies", "add", policy_file.to_str().unwrap()]).contains("slot 0")
    );

    let pod = Cgroup::new("rthooks-pod");
    agent
        .runtime_hook(hook_request(&pod, "c-ops", r#"{"app":"web"}"#))
        .unwrap();

    // Subscribe to the stream before the exec, then expect the event on it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = agent.socket.to_str().unwrap().to_string();
    let mut stream = subscribe_events(&rt, &socket);
    let (outcome, ran) = victim.run(&pod, "absolute");
    assert!(agent.denied(&outcome) && !ran, "{outcome:?}");
    let event = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), stream.message()).await })
        .expect("event within 20 s")
        .unwrap()
        .expect("stream open");
    assert_eq!(event.binary, victim.path.to_str().unwrap());
    assert_eq!(event.container.unwrap().pod_name, "web-0");

    // A container learned of without our hook is marked and counted.
    let late = Cgroup::new("rthooks-late");
    rt.block_on(async {
        let ch = rthooks_api::client::connect_unix(&socket, Duration::from_secs(5))
            .await
            .unwrap();
        v1::agent_client::AgentClient::new(ch)
            .report_container(v1::ReportContainerRequest {
                container: Some(hook_request(&late, "c-late", r#"{"app":"db"}"#)),
                source: "nri-sync".into(),
                hook_ran: false,
            })
            .await
            .unwrap()
    });

    let metrics = wait_for("metrics", Duration::from_secs(20), || {
        let (_, m) = http_get(&addr, "/metrics")?;
        m.contains("rthooks_events_total{action=\"kill\"} 1")
            .then_some(m)
    });
    for want in [
        "rthooks_runtime_hook_requests_total{result=\"ok\"} 1",
        "rthooks_runtime_hook_duration_seconds_count 1",
        "rthooks_containers 2",
        "rthooks_containers_not_covered 1",
        "rthooks_policies 1",
        "rthooks_map_entries{map=\"containers\"} 1",
        "rthooks_ring_buffer_drops 0",
    ] {
        assert!(metrics.contains(want), "{want} missing in\n{metrics}");
    }
    for (path, want) in [("/healthz", 200), ("/readyz", 200), ("/nope", 404)] {
        let (status, _) = http_get(&addr, path).unwrap();
        assert!(
            status.starts_with(&format!("HTTP/1.1 {want} ")),
            "{path}: {status}"
        );
    }

    let status: serde_json::Value =
        serde_json::from_str(&rthooksctl(&agent, &["-o", "json", "status"])).unwrap();
    assert!(["sigkill", "lsm"].contains(&status["enforcement_mode"].as_str().unwrap()));
    assert_eq!(status["containers"], 2);
    let containers: serde_json::Value =
        serde_json::from_str(&rthooksctl(&agent, &["-o", "json", "containers"])).unwrap();
    let late_c = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["container_id"] == "c-late")
        .unwrap();
    assert_eq!(late_c["covered"], false);
    assert!(rthooksctl(&agent, &["containers"]).contains(" NO "));
    let check = rthooksctl(
        &agent,
        &[
            "-o",
            "json",
            "policies",
            "check",
            policy_file.to_str().unwrap(),
        ],
    );
    let selected: serde_json::Value = serde_json::from_str(&check).unwrap();
    assert_eq!(selected.as_array().unwrap().len(), 1, "{check}");
    rthooksctl(&agent, &["policies", "delete", "deny-victim"]);
    assert!(agent.policies().is_empty());

    // Every log line is a JSON object.
    let log = agent.log();
    assert!(log.lines().count() > 3);
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
}

#[test]
fn socket_refuses_unauthorized_uids_even_when_its_mode_allows_them() {
    if !kernel_tests_possible() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let agent = Agent::start(&[]);
    // Open the socket and its directory to everyone: only the uid check stands in the way.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The client runs from the agent's directory: the checkout may sit below a directory
    // other uids cannot enter (`mktemp -d` makes it 0700), and then exec, not the agent,
    // would refuse uid 65534.
    let ctl = agent.dir.path().join("rthooksctl");
    std::fs::hard_link(env!("CARGO_BIN_EXE_rthooksctl"), &ctl)
        .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_rthooksctl"), &ctl).map(drop))
        .unwrap();
    let run_as = |uid: u32| {
        let mut cmd = Command::new(&ctl);
        cmd.arg(format!("--address=unix://{}", agent.socket.display()))
            .arg("status")
            .gid(uid)
            .uid(uid);
        cmd.output().unwrap()
    };
    let nobody = run_as(65534);
    assert!(!nobody.status.success(), "uid 65534 was served");
    let root = run_as(0);
    assert!(
        root.status.success(),
        "{}",
        String::from_utf8_lossy(&root.stderr)
    );
    assert!(agent.log().contains("unauthorized uid"));
}

#[test]
fn unpin_detaches_everything() {
    if !kernel_tests_possible() {
        return;
    }
    let mut agent = Agent::start(&[]);
    agent.kill();
    assert!(agent.pin_dir.join("links").is_dir());
    let out = Command::new(env!("CARGO_BIN_EXE_rthooks-agent"))
        .arg(format!("--bpf-pin-dir={}", agent.pin_dir.display()))
        .arg("--unpin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.pin_dir.exists());
}

#[test]
fn sigterm_ends_the_agent_despite_open_event_streams_and_keeps_the_pins() {
    if !kernel_tests_possible() {
        return;
    }
    let mut agent = Agent::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = agent.socket.to_str().unwrap().to_string();
    let _stream = subscribe_events(&rt, &socket);
    // Generous: this checks that it ends at all, not how fast.
    let status = agent
        .terminate(Duration::from_secs(30))
        .expect("agent still running 30 s after SIGTERM");
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(!agent.socket.exists(), "socket left behind");
    assert!(
        agent
            .pin_dir
            .join("links")
            .read_dir()
            .unwrap()
            .next()
            .is_some(),
        "pins removed"
    );
}

#[test]
fn debug_maps_reads_the_pinned_maps_with_the_agent_down() {
    if !kernel_tests_possible() {
        return;
    }
    let mut agent = Agent::start(&["--trust-label-annotation"]);
    let victim = Victim::new();
    agent
        .add_policy(&policy_yaml("deny-victim", "web", &victim.path, "Deny"))
        .unwrap();
    let pod = Cgroup::new("rthooks-maps");
    agent
        .runtime_hook(hook_request(&pod, "c-maps", r#"{"app":"web"}"#))
        .unwrap();
    // What the pinned programs go on enforcing once the agent is gone.
    let status = agent
        .terminate(Duration::from_secs(30))
        .expect("agent still running 30 s after SIGTERM");
    assert!(status.success(), "{status}\n{}", agent.log());
    let pins = agent.pin_dir.to_str().unwrap().to_string();
    let debug_maps = |output| {
        rthooksctl(
            &agent,
            &["-o", output, "debug", "maps", "--bpf-pin-dir", &pins],
        )
    };
    let maps: serde_json::Value = serde_json::from_str(&debug_maps("json")).unwrap();
    assert_eq!(
        maps["containers"],
        serde_json::json!([{"cgroup_id": pod.id(), "policy_slots": [0]}]),
        "{maps}"
    );
    // The policy's one binary (under each path the agent hashes it by): deny in slot 0.
    let binaries = maps["binaries"].as_array().unwrap();
    assert!(!binaries.is_empty(), "{maps}");
    for b in binaries {
        assert_eq!(b["deny"], serde_json::json!([0]), "{maps}");
        assert_eq!(b["kill"], serde_json::json!([]), "{maps}");
    }
    assert_ne!(maps["cgroup_levels"], 0, "{maps}");
    assert!(debug_maps("table").contains(&format!("{} ", pod.id())));
}
