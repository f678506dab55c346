//! Deny and kill as Kubernetes Events on the pod (opt-in: `--kube-events`), so that
//! `kubectl describe pod` says why an exec failed: the action, the binary, the policy with
//! its origin and the container.
//!
//! The reporter reads the agent's event stream (the broadcast every enforcement event goes
//! through) and never holds it up: a reporter that falls behind loses the oldest events
//! of the stream (counted as `dropped`), and a full queue to the API (a slow or
//! unreachable server) drops the report (`dropped`) instead of waiting.
//!
//! Rate rule, per (pod, container, action, binary, policies): the first exec is reported at
//! once; further ones less than `--kube-events-interval` after the last report are counted
//! (`suppressed`), not sent; the first one after the interval is sent again. So an exec
//! loop in one pod costs at most one API request per interval per distinct exec.
//!
//! Publishing goes through kube-runtime's [`Recorder`], one per rate key: its first
//! publish creates the Event (POST), a later one within its 6-minute cache turns that
//! Event into a series (PATCH: `series.count` + 1, `lastObservedTime`), which `kubectl
//! describe` shows as `(xN over T)`. The Recorder re-sends the first report's note with
//! each series update, so the number of execs suppressed in between is not in the note:
//! it is in the agent's log line of each update and in `rthooks_kube_events_total`.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::kube::core::ApiResource;
use ::kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use k8s_openapi::api::core::v1::ObjectReference;
use rthooks_api::v1;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::agent::Agent;

/// The reporting controller of every Event; the instance is the node's name (as the
/// kubelet reports its own).
pub const REPORTING_CONTROLLER: &str = "rthooks-agent";

/// Reports waiting for the API; more are dropped. Small: with the rate rule in front, a
/// full queue means the API does not answer, and reports older than that are stale.
const QUEUE: usize = 64;
/// Rate keys remembered at most (distinct execs within one interval); a new key beyond
/// them is dropped until old ones expire.
const MAX_KEYS: usize = 4096;
/// kube-runtime's Recorder forgets an Event 6 minutes after it was last observed (its
/// `CACHE_TTL`); a Recorder idle that long creates a new Event anyway, so it is let go.
const RECORDER_IDLE: Duration = Duration::from_secs(6 * 60);
/// The Events API's limit on a note.
const NOTE_MAX: usize = 1024;

/// What one rate key stands for: an exec of one binary in one container, stopped by the
/// same policies the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReportKey {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub action: String,
    pub binary: String,
    pub policies: Vec<String>,
}

/// The rate rule (module docs), on its own so that it can be checked against a clock of
/// the test's choosing.
pub struct RateLimiter {
    interval: Duration,
    keys: HashMap<ReportKey, Sent>,
}

struct Sent {
    at: Instant,
    suppressed: u64,
}

/// The limiter's verdict on one exec.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Report it; `suppressed` execs of this key were not reported since the last report.
    Send { suppressed: u64 },
    /// Within the interval of the last report: counted only.
    Suppress,
    /// Too many keys within one interval: not even counted per key.
    Overflow,
}

impl RateLimiter {
    pub fn new(interval: Duration) -> RateLimiter {
        RateLimiter {
            interval,
            keys: HashMap::new(),
        }
    }

    pub fn check(&mut self, key: &ReportKey, now: Instant) -> Verdict {
        if let Some(sent) = self.keys.get_mut(key) {
            if now.duration_since(sent.at) < self.interval {
                sent.suppressed += 1;
                return Verdict::Suppress;
            }
            let suppressed = std::mem::take(&mut sent.suppressed);
            sent.at = now;
            return Verdict::Send { suppressed };
        }
        if self.keys.len() >= MAX_KEYS {
            let interval = self.interval;
            self.keys.retain(|_, s| now.duration_since(s.at) < interval);
            if self.keys.len() >= MAX_KEYS {
                return Verdict::Overflow;
            }
        }
        self.keys.insert(
            key.clone(),
            Sent {
                at: now,
                suppressed: 0,
            },
        );
        Verdict::Send { suppressed: 0 }
    }
}

/// One Event to publish.
pub struct Report {
    pub key: ReportKey,
    pub regarding: ObjectReference,
    pub event: KubeEvent,
    pub suppressed: u64,
}

/// The policy entries of an event's `policies` (`origin:name:action`) that stopped the
/// exec: those asking for deny or kill.
fn enforcing(policies: &[String]) -> Vec<String> {
    policies
        .iter()
        .filter(|p| p.ends_with(":deny") || p.ends_with(":kill"))
        .cloned()
        .collect()
}

/// `origin:ns/name:action` as a person reads it: `ns/name (kubernetes, deny)`.
fn describe_policy(entry: &str) -> String {
    let (rest, action) = entry.rsplit_once(':').unwrap_or((entry, ""));
    match rest.split_once(':') {
        Some((origin, name)) => format!("{name} ({origin} policy, {action})"),
        None => format!("{rest} ({action})"),
    }
}

/// The Event for an enforcement event, if it is a deny or kill in a known pod.
pub fn report(
    event: &v1::Event,
    pods: &ApiResource,
) -> Option<(ReportKey, ObjectReference, KubeEvent)> {
    let (reason, action, verb) = match event.action.as_str() {
        "deny" => ("ExecDenied", "Deny", "denied"),
        "kill" => ("ExecKilled", "Kill", "killed"),
        _ => return None,
    };
    let c = event.container.as_ref()?;
    if c.pod_namespace.is_empty() || c.pod_name.is_empty() {
        return None;
    }
    let policies = enforcing(&event.policies);
    let key = ReportKey {
        namespace: c.pod_namespace.clone(),
        pod: c.pod_name.clone(),
        pod_uid: c.pod_uid.clone(),
        container: c.container_name.clone(),
        action: event.action.clone(),
        binary: event.binary.clone(),
        policies: policies.clone(),
    };
    let by = match policies.as_slice() {
        [] => "a policy".to_string(),
        [one] => format!("policy {}", describe_policy(one)),
        many => format!(
            "policies {}",
            many.iter()
                .map(|p| describe_policy(p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let container = if c.container_name.is_empty() {
        "its container".to_string()
    } else {
        format!("container {}", c.container_name)
    };
    let mut note = format!(
        "rthooks {verb} exec of {} in {container} by {by}; {} mode, pid {} ({})",
        event.binary, event.enforcement_mode, event.pid, event.comm
    );
    truncate(&mut note, NOTE_MAX);
    let regarding = ObjectReference {
        api_version: Some(pods.api_version.clone()),
        kind: Some(pods.kind.clone()),
        namespace: Some(c.pod_namespace.clone()),
        name: Some(c.pod_name.clone()),
        uid: (!c.pod_uid.is_empty()).then(|| c.pod_uid.clone()),
        // The convention for an event about one container of a pod (the kubelet's).
        field_path: (!c.container_name.is_empty())
            .then(|| format!("spec.containers{{{}}}", c.container_name)),
        ..Default::default()
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    Some((key, regarding, event))
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Starts the reporter when `args` ask for it (`--kube-events`); whether it did.
pub fn start(
    args: &super::KubeArgs,
    client: ::kube::Client,
    node: &str,
    agent: Arc<Agent>,
) -> bool {
    if !args.kube_events {
        return false;
    }
    tracing::info!(interval = ?args.kube_events_interval, "reporting deny and kill as Kubernetes Events on the pod");
    spawn(
        client,
        args.resources().pods,
        node,
        args.kube_events_interval,
        agent,
    );
    true
}

/// Starts the reporter on `agent`'s event stream: Events regarding pods of `pods`' kind,
/// reported by `rthooks-agent` on `node`, at most one request per exec key per `interval`.
pub fn spawn(
    client: ::kube::Client,
    pods: ApiResource,
    node: &str,
    interval: Duration,
    agent: Arc<Agent>,
) {
    let mut stream = agent.subscribe_events();
    let (queue, pending) = mpsc::channel(QUEUE);
    let reporter = Reporter {
        controller: REPORTING_CONTROLLER.into(),
        instance: Some(node.to_string()),
    };
    tokio::spawn(publish(client, reporter, pending, agent.clone()));
    tokio::spawn(async move {
        let mut limiter = RateLimiter::new(interval);
        loop {
            let event = match stream.recv().await {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    agent.metrics().kube_events("dropped", n);
                    tracing::warn!(
                        lost = n,
                        "Kubernetes Event reporter fell behind the event stream"
                    );
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some((key, regarding, event)) = report(&event, &pods) else {
                continue;
            };
            match limiter.check(&key, Instant::now()) {
                Verdict::Suppress => agent.metrics().kube_events("suppressed", 1),
                Verdict::Overflow => agent.metrics().kube_events("dropped", 1),
                Verdict::Send { suppressed } => {
                    let report = Report {
                        key,
                        regarding,
                        event,
                        suppressed,
                    };
                    if queue.try_send(report).is_err() {
                        agent.metrics().kube_events("dropped", 1);
                    }
                }
            }
        }
    });
}

/// Publishes queued reports one at a time, each key through its own [`Recorder`] (module
/// docs). A failure is logged and counted; the next report is tried as usual.
async fn publish(
    client: ::kube::Client,
    reporter: Reporter,
    mut pending: mpsc::Receiver<Report>,
    agent: Arc<Agent>,
) {
    let mut recorders: HashMap<ReportKey, (Recorder, Instant)> = HashMap::new();
    while let Some(report) = pending.recv().await {
        let now = Instant::now();
        recorders.retain(|_, (_, used)| now.duration_since(*used) < RECORDER_IDLE);
        let (recorder, used) = recorders
            .entry(report.key.clone())
            .or_insert_with(|| (Recorder::new(client.clone(), reporter.clone()), now));
        *used = now;
        let k = &report.key;
        match recorder.publish(&report.event, &report.regarding).await {
            Ok(()) => {
                agent.metrics().kube_events("sent", 1);
                tracing::debug!(pod = %format!("{}/{}", k.namespace, k.pod), reason = %report.event.reason,
                    binary = %k.binary, suppressed_since_last = report.suppressed, "Kubernetes Event published");
            }
            Err(e) => {
                agent.metrics().kube_events("failed", 1);
                tracing::warn!(pod = %format!("{}/{}", k.namespace, k.pod), reason = %report.event.reason,
                    error = %e, "publishing a Kubernetes Event failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The test API server (apiextensions-apiserver) serves no Events (events.k8s.io is a
    //! core API group it does not have), so these tests stand in for the API with a
    //! hand-written tower service (tower-test is not obtainable here, as in
    //! `kube::pods`' tests) that records every request.
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::bpf::Mode;

    #[derive(Clone, Debug)]
    struct Request {
        method: String,
        path: String,
        body: serde_json::Value,
    }

    #[derive(Clone, Copy)]
    enum Api {
        /// Answers as the API server would: the object back.
        Echo,
        /// 500 for every request.
        Fail,
        /// Never answers.
        Silent,
    }

    fn mock_client(api: Api) -> (::kube::Client, Arc<Mutex<Vec<Request>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let service = tower::service_fn(move |req: http::Request<::kube::client::Body>| {
            let record = record.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                record.lock().unwrap().push(Request {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    body: body.clone(),
                });
                let (status, answer) = match api {
                    Api::Echo => (
                        if parts.method == http::Method::POST {
                            201
                        } else {
                            200
                        },
                        body,
                    ),
                    Api::Fail => (
                        500,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "etcdserver: request timed out", "code": 500}),
                    ),
                    Api::Silent => std::future::pending().await,
                };
                http::Response::builder()
                    .status(status)
                    .body(::kube::client::Body::from(answer.to_string().into_bytes()))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        (::kube::Client::new(service, "default"), seen)
    }

    fn agent(dir: &std::path::Path) -> Arc<Agent> {
        crate::agent::tests::fake_agent(dir, dir.to_path_buf(), Mode::Lsm)
    }

    fn exec(action: &str, binary: &str, pid: u32) -> v1::Event {
        v1::Event {
            time: "2026-12-01T16:00:00Z".into(),
            action: action.into(),
            pid,
            binary: binary.into(),
            cgroup_id: 42,
            container: Some(v1::Container {
                container_id: "c1".into(),
                container_name: "web".into(),
                pod_name: "web-0".into(),
                pod_uid: "uid-1".into(),
                pod_namespace: "shop".into(),
                ..Default::default()
            }),
            policies: vec![
                format!("kubernetes:shop/deny-tools:{action}"),
                "file:audit-all:audit".into(),
            ],
            comm: "sh".into(),
            enforcement_mode: "lsm".into(),
        }
    }

    fn kube_events(agent: &Agent) -> BTreeMap<String, u64> {
        agent.metrics().kube_event_counts()
    }

    /// Waits until the reporter has accounted for `n` events (sent, failed, suppressed
    /// or dropped).
    async fn accounted(agent: &Agent, n: u64, without: &[&str]) -> BTreeMap<String, u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let counts = kube_events(agent);
            let total: u64 = counts
                .iter()
                .filter(|(k, _)| !without.contains(&k.as_str()))
                .map(|(_, v)| v)
                .sum();
            if total >= n {
                return counts;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {counts:?} of {n}"
            );
            // Polling with a deadline: the reporter offers no notification.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// An agent whose reporter (`interval`) talks to a mock `api`; the directory lives as
    /// long as the test keeps it.
    fn reporting(
        api: Api,
        interval: Duration,
    ) -> (tempfile::TempDir, Arc<Agent>, Arc<Mutex<Vec<Request>>>) {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let (client, seen) = mock_client(api);
        spawn(client, pods(), "node-a", interval, agent.clone());
        (dir, agent, seen)
    }

    fn pods() -> ApiResource {
        crate::kube::Resources::core().pods
    }

    #[tokio::test]
    async fn a_denial_becomes_a_warning_event_on_the_pod() {
        let (_dir, agent, seen) = reporting(Api::Echo, Duration::from_secs(3600));
        agent.publish_event(exec("deny", "/usr/bin/curl", 7));
        agent.publish_event(exec("audit", "/usr/bin/id", 8));
        // Another pod's kill, to know the audit before it was passed over.
        let mut kill = exec("kill", "/usr/bin/nc", 9);
        kill.container.as_mut().unwrap().pod_name = "web-1".into();
        agent.publish_event(kill);
        accounted(&agent, 2, &[]).await;

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "audits are no Events: {seen:?}");
        let r = &seen[0];
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events")
        );
        let e = &r.body;
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["reason"], "ExecDenied");
        assert_eq!(e["action"], "Deny");
        assert_eq!(e["reportingController"], "rthooks-agent");
        assert_eq!(e["reportingInstance"], "node-a");
        assert_eq!(e["metadata"]["namespace"], "shop");
        assert_eq!(
            e["regarding"],
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-0",
                "uid": "uid-1", "fieldPath": "spec.containers{web}"})
        );
        assert_eq!(
            e["note"],
            "rthooks denied exec of /usr/bin/curl in container web by policy shop/deny-tools (kubernetes policy, deny); lsm mode, pid 7 (sh)"
        );
        assert_eq!(seen[1].body["reason"], "ExecKilled");
        assert_eq!(seen[1].body["regarding"]["name"], "web-1");
        assert_eq!(kube_events(&agent).get("sent"), Some(&2));
    }

    #[tokio::test]
    async fn an_exec_loop_costs_one_request_per_interval() {
        let (_dir, agent, seen) = reporting(Api::Echo, Duration::from_secs(3600));
        // 500 denials of one exec and 500 of another: two Events, the rest counted. Sent
        // in batches below the event stream's capacity, each accounted before the next.
        for batch in 0..10u32 {
            for i in 0..100 {
                let binary = if i % 2 == 0 {
                    "/usr/bin/curl"
                } else {
                    "/usr/bin/wget"
                };
                agent.publish_event(exec("deny", binary, batch * 100 + i));
            }
            accounted(&agent, u64::from(batch + 1) * 100, &[]).await;
        }
        let counts = kube_events(&agent);
        assert_eq!(counts.get("sent"), Some(&2), "{counts:?}");
        assert_eq!(counts.get("suppressed"), Some(&998), "{counts:?}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|r| r.method == "POST"));
    }

    #[tokio::test]
    async fn a_repeat_after_the_interval_extends_the_events_series() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let (client, seen) = mock_client(Api::Echo);
        // A zero interval: every repeat is past it.
        spawn(client, pods(), "node-a", Duration::ZERO, agent.clone());
        for pid in 1..=3 {
            agent.publish_event(exec("deny", "/usr/bin/curl", pid));
            accounted(&agent, u64::from(pid), &[]).await;
        }
        let seen = seen.lock().unwrap().clone();
        let methods: Vec<&str> = seen.iter().map(|r| r.method.as_str()).collect();
        assert_eq!(methods, ["POST", "PATCH", "PATCH"]);
        let name = seen[0].body["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            seen[2].path,
            format!("/apis/events.k8s.io/v1/namespaces/shop/events/{name}")
        );
        assert_eq!(seen[2].body["series"]["count"], 3);
    }

    #[test]
    fn the_rate_rule_sends_once_per_interval_and_counts_the_rest() {
        let mut limiter = RateLimiter::new(Duration::from_secs(60));
        let key = report(&exec("deny", "/usr/bin/curl", 1), &pods())
            .unwrap()
            .0;
        let other = report(&exec("deny", "/usr/bin/wget", 1), &pods())
            .unwrap()
            .0;
        let t0 = Instant::now();
        assert_eq!(limiter.check(&key, t0), Verdict::Send { suppressed: 0 });
        for s in 1..=30 {
            assert_eq!(
                limiter.check(&key, t0 + Duration::from_secs(s)),
                Verdict::Suppress
            );
        }
        assert_eq!(
            limiter.check(&other, t0 + Duration::from_secs(30)),
            Verdict::Send { suppressed: 0 }
        );
        assert_eq!(
            limiter.check(&key, t0 + Duration::from_secs(60)),
            Verdict::Send { suppressed: 30 }
        );
        assert_eq!(
            limiter.check(&key, t0 + Duration::from_secs(61)),
            Verdict::Suppress
        );
    }

    #[tokio::test]
    async fn api_errors_are_counted_and_the_reporter_goes_on() {
        let (_dir, agent, seen) = reporting(Api::Fail, Duration::from_secs(3600));
        let mut stream = agent.subscribe_events();
        for pid in 0..20 {
            agent.publish_event(exec("deny", &format!("/usr/bin/tool-{pid}"), pid));
            assert_eq!(stream.recv().await.unwrap().pid, pid);
            accounted(&agent, u64::from(pid) + 1, &[]).await;
        }
        // Each one tried (distinct execs) and refused; the next one tried all the same.
        assert_eq!(kube_events(&agent).get("failed"), Some(&20));
        assert_eq!(seen.lock().unwrap().len(), 20);
    }

    #[tokio::test]
    async fn a_silent_api_does_not_hold_up_the_event_stream() {
        let (_dir, agent, seen) = reporting(Api::Silent, Duration::from_secs(3600));
        let mut stream = agent.subscribe_events();
        // Distinct execs, none suppressed: one request hangs, the queue behind it fills,
        // the rest are dropped. Every event still reaches the stream's other readers.
        let n = 3 * QUEUE as u32;
        for pid in 0..n {
            agent.publish_event(exec("deny", &format!("/usr/bin/tool-{pid}"), pid));
            assert_eq!(stream.recv().await.unwrap().pid, pid);
        }
        let all_but_queue = u64::from(n) - QUEUE as u64 - 1;
        let counts = accounted(&agent, all_but_queue, &[]).await;
        assert!(
            counts["dropped"] <= u64::from(n) - QUEUE as u64,
            "{counts:?}"
        );
        assert!(seen.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn events_are_off_unless_asked_for() {
        use clap::Parser;
        let off = crate::AgentConfig::parse_from(["rthooks-agent"]).kube;
        assert!(!off.kube_events);
        assert_eq!(off.kube_events_interval, Duration::from_secs(60));
        let on = crate::AgentConfig::parse_from([
            "rthooks-agent",
            "--kube-events",
            "--kube-events-interval=10s",
        ])
        .kube;
        assert!(on.kube_events);
        assert_eq!(on.kube_events_interval, Duration::from_secs(10));

        // The same denial for an agent started without and one with the flag: once the
        // second has sent its Event, the first has seen the denial too and sent nothing.
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        let (client_off, seen_off) = mock_client(Api::Echo);
        let (client_on, seen_on) = mock_client(Api::Echo);
        assert!(!start(&off, client_off, "node-a", agent.clone()));
        assert!(start(&on, client_on, "node-a", agent.clone()));
        agent.publish_event(exec("deny", "/usr/bin/curl", 7));
        accounted(&agent, 1, &[]).await;
        assert_eq!(seen_on.lock().unwrap().len(), 1);
        assert!(seen_off.lock().unwrap().is_empty());
    }

    #[test]
    fn a_long_note_is_cut_at_the_apis_limit() {
        let mut e = exec("deny", &format!("/{}", "é".repeat(700)), 1);
        e.policies = vec!["file:p:deny".into()];
        let (_, _, event) = report(&e, &pods()).unwrap();
        let note = event.note.unwrap();
        assert!(
            note.len() <= NOTE_MAX && note.len() > NOTE_MAX - 2,
            "{}",
            note.len()
        );
    }
}
