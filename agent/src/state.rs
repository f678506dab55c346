//! The agent's model: known containers, loaded policies (each in a slot 0..128), and a
//! mirror of what the BPF maps hold, so that every change writes exactly the map entries
//! whose value changes — nothing more, and nothing is left behind.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rthooks_common::{path_hash, BinaryRules, PolicySet, MAX_POLICIES};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::identity::ContainerIdentity;
use crate::policy::{Origin, Policy, PolicyKey, RuleAction};

/// What the maps hold: container entries, binary entries, the cgroup levels word.
pub type MapContents = (HashMap<u64, PolicySet>, HashMap<u64, BinaryRules>, u64);

/// Where map writes go: the pinned BPF maps in the agent, a recorder in tests.
pub trait MapSink {
    fn set_container(&mut self, cgroup_id: u64, policies: PolicySet) -> Result<(), Error>;
    fn remove_container(&mut self, cgroup_id: u64) -> Result<(), Error>;
    fn set_binary(&mut self, hash: u64, rules: BinaryRules) -> Result<(), Error>;
    fn remove_binary(&mut self, hash: u64) -> Result<(), Error>;
    fn set_cgroup_levels(&mut self, levels: u64) -> Result<(), Error>;
    /// Read back (after a restart, the previous agent's entries).
    fn contents(&self) -> MapContents;
    /// Events the kernel could not queue because the ring buffer was full.
    fn ring_buffer_drops(&self) -> u64;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub identity: ContainerIdentity,
    pub cgroup_id: u64,
    /// Relative to the cgroup v2 root.
    pub cgroup_path: String,
    pub level: u32,
    /// True when our hook registered it before it started.
    pub covered: bool,
    /// "hook", "nri-sync", ...
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicySource {
    File(PathBuf),
    Api,
    /// A custom resource (`RuntimePolicy`, `NamespacedRuntimePolicy`).
    Kubernetes,
}

impl PolicySource {
    pub fn origin(&self) -> Origin {
        match self {
            PolicySource::File(_) => Origin::File,
            PolicySource::Api => Origin::Api,
            PolicySource::Kubernetes => Origin::Kubernetes,
        }
    }
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::File(p) => write!(f, "file:{}", p.display()),
            PolicySource::Api => f.write_str("api"),
            PolicySource::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub policy: Policy,
    pub slot: usize,
    pub source: PolicySource,
}

impl PolicyRecord {
    pub fn key(&self) -> PolicyKey {
        self.policy.key(self.source.origin())
    }
}

/// What is persisted so that a restarted agent rebuilds exactly the same maps.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub containers: Vec<ContainerRecord>,
    pub policies: Vec<PolicyRecord>,
    /// Namespace labels from the Kubernetes API: a restarted agent keeps the entries that
    /// `namespaceSelector`s gave until the API is listed again.
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, Labels>,
}

pub type Labels = BTreeMap<String, String>;

/// The labels of a namespace the agent knows nothing of.
static NO_LABELS: Labels = BTreeMap::new();

#[derive(Default)]
pub struct State {
    containers: BTreeMap<u64, ContainerRecord>,
    policies: BTreeMap<PolicyKey, PolicyRecord>,
    slots: Vec<Option<PolicyKey>>,
    namespace_labels: BTreeMap<String, Labels>,
    /// Mirror of the maps' contents.
    map_containers: HashMap<u64, PolicySet>,
    map_binaries: HashMap<u64, BinaryRules>,
    map_levels: u64,
    /// Path of every binary any policy names (for events and removal).
    binary_paths: HashMap<u64, String>,
}

impl State {
    pub fn new() -> State {
        State {
            slots: vec![None; MAX_POLICIES],
            ..Default::default()
        }
    }

    /// Starts from what the pinned maps already hold (after an agent restart), so that
    /// the first sync removes stale entries and rewrites only what differs.
    pub fn with_map_contents(
        containers: HashMap<u64, PolicySet>,
        binaries: HashMap<u64, BinaryRules>,
        levels: u64,
    ) -> State {
        State {
            map_containers: containers,
            map_binaries: binaries,
            map_levels: levels,
            ..State::new()
        }
    }

    pub fn containers(&self) -> impl Iterator<Item = &ContainerRecord> {
        self.containers.values()
    }

    pub fn container(&self, cgroup_id: u64) -> Option<&ContainerRecord> {
        self.containers.get(&cgroup_id)
    }

    pub fn policies(&self) -> impl Iterator<Item = &PolicyRecord> {
        self.policies.values()
    }

    pub fn policy_in_slot(&self, slot: usize) -> Option<&PolicyRecord> {
        self.slots
            .get(slot)?
            .as_ref()
            .and_then(|k| self.policies.get(k))
    }

    pub fn binary_path(&self, hash: u64) -> Option<&str> {
        self.binary_paths.get(&hash).map(String::as_str)
    }

    pub fn map_fill(&self) -> (usize, usize) {
        (self.map_containers.len(), self.map_binaries.len())
    }

    /// Policies (by key) that select `identity`.
    pub fn selecting(&self, identity: &ContainerIdentity) -> Vec<&PolicyRecord> {
        self.policies
            .values()
            .filter(|p| {
                p.policy
                    .selects_in(identity, self.namespace_labels(&identity.pod_namespace))
            })
            .collect()
    }

    fn policy_set_for(&self, identity: &ContainerIdentity) -> PolicySet {
        let mut set = PolicySet::EMPTY;
        for p in self.selecting(identity) {
            set.insert(p.slot);
        }
        set
    }

    /// Adds or replaces a container (keyed by cgroup id; a container id seen before under
    /// another cgroup is moved).
    pub fn upsert_container(
        &mut self,
        rec: ContainerRecord,
        sink: &mut dyn MapSink,
    ) -> Result<(), Error> {
        if rec.level == 0 {
            return Err(Error::Cgroup {
                path: "/".into(),
                reason: "refusing to register the root cgroup as a container".into(),
            });
        }
        let moved: Vec<u64> = self
            .containers
            .values()
            .filter(|c| {
                c.identity.container_id == rec.identity.container_id && c.cgroup_id != rec.cgroup_id
            })
            .map(|c| c.cgroup_id)
            .collect();
        let id = rec.cgroup_id;
        let previous = self.containers.insert(id, rec);
        if let Err(e) = self.sync_container(id, sink) {
            // Leave the model as it was: the caller's request failed.
            match previous {
                Some(p) => self.containers.insert(id, p),
                None => self.containers.remove(&id),
            };
            self.sync_container(id, sink).ok();
            return Err(e);
        }
        for old in moved {
            self.remove_container(old, sink)?;
        }
        Ok(())
    }

    pub fn remove_container(
        &mut self,
        cgroup_id: u64,
        sink: &mut dyn MapSink,
    ) -> Result<Option<ContainerRecord>, Error> {
        let rec = self.containers.remove(&cgroup_id);
        self.sync_container(cgroup_id, sink)?;
        Ok(rec)
    }

    /// Forgets a container whose cgroup the kernel already removed (its map entry went
    /// with it, deleted by the BPF program).
    pub fn forget_removed_cgroup(
        &mut self,
        cgroup_id: u64,
        sink: &mut dyn MapSink,
    ) -> Result<Option<ContainerRecord>, Error> {
        self.map_containers.remove(&cgroup_id);
        self.remove_container(cgroup_id, sink)
    }

    pub fn cgroup_of_container_id(&self, container_id: &str) -> Option<u64> {
        self.containers
            .values()
            .find(|c| c.identity.container_id == container_id)
            .map(|c| c.cgroup_id)
    }

    /// Replaces a container's labels (a newer pod version from the API).
    pub fn set_labels(
        &mut self,
        cgroup_id: u64,
        labels: BTreeMap<String, String>,
        sink: &mut dyn MapSink,
    ) -> Result<bool, Error> {
        let Some(c) = self.containers.get_mut(&cgroup_id) else {
            return Ok(false);
        };
        c.identity.pod_labels = labels;
        self.sync_container(cgroup_id, sink)?;
        Ok(true)
    }

    /// The labels of namespace `name` as the API last gave them (none when unknown).
    pub fn namespace_labels(&self, name: &str) -> &Labels {
        self.namespace_labels.get(name).unwrap_or(&NO_LABELS)
    }

    /// Every namespace's labels (for saving).
    pub fn all_namespace_labels(&self) -> &BTreeMap<String, Labels> {
        &self.namespace_labels
    }

    /// A namespace's labels changed (empty: deleted or unlabelled): the entries of exactly
    /// its containers are recomputed. Returns whether anything changed.
    pub fn set_namespace_labels(
        &mut self,
        name: &str,
        labels: Labels,
        sink: &mut dyn MapSink,
    ) -> Result<bool, Error> {
        if self.namespace_labels(name) == &labels {
            return Ok(false);
        }
        if labels.is_empty() {
            self.namespace_labels.remove(name);
        } else {
            self.namespace_labels.insert(name.to_string(), labels);
        }
        let ids: Vec<u64> = self
            .containers
            .values()
            .filter(|c| c.identity.pod_namespace == name)
            .map(|c| c.cgroup_id)
            .collect();
        for id in ids {
            self.sync_container_entry(id, sink)?;
        }
        self.sync_levels(sink)?;
        Ok(true)
    }

    /// Adds or replaces a policy; returns its slot.
    pub fn upsert_policy(
        &mut self,
        policy: Policy,
        source: PolicySource,
        sink: &mut dyn MapSink,
    ) -> Result<usize, Error> {
        policy.validate()?;
        // Each origin names its own policies: a file's policy and an API policy of the
        // same name are two policies.
        let key = policy.key(source.origin());
        let (slot, old_binaries) = match self.policies.get(&key) {
            Some(existing) => (
                existing.slot,
                existing.policy.binary_actions().into_keys().collect(),
            ),
            None => (
                self.slots
                    .iter()
                    .position(Option::is_none)
                    .ok_or(Error::NoPolicySlot(MAX_POLICIES))?,
                BTreeSet::new(),
            ),
        };
        self.place_policy(
            PolicyRecord {
                policy,
                slot,
                source,
            },
            old_binaries,
            sink,
        )?;
        Ok(slot)
    }

    fn place_policy(
        &mut self,
        rec: PolicyRecord,
        old_binaries: BTreeSet<String>,
        sink: &mut dyn MapSink,
    ) -> Result<(), Error> {
        let key = rec.key();
        let mut binaries = old_binaries;
        binaries.extend(rec.policy.binary_actions().into_keys());
        self.slots[rec.slot] = Some(key.clone());
        self.policies.insert(key, rec);
        self.sync_binaries(&binaries, sink)?;
        self.sync_all_containers(sink)
    }

    pub fn delete_policy(
        &mut self,
        key: &PolicyKey,
        sink: &mut dyn MapSink,
    ) -> Result<PolicyRecord, Error> {
        let rec = self
            .policies
            .remove(key)
            .ok_or_else(|| Error::PolicyNotFound(key.to_string()))?;
        self.slots[rec.slot] = None;
        // Containers first, so that no container carries a slot whose rules are gone
        // while a new policy could take the slot.
        self.sync_all_containers(sink)?;
        let binaries = rec.policy.binary_actions().into_keys().collect();
        self.sync_binaries(&binaries, sink)?;
        Ok(rec)
    }

    fn sync_all_containers(&mut self, sink: &mut dyn MapSink) -> Result<(), Error> {
        let ids: Vec<u64> = self
            .containers
            .keys()
            .chain(self.map_containers.keys())
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for id in ids {
            self.sync_container_entry(id, sink)?;
        }
        self.sync_levels(sink)
    }

    fn sync_container(&mut self, cgroup_id: u64, sink: &mut dyn MapSink) -> Result<(), Error> {
        self.sync_container_entry(cgroup_id, sink)?;
        self.sync_levels(sink)
    }

    fn sync_container_entry(
        &mut self,
        cgroup_id: u64,
        sink: &mut dyn MapSink,
    ) -> Result<(), Error> {
        let desired = self
            .containers
            .get(&cgroup_id)
            .map(|c| self.policy_set_for(&c.identity))
            .unwrap_or_default();
        let current = self.map_containers.get(&cgroup_id).copied();
        match (current, desired.is_empty()) {
            (Some(_), true) => {
                sink.remove_container(cgroup_id)?;
                self.map_containers.remove(&cgroup_id);
            }
            (Some(cur), false) if cur == desired => {}
            (_, false) => {
                sink.set_container(cgroup_id, desired)?;
                self.map_containers.insert(cgroup_id, desired);
            }
            (None, true) => {}
        }
        Ok(())
    }

    fn sync_levels(&mut self, sink: &mut dyn MapSink) -> Result<(), Error> {
        let levels = self
            .map_containers
            .keys()
            .filter_map(|id| self.containers.get(id))
            .fold(0u64, |acc, c| acc | (1u64 << c.level));
        if levels != self.map_levels {
            sink.set_cgroup_levels(levels)?;
            self.map_levels = levels;
        }
        Ok(())
    }

    fn sync_binaries(
        &mut self,
        paths: &BTreeSet<String>,
        sink: &mut dyn MapSink,
    ) -> Result<(), Error> {
        for path in paths {
            let hash = path_hash(path.as_bytes());
            let mut rules = BinaryRules::default();
            for rec in self.policies.values() {
                match rec.policy.binary_actions().get(path) {
                    Some(RuleAction::Deny) => rules.deny.insert(rec.slot),
                    Some(RuleAction::Kill) => rules.kill.insert(rec.slot),
                    Some(RuleAction::Audit) => rules.audit.insert(rec.slot),
                    None => {}
                }
            }
            let empty = rules == BinaryRules::default();
            match (self.map_binaries.get(&hash), empty) {
                (Some(_), true) => {
                    sink.remove_binary(hash)?;
                    self.map_binaries.remove(&hash);
                    self.binary_paths.remove(&hash);
                }
                (Some(cur), false) if *cur == rules => {}
                (_, false) => {
                    sink.set_binary(hash, rules)?;
                    self.map_binaries.insert(hash, rules);
                    self.binary_paths.insert(hash, path.clone());
                }
                (None, true) => {}
            }
        }
        Ok(())
    }

    /// Removes map entries no longer wanted (binaries of policies that disappeared while
    /// the agent was down) and writes everything else that differs.
    pub fn full_sync(&mut self, sink: &mut dyn MapSink) -> Result<(), Error> {
        let wanted: BTreeSet<String> = self
            .policies
            .values()
            .flat_map(|p| p.policy.binary_actions().into_keys())
            .collect();
        let wanted_hashes: BTreeSet<u64> = wanted.iter().map(|p| path_hash(p.as_bytes())).collect();
        for hash in self.map_binaries.keys().copied().collect::<Vec<_>>() {
            if !wanted_hashes.contains(&hash) {
                sink.remove_binary(hash)?;
                self.map_binaries.remove(&hash);
            }
        }
        // Entries read back from the maps have no path yet: forget the mirror for wanted
        // hashes so they are rewritten with their path known.
        for p in &wanted {
            self.binary_paths.insert(path_hash(p.as_bytes()), p.clone());
        }
        self.sync_binaries(&wanted, sink)?;
        self.sync_all_containers(sink)?;
        // Force the levels word to be written once (it may be stale in the map).
        sink.set_cgroup_levels(self.map_levels)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            containers: self.containers.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            namespace_labels: self.namespace_labels.clone(),
        }
    }

    /// Restores a snapshot's containers and policies (slots kept) without touching the
    /// maps; call [`State::full_sync`] afterwards.
    pub fn restore(&mut self, snapshot: Snapshot) {
        self.namespace_labels = snapshot.namespace_labels;
        for c in snapshot.containers {
            self.containers.insert(c.cgroup_id, c);
        }
        for p in snapshot.policies {
            if p.slot < MAX_POLICIES && self.slots[p.slot].is_none() {
                let key = p.key();
                self.slots[p.slot] = Some(key.clone());
                self.policies.insert(key, p);
            }
        }
    }

    /// Which policies, by slot, of a set (for events): `origin:ns/name`, because two
    /// origins may hold policies of the same name.
    pub fn policy_names(&self, set: &PolicySet) -> Vec<String> {
        set.slots()
            .filter_map(|s| self.policy_in_slot(s))
            .map(|p| format!("{}:{}", p.key().origin.as_str(), p.key()))
            .collect()
    }
}

/// Persistence: one small file per container (written before the hook is answered, so
/// its cost does not grow with the number of containers) and one file for the policies.
/// Every write goes through a temp file and a rename, so a crash never leaves half a file.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, Error> {
        let containers = dir.join("containers");
        std::fs::create_dir_all(&containers).map_err(|e| Error::io(&containers, e))?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    fn container_path(&self, cgroup_id: u64) -> PathBuf {
        self.dir
            .join("containers")
            .join(format!("{cgroup_id}.json"))
    }

    pub fn save_container(&self, rec: &ContainerRecord) -> Result<(), Error> {
        let data = serde_json::to_vec(rec).expect("container record serialises");
        Self::write_atomic(&self.container_path(rec.cgroup_id), &data)
    }

    pub fn delete_container(&self, cgroup_id: u64) -> Result<(), Error> {
        let path = self.container_path(cgroup_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&path, e)),
            _ => Ok(()),
        }
    }

    pub fn save_policies<'a>(
        &self,
        policies: impl Iterator<Item = &'a PolicyRecord>,
    ) -> Result<(), Error> {
        let list: Vec<&PolicyRecord> = policies.collect();
        let data = serde_json::to_vec_pretty(&list).expect("policies serialise");
        Self::write_atomic(&self.dir.join("policies.json"), &data)
    }

    pub fn save_namespace_labels(&self, labels: &BTreeMap<String, Labels>) -> Result<(), Error> {
        let data = serde_json::to_vec_pretty(labels).expect("labels serialise");
        Self::write_atomic(&self.dir.join("namespaces.json"), &data)
    }

    /// Everything saved; unreadable entries are skipped with a warning (they are rebuilt
    /// from the next hook call or reconciliation), never fatal.
    pub fn load(&self) -> Result<Snapshot, Error> {
        let mut snap = Snapshot::default();
        let policies = self.dir.join("policies.json");
        match std::fs::read(&policies) {
            Ok(data) => match serde_json::from_slice(&data) {
                Ok(p) => snap.policies = p,
                Err(e) => {
                    tracing::warn!(path = %policies.display(), error = %e, "ignoring unreadable policy state")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&policies, e)),
        }
        let namespaces = self.dir.join("namespaces.json");
        match std::fs::read(&namespaces) {
            Ok(data) => match serde_json::from_slice(&data) {
                Ok(n) => snap.namespace_labels = n,
                Err(e) => {
                    tracing::warn!(path = %namespaces.display(), error = %e, "ignoring unreadable namespace labels")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&namespaces, e)),
        }
        let dir = self.dir.join("containers");
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|d| serde_json::from_slice(&d).ok())
            {
                Some(rec) => snap.containers.push(rec),
                None => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable container state")
                }
            }
        }
        Ok(snap)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::policy::parse_policies;

    /// Records map contents like the kernel would hold them, and counts writes.
    #[derive(Default)]
    pub struct FakeMaps {
        pub containers: HashMap<u64, PolicySet>,
        pub binaries: HashMap<u64, BinaryRules>,
        pub levels: u64,
        pub writes: usize,
        pub fail_container_writes: bool,
        /// Stands for a bug in the middle of a state change.
        pub panic_on_container_write: bool,
    }

    impl MapSink for FakeMaps {
        fn set_container(&mut self, id: u64, p: PolicySet) -> Result<(), Error> {
            if self.panic_on_container_write {
                self.panic_on_container_write = false;
                panic!("injected panic while writing container {id}");
            }
            if self.fail_container_writes {
                // What the kernel answers when a hash map is full.
                return Err(Error::Map {
                    map: "containers",
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_elem",
                        io_error: nix::errno::Errno::E2BIG.into(),
                    }),
                });
            }
            self.writes += 1;
            self.containers.insert(id, p);
            Ok(())
        }
        fn remove_container(&mut self, id: u64) -> Result<(), Error> {
            self.writes += 1;
            self.containers.remove(&id);
            Ok(())
        }
        fn set_binary(&mut self, h: u64, r: BinaryRules) -> Result<(), Error> {
            self.writes += 1;
            self.binaries.insert(h, r);
            Ok(())
        }
        fn remove_binary(&mut self, h: u64) -> Result<(), Error> {
            self.writes += 1;
            self.binaries.remove(&h);
            Ok(())
        }
        fn set_cgroup_levels(&mut self, l: u64) -> Result<(), Error> {
            self.writes += 1;
            self.levels = l;
            Ok(())
        }
        fn contents(&self) -> MapContents {
            (self.containers.clone(), self.binaries.clone(), self.levels)
        }
        fn ring_buffer_drops(&self) -> u64 {
            0
        }
    }

    pub fn policy(name: &str, app: &str, binary: &str, action: &str) -> Policy {
        parse_policies(&format!(
            "apiVersion: rthooks.io/v1alpha1\nkind: RuntimePolicy\nmetadata: {{name: {name}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  rules: [{{binaries: [{binary}], action: {action}}}]\n"
        ))
        .unwrap()
        .remove(0)
    }

    /// Adds an API policy (`policy(..)`) and returns its slot.
    fn add(
        s: &mut State,
        m: &mut FakeMaps,
        name: &str,
        app: &str,
        binary: &str,
        action: &str,
    ) -> usize {
        s.upsert_policy(policy(name, app, binary, action), PolicySource::Api, m)
            .unwrap()
    }

    fn container(cgroup: u64, id: &str, app: &str) -> ContainerRecord {
        ContainerRecord {
            identity: ContainerIdentity {
                container_id: id.into(),
                pod_namespace: "default".into(),
                pod_labels: [("app".to_string(), app.to_string())].into(),
                ..Default::default()
            },
            cgroup_id: cgroup,
            cgroup_path: format!("kubepods/{id}"),
            level: 2,
            covered: true,
            source: "hook".into(),
        }
    }

    #[test]
    fn a_namespace_label_change_rewrites_exactly_its_containers_entries() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        let mut other = container(11, "b", "web");
        other.identity.pod_namespace = "other".into();
        s.upsert_container(container(10, "a", "web"), &mut m)
            .unwrap();
        s.upsert_container(other, &mut m).unwrap();
        let mut p = policy("deny-curl", "web", "/usr/bin/curl", "Deny");
        p.spec.namespace_selector = Some(crate::policy::LabelSelector {
            match_labels: [("team".to_string(), "pay".to_string())].into(),
            ..Default::default()
        });
        let slot = s.upsert_policy(p, PolicySource::Api, &mut m).unwrap();
        assert!(m.containers.is_empty(), "no namespace labels yet");
        let team = |t: &str| Labels::from([("team".to_string(), t.to_string())]);
        assert!(s
            .set_namespace_labels("default", team("pay"), &mut m)
            .unwrap());
        assert_eq!(m.containers.keys().collect::<Vec<_>>(), [&10]);
        assert!(m.containers[&10].contains(slot));
        let before = m.writes;
        assert!(!s
            .set_namespace_labels("default", team("pay"), &mut m)
            .unwrap());
        assert_eq!(m.writes, before, "unchanged labels write nothing");
        assert!(s
            .set_namespace_labels("default", team("x"), &mut m)
            .unwrap());
        assert!(m.containers.is_empty());
        // Kept in the snapshot, so a restarted agent keeps the entries until it relists.
        s.set_namespace_labels("default", team("pay"), &mut m)
            .unwrap();
        assert_eq!(s.snapshot().namespace_labels["default"], team("pay"));
    }

    #[test]
    fn container_and_policy_changes_write_only_affected_entries() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        s.upsert_container(container(10, "a", "web"), &mut m)
            .unwrap();
        s.upsert_container(container(11, "b", "db"), &mut m)
            .unwrap();
        assert!(m.containers.is_empty(), "no policy, no entries");
        let slot = s
            .upsert_policy(
                policy("deny-curl", "web", "/usr/bin/curl", "Deny"),
                PolicySource::Api,
                &mut m,
            )
            .unwrap();
        assert_eq!(m.containers.len(), 1);
        assert!(m.containers[&10].contains(slot));
        assert_eq!(m.levels, 1 << 2);
        let h = path_hash(b"/usr/bin/curl");
        assert!(m.binaries[&h].deny.contains(slot));

        // A third container that does not match: no write at all.
        let before = m.writes;
        s.upsert_container(container(12, "c", "db"), &mut m)
            .unwrap();
        assert_eq!(m.writes, before);

        // Label change stops the match: exactly the one entry (+ levels) changes.
        s.set_labels(
            10,
            [("app".to_string(), "other".to_string())].into(),
            &mut m,
        )
        .unwrap();
        assert!(m.containers.is_empty());
        assert_eq!(m.levels, 0);
        s.set_labels(10, [("app".to_string(), "web".to_string())].into(), &mut m)
            .unwrap();
        assert_eq!(m.containers.len(), 1);

        // Deleting the policy removes every entry it created.
        s.delete_policy(
            &PolicyKey {
                origin: Origin::Api,
                namespace: None,
                name: "deny-curl".into(),
            },
            &mut m,
        )
        .unwrap();
        assert!(m.containers.is_empty() && m.binaries.is_empty());
    }

    #[test]
    fn strongest_action_and_all_audits_are_kept_across_policies() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        let a = s
            .upsert_policy(
                policy("a", "web", "/bin/x", "Audit"),
                PolicySource::Api,
                &mut m,
            )
            .unwrap();
        let b = s
            .upsert_policy(
                policy("b", "web", "/bin/x", "Deny"),
                PolicySource::Api,
                &mut m,
            )
            .unwrap();
        let r = m.binaries[&path_hash(b"/bin/x")];
        assert!(r.audit.contains(a) && r.deny.contains(b) && !r.deny.contains(a));
    }

    #[test]
    fn removal_returns_maps_to_their_size_before() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        add(&mut s, &mut m, "p", "web", "/bin/x", "Kill");
        let (c0, b0) = (m.containers.len(), m.binaries.len());
        for i in 0..1000u64 {
            s.upsert_container(container(100 + i, &format!("c{i}"), "web"), &mut m)
                .unwrap();
        }
        assert_eq!(m.containers.len(), 1000);
        for i in 0..1000u64 {
            s.remove_container(100 + i, &mut m).unwrap();
        }
        assert_eq!((m.containers.len(), m.binaries.len()), (c0, b0));
        assert_eq!(s.containers().count(), 0);
    }

    #[test]
    fn failed_map_write_leaves_state_unchanged() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        add(&mut s, &mut m, "p", "web", "/bin/x", "Deny");
        m.fail_container_writes = true;
        assert!(s
            .upsert_container(container(5, "a", "web"), &mut m)
            .is_err());
        assert_eq!(s.containers().count(), 0);
        assert!(m.containers.is_empty());
    }

    #[test]
    fn slots_are_limited_and_reused() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        for i in 0..MAX_POLICIES {
            s.upsert_policy(
                policy(&format!("p{i}"), "web", "/bin/x", "Audit"),
                PolicySource::Api,
                &mut m,
            )
            .unwrap();
        }
        let e = s.upsert_policy(
            policy("one-more", "web", "/bin/x", "Audit"),
            PolicySource::Api,
            &mut m,
        );
        assert!(matches!(e, Err(Error::NoPolicySlot(_))));
        s.delete_policy(
            &PolicyKey {
                origin: Origin::Api,
                namespace: None,
                name: "p7".into(),
            },
            &mut m,
        )
        .unwrap();
        assert_eq!(add(&mut s, &mut m, "one-more", "web", "/bin/x", "Audit"), 7);
    }

    #[test]
    fn each_source_holds_its_own_policy_of_a_name() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        let sources = [
            PolicySource::File("/p.yaml".into()),
            PolicySource::Api,
            PolicySource::Kubernetes,
        ];
        for (binary, source) in ["/bin/x", "/bin/y", "/bin/z"].iter().zip(&sources) {
            s.upsert_policy(policy("p", "web", binary, "Deny"), source.clone(), &mut m)
                .unwrap();
        }
        assert_eq!(s.policies().count(), 3);
        assert_eq!(m.binaries.len(), 3);
        // Deleting one source's policy leaves the others' in force.
        let key = |origin| PolicyKey {
            origin,
            namespace: None,
            name: "p".into(),
        };
        s.delete_policy(&key(Origin::Api), &mut m).unwrap();
        assert_eq!(m.binaries.len(), 2);
        let left: Vec<PolicyKey> = s.policies().map(PolicyRecord::key).collect();
        assert_eq!(left, [key(Origin::File), key(Origin::Kubernetes)]);
    }

    #[test]
    fn store_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        let mut s = State::new();
        let mut m = FakeMaps::default();
        add(&mut s, &mut m, "p", "web", "/bin/x", "Deny");
        store.save_policies(s.policies()).unwrap();
        store.save_container(&container(10, "a", "web")).unwrap();
        store.save_container(&container(11, "b", "web")).unwrap();
        store.delete_container(11).unwrap();
        std::fs::write(tmp.path().join("containers/12.json"), b"{garbage").unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.containers, [container(10, "a", "web")]);
        assert_eq!(snap.policies.len(), 1);
        assert_eq!(snap.policies[0].slot, 0);
    }

    #[test]
    fn restart_rebuilds_exactly_and_drops_stale_entries() {
        let mut s = State::new();
        let mut m = FakeMaps::default();
        add(&mut s, &mut m, "p", "web", "/bin/x", "Deny");
        s.upsert_container(container(10, "a", "web"), &mut m)
            .unwrap();
        let snap = s.snapshot();
        // A stale entry from some earlier life of the maps.
        m.containers.insert(999, PolicySet::EMPTY);
        m.binaries.insert(42, BinaryRules::default());
        let (containers, binaries) = (m.containers.clone(), m.binaries.clone());
        let mut s2 = State::with_map_contents(containers, binaries, m.levels);
        s2.restore(snap);
        s2.full_sync(&mut m).unwrap();
        assert_eq!(m.containers.keys().copied().collect::<Vec<_>>(), [10]);
        assert_eq!(m.binaries.len(), 1);
        assert_eq!(s2.policy_names(&m.containers[&10]), ["api:p"]);
    }
}
