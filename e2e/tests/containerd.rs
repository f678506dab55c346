//! The harness itself: a private containerd of each release runs a host-network pod with a
//! busybox container through CRI, survives a restart, and cleans up.

use std::time::{Duration, Instant};

use rthooks_e2e::containerd::{is_root, Containerd, Release};
use rthooks_e2e::cri::{ContainerSpec, PodSpec};
use rthooks_e2e::images::BUSYBOX_IMAGE;

async fn pod_and_container(release: Release) {
    if !is_root() {
        eprintln!("skipping: containerd tests need root");
        return;
    }
    let t = Instant::now();
    let mut ctrd = Containerd::start(release).await.expect("containerd starts");
    eprintln!(
        "{release:?}: containerd up with images in {:?}",
        t.elapsed()
    );
    let mut cri = ctrd.cri().await.unwrap();
    let spec = PodSpec::new("harness", "default").label("app", "harness");
    let t = Instant::now();
    let pod = cri.run_pod(&spec).await.expect("RunPodSandbox");
    eprintln!("{release:?}: RunPodSandbox {:?}", t.elapsed());
    let t = Instant::now();
    let id = cri
        .create_container(
            &pod,
            &ContainerSpec {
                name: "sleeper".into(),
                image: BUSYBOX_IMAGE.into(),
                command: vec!["/bin/sleep".into(), "300".into()],
                ..Default::default()
            },
        )
        .await
        .expect("CreateContainer");
    eprintln!("{release:?}: CreateContainer {:?}", t.elapsed());
    let t = Instant::now();
    cri.start_container(&id).await.expect("StartContainer");
    eprintln!("{release:?}: StartContainer {:?}", t.elapsed());
    let spec_json = cri.container_spec(&id).await.unwrap();
    assert_eq!(
        spec_json["linux"]["cgroupsPath"].as_str().unwrap(),
        format!("{}/{id}", pod.spec.cgroup_parent())
    );
    let (status, _) = cri.container_status(&id).await.unwrap();
    assert_eq!(
        status.state,
        rthooks_e2e::k8s_cri::v1::ContainerState::ContainerRunning as i32
    );

    ctrd.restart().await.expect("restart");
    let mut cri = ctrd.cri().await.unwrap();
    let (status, _) = cri.container_status(&id).await.unwrap();
    assert_eq!(
        status.state,
        rthooks_e2e::k8s_cri::v1::ContainerState::ContainerRunning as i32
    );

    cri.remove_pod(&pod).await.expect("remove pod");
    let cg = std::path::Path::new("/sys/fs/cgroup/unified")
        .join(pod.spec.cgroup_parent().trim_start_matches('/'));
    let deadline = Instant::now() + Duration::from_secs(2);
    while cg.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cg.exists(), "pod cgroup left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_1_runs_a_pod() {
    pod_and_container(Release::V2_1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_1_7_runs_a_pod() {
    pod_and_container(Release::V1_7).await;
}

/// A test that fails half-way drops the harness with pods still running: nothing may
/// stay behind (processes, cgroups, mounts, the temp directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_harness_cleans_up() {
    if !is_root() {
        eprintln!("skipping: containerd tests need root");
        return;
    }
    let ctrd = Containerd::start(Release::V2_1).await.unwrap();
    let dir = ctrd.dir().to_path_buf();
    let mut cri = ctrd.cri().await.unwrap();
    let pod = cri.run_pod(&PodSpec::new("leak", "default")).await.unwrap();
    let id = cri
        .create_container(
            &pod,
            &ContainerSpec {
                name: "sleeper".into(),
                image: BUSYBOX_IMAGE.into(),
                command: vec!["/bin/sleep".into(), "301".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    cri.start_container(&id).await.unwrap();
    drop(cri);
    drop(ctrd);
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory"] {
        let cg = std::path::Path::new(root).join(pod.spec.cgroup_parent().trim_start_matches('/'));
        assert!(!cg.exists(), "{} left behind", cg.display());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "mounts left behind"
    );
    assert!(!dir.exists(), "temp dir left behind");
}
