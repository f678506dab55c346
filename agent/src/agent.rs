//! The running agent: the model (`state`), the BPF maps and the persistence behind one
//! lock, and the operations the gRPC services, the policy directory watcher, the event
//! reader and the reconciler perform on them.
//!
//! A panic while the lock is held (a bug anywhere below) must not leave the node failing
//! closed for every later container. The lock is taken through [`Agent::lock`] only: when
//! a panic poisoned it, the next caller rebuilds the model the way a starting agent does
//! (the saved state over what the maps hold, then the maps made to match) and clears the
//! poison, so the change the panic interrupted is either complete or undone everywhere.
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use rthooks_api::tetragon::CreateContainer;
use rthooks_api::v1;
use rthooks_common::Event;
use tokio::sync::broadcast;

use crate::bpf::Mode;
use crate::error::Error;
use crate::identity::ContainerIdentity;
use crate::kube::namespaces::{NamespaceEvents, NamespaceSource};
use crate::kube::pods::{LabelError, Lookup, PodEvents, PodInfo, PodSource};
use crate::metrics::{Gauges, Metrics};
use crate::policy::{parse_policies, Origin, Policy, PolicyKey};
use crate::state::{ContainerRecord, MapSink, PolicyRecord, PolicySource, State, Store};
use crate::{cgroup, identity};

/// The map writer the agent drives: the pinned BPF maps, or a recorder in tests.
pub type Maps = Box<dyn MapSink + Send>;

/// A policy file as last read.
struct PolicyFile {
    mtime: SystemTime,
    len: u64,
    /// The policies it defined.
    keys: Vec<PolicyKey>,
}

/// Everything behind the lock.
struct Inner {
    state: State,
    maps: Maps,
    store: Store,
    files: HashMap<PathBuf, PolicyFile>,
}

/// What a restore found.
struct Restored {
    containers: usize,
    dropped: usize,
    policies: usize,
}

pub struct Agent {
    inner: Mutex<Inner>,
    cgroup_root: PathBuf,
    trust_label_annotation: bool,
    mode: Mode,
    mode_reason: String,
    kernel_release: String,
    events: broadcast::Sender<v1::Event>,
    metrics: Metrics,
    policy_dir: PathBuf,
    /// This node's pods from the Kubernetes API, when the agent uses it.
    pods: OnceLock<PodSource>,
    /// Namespace labels from the Kubernetes API, when the agent uses it.
    namespaces: OnceLock<NamespaceSource>,
}

/// A request's container, identified but not registered yet.
pub struct Identified {
    cgroup: cgroup::Cgroup,
    pub identity: ContainerIdentity,
    /// Its labels came from the trusted `rthooks.io/pod-labels` annotation.
    pub labels_trusted: bool,
}

/// What the agent knows about the subjects of one exec record.
pub struct ExecContext {
    /// `origin:name:deny|kill|audit` for every policy involved (`api:prod/p:deny`).
    pub policies: Vec<String>,
    /// The path a policy named it by, when one did.
    pub binary: Option<String>,
    pub container: Option<v1::Container>,
}

impl Agent {
    /// Builds the agent around loaded programs, restoring the saved state and making the
    /// maps match it exactly.
    pub fn new(
        maps: Maps,
        mode: Mode,
        mode_reason: String,
        state_dir: &Path,
        cgroup_root: PathBuf,
        policy_dir: PathBuf,
        trust_label_annotation: bool,
    ) -> Result<Agent, Error> {
        let mut inner = Inner {
            state: State::new(),
            maps,
            store: Store::open(state_dir)?,
            files: HashMap::new(),
        };
        let restored = inner.restore(&cgroup_root)?;
        tracing::info!(
            containers = restored.containers,
            dropped = restored.dropped,
            policies = restored.policies,
            "state restored"
        );
        Ok(Agent {
            inner: Mutex::new(inner),
            cgroup_root,
            trust_label_annotation,
            mode,
            mode_reason,
            kernel_release: kernel_release(),
            events: broadcast::channel(1024).0,
            metrics: Metrics::default(),
            policy_dir,
            pods: OnceLock::new(),
            namespaces: OnceLock::new(),
        })
    }

    /// The only way to the state. Recovers from a poisoned lock (see the module doc).
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut inner = poisoned.into_inner();
            tracing::error!(
                "a panic interrupted a change of the agent's state; rebuilding it from the state directory and the maps"
            );
            match inner.restore(&self.cgroup_root) {
                Ok(r) => tracing::info!(
                    containers = r.containers,
                    dropped = r.dropped,
                    policies = r.policies,
                    "state rebuilt"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "rebuilding the state failed; going on with the state the panic left"
                ),
            }
            self.inner.clear_poison();
            inner
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Enforcement events as they happen.
    pub fn subscribe_events(&self) -> broadcast::Receiver<v1::Event> {
        self.events.subscribe()
    }

    pub fn publish_event(&self, event: v1::Event) {
        // No subscriber is no error.
        let _ = self.events.send(event);
    }

    /// The pod source the agent takes labels from from now on (set once, at start-up).
    pub fn attach_pods(&self, pods: PodSource) {
        if self.pods.set(pods).is_err() {
            tracing::warn!("a pod source was attached twice; keeping the first");
        }
    }

    /// The namespace source (set once, at start-up).
    pub fn attach_namespaces(&self, namespaces: NamespaceSource) {
        if self.namespaces.set(namespaces).is_err() {
            tracing::warn!("a namespace source was attached twice; keeping the first");
        }
    }

    /// This node's pods, when the agent uses the Kubernetes API.
    pub fn pods(&self) -> Option<&PodSource> {
        self.pods.get()
    }

    /// NRI Synchronize reports and tests: resolve, identify, register, persist. Labels the
    /// request does not carry trusted come from the pod store if the pod is there (no
    /// wait: [`Agent::register_waiting`] is the hook's path). On error nothing changes.
    pub fn register(
        &self,
        req: &CreateContainer,
        source: &str,
        covered: bool,
    ) -> Result<ContainerRecord, Error> {
        let mut found = self.identify(req)?;
        if let (false, Some(pods)) = (found.labels_trusted, self.pods()) {
            let id = &found.identity;
            if let Some(p) = pods
                .pod(&id.pod_namespace, &id.pod_name)
                .filter(|p| p.is_pod_with_uid(&id.pod_uid))
            {
                found.identity.pod_labels = p.labels;
            }
        }
        self.register_identified(found, source, covered)
    }

    /// RuntimeHook CreateContainer, between [`Agent::identify`] and
    /// [`Agent::register_identified`]: a container without trusted labels takes them from
    /// the API's pod store, waiting for its pod within the bound, and fails when they
    /// cannot be had, so that the hook's failure rule decides. Without the API, nothing.
    pub async fn labels_from_api(&self, found: &mut Identified) -> Result<(), Error> {
        let (false, Some(pods)) = (found.labels_trusted, self.pods()) else {
            return Ok(());
        };
        let id = &found.identity;
        let result = pods
            .labels(&id.pod_namespace, &id.pod_name, &id.pod_uid)
            .await;
        self.metrics.pod_label_lookup(match &result {
            Ok((_, Lookup::Store)) => "store",
            Ok((_, Lookup::Waited)) => "waited",
            Err(LabelError::NotFound { .. }) => "not_found",
            Err(LabelError::Unavailable(_)) => "api_unavailable",
        });
        found.identity.pod_labels = result?.0;
        Ok(())
    }

    /// The container a request describes: its cgroup and identity.
    pub fn identify(&self, req: &CreateContainer) -> Result<Identified, Error> {
        let cgroup = cgroup::resolve(&self.cgroup_root, &req.cgroups_path)?;
        let identity = identity::from_request(req, &cgroup.path, self.trust_label_annotation)?;
        let labels_trusted = self.trust_label_annotation
            && rthooks_container::labels::from_annotations(&req.annotations).is_some();
        Ok(Identified {
            cgroup,
            identity,
            labels_trusted,
        })
    }

    /// Registers and persists an identified container. On error nothing changes.
    pub fn register_identified(
        &self,
        found: Identified,
        source: &str,
        covered: bool,
    ) -> Result<ContainerRecord, Error> {
        let rec = ContainerRecord {
            identity: found.identity,
            cgroup_id: found.cgroup.id,
            cgroup_path: found.cgroup.path.relative().to_owned(),
            level: found.cgroup.level,
            covered,
            source: source.to_string(),
        };
        self.lock().register(rec)
    }

    pub fn remove_container(&self, container_id: &str) -> Result<bool, Error> {
        self.lock().remove_container(container_id)
    }

    /// The kernel removed a registered cgroup (its map entry is already gone).
    pub fn cgroup_removed(&self, cgroup_id: u64) {
        self.lock().cgroup_removed(cgroup_id);
    }

    /// Drops containers whose cgroup no longer exists (periodic; the BPF rmdir program
    /// normally does it first, this catches anything missed, e.g. while the agent was down).
    pub fn reconcile(&self) -> usize {
        let mut inner = self.lock();
        let gone = inner.gone_containers(&self.cgroup_root);
        for id in &gone {
            inner.cgroup_removed(*id);
        }
        gone.len()
    }

    pub fn add_policy(&self, policy: Policy, source: PolicySource) -> Result<PolicyRecord, Error> {
        self.lock().add_policy(policy, source)
    }

    /// Deletes a policy through the API: one from a file is refused.
    pub fn delete_policy(&self, key: &PolicyKey) -> Result<(), Error> {
        let mut inner = self.lock();
        let exists = inner.state.policies().any(|p| &p.key() == key);
        if !exists && key.origin == Origin::Api {
            let file_key = PolicyKey {
                origin: Origin::File,
                ..key.clone()
            };
            if inner.state.policies().any(|p| p.key() == file_key) {
                return Err(Error::PolicyFromFile(key.to_string()));
            }
        }
        inner.delete_policy(key)
    }

    /// Dry run: the known containers `policy` would select.
    pub fn check_policy(&self, policy: &Policy) -> Vec<v1::Container> {
        let inner = self.lock();
        inner
            .state
            .containers()
            .filter(|c| {
                policy.selects_in(
                    &c.identity,
                    inner.state.namespace_labels(&c.identity.pod_namespace),
                )
            })
            .map(|c| to_api_container(&inner.state, c))
            .collect()
    }

    pub fn list_containers(&self) -> Vec<v1::Container> {
        let inner = self.lock();
        inner
            .state
            .containers()
            .map(|c| to_api_container(&inner.state, c))
            .collect()
    }

    pub fn list_policies(&self) -> Vec<v1::Policy> {
        self.lock().state.policies().map(to_api_policy).collect()
    }

    /// The policies, binary and container an exec record names.
    pub fn exec_context(&self, ev: &Event) -> ExecContext {
        let inner = self.lock();
        let state = &inner.state;
        let mut policies = Vec::new();
        for (set, what) in [(&ev.deny, "deny"), (&ev.kill, "kill"), (&ev.audit, "audit")] {
            for name in state.policy_names(set) {
                policies.push(format!("{name}:{what}"));
            }
        }
        ExecContext {
            policies,
            binary: state.binary_path(ev.path_hash).map(str::to_string),
            container: state
                .container(ev.container_cgroup_id)
                .map(|c| to_api_container(state, c)),
        }
    }

    pub fn gauges(&self) -> Gauges {
        let inner = self.lock();
        let (c, b) = inner.state.map_fill();
        let (cc, bc) = crate::bpf::MapWriter::capacities();
        Gauges {
            containers: inner.state.containers().count() as u64,
            containers_not_covered: inner.state.containers().filter(|c| !c.covered).count() as u64,
            policies: inner.state.policies().count() as u64,
            map_containers: (c as u64, cc as u64),
            map_binaries: (b as u64, bc as u64),
            ring_buffer_drops: inner.maps.ring_buffer_drops(),
            kube_pods: self.pods().map(|p| (p.state().is_synced(), p.len() as u64)),
        }
    }

    /// Why the agent is not ready, if it is not: the Kubernetes API it uses is unreachable
    /// or not listed yet, so registrations without trusted labels fail.
    pub fn readiness(&self) -> Result<(), String> {
        let pods = self.pods().map(|p| ("pods", p.state()));
        let namespaces = self.namespaces.get().map(|n| ("namespaces", n.state()));
        let why: Vec<String> = [pods, namespaces]
            .into_iter()
            .flatten()
            .filter(|(_, state)| !state.is_synced())
            .map(|(what, state)| format!("Kubernetes API ({what}): {state}"))
            .collect();
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    /// Registers the running containers of `pods` that the agent does not know (it was
    /// down when they started, the hook failed open, or NRI dropped the plugin), found by
    /// their `containerID` among the cgroups of their pod, as not covered from their first
    /// instruction.
    fn discover_unregistered(&self, pods: &[PodInfo]) {
        let unknown: Vec<(&PodInfo, &crate::kube::pods::RunningContainer)> = {
            let inner = self.lock();
            pods.iter()
                .flat_map(|p| p.containers.iter().map(move |c| (p, c)))
                .filter(|(_, c)| inner.state.cgroup_of_container_id(&c.id).is_none())
                .collect()
        };
        if unknown.is_empty() {
            return;
        }
        let wanted: Vec<(&str, &str)> = unknown
            .iter()
            .map(|(p, c)| (p.mirror_of.as_deref().unwrap_or(&p.uid), c.id.as_str()))
            .collect();
        let found = cgroup::find_container_cgroups(&self.cgroup_root, &wanted);
        for (pod, c) in unknown {
            let Some(path) = found.get(c.id.as_str()) else {
                tracing::debug!(container = %c.id, pod = %format!("{}/{}", pod.namespace, pod.name), "running container without a cgroup here; not registered");
                continue;
            };
            let req = CreateContainer {
                cgroups_path: path.clone(),
                container_id: c.id.clone(),
                container_name: c.name.clone(),
                container_image: c.image.clone(),
                pod_name: pod.name.clone(),
                pod_uid: pod.mirror_of.clone().unwrap_or_else(|| pod.uid.clone()),
                pod_namespace: pod.namespace.clone(),
                ..Default::default()
            };
            let result = self.identify(&req).and_then(|mut found| {
                found.identity.pod_labels = pod.labels.clone();
                self.register_identified(found, "kube-discovery", false)
            });
            match result {
                Ok(rec) => {
                    self.metrics.container_discovered();
                    tracing::warn!(container = %c.id, pod = %format!("{}/{}", pod.namespace, pod.name), cgroup = %rec.cgroup_path, "running container found that was never registered: not covered from its first instruction");
                }
                Err(e) => {
                    tracing::warn!(container = %c.id, error = %e, "registering a running container found through the API failed")
                }
            }
        }
    }

    pub fn status(&self) -> v1::StatusResponse {
        let g = self.gauges();
        v1::StatusResponse {
            enforcement_mode: self.mode.as_str().into(),
            enforcement_reason: self.mode_reason.clone(),
            kernel_release: self.kernel_release.clone(),
            maps: vec![
                v1::MapFill {
                    name: "containers".into(),
                    entries: g.map_containers.0,
                    capacity: g.map_containers.1,
                },
                v1::MapFill {
                    name: "binaries".into(),
                    entries: g.map_binaries.0,
                    capacity: g.map_binaries.1,
                },
            ],
            containers: g.containers,
            policies: g.policies,
            ring_buffer_drops: g.ring_buffer_drops,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// Re-reads the policy directory: new and changed files are (re)loaded, policies of
    /// removed files are deleted. A bad file is logged and leaves its previous policies
    /// in force (a typo must not silently lift enforcement). The directory is listed
    /// before the lock is taken; the rest happens under it, once.
    pub fn sync_policy_dir(&self) {
        let seen = scan_policy_dir(&self.policy_dir);
        self.lock().sync_policy_files(seen);
    }
}

impl PodEvents for Agent {
    fn pod_applied(&self, pod: &PodInfo) {
        self.lock().apply_pod_labels(pod);
    }

    fn pod_deleted(&self, pod: &PodInfo) {
        self.lock().drop_pod(pod);
    }

    fn pods_relisted(&self, pods: &[PodInfo], gone: &[PodInfo]) {
        {
            let mut inner = self.lock();
            for pod in pods {
                inner.apply_pod_labels(pod);
            }
            for pod in gone {
                inner.drop_pod(pod);
            }
        }
        self.discover_unregistered(pods);
    }
}

impl NamespaceEvents for Agent {
    fn namespace_labels(&self, changed: &[(String, crate::kube::namespaces::Labels)]) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut any = false;
        for (name, labels) in changed {
            match inner
                .state
                .set_namespace_labels(name, labels.clone(), inner.maps.as_mut())
            {
                Ok(true) => {
                    any = true;
                    tracing::info!(namespace = %name, "namespace labels changed; its containers re-evaluated")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(namespace = %name, error = %e, "applying changed namespace labels failed")
                }
            }
        }
        if any {
            if let Err(e) = inner
                .store
                .save_namespace_labels(inner.state.all_namespace_labels())
            {
                tracing::warn!(error = %e, "saving namespace labels failed");
            }
        }
    }
}

/// The policy files in `dir` (`*.yaml`, `*.yml`, symlinks followed: ConfigMap mounts
/// swap a `..data` symlink) with their mtime and length.
fn scan_policy_dir(dir: &Path) -> HashMap<PathBuf, (SystemTime, u64)> {
    let mut seen = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return seen;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_yaml = path.extension().is_some_and(|x| x == "yaml" || x == "yml");
        if let (true, Ok(meta)) = (is_yaml, std::fs::metadata(&path)) {
            if meta.is_file() {
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                seen.insert(path, (mtime, meta.len()));
            }
        }
    }
    seen
}

impl Inner {
    /// Rebuilds the model as a starting agent does: what the maps hold, the saved
    /// containers and policies over it, containers whose cgroup went away dropped, then
    /// the maps made to match. File policies are re-read by the next directory scan.
    fn restore(&mut self, cgroup_root: &Path) -> Result<Restored, Error> {
        let snapshot = self.store.load()?;
        let (containers, binaries, levels) = self.maps.contents();
        let mut state = State::with_map_contents(containers, binaries, levels);
        let saved = (snapshot.containers.len(), snapshot.policies.len());
        state.restore(snapshot);
        self.state = state;
        self.files = HashMap::new();
        let gone = self.gone_containers(cgroup_root);
        for id in &gone {
            self.state.forget_removed_cgroup(*id, self.maps.as_mut())?;
            self.store.delete_container(*id)?;
        }
        self.state.full_sync(self.maps.as_mut())?;
        self.adopt_file_policies();
        Ok(Restored {
            containers: saved.0 - gone.len(),
            dropped: gone.len(),
            policies: saved.1,
        })
    }

    /// File policies in the state are adopted by the next directory scan, which re-reads
    /// their file (the zero mtime never matches) or deletes them if it is gone.
    fn adopt_file_policies(&mut self) {
        for p in self.state.policies() {
            if let PolicySource::File(file) = &p.source {
                self.files
                    .entry(file.clone())
                    .or_insert(PolicyFile {
                        mtime: SystemTime::UNIX_EPOCH,
                        len: u64::MAX,
                        keys: vec![],
                    })
                    .keys
                    .push(p.key());
            }
        }
    }

    fn gone_containers(&self, cgroup_root: &Path) -> Vec<u64> {
        self.state
            .containers()
            .filter(|c| !cgroup_alive(cgroup_root, c))
            .map(|c| c.cgroup_id)
            .collect()
    }

    fn register(&mut self, mut rec: ContainerRecord) -> Result<ContainerRecord, Error> {
        // A later report without the hook must not erase that the hook did run.
        if let Some(prev) = self.state.container(rec.cgroup_id) {
            rec.covered |= prev.covered && prev.identity.container_id == rec.identity.container_id;
        }
        self.store.save_container(&rec)?;
        if let Err(e) = self.state.upsert_container(rec.clone(), self.maps.as_mut()) {
            let _ = self.store.delete_container(rec.cgroup_id);
            return Err(e);
        }
        Ok(rec)
    }

    fn remove_container(&mut self, container_id: &str) -> Result<bool, Error> {
        let Some(id) = self.state.cgroup_of_container_id(container_id) else {
            return Ok(false);
        };
        self.state.remove_container(id, self.maps.as_mut())?;
        self.store.delete_container(id)?;
        Ok(true)
    }

    fn cgroup_removed(&mut self, cgroup_id: u64) {
        match self
            .state
            .forget_removed_cgroup(cgroup_id, self.maps.as_mut())
        {
            Ok(Some(c)) => {
                let _ = self.store.delete_container(cgroup_id);
                tracing::info!(container = %c.identity.container_id, cgroup_id, "cgroup removed; container forgotten");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(cgroup_id, error = %e, "dropping a removed cgroup failed"),
        }
    }

    /// The registered containers of `pod`.
    fn containers_of(&self, pod: &PodInfo) -> Vec<u64> {
        self.state
            .containers()
            .filter(|c| {
                let id = &c.identity;
                id.pod_namespace == pod.namespace
                    && id.pod_name == pod.name
                    && pod.is_pod_with_uid(&id.pod_uid)
            })
            .map(|c| c.cgroup_id)
            .collect()
    }

    /// A newer version of `pod`: each of its containers whose labels differ gets them, and
    /// with them exactly its own map entry recomputed.
    fn apply_pod_labels(&mut self, pod: &PodInfo) {
        for id in self.containers_of(pod) {
            let Some(c) = self.state.container(id) else {
                continue;
            };
            if c.identity.pod_labels == pod.labels {
                continue;
            }
            let labels: BTreeMap<String, String> = pod.labels.clone();
            let result = self
                .state
                .set_labels(id, labels, self.maps.as_mut())
                .and_then(|_| match self.state.container(id) {
                    Some(rec) => self.store.save_container(rec),
                    None => Ok(()),
                });
            match result {
                Ok(()) => {
                    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), cgroup_id = id, "pod labels changed; container re-evaluated")
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), cgroup_id = id, error = %e, "applying changed pod labels failed")
                }
            }
        }
    }

    /// `pod` was deleted: its containers are forgotten and their map entries dropped. A
    /// mirror pod's deletion says nothing about its static pod, which keeps running.
    fn drop_pod(&mut self, pod: &PodInfo) {
        if pod.mirror_of.is_some() {
            return;
        }
        for id in self.containers_of(pod) {
            let result = self
                .state
                .remove_container(id, self.maps.as_mut())
                .and_then(|_| self.store.delete_container(id));
            match result {
                Ok(()) => {
                    tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), cgroup_id = id, "pod deleted; container forgotten")
                }
                Err(e) => {
                    tracing::warn!(cgroup_id = id, error = %e, "forgetting a deleted pod's container failed")
                }
            }
        }
    }

    fn add_policy(&mut self, policy: Policy, source: PolicySource) -> Result<PolicyRecord, Error> {
        let key = policy.key(source.origin());
        self.state
            .upsert_policy(policy, source, self.maps.as_mut())?;
        self.store.save_policies(self.state.policies())?;
        let rec = self.state.policies().find(|p| p.key() == key).cloned();
        Ok(rec.expect("just added"))
    }

    fn delete_policy(&mut self, key: &PolicyKey) -> Result<(), Error> {
        self.state.delete_policy(key, self.maps.as_mut())?;
        self.store.save_policies(self.state.policies())?;
        Ok(())
    }

    fn sync_policy_files(&mut self, seen: HashMap<PathBuf, (SystemTime, u64)>) {
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        for path in removed {
            let keys = self.files.remove(&path).map(|f| f.keys).unwrap_or_default();
            for key in keys {
                match self.delete_policy(&key) {
                    Ok(()) => {
                        tracing::info!(policy = %key, file = %path.display(), "policy file removed; policy deleted")
                    }
                    Err(e) => {
                        tracing::warn!(policy = %key, error = %e, "deleting policy failed")
                    }
                }
            }
        }
        for (path, (mtime, len)) in seen {
            let old_keys = match self.files.get(&path) {
                Some(f) if f.mtime == mtime && f.len == len => continue,
                Some(f) => f.keys.clone(),
                None => Vec::new(),
            };
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(&path, e))
                .and_then(|t| Ok(parse_policies(&t)?));
            let policies = match parsed {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "policy file rejected; previous version stays in force");
                    // Remember this version so the same error is not logged every poll.
                    let keys = old_keys;
                    self.files.insert(path, PolicyFile { mtime, len, keys });
                    continue;
                }
            };
            let mut keys = Vec::new();
            for p in policies {
                let key = p.key(Origin::File);
                match self.add_policy(p, PolicySource::File(path.clone())) {
                    Ok(rec) => {
                        tracing::info!(policy = %key, slot = rec.slot, file = %path.display(), "policy loaded");
                        keys.push(key);
                    }
                    Err(e) => {
                        tracing::error!(policy = %key, file = %path.display(), error = %e, "policy not loaded")
                    }
                }
            }
            for key in old_keys.iter().filter(|k| !keys.contains(k)) {
                if let Err(e) = self.delete_policy(key) {
                    tracing::warn!(policy = %key, error = %e, "deleting policy failed");
                }
            }
            self.files.insert(path, PolicyFile { mtime, len, keys });
        }
    }
}

fn cgroup_alive(root: &Path, c: &ContainerRecord) -> bool {
    let dir = root.join(&c.cgroup_path);
    cgroup::cgroup_id(&dir).is_ok_and(|id| id == c.cgroup_id)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn to_api_container(state: &State, c: &ContainerRecord) -> v1::Container {
    let id = &c.identity;
    v1::Container {
        container_id: id.container_id.clone(),
        container_name: id.container_name.clone(),
        image: id.image.clone(),
        pod_name: id.pod_name.clone(),
        pod_uid: id.pod_uid.clone(),
        pod_namespace: id.pod_namespace.clone(),
        pod_labels: id.pod_labels.clone().into_iter().collect(),
        cgroup_id: c.cgroup_id,
        cgroup_path: c.cgroup_path.clone(),
        policies: state
            .selecting(id)
            .iter()
            .map(|p| p.key().to_string())
            .collect(),
        covered: c.covered,
        source: c.source.clone(),
    }
}

pub fn to_api_policy(p: &PolicyRecord) -> v1::Policy {
    v1::Policy {
        name: p.policy.metadata.name.clone(),
        kind: format!("{:?}", p.policy.kind),
        namespace: p.policy.metadata.namespace.clone().unwrap_or_default(),
        yaml: crate::policy::to_yaml(&p.policy),
        slot: p.slot as u32,
        source: p.source.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::tests::{policy, FakeMaps};
    use crate::state::MapContents;

    /// An agent over the state tests' map recorder (`mode`), its state and policy
    /// directories below `dir`, cgroups below `cgroup_root`.
    pub(crate) fn fake_agent(dir: &Path, cgroup_root: PathBuf, mode: Mode) -> Arc<Agent> {
        Arc::new(
            Agent::new(
                Box::new(FakeMaps::default()),
                mode,
                "test".into(),
                &dir.join("state"),
                cgroup_root,
                dir.join("policies"),
                false,
            )
            .unwrap(),
        )
    }

    /// The fake maps, shared so the test can look at them while the agent owns them.
    struct SharedMaps(Arc<Mutex<FakeMaps>>);

    impl SharedMaps {
        fn get(&self) -> MutexGuard<'_, FakeMaps> {
            unpoisoned(&self.0)
        }
    }

    /// The injected panic happens with the fake maps' lock held too.
    fn unpoisoned(fake: &Mutex<FakeMaps>) -> MutexGuard<'_, FakeMaps> {
        fake.lock().unwrap_or_else(|p| p.into_inner())
    }

    impl MapSink for SharedMaps {
        fn set_container(&mut self, id: u64, p: rthooks_common::PolicySet) -> Result<(), Error> {
            self.get().set_container(id, p)
        }
        fn remove_container(&mut self, id: u64) -> Result<(), Error> {
            self.get().remove_container(id)
        }
        fn set_binary(&mut self, h: u64, r: rthooks_common::BinaryRules) -> Result<(), Error> {
            self.get().set_binary(h, r)
        }
        fn remove_binary(&mut self, h: u64) -> Result<(), Error> {
            self.get().remove_binary(h)
        }
        fn set_cgroup_levels(&mut self, l: u64) -> Result<(), Error> {
            self.get().set_cgroup_levels(l)
        }
        fn contents(&self) -> MapContents {
            self.get().contents()
        }
        fn ring_buffer_drops(&self) -> u64 {
            0
        }
    }

    /// A real cgroup v2 directory below the root, removed on drop.
    pub(crate) struct TestCgroup {
        pub dir: PathBuf,
        cgroups_path: String,
    }

    impl TestCgroup {
        pub fn new(root: &Path, name: &str) -> TestCgroup {
            let leaf = format!("rthooks-unit-{}-{name}", std::process::id());
            let dir = root.join(&leaf);
            std::fs::create_dir(&dir).unwrap();
            TestCgroup {
                dir,
                cgroups_path: format!("/{leaf}"),
            }
        }

        pub fn request(&self, container_id: &str) -> CreateContainer {
            CreateContainer {
                cgroups_path: self.cgroups_path.clone(),
                container_id: container_id.into(),
                container_name: "app".into(),
                pod_name: format!("pod-{container_id}"),
                pod_namespace: "shop".into(),
                ..Default::default()
            }
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }

    /// A writable cgroup v2 root, or why the test cannot run here.
    pub(crate) fn cgroup_root() -> Option<PathBuf> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating cgroups needs root");
            return None;
        }
        match cgroup::detect_root() {
            Ok(root) => Some(root),
            Err(e) => {
                eprintln!("skipped: no cgroup v2 root: {e}");
                None
            }
        }
    }

    #[test]
    fn a_panic_while_the_state_is_locked_does_not_stop_later_registrations() {
        let Some(root) = cgroup_root() else { return };
        let (a, b) = (TestCgroup::new(&root, "a"), TestCgroup::new(&root, "b"));
        let dirs = tempfile::tempdir().unwrap();
        let fake = Arc::new(Mutex::new(FakeMaps::default()));
        let agent = Arc::new(
            Agent::new(
                Box::new(SharedMaps(fake.clone())),
                Mode::Sigkill,
                "test".into(),
                &dirs.path().join("state"),
                root.clone(),
                dirs.path().join("policies"),
                false,
            )
            .unwrap(),
        );
        let mut deny = policy("deny-curl", "web", "/usr/bin/curl", "Deny");
        // Every pod: the test's pods have no labels.
        deny.spec.pod_selector = None;
        let slot = agent.add_policy(deny, PolicySource::Api).unwrap().slot;

        unpoisoned(&fake).panic_on_container_write = true;
        let panicking = agent.clone();
        let req_a = a.request("a");
        let outcome = std::thread::spawn(move || panicking.register(&req_a, "hook", true)).join();
        assert!(outcome.is_err(), "the injected panic did not happen");
        assert!(
            agent.inner.is_poisoned(),
            "the panic did not happen with the state locked"
        );

        let rec_b = agent.register(&b.request("b"), "hook", true).unwrap();
        assert!(!agent.inner.is_poisoned());
        let b_id = cgroup::cgroup_id(&b.dir).unwrap();
        assert_eq!(rec_b.cgroup_id, b_id);

        // The model, the maps and the state directory agree again: every container the
        // agent lists has its map entry with the policy, and nothing else is in the map.
        let listed: Vec<u64> = agent
            .list_containers()
            .iter()
            .map(|c| c.cgroup_id)
            .collect();
        let maps = unpoisoned(&fake).containers.clone();
        let mut in_maps: Vec<u64> = maps.keys().copied().collect();
        let mut listed_sorted = listed.clone();
        in_maps.sort();
        listed_sorted.sort();
        assert_eq!(listed_sorted, in_maps);
        assert!(listed.contains(&b_id));
        for id in &listed {
            assert_eq!(maps[id].slots().collect::<Vec<_>>(), vec![slot]);
        }
        // ...and later changes go through as usual.
        assert!(agent.remove_container("b").unwrap());
        assert!(!unpoisoned(&fake).containers.contains_key(&b_id));
    }

    #[test]
    fn a_policy_directory_sync_loads_changes_and_removes_deleted_files() {
        let dirs = tempfile::tempdir().unwrap();
        let policy_dir = dirs.path().join("policies");
        std::fs::create_dir(&policy_dir).unwrap();
        let fake = Arc::new(Mutex::new(FakeMaps::default()));
        let agent = Agent::new(
            Box::new(SharedMaps(fake.clone())),
            Mode::Sigkill,
            "test".into(),
            &dirs.path().join("state"),
            dirs.path().to_path_buf(),
            policy_dir.clone(),
            false,
        )
        .unwrap();
        let names = |agent: &Agent| {
            let mut n: Vec<String> = agent.list_policies().into_iter().map(|p| p.name).collect();
            n.sort();
            n
        };
        let doc = |name: &str| {
            format!(
                "apiVersion: rthooks.io/v1alpha1\nkind: RuntimePolicy\nmetadata: {{name: {name}}}\n\
                 spec:\n  rules: [{{binaries: [/usr/bin/{name}], action: Deny}}]\n"
            )
        };
        let file = policy_dir.join("p.yaml");
        std::fs::write(&file, format!("{}---\n{}", doc("one"), doc("two"))).unwrap();
        agent.sync_policy_dir();
        assert_eq!(names(&agent), ["one", "two"]);
        assert_eq!(unpoisoned(&fake).binaries.len(), 2);

        // A bad version keeps the previous policies in force.
        std::fs::write(&file, "kind: [").unwrap();
        agent.sync_policy_dir();
        assert_eq!(names(&agent), ["one", "two"]);

        // A new version replaces them; a policy it no longer defines is deleted.
        std::fs::write(&file, doc("three")).unwrap();
        agent.sync_policy_dir();
        assert_eq!(names(&agent), ["three"]);
        assert_eq!(unpoisoned(&fake).binaries.len(), 1);

        std::fs::remove_file(&file).unwrap();
        agent.sync_policy_dir();
        assert!(names(&agent).is_empty());
        assert!(unpoisoned(&fake).binaries.is_empty());
    }
}
