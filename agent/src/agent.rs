//! The running agent: the model (`state`), the BPF maps and the persistence behind one
//! lock, and the operations the gRPC services, the policy directory watcher, the event
//! reader and the reconciler perform on them.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use rthooks_api::tetragon::CreateContainer;
use rthooks_api::v1;
use tokio::sync::broadcast;

use crate::bpf::{MapWriter, Mode};
use crate::cgroup;
use crate::error::Error;
use crate::identity::{ContainerIdentity, RequestFields};
use crate::metrics::{Gauges, Metrics};
use crate::policy::{parse_policies, Policy, PolicyKey};
use crate::state::{ContainerRecord, PolicyRecord, PolicySource, State, Store};

pub struct Inner {
    pub state: State,
    pub maps: MapWriter,
    store: Store,
    /// Policy files as last read: path → (mtime, len, keys it defined).
    files: HashMap<PathBuf, (SystemTime, u64, Vec<PolicyKey>)>,
}

pub struct Agent {
    pub inner: Mutex<Inner>,
    pub cgroup_root: PathBuf,
    pub trust_label_annotation: bool,
    pub mode: Mode,
    pub mode_reason: String,
    pub kernel_release: String,
    pub events: broadcast::Sender<v1::Event>,
    pub metrics: Metrics,
    pub policy_dir: PathBuf,
}

impl Agent {
    /// Builds the agent around loaded programs, restoring the saved state and making the
    /// maps match it exactly.
    pub fn new(
        maps: MapWriter,
        mode: Mode,
        mode_reason: String,
        state_dir: &Path,
        cgroup_root: PathBuf,
        policy_dir: PathBuf,
        trust_label_annotation: bool,
    ) -> Result<Agent, Error> {
        let store = Store::open(state_dir)?;
        let snapshot = store.load()?;
        let (containers, binaries, levels) = maps.map_contents();
        let mut state = State::with_map_contents(containers, binaries, levels);
        let restored = (snapshot.containers.len(), snapshot.policies.len());
        state.restore(snapshot);
        let mut inner = Inner {
            state,
            maps,
            store,
            files: HashMap::new(),
        };
        // Containers whose cgroup went away while the agent was down.
        let gone: Vec<u64> = inner
            .state
            .containers()
            .filter(|c| !cgroup_alive(&cgroup_root, c))
            .map(|c| c.cgroup_id)
            .collect();
        for id in &gone {
            inner.state.forget_removed_cgroup(*id, &mut inner.maps)?;
            inner.store.delete_container(*id)?;
        }
        inner.state.full_sync(&mut inner.maps)?;
        tracing::info!(
            containers = restored.0 - gone.len(),
            dropped = gone.len(),
            policies = restored.1,
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
        })
    }

    /// RuntimeHook CreateContainer (and NRI Synchronize reports): resolve, identify,
    /// register, persist. On error nothing changes.
    pub fn register(
        &self,
        req: &CreateContainer,
        source: &str,
        covered: bool,
    ) -> Result<ContainerRecord, Error> {
        let cg = cgroup::resolve(&self.cgroup_root, &req.cgroups_path)?;
        let mut identity = ContainerIdentity::from_request(
            &RequestFields {
                container_id: &req.container_id,
                container_name: &req.container_name,
                image: &req.container_image,
                pod_name: &req.pod_name,
                pod_uid: &req.pod_uid,
                pod_namespace: &req.pod_namespace,
                annotations: &req.annotations,
            },
            self.trust_label_annotation,
        )?;
        if identity.container_id.is_empty() {
            // Tetragon's hook always sends it; other callers may not: the cgroup leaf
            // name is the next best stable id.
            identity.container_id = cg
                .relative
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
        }
        let rec = ContainerRecord {
            identity,
            cgroup_id: cg.id,
            cgroup_path: cg.relative,
            level: cg.level,
            covered,
            source: source.to_string(),
        };
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        // A later report without the hook must not erase that the hook did run.
        let mut rec = rec;
        if let Some(prev) = inner.state.container(rec.cgroup_id) {
            rec.covered |= prev.covered && prev.identity.container_id == rec.identity.container_id;
        }
        inner.store.save_container(&rec)?;
        if let Err(e) = inner.state.upsert_container(rec.clone(), &mut inner.maps) {
            let _ = inner.store.delete_container(rec.cgroup_id);
            return Err(e);
        }
        Ok(rec)
    }

    pub fn remove_container(&self, container_id: &str) -> Result<bool, Error> {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        let Some(id) = inner.state.cgroup_of_container_id(container_id) else {
            return Ok(false);
        };
        inner.state.remove_container(id, &mut inner.maps)?;
        inner.store.delete_container(id)?;
        Ok(true)
    }

    /// The kernel removed a registered cgroup (its map entry is already gone).
    pub fn cgroup_removed(&self, cgroup_id: u64) {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        match inner
            .state
            .forget_removed_cgroup(cgroup_id, &mut inner.maps)
        {
            Ok(Some(c)) => {
                let _ = inner.store.delete_container(cgroup_id);
                tracing::info!(container = %c.identity.container_id, cgroup_id, "cgroup removed; container forgotten");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(cgroup_id, error = %e, "dropping a removed cgroup failed"),
        }
    }

    /// Drops containers whose cgroup no longer exists (periodic; the BPF rmdir program
    /// normally does it first, this catches anything missed, e.g. while the agent was down).
    pub fn reconcile(&self) -> usize {
        let gone: Vec<u64> = {
            let inner = self.inner.lock().unwrap();
            inner
                .state
                .containers()
                .filter(|c| !cgroup_alive(&self.cgroup_root, c))
                .map(|c| c.cgroup_id)
                .collect()
        };
        for id in &gone {
            self.cgroup_removed(*id);
        }
        gone.len()
    }

    pub fn add_policy(&self, policy: Policy, source: PolicySource) -> Result<PolicyRecord, Error> {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        let key = policy.key();
        inner.state.upsert_policy(policy, source, &mut inner.maps)?;
        inner.store.save_policies(inner.state.policies())?;
        let rec = inner
            .state
            .policies()
            .find(|p| p.policy.key() == key)
            .cloned();
        Ok(rec.expect("just added"))
    }

    pub fn delete_policy(&self, key: &PolicyKey, from_api: bool) -> Result<(), Error> {
        let mut guard = self.inner.lock().unwrap();
        let inner = &mut *guard;
        if from_api {
            if let Some(p) = inner.state.policies().find(|p| &p.policy.key() == key) {
                if matches!(p.source, PolicySource::File(_)) {
                    return Err(Error::PolicyFromFile(key.to_string()));
                }
            }
        }
        inner.state.delete_policy(key, &mut inner.maps)?;
        inner.store.save_policies(inner.state.policies())?;
        Ok(())
    }

    /// Dry run: the known containers `policy` would select.
    pub fn check_policy(&self, policy: &Policy) -> Vec<v1::Container> {
        let inner = self.inner.lock().unwrap();
        inner
            .state
            .containers()
            .filter(|c| policy.selects(&c.identity))
            .map(|c| to_api_container(&inner.state, c))
            .collect()
    }

    pub fn list_containers(&self) -> Vec<v1::Container> {
        let inner = self.inner.lock().unwrap();
        inner
            .state
            .containers()
            .map(|c| to_api_container(&inner.state, c))
            .collect()
    }

    pub fn list_policies(&self) -> Vec<v1::Policy> {
        let inner = self.inner.lock().unwrap();
        inner.state.policies().map(to_api_policy).collect()
    }

    pub fn gauges(&self) -> Gauges {
        let inner = self.inner.lock().unwrap();
        let (c, b) = inner.state.map_fill();
        let (cc, bc) = MapWriter::capacities();
        Gauges {
            containers: inner.state.containers().count() as u64,
            containers_not_covered: inner.state.containers().filter(|c| !c.covered).count() as u64,
            policies: inner.state.policies().count() as u64,
            map_containers: (c as u64, cc as u64),
            map_binaries: (b as u64, bc as u64),
            ring_buffer_drops: inner.maps.ring_buffer_drops(),
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
    /// in force (a typo must not silently lift enforcement).
    pub fn sync_policy_dir(&self) {
        let mut seen: HashMap<PathBuf, (SystemTime, u64)> = HashMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.policy_dir) {
            for e in entries.flatten() {
                let path = e.path();
                let is_yaml = path.extension().is_some_and(|x| x == "yaml" || x == "yml");
                // Follows symlinks (ConfigMap mounts swap a ..data symlink).
                if let (true, Ok(meta)) = (is_yaml, std::fs::metadata(&path)) {
                    if meta.is_file() {
                        seen.insert(
                            path,
                            (
                                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                                meta.len(),
                            ),
                        );
                    }
                }
            }
        }
        let known: Vec<PathBuf> = self.inner.lock().unwrap().files.keys().cloned().collect();
        for path in known {
            if !seen.contains_key(&path) {
                let keys = self
                    .inner
                    .lock()
                    .unwrap()
                    .files
                    .remove(&path)
                    .map(|f| f.2)
                    .unwrap_or_default();
                for key in keys {
                    match self.delete_policy(&key, false) {
                        Ok(()) => {
                            tracing::info!(policy = %key, file = %path.display(), "policy file removed; policy deleted")
                        }
                        Err(e) => {
                            tracing::warn!(policy = %key, error = %e, "deleting policy failed")
                        }
                    }
                }
            }
        }
        for (path, (mtime, len)) in seen {
            let unchanged = self
                .inner
                .lock()
                .unwrap()
                .files
                .get(&path)
                .is_some_and(|f| f.0 == mtime && f.1 == len);
            if unchanged {
                continue;
            }
            let old_keys = self.file_keys(&path);
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| Error::io(&path, e))
                .and_then(|t| parse_policies(&t));
            let policies = match parsed {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "policy file rejected; previous version stays in force");
                    // Remember this version so the same error is not logged every poll.
                    self.inner
                        .lock()
                        .unwrap()
                        .files
                        .insert(path.clone(), (mtime, len, old_keys));
                    continue;
                }
            };
            let mut keys = Vec::new();
            for p in policies {
                let key = p.key();
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
                if let Err(e) = self.delete_policy(key, false) {
                    tracing::warn!(policy = %key, error = %e, "deleting policy failed");
                }
            }
            self.inner
                .lock()
                .unwrap()
                .files
                .insert(path, (mtime, len, keys));
        }
    }

    /// Policies last loaded from `path`.
    fn file_keys(&self, path: &Path) -> Vec<PolicyKey> {
        let inner = self.inner.lock().unwrap();
        inner
            .files
            .get(path)
            .map(|f| f.2.clone())
            .unwrap_or_default()
    }

    /// File policies restored from the state directory are adopted by the first directory
    /// scan; ones whose file is gone are deleted.
    pub fn adopt_restored_file_policies(&self) {
        let restored: Vec<(PolicyKey, PathBuf)> = {
            let inner = self.inner.lock().unwrap();
            inner
                .state
                .policies()
                .filter_map(|p| match &p.source {
                    PolicySource::File(f) => Some((p.policy.key(), f.clone())),
                    PolicySource::Api => None,
                })
                .collect()
        };
        let mut inner = self.inner.lock().unwrap();
        for (key, file) in restored {
            // Zero mtime: the next scan re-reads the file and reconciles its policies.
            inner
                .files
                .entry(file)
                .or_insert((SystemTime::UNIX_EPOCH, u64::MAX, vec![]))
                .2
                .push(key);
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
            .map(|p| p.policy.key().to_string())
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
        yaml: serde_yaml::to_string(&p.policy).unwrap_or_default(),
        slot: p.slot as u32,
        source: p.source.to_string(),
    }
}
