//! Exec overhead of the attached programs: the same loop of fork+exec of `true` with no
//! agent, with the agent attached but the task's cgroup unregistered (host processes), and
//! in a registered cgroup selected by a policy (every exec walks and hashes its path).
//! Also the cost of a RuntimeHook registration. Prints figures; asserts nothing about time.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const EXECS: usize = 2000;

fn exec_loop(cgroup: &Cgroup) -> Duration {
    let tmp = std::env::temp_dir();
    let truebin = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    let start = Instant::now();
    for _ in 0..EXECS {
        assert!(run_in(cgroup, &tmp, truebin, &[]).succeeded());
    }
    start.elapsed()
}

fn per_exec(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / EXECS as f64
}

fn main() {
    if !kernel_tests_possible() {
        return;
    }
    let registered = Cgroup::new("rthooks-bench-pod");
    let plain = Cgroup::new("rthooks-bench-plain");
    // Warm-up, then the baseline without any program attached (by this benchmark).
    exec_loop(&plain);
    let detached = exec_loop(&plain);

    let agent = Agent::start(&["--trust-label-annotation", "--log-level=warn"]);
    // A policy that selects the pod but names another binary: every exec pays the full
    // path walk and both lookups, and nothing is killed.
    agent
        .add_policy(&policy_yaml(
            "bench",
            "web",
            std::path::Path::new("/nonexistent/bin/x"),
            "Deny",
        ))
        .unwrap();
    let mut hook = Vec::new();
    for i in 0..200 {
        let c = registered.child(&format!("c{i}"));
        let t = Instant::now();
        agent
            .runtime_hook(hook_request(&c, &format!("bench-{i}"), r#"{"app":"web"}"#))
            .unwrap();
        hook.push(t.elapsed());
    }
    agent
        .runtime_hook(hook_request(&registered, "bench-pod", r#"{"app":"web"}"#))
        .unwrap();
    let unregistered = exec_loop(&plain);
    let matched = exec_loop(&registered);
    hook.sort();
    println!("exec loop of {EXECS} fork+exec of true (µs per exec):");
    println!(
        "  programs detached                      {:8.1}",
        per_exec(detached)
    );
    println!(
        "  attached, unregistered cgroup          {:8.1}",
        per_exec(unregistered)
    );
    println!(
        "  attached, registered + policy selects  {:8.1}",
        per_exec(matched)
    );
    println!(
        "RuntimeHook registration over gRPC (200 calls, new connection each): p50 {:.2} ms, p99 {:.2} ms",
        hook[hook.len() / 2].as_secs_f64() * 1e3,
        hook[hook.len() * 99 / 100].as_secs_f64() * 1e3
    );
}
