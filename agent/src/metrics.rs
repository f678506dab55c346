//! Prometheus metrics (text exposition) and the health/readiness endpoints, served by a
//! deliberately tiny HTTP/1.1 responder: three fixed paths need no web framework.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the RuntimeHook latency histogram.
const BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

#[derive(Default)]
pub struct Metrics {
    hook_requests: Mutex<Counts>,
    hook_buckets: [AtomicU64; BUCKETS.len()],
    hook_count: AtomicU64,
    hook_sum_ns: AtomicU64,
    events: Mutex<Counts>,
    pod_label_lookups: Mutex<Counts>,
    kube_events: Mutex<Counts>,
    discovered: AtomicU64,
}

type Counts = BTreeMap<&'static str, u64>;

/// A counter table survives a panic elsewhere while it was locked: each update is one
/// increment, never half done, and the registration path counts every request.
fn counts<'a>(m: &'a Mutex<Counts>) -> MutexGuard<'a, Counts> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Gauges read from the agent's state at scrape time.
pub struct Gauges {
    pub containers: u64,
    pub containers_not_covered: u64,
    pub policies: u64,
    pub map_containers: (u64, u64),
    pub map_binaries: (u64, u64),
    pub ring_buffer_drops: u64,
    /// With the Kubernetes API: whether the pod store is in sync, and how many pods it holds.
    pub kube_pods: Option<(bool, u64)>,
}

impl Metrics {
    pub fn hook_request(&self, result: &'static str, elapsed: Duration) {
        *counts(&self.hook_requests).entry(result).or_default() += 1;
        let secs = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.hook_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.hook_count.fetch_add(1, Ordering::Relaxed);
        self.hook_sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn event(&self, action: &'static str) {
        *counts(&self.events).entry(action).or_default() += 1;
    }

    /// A registration without trusted labels asked the pod store: `store`, `waited`,
    /// `not_found`, `api_unavailable`.
    pub fn pod_label_lookup(&self, result: &'static str) {
        *counts(&self.pod_label_lookups).entry(result).or_default() += 1;
    }

    /// Deny and kill reports as Kubernetes Events (`--kube-events`): `sent`, `failed`
    /// (the API refused or did not answer), `suppressed` (the rate rule), `dropped` (the
    /// reporter or its queue to the API was full).
    pub fn kube_events(&self, result: &'static str, n: u64) {
        *counts(&self.kube_events).entry(result).or_default() += n;
    }

    pub fn kube_event_counts(&self) -> BTreeMap<String, u64> {
        counts(&self.kube_events)
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// A running container that was never registered was found through the API.
    pub fn container_discovered(&self) {
        self.discovered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let mut counter =
            |name: &str, help: &str, label: &str, values: &BTreeMap<&'static str, u64>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (k, v) in values {
                    let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
                }
            };
        counter(
            "rthooks_runtime_hook_requests_total",
            "RuntimeHook requests by result.",
            "result",
            &counts(&self.hook_requests),
        );
        counter(
            "rthooks_events_total",
            "Enforcement events by action.",
            "action",
            &counts(&self.events),
        );
        counter(
            "rthooks_pod_label_lookups_total",
            "Registrations without trusted labels, by how the pod store answered.",
            "result",
            &counts(&self.pod_label_lookups),
        );
        counter(
            "rthooks_kube_events_total",
            "Deny and kill reports as Kubernetes Events, by result (sent, failed, suppressed by the rate rule, dropped).",
            "result",
            &counts(&self.kube_events),
        );
        let name = "rthooks_runtime_hook_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} RuntimeHook handling time.\n# TYPE {name} histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.hook_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.hook_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.hook_sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {count}");
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "rthooks_containers",
            "Containers the agent knows.",
            g.containers,
        );
        gauge(
            "rthooks_containers_not_covered",
            "Containers learned of after they started (no hook ran for them).",
            g.containers_not_covered,
        );
        gauge("rthooks_policies", "Loaded policies.", g.policies);
        if let Some((synced, pods)) = g.kube_pods {
            gauge(
                "rthooks_kube_pods_synced",
                "1 when the pod store is listed and the Kubernetes API answers; 0 while registrations without trusted labels fail fast.",
                synced as u64,
            );
            gauge(
                "rthooks_kube_pods",
                "This node's pods in the agent's store.",
                pods,
            );
        }
        gauge(
            "rthooks_ring_buffer_drops",
            "Events the kernel could not queue.",
            g.ring_buffer_drops,
        );
        let discovered = "rthooks_containers_discovered_total";
        let _ = writeln!(
            out,
            "# HELP {discovered} Running containers found through the Kubernetes API that were never registered (not covered from their first instruction).\n# TYPE {discovered} counter\n{discovered} {}",
            self.discovered.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP rthooks_map_entries BPF map entries in use.\n# TYPE rthooks_map_entries gauge"
        );
        let _ = writeln!(
            out,
            "rthooks_map_entries{{map=\"containers\"}} {}",
            g.map_containers.0
        );
        let _ = writeln!(
            out,
            "rthooks_map_entries{{map=\"binaries\"}} {}",
            g.map_binaries.0
        );
        let _ = writeln!(
            out,
            "# HELP rthooks_map_capacity BPF map capacity.\n# TYPE rthooks_map_capacity gauge"
        );
        let _ = writeln!(
            out,
            "rthooks_map_capacity{{map=\"containers\"}} {}",
            g.map_containers.1
        );
        let _ = writeln!(
            out,
            "rthooks_map_capacity{{map=\"binaries\"}} {}",
            g.map_binaries.1
        );
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped. `/readyz`
/// answers 503 with `ready`'s reason while it has one.
pub async fn serve<F, R>(listener: TcpListener, render: F, ready: R)
where
    F: Fn() -> String + Send + Sync + 'static,
    R: Fn() -> Result<(), String> + Send + Sync + 'static,
{
    let render = std::sync::Arc::new(render);
    let ready = std::sync::Arc::new(ready);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            // Read the whole request head: answering after a partial read would close the
            // socket with unread data, which resets the connection under the client.
            let mut buf = [0u8; 2048];
            let mut n = 0;
            while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[n..])).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            let (status, body, ctype) = match path {
                "/metrics" => ("200 OK", render(), "text/plain; version=0.0.4"),
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/readyz" => match ready() {
                    Ok(()) => ("200 OK", "ok\n".to_string(), "text/plain"),
                    Err(why) => ("503 Service Unavailable", format!("{why}\n"), "text/plain"),
                },
                _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_histogram_and_counters() {
        let m = Metrics::default();
        m.hook_request("ok", Duration::from_micros(700));
        m.hook_request("error", Duration::from_millis(30));
        m.event("deny");
        let text = m.render(&Gauges {
            containers: 3,
            containers_not_covered: 1,
            policies: 2,
            map_containers: (1, 65536),
            map_binaries: (2, 16384),
            ring_buffer_drops: 0,
            kube_pods: Some((false, 7)),
        });
        assert!(text.contains("rthooks_runtime_hook_requests_total{result=\"ok\"} 1"));
        assert!(text.contains("rthooks_runtime_hook_duration_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("rthooks_runtime_hook_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("rthooks_runtime_hook_duration_seconds_count 2"));
        assert!(text.contains("rthooks_events_total{action=\"deny\"} 1"));
        assert!(text.contains("rthooks_containers_not_covered 1"));
        assert!(text.contains("rthooks_kube_pods_synced 0"));
        assert!(text.contains("rthooks_kube_pods 7"));
    }
}
