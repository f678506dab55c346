//! Figures of the pod source against the real test API server and the real agent:
//! label-change-to-map latency (a pod's label patched until the container's map entry
//! follows), registration latency with the pod already in the store vs waited for (from
//! the pod's creation to the registration's answer), and the agent's RSS with 1,000 pods
//! in its store. `RTHOOKS_BENCH_PODS` and `RTHOOKS_BENCH_ROUNDS` change the counts.
//! Prints figures; asserts nothing about time.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::*;
use serde_json::json;

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len()
    )
}

fn rss_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn main() {
    let Some(cluster) = Cluster::start("figures") else {
        return;
    };
    let rounds = count("RTHOOKS_BENCH_ROUNDS", 50);
    let pods = count("RTHOOKS_BENCH_PODS", 1000);
    let metrics = free_address();
    let victim = Victim::new();
    // Info logs (the tests' debug logs cost time); the wait's own line stays visible.
    let agent = cluster.ready_agent(&metrics, &victim, &["--log-level=info,rthooks_agent=debug"]);
    let rss_empty = rss_kib(&agent);

    // Registration, pod in the store.
    let uid = cluster.create_pod("bench", "web-0", NODE, json!({"app": "web"}));
    let parent = Cgroup::new("rthooks-kfig");
    wait_for("web-0 in the store", Duration::from_secs(30), || {
        agent
            .runtime_hook(request(&parent, "warm-up", "bench", "web-0", &uid))
            .ok()
    });
    let socket = agent.address();
    let mut in_store = Vec::new();
    let mut cgroups = Vec::new();
    for i in 0..rounds {
        let cg = parent.child(&format!("s{i}"));
        let req = request(&cg, &format!("ctr-s{i}"), "bench", "web-0", &uid);
        let start = Instant::now();
        hook_call(&socket, req).unwrap();
        in_store.push(start.elapsed());
        cgroups.push(cg);
    }

    // Registration, pod created while the registration waits.
    let mut waited = Vec::new();
    for i in 0..rounds.min(20) {
        let cg = parent.child(&format!("w{i}"));
        let name = format!("late-{i}");
        let req = request(&cg, &format!("ctr-w{i}"), "bench", &name, "");
        let s = socket.clone();
        let call = std::thread::spawn(move || {
            hook_call(&s, req).unwrap();
            Instant::now()
        });
        let line = format!("waiting for pod bench/{name}");
        wait_for("the registration waiting", Duration::from_secs(30), || {
            agent.log().contains(&line).then_some(())
        });
        let start = Instant::now();
        cluster.create_pod("bench", &name, NODE, json!({"app": "web"}));
        waited.push(call.join().unwrap() - start);
        cgroups.push(cg);
    }

    // Label change to map entry, both ways, on a pod with one container (a change
    // rewrites and saves each of the pod's containers).
    let lab_uid = cluster.create_pod("bench", "lab-0", NODE, json!({"app": "web"}));
    let lab = parent.child("lab");
    wait_for("lab-0 in the store", Duration::from_secs(30), || {
        agent
            .runtime_hook(request(&lab, "ctr-lab", "bench", "lab-0", &lab_uid))
            .ok()
    });
    let mut label_change = Vec::new();
    for i in 0..rounds.min(20) {
        let (to, entries_wanted) = if i % 2 == 0 { ("db", 0) } else { ("web", 1) };
        let start = Instant::now();
        cluster.set_labels("bench", "lab-0", json!({"app": to}));
        wait_for("the map to follow", Duration::from_secs(30), || {
            let entry = agent
                .containers()
                .into_iter()
                .find(|c| c.container_id == "ctr-lab")
                .map(|c| c.policies.len())?;
            (entry == entries_wanted).then_some(())
        });
        label_change.push(start.elapsed());
    }

    // RSS with many pods in the store.
    for i in 0..pods {
        cluster.create_pod(
            "fill",
            &format!("p{i}"),
            NODE,
            json!({"app": "fill", "i": i.to_string()}),
        );
    }
    wait_for("the pods in the store", Duration::from_secs(120), || {
        (metric(&metrics, "rthooks_kube_pods ")? as usize >= pods).then_some(())
    });
    let rss_full = rss_kib(&agent);

    println!("pod source figures (test API server on loopback, this host):");
    println!(
        "  registration, pod in the store:     {}",
        percentiles(in_store)
    );
    println!(
        "  registration, pod waited for:       {} (pod create request → registration answer)",
        percentiles(waited)
    );
    println!(
        "  label change → container re-evaluated: {} (patch request → agent lists the change)",
        percentiles(label_change)
    );
    println!(
        "  agent RSS: {} KiB listed with no pods, {} KiB with {} pods in the store (+{} KiB)",
        rss_empty,
        rss_full,
        pods,
        rss_full.saturating_sub(rss_empty)
    );
}
