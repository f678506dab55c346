//! Reads the kernel's ring buffer, enriches each record with the container's identity and
//! the policies involved, and publishes it: JSON lines (stdout or file), the gRPC event
//! stream and the metrics.
use std::io::Write;
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use rthooks_api::v1;
use rthooks_common::{Action, Event, EVENT_CGROUP_REMOVED, EVENT_EXEC};
use tokio::io::unix::AsyncFd;

use crate::agent::Agent;

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Audit => "audit",
        Action::Kill => "kill",
        Action::Deny => "deny",
    }
}

/// Turns one exec record into the API event.
pub fn enrich(agent: &Agent, ev: &Event) -> Option<v1::Event> {
    let action = Action::from_u32(ev.action)?;
    // Outside lsm mode a Deny is carried out as a kill: report what happened.
    let reported = match action {
        Action::Deny if !agent.mode().refuses_exec() => Action::Kill,
        a => a,
    };
    let context = agent.exec_context(ev);
    let comm_len = ev
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(ev.comm.len());
    Some(v1::Event {
        time: now_rfc3339(),
        action: action_name(reported).into(),
        pid: ev.tgid,
        binary: context
            .binary
            .unwrap_or_else(|| format!("<hash {:#x}>", ev.path_hash)),
        cgroup_id: ev.cgroup_id,
        container: context.container,
        policies: context.policies,
        comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
        enforcement_mode: agent.mode().as_str().into(),
    })
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// JSON form of an event (one line), with field names as in the proto.
pub fn to_json(e: &v1::Event) -> serde_json::Value {
    let c = e.container.as_ref();
    serde_json::json!({
        "time": e.time,
        "action": e.action,
        "pid": e.pid,
        "binary": e.binary,
        "comm": e.comm,
        "cgroup_id": e.cgroup_id,
        "policies": e.policies,
        "enforcement_mode": e.enforcement_mode,
        "container": c.map(|c| serde_json::json!({
            "container_id": c.container_id,
            "container_name": c.container_name,
            "image": c.image,
            "pod_name": c.pod_name,
            "pod_uid": c.pod_uid,
            "pod_namespace": c.pod_namespace,
            "pod_labels": c.pod_labels,
        })),
    })
}

/// Runs until the ring buffer fails.
pub async fn run(
    agent: Arc<Agent>,
    ring: RingBuf<MapData>,
    mut sink: Option<Box<dyn Write + Send>>,
) {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until it is dropped.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %std::io::Error::from(e), "cannot poll the event ring buffer; no events");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "event ring buffer failed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        let mut records = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel wrote an Event (same #[repr(C)] definition); read
                // unaligned because the ring buffer only guarantees 8-byte alignment.
                records.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
            }
        }
        guard.clear_ready();
        handle_records(&agent, records, &mut sink);
    }
}

/// Handles a batch of kernel records, each on its own: a bug handling one must not end the
/// reader, or no event would be reported and removed cgroups would wait for the reconciler.
fn handle_records(agent: &Agent, records: Vec<Event>, sink: &mut Option<Box<dyn Write + Send>>) {
    for ev in records {
        let handled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(agent, &ev, sink)));
        if handled.is_err() {
            tracing::error!(
                kind = ev.kind,
                "handling a kernel event panicked; record skipped"
            );
        }
    }
}

fn handle(agent: &Agent, ev: &Event, sink: &mut Option<Box<dyn Write + Send>>) {
    match ev.kind {
        EVENT_EXEC => {
            let Some(event) = enrich(agent, ev) else {
                return;
            };
            agent.metrics().event(match event.action.as_str() {
                "deny" => "deny",
                "kill" => "kill",
                _ => "audit",
            });
            if let Some(out) = sink.as_mut() {
                let _ = writeln!(out, "{}", to_json(&event));
                let _ = out.flush();
            }
            let pod = event
                .container
                .as_ref()
                .map(|c| format!("{}/{}", c.pod_namespace, c.pod_name));
            tracing::info!(action = %event.action, binary = %event.binary, pid = event.pid, pod = ?pod, policies = ?event.policies, "enforcement event");
            agent.publish_event(event);
        }
        EVENT_CGROUP_REMOVED => agent.cgroup_removed(ev.cgroup_id),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use rthooks_common::{PolicySet, EVENT_EXEC};

    use super::*;
    use crate::bpf::Mode;
    use crate::state::tests::FakeMaps;

    /// An events file whose first write panics; later lines are kept.
    struct PanicsOnce {
        panicked: bool,
        lines: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for PanicsOnce {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.panicked {
                self.panicked = true;
                panic!("injected panic writing an event");
            }
            self.lines.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn audit(pid: u32) -> Event {
        Event {
            kind: EVENT_EXEC,
            action: Action::Audit as u32,
            pid,
            tgid: pid,
            cgroup_id: 1,
            container_cgroup_id: 1,
            path_hash: 7,
            ktime_ns: 0,
            deny: PolicySet::EMPTY,
            kill: PolicySet::EMPTY,
            audit: PolicySet::EMPTY,
            comm: [0; 16],
        }
    }

    #[test]
    fn a_panic_handling_one_record_does_not_lose_the_next() {
        let dirs = tempfile::tempdir().unwrap();
        let agent = Agent::new(
            Box::new(FakeMaps::default()),
            Mode::Sigkill,
            "test".into(),
            &dirs.path().join("state"),
            dirs.path().to_path_buf(),
            dirs.path().join("policies"),
            false,
        )
        .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut sink: Option<Box<dyn Write + Send>> = Some(Box::new(PanicsOnce {
            panicked: false,
            lines: lines.clone(),
        }));
        handle_records(&agent, vec![audit(100), audit(200)], &mut sink);
        let written = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        assert!(written.contains("\"pid\":200"), "{written}");
        assert!(!written.contains("\"pid\":100"), "{written}");
    }
}
