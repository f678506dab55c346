//! A real Kubernetes API server for tests (feature `apiserver`): etcd and `apiextensions-apiserver` on
//! loopback, with their own CA and an admin client certificate.
//!
//! The binaries are the ones `cargo xtask setup` builds from Debian's Go sources
//! (xtask/src/apiserver.rs); they are found through `RTHOOKS_APISERVER_BIN_DIR` (set by
//! `cargo xtask test`) or in the cache. This server serves CustomResourceDefinitions and
//! custom resources with the real API machinery (watch, resourceVersion, bookmarks,
//! 410 Gone after compaction, field selectors through `selectableFields`, CEL and OpenAPI
//! validation, status subresource, server-side apply); it serves no core resources, no
//! `/api` and no root `/apis` discovery document.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Why the test API server could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The binaries are not built.
    #[error("{0}")]
    Unavailable(String),
    /// A file of the server's directory could not be written or read.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The certificates could not be made.
    #[error("making the test PKI")]
    Pki(#[from] rcgen::Error),
    /// The kubeconfig could not be read into a kube client.
    #[error("kube client for the test API server")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// The kube client could not be built.
    #[error("kube client for the test API server")]
    Client(#[from] kube::Error),
    /// The server exited or did not become ready.
    #[error("{0}")]
    NotReady(String),
}

type Result<T, E = ApiServerError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApiServerError {
    let what = what.into();
    move |source| ApiServerError::Io { what, source }
}

/// Set by `cargo xtask test`: the directory holding `etcd` and `apiextensions-apiserver`.
pub use crate::APISERVER_BIN_DIR_ENV as BIN_DIR_ENV;

/// How long the server may take to answer `/readyz` (a busy 2-core machine: ~5–20 s; the
/// e2e guests emulate every instruction under TCG, several times slower).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The directory with the built binaries, if they exist: `$RTHOOKS_APISERVER_BIN_DIR`, else
/// where xtask builds them ([`crate::apiserver_bin_dir`]).
pub fn bin_dir() -> Option<PathBuf> {
    let dir = std::env::var_os(BIN_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(crate::apiserver_bin_dir);
    (dir.join("etcd").exists() && dir.join("apiextensions-apiserver").exists()).then_some(dir)
}

/// Why a test cannot have a server, for its skip message; `None` when it can.
pub fn unavailable() -> Option<String> {
    match bin_dir() {
        Some(_) => None,
        None => Some(format!(
            "no test API server: run `cargo xtask setup` (builds it into ~/.cache/rthooks/apiserver/bin) or set {BIN_DIR_ENV}"
        )),
    }
}

/// The Pod-shaped CRD of a test group (DESIGN.md): this server serves no core resources,
/// so pods are custom resources `pods.<group>` with `spec.nodeName` selectable (a
/// selectable field must be in the schema, even under preserve-unknown-fields).
pub fn pod_crd(group: &str) -> CustomResourceDefinition {
    let open = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let spec = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
        "properties": {"nodeName": {"type": "string"}}});
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("pods.{group}")},
        "spec": {
            "group": group,
            "names": {"plural": "pods", "singular": "pod", "kind": "Pod"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "selectableFields": [{"jsonPath": ".spec.nodeName"}],
                "schema": {"openAPIV3Schema": {"type": "object",
                    "properties": {"spec": spec, "status": open}}}}]
        }
    }))
    .expect("a valid CRD")
}

/// The Namespace-shaped CRD of a test group, served as `plural` (the agent's
/// `TEST_NAMESPACES`: a custom resource called `namespaces` cannot be read by name).
pub fn namespace_crd(group: &str, plural: &str) -> CustomResourceDefinition {
    let open = serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "names": {"plural": plural, "singular": "testnamespace", "kind": "Namespace"},
            "scope": "Cluster",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object",
                    "properties": {"spec": open, "status": open}}}}]
        }
    }))
    .expect("a valid CRD")
}

/// A running etcd + API server pair; both are killed when it is dropped.
pub struct TestApiServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    etcd: Child,
    etcd_url: String,
    apiserver: Option<Child>,
    port: u16,
    audit_log: PathBuf,
    /// A kubeconfig for the admin client (CA, client certificate and key inline).
    pub kubeconfig: PathBuf,
}

impl TestApiServer {
    /// Starts etcd and the server and waits until the server is ready. `audit_log` is where
    /// the server writes every request it served (one JSON line per request, read by
    /// [`read_audit_log`]): keep it under `target/` so the verbs and resources a test used
    /// stay on record. A log left by an earlier run is replaced (the server would append
    /// to it), so the file holds this run's requests only; restarts of the API server
    /// within the run ([`TestApiServer::start_apiserver`]) append.
    pub async fn start(audit_log: &Path) -> Result<Self> {
        let bin = bin_dir()
            .ok_or_else(|| ApiServerError::Unavailable(unavailable().unwrap_or_default()))?;
        let dir = tempfile::Builder::new()
            .prefix("rthooks-apiserver")
            .tempdir()
            .map_err(io("creating the server's directory"))?;
        let [client_port, peer_port, port] = free_ports().map_err(io("choosing free ports"))?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let etcd = Command::new(bin.join("etcd"))
            .arg("--data-dir")
            .arg(dir.path().join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log_file(&dir.path().join("etcd.log"))?)
            .spawn()
            .map_err(io("starting etcd"))?;
        let kubeconfig = dir.path().join("kubeconfig");
        write_pki(dir.path(), port, &kubeconfig)?;
        std::fs::write(dir.path().join("audit-policy.yaml"), AUDIT_POLICY)
            .map_err(io("writing the audit policy"))?;
        if let Some(parent) = audit_log.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        match std::fs::remove_file(audit_log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!(
                    "removing the last run's {}",
                    audit_log.display()
                ))(e))
            }
            _ => {}
        }
        let mut server = TestApiServer {
            dir,
            bin,
            etcd,
            etcd_url,
            apiserver: None,
            port,
            audit_log: audit_log.to_path_buf(),
            kubeconfig,
        };
        server.start_apiserver().await?;
        Ok(server)
    }

    /// (Re)starts the API server on the same port and etcd, and waits until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            return Err(ApiServerError::NotReady(
                "the API server is already running".into(),
            ));
        }
        let d = self.dir.path();
        let child = Command::new(self.bin.join("apiextensions-apiserver"))
            .args(["--etcd-servers", &self.etcd_url])
            .args(["--secure-port", &self.port.to_string()])
            .args(["--bind-address", "127.0.0.1"])
            .arg("--cert-dir")
            .arg(d.join("serving"))
            .arg("--tls-cert-file")
            .arg(d.join("server.crt"))
            .arg("--tls-private-key-file")
            .arg(d.join("server.key"))
            .arg("--client-ca-file")
            .arg(d.join("ca.crt"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--authentication-kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--authorization-kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "--authentication-skip-lookup",
                "--authentication-tolerate-lookup-failure",
                "--authorization-always-allow-paths",
                "/*",
                "--enable-priority-and-fairness=false",
                "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook",
            ])
            .arg("--audit-policy-file")
            .arg(d.join("audit-policy.yaml"))
            .arg("--audit-log-path")
            .arg(&self.audit_log)
            .args(["--audit-log-format", "json"])
            .stdout(Stdio::null())
            .stderr(log_file(&d.join("apiserver.log"))?)
            .spawn()
            .map_err(io("starting apiextensions-apiserver"))?;
        self.apiserver = Some(child);
        self.wait_ready().await
    }

    /// Stops the API server (etcd keeps running), as a control-plane outage would.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Compacts etcd's history up to its current revision (what etcd does on its own every
    /// few minutes in a cluster): a watch resuming from an older resourceVersion then gets
    /// `410 Gone` and must relist. Through etcd's HTTP gateway; returns the revision.
    pub fn compact_etcd(&self) -> Result<i64> {
        let address = self.etcd_url.trim_start_matches("http://");
        // Any key: the answer's header carries the store's revision.
        let range = etcd_post(address, "/v3/kv/range", r#"{"key":"AA=="}"#)?;
        let revision: i64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| {
                ApiServerError::NotReady(format!("etcd range answer without a revision: {range}"))
            })?;
        etcd_post(
            address,
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        Ok(revision)
    }

    /// The kube client configuration for the admin user.
    pub async fn config(&self) -> Result<kube::Config> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        Ok(kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?)
    }

    /// A kube client for the admin user.
    pub async fn client(&self) -> Result<kube::Client> {
        Ok(kube::Client::try_from(self.config().await?)?)
    }

    /// Applies `crds` (server-side apply, field manager `rthooks-test`) and waits until each
    /// is Established, as a cluster's operator would before using the kinds.
    pub async fn install_crds(&self, crds: &[CustomResourceDefinition]) -> Result<()> {
        let api: kube::Api<CustomResourceDefinition> = kube::Api::all(self.client().await?);
        let params = kube::api::PatchParams::apply("rthooks-test").force();
        for crd in crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &kube::api::Patch::Apply(crd))
                .await?;
            let established = kube::runtime::wait::await_condition(
                api.clone(),
                &name,
                kube::runtime::wait::conditions::is_crd_established(),
            );
            match tokio::time::timeout(READY_TIMEOUT, established).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ApiServerError::NotReady(format!("CRD {name}: {e}"))),
                Err(_) => {
                    return Err(ApiServerError::NotReady(format!(
                        "CRD {name} was not Established within {READY_TIMEOUT:?}:\n{}",
                        tail(&self.log(), 30)
                    )))
                }
            }
        }
        Ok(())
    }

    /// Where the server writes its audit log.
    pub fn audit_log(&self) -> &Path {
        &self.audit_log
    }

    /// The server's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // `informer-sync` never passes here: the server starts informers for core
            // resources (admission's namespaces, webhooks, policies) through its own
            // kubeconfig, and it serves none of them. Every other check, CRD informers
            // included, must pass.
            let req = http::Request::get("/readyz?exclude=informer-sync")
                .body(Vec::new())
                .expect("a constant request");
            let last = match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if let Some(status) = self
                .apiserver
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(ApiServerError::NotReady(format!(
                    "the API server exited ({status}):\n{}",
                    tail(&self.log(), 30)
                )));
            }
            if Instant::now() > deadline {
                return Err(ApiServerError::NotReady(format!(
                    "the API server was not ready within {READY_TIMEOUT:?} (last answer: {last}):\n{}",
                    tail(&self.log(), 30)
                )));
            }
            // Polling a condition with a deadline, not a sleep standing in for a signal:
            // the server offers no readiness notification.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

/// One JSON request to etcd's HTTP gateway (plain HTTP on loopback).
fn etcd_post(address: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    use std::io::{Read, Write};
    let what = format!("etcd {path}");
    let mut stream = std::net::TcpStream::connect(address).map_err(io(what.clone()))?;
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(io(what.clone()))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(io(what.clone()))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    // HTTP/1.0: the answer comes whole, never chunked, and the connection then closes.
    if !head
        .lines()
        .next()
        .is_some_and(|status| status.contains(" 200 "))
    {
        return Err(ApiServerError::NotReady(format!("{what}: {answer}")));
    }
    serde_json::from_str(body.trim())
        .map_err(|e| ApiServerError::NotReady(format!("{what}: {e}: {body}")))
}

/// One request of the audit log, as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// `get`, `list`, `watch`, `create`, `patch`, ...
    pub verb: String,
    /// Empty for the core group.
    pub api_group: String,
    pub resource: String,
    /// `status`, ... ; empty for the resource itself.
    pub subresource: String,
    pub namespace: String,
    pub user_agent: String,
    pub request_uri: String,
    /// The HTTP status of the answer.
    pub code: u16,
}

/// The requests the server answered or is answering (a watch is logged at
/// `ResponseStarted` and only reaches `ResponseComplete` when it ends), each once, in the
/// order they came, with a resource (non-resource paths such as `/readyz` are left out).
/// A missing log reads as none.
pub fn read_audit_log(path: &Path) -> Result<Vec<AuditRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let mut records: Vec<AuditRecord> = Vec::new();
    let mut by_id: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            ApiServerError::NotReady(format!("audit log {}: {e}: {line}", path.display()))
        })?;
        let object = &v["objectRef"];
        let answered = matches!(
            v["stage"].as_str(),
            Some("ResponseStarted" | "ResponseComplete" | "Panic")
        );
        if !answered || object.is_null() {
            continue;
        }
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let record = AuditRecord {
            verb: text(&v["verb"]),
            api_group: text(&object["apiGroup"]),
            resource: text(&object["resource"]),
            subresource: text(&object["subresource"]),
            namespace: text(&object["namespace"]),
            user_agent: text(&v["userAgent"]),
            request_uri: text(&v["requestURI"]),
            code: v["responseStatus"]["code"].as_u64().unwrap_or_default() as u16,
        };
        // A request's later stage replaces its earlier one.
        match by_id.entry(text(&v["auditID"])) {
            std::collections::hash_map::Entry::Occupied(i) => records[*i.get()] = record,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(records.len());
                records.push(record);
            }
        }
    }
    Ok(records)
}

/// Logs every request with its user, verb and resource (no bodies): what RBAC needs.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n";

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).map_err(io(format!("creating {}", path.display())))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Ports free at the time of asking, all held until every one is chosen so that no two are
/// the same. Another process could still take one before etcd or the server binds it; the
/// start then fails with "address already in use" rather than silently sharing a port.
fn free_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    Ok(ports.try_into().expect("N ports"))
}

/// A CA, the server's certificate for 127.0.0.1, and an admin client certificate in
/// `system:masters`, all X.509 v3 (rustls refuses v1 client certificates), and a
/// kubeconfig that uses them.
fn write_pki(dir: &Path, port: u16, kubeconfig: &Path) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "rthooks test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
    server
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::default();
    client.distinguished_name = DistinguishedName::new();
    client
        .distinguished_name
        .push(DnType::CommonName, "rthooks-test-admin");
    client
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer)?;

    for (name, pem) in [
        ("ca.crt", ca_cert.pem()),
        ("server.crt", server_cert.pem()),
        ("server.key", server_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).map_err(io(format!("writing {name}")))?;
    }
    use base64::Engine as _;
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority-data": b64(ca_cert.pem()),
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": b64(client_cert.pem()),
            "client-key-data": b64(client_key.serialize_pem()),
        }}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        "current-context": "test",
    });
    // JSON is YAML: the server and kubectl read it as a kubeconfig.
    std::fs::write(kubeconfig, config.to_string()).map_err(io("writing the kubeconfig"))?;
    Ok(())
}
