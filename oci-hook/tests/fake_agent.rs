//! The hook against an in-process fake of the agent's RuntimeHook service (no root
//! needed): what it sends, how it reacts to errors and to a hung agent. The real agent is
//! exercised in `runc.rs`.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rthooks_api::tetragon::fine_guidance_sensors_server::{
    FineGuidanceSensors, FineGuidanceSensorsServer,
};
use rthooks_api::tetragon::{
    runtime_hook_request::Event, CreateContainer, RuntimeHookRequest, RuntimeHookResponse,
};
use rthooks_oci_hook::{config, hook};

#[derive(Clone, Copy)]
enum Mode {
    Ok,
    Error,
    Hang,
    /// Answers after this long.
    Slow(Duration),
}

struct Fake {
    mode: Mode,
    seen: Arc<Mutex<Vec<CreateContainer>>>,
}

#[tonic::async_trait]
impl FineGuidanceSensors for Fake {
    async fn runtime_hook(
        &self,
        req: tonic::Request<RuntimeHookRequest>,
    ) -> Result<tonic::Response<RuntimeHookResponse>, tonic::Status> {
        if let Some(Event::CreateContainer(c)) = req.into_inner().event {
            self.seen.lock().unwrap().push(c);
        }
        match self.mode {
            Mode::Ok => Ok(tonic::Response::new(RuntimeHookResponse {})),
            Mode::Error => Err(tonic::Status::unavailable("pod not found in the cache")),
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(tonic::Response::new(RuntimeHookResponse {}))
            }
            Mode::Slow(d) => {
                tokio::time::sleep(d).await;
                Ok(tonic::Response::new(RuntimeHookResponse {}))
            }
        }
    }
}

struct Agent {
    sock: PathBuf,
    seen: Arc<Mutex<Vec<CreateContainer>>>,
    _rt: tokio::runtime::Runtime,
}

fn start_agent(dir: &Path, mode: Mode) -> Agent {
    let sock = dir.join("agent.sock");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(async { tokio::net::UnixListener::bind(&sock) })
        .unwrap();
    let svc = FineGuidanceSensorsServer::new(Fake {
        mode,
        seen: seen.clone(),
    });
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    Agent {
        sock,
        seen,
        _rt: rt,
    }
}

const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const UID_: &str = "8d7b6c6a_2c4e_4f1e_9d3b_0a1b2c3d4e5f";

/// A bundle as containerd's CRI plugin (systemd driver) writes it.
fn bundle(dir: &Path, namespace: &str) -> String {
    let b = dir.join("bundle");
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    let cfg = serde_json::json!({
        "ociVersion": "1.1.0",
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid"]}],
        "linux": {"cgroupsPath": format!("kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}")},
        "annotations": {
            "io.kubernetes.cri.container-name": "web",
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.image-name": "docker.io/library/nginx:1.27",
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.sandbox-namespace": namespace,
            "io.kubernetes.cri.sandbox-uid": "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f",
            "rthooks.io/pod-labels": "{\"app\":\"web\"}"
        }
    });
    std::fs::write(b.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    serde_json::json!({"ociVersion":"1.1.0","id":CID,"status":"creating","pid":4242,"bundle":b,
        "annotations": cfg["annotations"]})
    .to_string()
}

fn run(dir: &Path, sock: &Path, stdin: &str, extra: &[&str]) -> hook::Outcome {
    let addr = format!("unix://{}", sock.display());
    let log = dir.join("hook.log");
    let mut args = vec![
        "rthooks-oci-hook",
        "createRuntime",
        "--grpc-address",
        &addr,
        "--log-fname",
        log.to_str().unwrap(),
        "--config-file",
        "/nonexistent/c.json",
    ];
    args.extend_from_slice(extra);
    hook::run(
        config::parse(args).unwrap(),
        stdin.as_bytes(),
        Some(dir.to_owned()),
    )
}

#[test]
fn registers_with_full_identity() {
    let d = tempfile::tempdir().unwrap();
    let a = start_agent(d.path(), Mode::Ok);
    let out = run(d.path(), &a.sock, &bundle(d.path(), "shop"), &[]);
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.log_line["decision"], "registered");
    let seen = a.seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let c = &seen[0];
    assert_eq!(
        c.cgroups_path,
        format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope")
    );
    assert_eq!(c.container_id, CID);
    assert_eq!(c.container_name, "web");
    assert_eq!(c.container_image, "docker.io/library/nginx:1.27");
    assert_eq!(c.pod_name, "web-0");
    assert_eq!(c.pod_namespace, "shop");
    assert_eq!(c.pod_uid, "8d7b6c6a-2c4e-4f1e-9d3b-0a1b2c3d4e5f");
    assert_eq!(c.root_dir, d.path().join("bundle/rootfs").to_str().unwrap());
    assert_eq!(c.annotations["rthooks.io/pod-labels"], "{\"app\":\"web\"}");
    assert_eq!(c.mounts.len(), 1);
    assert_eq!(c.mounts[0].r#type, "proc");
}

#[test]
fn agent_error_applies_the_failure_rule() {
    let d = tempfile::tempdir().unwrap();
    let a = start_agent(d.path(), Mode::Error);
    let out = run(d.path(), &a.sock, &bundle(d.path(), "shop"), &[]);
    assert_eq!(out.exit_code, 1);
    let err = out.stderr.unwrap();
    assert!(
        err.contains("pod not found in the cache")
            && err.contains(
                "\"shop\" (io.kubernetes.cri.sandbox-namespace) is not in the allow list"
            ),
        "{err}"
    );
    let out = run(d.path(), &a.sock, &bundle(d.path(), "rthooks"), &[]);
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.log_line["decision"], "allowed-unregistered");
    assert_eq!(out.log_line["level"], "WARN");
    let out = run(
        d.path(),
        &a.sock,
        &bundle(d.path(), "shop"),
        &["--fail-open"],
    );
    assert_eq!(out.exit_code, 0);
}

#[test]
fn hung_agent_hits_the_deadline() {
    let d = tempfile::tempdir().unwrap();
    let a = start_agent(d.path(), Mode::Hang);
    let t = Instant::now();
    let out = run(
        d.path(),
        &a.sock,
        &bundle(d.path(), "shop"),
        &["--grpc-timeout", "300ms"],
    );
    let took = t.elapsed();
    assert_eq!(out.exit_code, 1);
    assert!(out.stderr.unwrap().contains("did not answer within 300 ms"));
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn no_agent_and_disable_grpc() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("nope.sock");
    let out = run(d.path(), &sock, &bundle(d.path(), "kube-system"), &[]);
    assert_eq!(out.exit_code, 0);
    assert!(
        out.log_line["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{}",
        out.log_line
    );
    let out = run(
        d.path(),
        &sock,
        &bundle(d.path(), "default"),
        &["--disable-grpc"],
    );
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.log_line["decision"], "not-sent");
}

/// The binary itself: exit codes, stderr, one log line per invocation, no stdin from a
/// runtime (Tetragon-style discovery from the working directory).
#[test]
fn binary_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let a = start_agent(d.path(), Mode::Ok);
    let state = bundle(d.path(), "shop");
    let log = d.path().join("bin.log");
    let exe = env!("CARGO_BIN_EXE_rthooks-oci-hook");
    let run_bin = |args: &[&str], stdin: &str, cwd: &Path| {
        let mut child = Command::new(exe)
            .args(args)
            .args([
                "--log-fname",
                log.to_str().unwrap(),
                "--config-file",
                "/nonexistent/c.json",
            ])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        // Stages that do not read stdin may exit first: EPIPE is fine.
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        child.wait_with_output().unwrap()
    };
    let addr = format!("unix://{}", a.sock.display());
    let o = run_bin(
        &["createRuntime", "--grpc-address", &addr],
        &state,
        d.path(),
    );
    assert!(o.status.success(), "{o:?}");
    // No state on stdin: found from the working directory (the bundle).
    let o = run_bin(
        &["createRuntime", "--grpc-address", &addr],
        "",
        &d.path().join("bundle"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(a.seen.lock().unwrap().len(), 2);
    assert_eq!(
        a.seen.lock().unwrap()[1].root_dir,
        d.path().join("bundle/rootfs").to_str().unwrap()
    );
    // Garbage stdin and no config in the working directory: one clear error line.
    let o = run_bin(
        &["createRuntime", "--grpc-address", &addr],
        "{garbage",
        d.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
    // Accepted no-op stages and a typo.
    assert!(run_bin(&["createContainer"], "", d.path()).status.success());
    assert!(run_bin(&["poststop", "--disable-grpc"], &state, d.path())
        .status
        .success());
    let o = run_bin(&["createRuntim"], &state, d.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8(o.stderr)
        .unwrap()
        .contains("unsupported hook stage"));
    // The installers' old spelling names their new binary, and writes nothing.
    for verb in ["install", "uninstall"] {
        let o = run_bin(&[verb, "hooks-d"], "", d.path());
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert!(err.contains(&format!("rthooks-setup {verb}")), "{err}");
    }
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(lines.lines().count(), 6, "{lines}");
}

/// Configuration from the file beside the binary and from the environment, as the
/// effective configuration shows it; flags win over both.
#[test]
fn config_file_beside_binary_and_env() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("rthooks-oci-hook");
    std::fs::copy(env!("CARGO_BIN_EXE_rthooks-oci-hook"), &bin).unwrap();
    std::fs::write(
        d.path().join("rthooks-oci-hook.json"),
        r#"{"grpc-address":"unix:///from/file.sock","fail-allow-namespaces":"a,b","grpc-timeout":"750ms"}"#,
    )
    .unwrap();
    // Other tests fork concurrently: a child may briefly hold the copy's write descriptor
    // (ETXTBSY) until it execs.
    let output = |cmd: &mut Command| {
        for _ in 0..100 {
            match cmd.output() {
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r.unwrap(),
            }
        }
        panic!("{bin:?} stayed busy")
    };
    let out = output(
        Command::new(&bin)
            .args(["--just-print-config", "--grpc-timeout", "1s"])
            .env("RTHOOKS_OCI_HOOK_FAIL_OPEN", "true")
            .env("RTHOOKS_OCI_HOOK_FAIL_ALLOW_NAMESPACES", "env-ns"),
    );
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["grpc-address"], "unix:///from/file.sock");
    assert_eq!(v["grpc-timeout"], "1s", "flag beats file");
    assert_eq!(
        v["fail-allow-namespaces"],
        serde_json::json!(["env-ns"]),
        "env beats file"
    );
    assert_eq!(v["fail-open"], true);

    // A broken expression is reported by --just-print-config (exit 1), not discovered
    // when the agent is down.
    let out = output(Command::new(&bin).args([
        "--just-print-config",
        "--fail-cel-expr",
        "annotations[[",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid fail CEL expression"));
}

/// Many hook processes at once on one small log: every line arrives whole, in the live
/// file or a rotated one, and rotation keeps the configured number of backups.
#[test]
fn concurrent_hook_processes_share_the_log() {
    let d = tempfile::tempdir().unwrap();
    let state = bundle(d.path(), "shop");
    // Large annotations make ~2 KiB lines at debug level, so 1 MiB rotates a few times.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("bundle/config.json")).unwrap())
            .unwrap();
    cfg["annotations"]["padding"] = "p".repeat(1800).into();
    std::fs::write(
        d.path().join("bundle/config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    let log = d.path().join("many.log");
    let exe = env!("CARGO_BIN_EXE_rthooks-oci-hook");
    let (procs, each) = (8, 100);
    let workers: Vec<_> = (0..procs)
        .map(|_| {
            let (state, log) = (state.clone(), log.clone());
            std::thread::spawn(move || {
                for _ in 0..each {
                    let mut child = Command::new(exe)
                        .args([
                            "createRuntime",
                            "--disable-grpc",
                            "--log-level=debug",
                            "--log-max-size=1",
                        ])
                        .args(["--log-max-backups=10", "--config-file=/nonexistent/c.json"])
                        .arg(format!("--log-fname={}", log.display()))
                        .stdin(Stdio::piped())
                        .spawn()
                        .unwrap();
                    use std::io::Write;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(state.as_bytes())
                        .unwrap();
                    assert!(child.wait().unwrap().success());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut total = 0;
    let mut files = 0;
    for e in std::fs::read_dir(d.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("many.log") || name.ends_with(".lock") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(e.path()).unwrap();
        assert!(
            text.len() <= (1 << 20) + (64 << 10),
            "{name} is {} bytes",
            text.len()
        );
        for l in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line in {name}: {e}"));
            assert_eq!(v["decision"], "not-sent");
            total += 1;
        }
    }
    assert!(files > 1, "the log rotated");
    assert_eq!(total, procs * each, "no line lost across {files} files");
}

/// Tetragon's hook also dials TCP addresses; so does ours.
#[test]
fn tcp_address() {
    let d = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = FineGuidanceSensorsServer::new(Fake {
        mode: Mode::Ok,
        seen: seen.clone(),
    });
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let state = bundle(d.path(), "shop");
    for addr in [
        format!("127.0.0.1:{port}"),
        format!("tcp://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        let out = hook::run(
            config::parse([
                "rthooks-oci-hook",
                "createRuntime",
                "--grpc-address",
                &addr,
                "--log-fname",
                d.path().join("hook.log").to_str().unwrap(),
                "--config-file",
                "/nonexistent/c.json",
            ])
            .unwrap(),
            state.as_bytes(),
            None,
        );
        assert_eq!(out.exit_code, 0, "{addr}: {out:?}");
    }
    assert_eq!(seen.lock().unwrap().len(), 3);
}

/// A request far above HTTP/2's 16 KiB frame and 64 KiB initial window (kubelet allows
/// 256 KiB of annotations): the client must wait for the server's window updates.
#[test]
fn large_request_crosses_frames_and_windows() {
    let d = tempfile::tempdir().unwrap();
    let a = start_agent(d.path(), Mode::Ok);
    bundle(d.path(), "shop");
    let cfg_path = d.path().join("bundle/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    for i in 0..400 {
        cfg["annotations"][format!("example.com/key-{i}")] =
            format!("{i}-{}", "v".repeat(600)).into();
    }
    let mounts: Vec<_> = (0..300)
        .map(|i| {
            serde_json::json!({"destination": format!("/data/{i}"), "type": "bind",
            "source": format!("/var/lib/kubelet/pods/x/volumes/{i}"), "options": ["rbind", "ro"]})
        })
        .collect();
    cfg["mounts"] = mounts.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let state = serde_json::json!({"id": CID, "bundle": d.path().join("bundle")}).to_string();
    let out = run(d.path(), &a.sock, &state, &[]);
    assert_eq!(out.exit_code, 0, "{out:?}");
    let seen = a.seen.lock().unwrap();
    assert_eq!(seen[0].annotations.len(), 407);
    assert_eq!(
        seen[0].annotations["example.com/key-399"],
        format!("399-{}", "v".repeat(600))
    );
    assert_eq!(seen[0].mounts.len(), 300);
    assert_eq!(seen[0].mounts[299].destination, "/data/299");
}

/// An agent that takes its time but answers within the deadline registers the container.
#[test]
fn slow_agent_within_the_deadline() {
    let d = tempfile::tempdir().unwrap();
    let a = start_agent(d.path(), Mode::Slow(Duration::from_millis(400)));
    let t = Instant::now();
    let out = run(
        d.path(),
        &a.sock,
        &bundle(d.path(), "shop"),
        &["--grpc-timeout", "3s"],
    );
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.log_line["decision"], "registered");
    assert!(t.elapsed() >= Duration::from_millis(400));
    let out = run(
        d.path(),
        &a.sock,
        &bundle(d.path(), "shop"),
        &["--grpc-timeout", "100ms"],
    );
    assert_eq!(out.exit_code, 1);
    assert!(out.stderr.unwrap().contains("did not answer within 100 ms"));
}

/// The agent down in its three shapes: no socket file, a stale socket file nobody listens
/// on (refused), and a listening socket whose owner never accepts (hung agent): each ends
/// in the failure rule, the last at the deadline.
#[test]
fn agent_down_shapes() {
    let d = tempfile::tempdir().unwrap();
    let state = bundle(d.path(), "shop");
    let missing = d.path().join("missing.sock");
    let out = run(d.path(), &missing, &state, &[]);
    assert_eq!(out.exit_code, 1);
    let err = out.stderr.unwrap();
    assert!(
        err.contains("cannot connect") && err.contains("No such file"),
        "{err}"
    );

    let stale = d.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = run(d.path(), &stale, &state, &[]);
    assert_eq!(out.exit_code, 1);
    let err = out.stderr.unwrap();
    assert!(
        err.contains("cannot connect") && err.contains("refused"),
        "{err}"
    );

    let idle = d.path().join("idle.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&idle).unwrap();
    // Fill the accept backlog too, so that connect itself has to wait.
    let queued = fill_backlog(&idle);
    assert!(!queued.is_empty());
    let t = Instant::now();
    let out = run(d.path(), &idle, &state, &["--grpc-timeout", "300ms"]);
    assert_eq!(out.exit_code, 1);
    assert!(out.stderr.unwrap().contains("did not answer within 300 ms"));
    assert!(t.elapsed() >= Duration::from_millis(300));
    // In the kube-system namespace the same failure lets the container start.
    let out = run(
        d.path(),
        &idle,
        &bundle(d.path(), "kube-system"),
        &["--grpc-timeout", "100ms"],
    );
    assert_eq!(out.exit_code, 0);
    assert_eq!(out.log_line["decision"], "allowed-unregistered");
}

/// Connects non-blocking sockets to `path` until the listener's backlog is full (EAGAIN);
/// returns them so they stay queued.
fn fill_backlog(path: &Path) -> Vec<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let addr = UnixAddr::new(path).unwrap();
    let mut fds = Vec::new();
    for _ in 0..100_000 {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        if connect(fd.as_raw_fd(), &addr).is_err() {
            break;
        }
        fds.push(fd);
    }
    fds
}
