//! The whole chain on a real containerd (2.1.9 and 1.7.24): kubelet-style CRI calls → containerd → NRI
//! → `rthooks-nri-hook` injects the hook → runc runs the real `rthooks-oci-hook` →
//! `rthooks-agent` records the container's identity, cgroup and labels. A container
//! created while the plugin was not running is learned from Synchronize and shown as not
//! covered by `rthooksctl containers`.
//!
//! Uses the agent and hook binaries built next to this crate's binary (`cargo build -p
//! rthooks-agent -p rthooks-oci-hook` with the same target dir and profile); skipped with
//! a message when they are missing or when not root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rthooks_e2e::containerd::{is_root, Containerd, Release};
use rthooks_e2e::cri::{ContainerSpec, PodSpec};
use rthooks_e2e::images::BUSYBOX_IMAGE;
use rthooks_e2e::k8s_cri::v1::ContainerState;

fn sibling(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_rthooks-nri-hook"))
        .parent()
        .unwrap()
        .join(name)
}

/// The agent's pinned BPF objects: removed (`rthooks-agent --unpin`) even when the test
/// fails half-way, so no program stays attached.
struct Pins {
    agent: PathBuf,
    dir: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(&self.agent)
            .arg("--unpin")
            .arg("--bpf-pin-dir")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.0.kill();
                let _ = self.0.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    Proc(
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
    )
}

async fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `rthooksctl containers -o json`.
fn containers(ctl: &Path, address: &str) -> Vec<serde_json::Value> {
    let out = Command::new(ctl)
        .args(["--address", address, "-o", "json", "containers"])
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn find<'a>(list: &'a [serde_json::Value], id: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|c| c["container_id"] == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chain_with_containerd_2_1() {
    full_chain(Release::V2_1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_chain_with_containerd_1_7() {
    full_chain(Release::V1_7).await;
}

async fn full_chain(release: Release) {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let (agent_bin, hook_bin, ctl) = (
        sibling("rthooks-agent"),
        sibling("rthooks-oci-hook"),
        sibling("rthooksctl"),
    );
    if !agent_bin.exists() || !hook_bin.exists() || !ctl.exists() {
        eprintln!(
            "skipping: build rthooks-agent and rthooks-oci-hook first (missing {} / {} / {})",
            agent_bin.display(),
            hook_bin.display(),
            ctl.display()
        );
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("rthf-")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let address = format!("unix://{}", d.join("agent.sock").display());
    // One pin directory per agent: both releases run at once.
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/rthooks-nri-test-{}-{release:?}",
        std::process::id()
    ));
    std::fs::create_dir_all(d.join("policies")).unwrap();
    // Pods labelled app=blocked may not run busybox — which is what their own first exec
    // (/bin/sleep, a busybox link) runs. Only the labels the NRI plugin adds can select
    // them at that moment.
    std::fs::write(
        d.join("policies/kill-busybox.yaml"),
        "apiVersion: rthooks.io/v1alpha1\nkind: RuntimePolicy\nmetadata:\n  name: kill-busybox\n\
         spec:\n  podSelector:\n    matchLabels: {app: blocked}\n  rules:\n    - binaries: [/bin/busybox]\n      \
         action: Kill\n",
    )
    .unwrap();

    let mut ctrd = Containerd::start(release).await.expect("containerd");
    let mut cri = ctrd.cri().await.unwrap();

    // A container from before the plugin: no hook, nobody told the agent.
    let early_pod = cri
        .run_pod(&PodSpec::new("early", "default").label("app", "early"))
        .await
        .unwrap();
    let sleeper = |name: &str| ContainerSpec {
        name: name.into(),
        image: BUSYBOX_IMAGE.into(),
        command: vec!["/bin/sleep".into(), "600".into()],
        ..Default::default()
    };
    let early = cri
        .create_container(&early_pod, &sleeper("early"))
        .await
        .unwrap();
    cri.start_container(&early).await.unwrap();

    let pins = Pins {
        agent: agent_bin.clone(),
        dir: pin_dir.clone(),
    };
    let agent = spawn(
        Command::new(&agent_bin)
            .arg("--grpc-address")
            .arg(&address)
            .arg("--bpf-pin-dir")
            .arg(&pin_dir)
            .arg("--policy-dir")
            .arg(d.join("policies"))
            .arg("--state-dir")
            .arg(d.join("agent-state"))
            .arg("--trust-label-annotation")
            .arg("--events-file")
            .arg(d.join("events.jsonl")),
        &d.join("agent.log"),
    );
    let agent_log = d.join("agent.log");
    eventually("agent socket", Duration::from_secs(30), || {
        d.join("agent.sock").exists()
    })
    .await;

    let hook_args = format!(
        "rthooks-oci-hook,createRuntime,--grpc-address={address},--log-fname={}",
        d.join("hook.log").display()
    );
    let plugin = spawn(
        Command::new(env!("CARGO_BIN_EXE_rthooks-nri-hook"))
            .arg("--socket")
            .arg(ctrd.nri_socket())
            .arg("--hook-path")
            .arg(&hook_bin)
            .arg("--hook-args")
            .arg(&hook_args)
            .arg("--agent-address")
            .arg(&address),
        &d.join("plugin.log"),
    );

    // Synchronize tells the agent about the early container: known, not covered.
    eventually(
        "early container at the agent",
        Duration::from_secs(20),
        || find(&containers(&ctl, &address), &early).is_some(),
    )
    .await;
    let list = containers(&ctl, &address);
    let e = find(&list, &early).unwrap();
    assert_eq!(e["covered"], false, "{e}");
    assert_eq!(e["source"], "nri-sync", "{e}");
    assert_eq!(e["pod_name"], "early");

    // A new pod's container: the hook runs before its first instruction and the agent
    // has its identity, cgroup and labels.
    let web = cri
        .run_pod(
            &PodSpec::new("web", "prod")
                .label("app", "web")
                .label("tier", "frontend"),
        )
        .await
        .unwrap();
    let c1 = cri.create_container(&web, &sleeper("nginx")).await.unwrap();
    cri.start_container(&c1).await.unwrap();
    eventually(
        "hooked container at the agent",
        Duration::from_secs(10),
        || find(&containers(&ctl, &address), &c1).is_some(),
    )
    .await;
    let list = containers(&ctl, &address);
    let c = find(&list, &c1).unwrap();
    eprintln!("agent entry: {c}");
    assert_eq!(c["covered"], true, "{c}");
    assert_eq!(c["pod_name"], "web");
    assert_eq!(c["pod_namespace"], "prod");
    assert_eq!(c["pod_uid"], web.spec.uid.as_str());
    assert_eq!(c["container_name"], "nginx");
    assert_eq!(c["pod_labels"]["app"], "web");
    assert_eq!(c["pod_labels"]["tier"], "frontend");
    // The agent shows the path relative to the cgroup root.
    assert_eq!(
        c["cgroup_path"]
            .as_str()
            .unwrap_or_default()
            .trim_matches('/'),
        format!("{}/{c1}", web.spec.cgroup_parent()).trim_matches('/'),
        "{c}"
    );
    assert_ne!(c["cgroup_id"], 0);
    assert_eq!(c["policies"], serde_json::json!([]), "{c}");

    // Removal reaches the agent through NRI.
    cri.stop_container(&c1, 0).await.unwrap();
    cri.remove_container(&c1).await.unwrap();
    eventually(
        "removed container gone from the agent",
        Duration::from_secs(10),
        || find(&containers(&ctl, &address), &c1).is_none(),
    )
    .await;

    // A pod the policy selects: its container's first exec is killed (sigkill mode) or
    // refused (LSM mode, where the start itself fails); never runs busybox.
    let blocked = cri
        .run_pod(&PodSpec::new("blocked", "prod").label("app", "blocked"))
        .await
        .unwrap();
    let victim = cri
        .create_container(&blocked, &sleeper("victim"))
        .await
        .unwrap();
    if cri.start_container(&victim).await.is_ok() {
        let mut exit = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while exit.is_none() && Instant::now() < deadline {
            let (st, _) = cri.container_status(&victim).await.unwrap();
            if st.state == ContainerState::ContainerExited as i32 {
                exit = Some(st.exit_code);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            exit,
            Some(137),
            "the first exec of a selected pod is killed"
        );
    }
    let events = d.join("events.jsonl");
    eventually("the enforcement event", Duration::from_secs(10), || {
        std::fs::read_to_string(&events).is_ok_and(|t| t.contains(&victim))
    })
    .await;
    let text = std::fs::read_to_string(&events).unwrap();
    let ev: serde_json::Value =
        serde_json::from_str(text.lines().find(|l| l.contains(&victim)).unwrap()).unwrap();
    eprintln!("enforcement event: {ev}");
    assert!(text.contains("kill-busybox"), "{ev}");
    assert!(text.contains("/bin/busybox"), "{ev}");
    assert!(
        text.contains(r#""blocked""#),
        "pod identity in the event: {ev}"
    );
    let (early_status, _) = cri.container_status(&early).await.unwrap();
    assert_eq!(
        early_status.state,
        ContainerState::ContainerRunning as i32,
        "pods the policy does not select run on"
    );
    cri.remove_pod(&blocked).await.unwrap();
    cri.remove_pod(&web).await.unwrap();
    cri.remove_pod(&early_pod).await.unwrap();
    drop(plugin);
    drop(agent);
    ctrd.stop();
    drop(pins);
    let log = std::fs::read_to_string(&agent_log).unwrap_or_default();
    eprintln!("{release:?}: full chain in {:?}", started.elapsed());
    assert!(!pin_dir.exists(), "pins left behind; agent log:\n{log}");
}
