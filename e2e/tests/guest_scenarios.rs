//! The VM guest scenarios, run on this host: the whole stack (agent, NRI plugin, OCI
//! hook) against both containerd releases, and CRI-O when `RTHOOKS_CRIO_DIR` names its
//! binaries and the host is cgroup v2 only. Uses the binaries of this build
//! (`cargo build --bins` first); without them every scenario is reported as skipped.

use std::time::Duration;

use rthooks_e2e::scenarios::{plan, run, Share};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_scenarios_on_this_host() {
    // target/<profile>/deps/<this test> → target/<profile>
    let exe = std::env::current_exe().unwrap();
    let bin_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let results = dir.path().join("results.jsonl");
    let ok = run(
        &results,
        &bin_dir,
        "",
        Share::All,
        "",
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&results).unwrap();
    eprintln!("{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let planned = lines[0]["plan"].as_array().unwrap().len();
    assert_eq!(planned, plan("", Share::All, "").len());
    assert_eq!(lines.len(), planned + 1, "one result per planned scenario");
    assert!(ok, "a scenario failed:\n{text}");
}
