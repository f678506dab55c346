//! Exec overhead of the attached programs: the same loop of fork+exec of `true` with no
//! agent, with the agent attached but the task's cgroup unregistered (host processes), and
//! in a registered cgroup selected by a policy (every exec walks and hashes its path).
//! Wall-clock figures are noisy on shared machines, so the benchmark also reads the
//! kernel's own accounting of the exec program (BPF run-time statistics): nanoseconds per
//! run, the exact overhead the program adds to each exec. Also the cost of a RuntimeHook
//! registration, and the kernel memory of the containers map holding 10,000 containers.
//! The agent runs in the mode it chooses; `RTHOOKS_ENFORCEMENT=lsm|fentry|kprobe|sigkill`
//! forces one (BPF statistics count the program only, not a kprobe's own trap);
//! `RTHOOKS_BENCH_EXECS` and `RTHOOKS_BENCH_REGISTRATIONS` change the counts.
//! Prints figures; asserts nothing about time.
#[path = "../tests/common/mod.rs"]
mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use common::*;

/// Execs per loop.
fn execs() -> usize {
    count("RTHOOKS_BENCH_EXECS", 2000)
}

/// RuntimeHook calls timed.
fn registrations() -> usize {
    count("RTHOOKS_BENCH_REGISTRATIONS", 200)
}

fn exec_loop(cgroup: &Cgroup) -> Duration {
    let tmp = std::env::temp_dir();
    let truebin = ["/usr/bin/true", "/bin/true"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
    let start = Instant::now();
    for _ in 0..execs() {
        assert!(run_in(cgroup, &tmp, truebin, &[]).succeeded());
    }
    start.elapsed()
}

fn per_exec(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / execs() as f64
}

/// (run_cnt, run_time_ns) of the program behind the pinned exec link.
fn program_stats(agent: &Agent) -> Option<(u64, u64)> {
    use rthooks_common::programs;
    let link = [
        programs::EXEC_LSM,
        programs::EXEC_FENTRY,
        programs::EXEC_KPROBE,
        programs::EXEC_SIGKILL,
    ]
    .iter()
    .map(|n| agent.pin_dir.join("links").join(n))
    .find(|p| p.exists())?;
    let link: aya::programs::links::FdLink = aya::programs::links::PinnedLink::from_pin(link)
        .ok()?
        .into();
    let prog_id = link.info().ok()?.program_id();
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)?;
    Some((prog.run_count(), prog.run_time().as_nanos() as u64))
}

/// `memlock` of a map as the kernel accounts it (`/proc/self/fdinfo`; aya's `MapInfo` does
/// not read it), in bytes.
fn map_memlock(map: &aya::maps::MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))?
        .trim()
        .parse()
        .ok()
}

/// A hash map shaped like `CONTAINERS` (same key, value, capacity and flags, from
/// rthooks-common) filled with `n` containers whose bitmaps select all 128 policies:
/// (memlock empty, memlock filled, containers inserted). A map of its own, so the figure
/// does not depend on what a running agent holds.
fn containers_map_memory(n: u64) -> Option<(u64, u64, u64)> {
    use aya::maps::{HashMap, IterableMap, MapData};
    use rthooks_common::{ContainerPolicies, MAX_CONTAINERS};
    /// The flag the eBPF crate declares `CONTAINERS` with (aya-ebpf's bindings).
    const BPF_F_NO_PREALLOC: u32 = 1;
    let mut map =
        HashMap::<MapData, u64, ContainerPolicies>::create(MAX_CONTAINERS, BPF_F_NO_PREALLOC)
            .ok()?;
    let empty = map_memlock(map.map());
    let mut value = ContainerPolicies::default();
    value.policies.words = [u64::MAX; rthooks_common::POLICY_WORDS];
    let inserted = (1..=n)
        .take_while(|cgroup_id| map.insert(cgroup_id, value, 0).is_ok())
        .count() as u64;
    let filled = map_memlock(map.map());
    Some((empty?, filled?, inserted))
}

fn main() {
    if !kernel_tests_possible() {
        return;
    }
    const CONTAINERS: u64 = 10_000;
    match containers_map_memory(CONTAINERS) {
        Some((empty, filled, inserted)) if inserted > 0 => println!(
            "containers map (65,536 buckets, 128-policy bitmaps): empty {:.2} MB, \
             {inserted} of {CONTAINERS} containers inserted: {:.2} MB ({} bytes per container)",
            empty as f64 / 1e6,
            filled as f64 / 1e6,
            (filled - empty) / inserted
        ),
        _ => println!("containers map memory: could not create or fill a map here"),
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
    for i in 0..registrations() {
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
    // Run-time statistics are collected while this fd is open.
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let s0 = program_stats(&agent);
    let unregistered = exec_loop(&plain);
    let s1 = program_stats(&agent);
    let matched = exec_loop(&registered);
    let s2 = program_stats(&agent);
    drop(stats_fd);
    hook.sort();
    let status = agent.status();
    println!(
        "enforcement mode: {} ({}; RTHOOKS_ENFORCEMENT chooses another)",
        status.enforcement_mode, status.enforcement_reason
    );
    if let (Some(a), Some(b), Some(c)) = (s0, s1, s2) {
        let per = |x: (u64, u64), y: (u64, u64)| (y.1 - x.1) as f64 / (y.0 - x.0).max(1) as f64;
        println!("exec program run time (kernel BPF stats, ns per exec):");
        println!(
            "  unregistered cgroup (one ancestor lookup)        {:8.0}",
            per(a, b)
        );
        println!(
            "  registered, policy selects (path walk + lookups) {:8.0}",
            per(b, c)
        );
    } else {
        println!("exec program run time: BPF run-time statistics unavailable");
    }
    println!("exec loop of {} fork+exec of true (µs per exec):", execs());
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
        "RuntimeHook registration over gRPC ({} calls, new connection each): p50 {:.2} ms, p99 {:.2} ms",
        hook.len(),
        hook[hook.len() / 2].as_secs_f64() * 1e3,
        hook[hook.len() * 99 / 100].as_secs_f64() * 1e3
    );
}
