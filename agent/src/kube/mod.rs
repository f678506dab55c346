//! The agent's Kubernetes side: the connection ([`client`]: in a cluster through its
//! service account, or a `--kubeconfig`), and the sources of pod identity it keeps in
//! reflector stores ([`pods`]: this node's pods; [`namespaces`]: namespace labels), the
//! policy resources ([`policies`]) and, opt-in, deny and kill as Events ([`events`]).
//!
//! The sources take the resource they watch as a parameter ([`Resources`]): core/v1
//! `pods` and `namespaces` in production, Pod- and Namespace-shaped custom resources of a
//! test group where the test API server (which serves no core resources) stands in.
pub mod client;
pub mod events;
pub mod namespaces;
pub mod pods;
pub mod policies;

pub use client::{Connection, KubeArgs, KubeError, Resources};

/// Where a source's view of the API stands. Registrations fail fast unless it is
/// [`ApiState::Synced`]; readiness and metrics report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiState {
    /// Not listed yet since the agent started.
    Connecting,
    /// Listed, and the watch (or a probe after an error) reached the server since.
    Synced,
    /// The last list or watch failed; the store may be stale.
    Unreachable(String),
}

impl ApiState {
    pub fn is_synced(&self) -> bool {
        matches!(self, ApiState::Synced)
    }
}

impl std::fmt::Display for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiState::Connecting => f.write_str("not listed yet"),
            ApiState::Synced => f.write_str("synced"),
            ApiState::Unreachable(why) => write!(f, "unreachable: {why}"),
        }
    }
}

use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, DynamicObject, ListParams};
use ::kube::core::ApiResource;
use ::kube::runtime::reflector::store::{Store, Writer};
use ::kube::runtime::watcher;
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// A reflector store kept by a watch task, and what the task reports about it.
pub(crate) struct Watched {
    pub store: Store<DynamicObject>,
    pub state: watch::Receiver<ApiState>,
    /// Counts the watch events applied to the store: a waiter re-checks on each.
    pub applied: watch::Receiver<u64>,
}

/// What a watch event did to the store, for the source's own reaction.
pub(crate) enum Change<'a> {
    Applied(&'a DynamicObject),
    Deleted(&'a DynamicObject),
    /// A (re)list finished; `before` is what the store held when it began.
    Relisted {
        before: Vec<Arc<DynamicObject>>,
    },
}

/// How long the task waits after a failed list or watch before the next try.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// When an unreachable server is asked whether it answers again: the watcher resumes
/// silently (a resumed watch emits nothing until an object changes), so only a request of
/// our own can tell that the API is back. The first probe comes soon (a blip ends the
/// outage quickly), later ones ever less often, so that the agents of every node do not
/// keep a recovering API server busy.
const PROBE_FIRST: Duration = Duration::from_millis(500);
const PROBE_MAX: Duration = Duration::from_secs(8);

/// Capped exponential backoff with jitter: each delay doubles up to the cap, and each
/// wait is drawn from the upper half of the delay, so that agents that lost the API at
/// the same moment do not come back in step.
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay / 2 + delay.mul_f64(jitter() / 2.0)
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A number in [0, 1): std's per-instance random hash keys, so no random crate is needed
/// for spreading retries.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Spawns the task that keeps `resource`'s objects (narrowed by `fields`) in a reflector
/// store, calls `react` after each change is applied, and reports the API's state.
pub(crate) fn spawn_watch(
    client: ::kube::Client,
    resource: ApiResource,
    fields: Option<String>,
    what: &'static str,
    mut react: impl FnMut(Change<'_>, &Store<DynamicObject>) + Send + 'static,
) -> Watched {
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut writer = Writer::new(resource);
    let store = writer.as_reader();
    let (state_tx, state) = watch::channel(ApiState::Connecting);
    let (applied_tx, applied) = watch::channel(0u64);
    let reader = store.clone();
    let mut config = watcher::Config::default();
    let mut probe_params = ListParams::default().limit(1);
    if let Some(f) = &fields {
        config = config.fields(f);
        probe_params = probe_params.fields(f);
    }
    tokio::spawn(async move {
        let stream = watcher(api.clone(), config);
        tokio::pin!(stream);
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_MAX);
        let mut probe_backoff = Backoff::new(PROBE_FIRST, PROBE_MAX);
        let mut next_probe = tokio::time::Instant::now();
        let mut before = Vec::new();
        let mut listed = false;
        loop {
            let probing = matches!(*state_tx.borrow(), ApiState::Unreachable(_));
            tokio::select! {
                event = stream.next() => match event {
                    None => break,
                    Some(Ok(event)) => {
                        backoff.reset();
                        // Who wrote which field is of no use here and often the bulk of
                        // an object: not kept in the store.
                        let event = event.modify(|o| o.metadata.managed_fields = None);
                        if matches!(event, watcher::Event::Init) {
                            before = reader.state();
                        }
                        writer.apply_watcher_event(&event);
                        match &event {
                            watcher::Event::Apply(o) => react(Change::Applied(o), &reader),
                            watcher::Event::Delete(o) => react(Change::Deleted(o), &reader),
                            watcher::Event::InitDone => {
                                react(Change::Relisted { before: std::mem::take(&mut before) }, &reader);
                                listed = true;
                                tracing::info!(resource = what, objects = reader.len(), "listed");
                                set_state(&state_tx, ApiState::Synced, what);
                            }
                            watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        }
                        applied_tx.send_modify(|n| *n += 1);
                    }
                    Some(Err(e)) => {
                        if !probing {
                            probe_backoff.reset();
                            next_probe = tokio::time::Instant::now() + probe_backoff.next_wait();
                        }
                        set_state(&state_tx, ApiState::Unreachable(e.to_string()), what);
                        tokio::time::sleep(backoff.next_wait()).await;
                    }
                },
                _ = tokio::time::sleep_until(next_probe), if probing => {
                    // Only a store that was listed before may serve again; one that never
                    // was waits for its first list.
                    if listed && api.list(&probe_params).await.is_ok() {
                        set_state(&state_tx, ApiState::Synced, what);
                    }
                    next_probe = tokio::time::Instant::now() + probe_backoff.next_wait();
                }
            }
        }
    });
    Watched {
        store,
        state,
        applied,
    }
}

fn set_state(tx: &watch::Sender<ApiState>, new: ApiState, what: &'static str) {
    tx.send_if_modified(|current| {
        if *current == new {
            return false;
        }
        match &new {
            ApiState::Unreachable(why) => {
                tracing::warn!(resource = what, error = %why, "Kubernetes API unreachable: registrations without trusted labels fail until it answers")
            }
            ApiState::Synced => tracing::info!(resource = what, "Kubernetes API in sync"),
            ApiState::Connecting => {}
        }
        *current = new;
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_starts_over_on_reset() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        let delays = [500, 1000, 2000, 4000, 8000, 8000, 8000, 8000].map(Duration::from_millis);
        for (wait, delay) in waits.iter().zip(delays) {
            assert!(
                *wait >= delay / 2 && *wait <= delay,
                "{wait:?} for {delay:?}"
            );
        }
        // Drawn, not fixed: eight capped waits all equal would be a fixed delay.
        let capped: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(capped.iter().any(|w| *w != capped[0]), "{capped:?}");
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(500));
    }
}
