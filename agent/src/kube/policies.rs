//! Policies from the Kubernetes API: `RuntimePolicy` and `NamespacedRuntimePolicy`
//! (`rthooks-policy`'s resources), watched beside the policy directory and the agent's
//! API, as policies of origin `kubernetes`. Each node's agent writes its own entry of the
//! resource's `status.nodes` (loaded or not, the error, how many of its containers the
//! policy selects) with server-side apply under its own field manager. A change that leaves
//! `metadata.generation` as it was (status written by some node) is not applied again, so
//! N agents do not wake each other.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::{Client, Resource, ResourceExt};
use rthooks_policy::resources::{status_field_manager, NodePolicyStatus};
use rthooks_policy::{NamespacedRuntimePolicy, Origin, Policy, PolicyKey, RuntimePolicy};
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;

use crate::agent::Agent;
use crate::state::PolicySource;

/// A policy kind the agent watches.
pub trait PolicyResource:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    fn to_policy(&self) -> Policy;
    /// The API that reaches this object (its namespace, for a namespaced kind).
    fn api_for(&self, client: Client) -> Api<Self>;
}

impl PolicyResource for RuntimePolicy {
    fn to_policy(&self) -> Policy {
        RuntimePolicy::to_policy(self)
    }
    fn api_for(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
}

impl PolicyResource for NamespacedRuntimePolicy {
    fn to_policy(&self) -> Policy {
        NamespacedRuntimePolicy::to_policy(self)
    }
    fn api_for(&self, client: Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
}

/// How often each applied policy's container count is recomputed; its status entry is
/// written again only when the count changed, so a node writes each policy's status at
/// most once per this interval however fast its containers come and go.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// Watches both kinds until the client's server goes away for good; `node` names this
/// agent's status entries.
pub fn spawn(client: Client, node: &str, agent: Arc<Agent>) {
    spawn_with_refresh(client, node, agent, STATUS_REFRESH)
}

/// [`spawn`], recounting containers every `refresh` (tests take less than [`STATUS_REFRESH`]).
pub fn spawn_with_refresh(client: Client, node: &str, agent: Arc<Agent>, refresh: Duration) {
    tokio::spawn(watch::<RuntimePolicy>(
        client.clone(),
        node.to_string(),
        agent.clone(),
        refresh,
    ));
    tokio::spawn(watch::<NamespacedRuntimePolicy>(
        client,
        node.to_string(),
        agent,
        refresh,
    ));
}

/// A policy as last applied, and what this node last wrote into its status.
struct Applied<K> {
    generation: i64,
    object: K,
    policy: Policy,
    error: Option<String>,
    containers: u64,
}

/// One kind's watch: applies, replaces and deletes its policies in `agent`; after a
/// (re)list, deletes those the list no longer has; every `refresh`, rewrites the status
/// of the policies whose container count changed.
pub async fn watch<K: PolicyResource>(
    client: Client,
    node: String,
    agent: Arc<Agent>,
    refresh: Duration,
) {
    let kind = K::kind(&()).to_string();
    let stream =
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    let mut applied: BTreeMap<PolicyKey, Applied<K>> = BTreeMap::new();
    let mut listed: BTreeSet<PolicyKey> = BTreeSet::new();
    let mut recount = tokio::time::interval(refresh);
    recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = stream.next() => match event {
                Some(event) => event,
                None => return,
            },
            _ = recount.tick() => {
                refresh_counts(&client, &node, &agent, &mut applied).await;
                continue;
            }
        };
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(obj)) => {
                listed.insert(key(&obj));
                apply(&client, &node, &agent, &mut applied, obj).await;
            }
            Ok(watcher::Event::Apply(obj)) => {
                apply(&client, &node, &agent, &mut applied, obj).await
            }
            Ok(watcher::Event::Delete(obj)) => {
                let key = key(&obj);
                applied.remove(&key);
                delete(&agent, &key);
            }
            Ok(watcher::Event::InitDone) => {
                let gone: Vec<PolicyKey> = applied
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    applied.remove(&key);
                    delete(&agent, &key);
                }
                tracing::info!(kind, policies = listed.len(), "policies listed");
            }
            Err(e) => tracing::warn!(kind, error = %e, "watching policies failed; retrying"),
        }
    }
}

fn key<K: PolicyResource>(obj: &K) -> PolicyKey {
    obj.to_policy().key(Origin::Kubernetes)
}

async fn apply<K: PolicyResource>(
    client: &Client,
    node: &str,
    agent: &Agent,
    applied: &mut BTreeMap<PolicyKey, Applied<K>>,
    obj: K,
) {
    let policy = obj.to_policy();
    let key = policy.key(Origin::Kubernetes);
    let generation = obj.meta().generation.unwrap_or_default();
    if applied.get(&key).map(|a| a.generation) == Some(generation) {
        return;
    }
    let error = match agent.add_policy(policy.clone(), PolicySource::Kubernetes) {
        Ok(rec) => {
            tracing::info!(policy = %key, slot = rec.slot, generation, "policy loaded from Kubernetes");
            None
        }
        Err(e) => {
            tracing::error!(policy = %key, generation, error = %e, "policy from Kubernetes not loaded");
            Some(e.to_string())
        }
    };
    let containers = agent.check_policy(&policy).len() as u64;
    let entry = Applied {
        generation,
        object: obj,
        policy,
        error,
        containers,
    };
    write_status(client, node, &key, &entry).await;
    applied.insert(key, entry);
}

/// Recounts each policy's containers and writes the status of those whose count changed.
async fn refresh_counts<K: PolicyResource>(
    client: &Client,
    node: &str,
    agent: &Agent,
    applied: &mut BTreeMap<PolicyKey, Applied<K>>,
) {
    for (key, entry) in applied.iter_mut() {
        let containers = agent.check_policy(&entry.policy).len() as u64;
        if containers != entry.containers {
            entry.containers = containers;
            write_status(client, node, key, entry).await;
        }
    }
}

/// This node's entry of the policy's `status.nodes`, by server-side apply.
async fn write_status<K: PolicyResource>(
    client: &Client,
    node: &str,
    key: &PolicyKey,
    entry: &Applied<K>,
) {
    let status = NodePolicyStatus {
        node: node.to_string(),
        loaded: entry.error.is_none(),
        error: entry.error.clone(),
        containers: entry.containers,
        observed_generation: entry.generation,
    };
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": {"nodes": [status]},
    });
    let api = entry.object.api_for(client.clone());
    let params = PatchParams::apply(&status_field_manager(node));
    if let Err(e) = api
        .patch_status(&entry.object.name_any(), &params, &Patch::Apply(&patch))
        .await
    {
        tracing::warn!(policy = %key, error = %e, "writing this node's policy status failed");
    }
}

fn delete(agent: &Agent, key: &PolicyKey) {
    match agent.delete_policy(key) {
        Ok(()) => tracing::info!(policy = %key, "policy deleted in Kubernetes"),
        Err(e) => tracing::warn!(policy = %key, error = %e, "deleting policy failed"),
    }
}

#[cfg(test)]
mod tests {
    //! Against the real test API server (CRDs from the policy types), with agents whose
    //! maps are the state tests' recorder: what a policy resource does to the model and the
    //! maps, the per-node status two agents write, and that a status-only change makes no
    //! agent apply again (counted in the server's audit log).
    use std::time::{Duration, Instant};

    use super::*;
    use crate::agent::tests::{cgroup_root, fake_agent, TestCgroup};
    use crate::bpf::Mode;
    use rthooks_policy::{NamespacedPolicySpec, PolicySpec};
    use rthooks_testkit::apiserver::{unavailable, TestApiServer};

    fn agent(dir: &std::path::Path) -> Arc<Agent> {
        fake_agent(dir, dir.to_path_buf(), Mode::Sigkill)
    }

    async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            // Polling a condition with a deadline: the agent offers no notification.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A test API server serving the policy CRDs, its audit log (this run's, named after
    /// `test`, under target/) and a client.
    async fn server_with_crds(test: &str) -> (TestApiServer, std::path::PathBuf, Client) {
        let audit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../target/tmp/apiserver-audit/{test}.log"));
        let server = TestApiServer::start(&audit).await.unwrap();
        server
            .install_crds(&rthooks_policy::resources::crds())
            .await
            .unwrap();
        let client = server.client().await.unwrap();
        (server, audit, client)
    }

    /// The status writes on RuntimePolicy `name` in the audit log (by `node`'s field
    /// manager, when given).
    fn status_writes(audit: &std::path::Path, name: &str, node: Option<&str>) -> usize {
        let manager = node.map(|n| {
            format!(
                "fieldManager={}",
                status_field_manager(n).replace('/', "%2F")
            )
        });
        rthooks_testkit::apiserver::read_audit_log(audit)
            .unwrap()
            .iter()
            .filter(|r| {
                r.verb == "patch"
                    && r.resource == "runtimepolicies"
                    && r.subresource == "status"
                    && r.request_uri
                        .contains(&format!("/runtimepolicies/{name}/status"))
                    && manager
                        .as_ref()
                        .is_none_or(|m| r.request_uri.contains(m.as_str()))
            })
            .count()
    }

    fn kube_policies(agent: &Agent) -> Vec<(String, String)> {
        agent
            .list_policies()
            .into_iter()
            .filter(|p| p.source == "kubernetes")
            .map(|p| (p.namespace, p.name))
            .collect()
    }

    #[tokio::test]
    async fn policy_resources_reach_the_maps_and_each_node_writes_its_own_status() {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        // Each start of the server begins its log afresh: the test counts this run's requests.
        let (_server, audit, client) = server_with_crds("kube_policies").await;
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let agents = [agent(dirs[0].path()), agent(dirs[1].path())];
        for (agent, node) in agents.iter().zip(["node-a", "node-b"]) {
            spawn(client.clone(), node, agent.clone());
        }

        let spec: PolicySpec =
            rthooks_policy::yaml::from_str("rules: [{binaries: [/usr/bin/nc], action: Deny}]\n")
                .unwrap();
        let cluster: Api<RuntimePolicy> = Api::all(client.clone());
        let namespaced: Api<NamespacedRuntimePolicy> = Api::namespaced(client.clone(), "prod");
        let pp = Default::default();
        cluster
            .create(&pp, &RuntimePolicy::new("deny-nc", spec.clone()))
            .await
            .unwrap();
        // The same name in another kind (and a file or API policy of that name) is another policy.
        namespaced
            .create(
                &pp,
                &NamespacedRuntimePolicy::new("deny-nc", NamespacedPolicySpec(spec.clone())),
            )
            .await
            .unwrap();
        agents[0]
            .add_policy(
                rthooks_policy::parse_policies(
                    "apiVersion: rthooks.io/v1alpha1\nkind: RuntimePolicy\nmetadata: {name: deny-nc}\nspec:\n  rules: [{binaries: [/usr/bin/curl], action: Deny}]\n",
                )
                .unwrap()
                .remove(0),
                PolicySource::Api,
            )
            .unwrap();
        for agent in &agents {
            until("both policies in each agent", async || {
                let mut got = kube_policies(agent);
                got.sort();
                (got == [
                    ("".into(), "deny-nc".into()),
                    ("prod".into(), "deny-nc".into()),
                ])
                .then_some(())
            })
            .await;
        }
        // Both agents hold the binary; the first also its API policy's.
        assert_eq!(agents[0].gauges().map_binaries.0, 2);
        assert_eq!(agents[1].gauges().map_binaries.0, 1);

        // Each node's entry, written under its own field manager, next to the other's.
        let nodes = until("both nodes' status entries", async || {
            let status = cluster.get("deny-nc").await.ok()?.status?;
            let mut nodes: Vec<(String, bool, i64)> = status
                .nodes
                .iter()
                .map(|n| (n.node.clone(), n.loaded, n.observed_generation))
                .collect();
            nodes.sort();
            (nodes.len() == 2).then_some(nodes)
        })
        .await;
        assert_eq!(
            nodes,
            [("node-a".into(), true, 1), ("node-b".into(), true, 1)]
        );

        // A status-only change (another manager's entry) leaves the generation as it was:
        // no agent applies the policy again. Then a spec change (generation 2): each agent
        // applies it and writes its entry once more. The audit log holds every status
        // write: exactly one per node per generation.
        let other = serde_json::json!({"apiVersion": "rthooks.io/v1alpha1", "kind": "RuntimePolicy",
            "status": {"nodes": [{"node": "node-c", "loaded": false, "containers": 0, "observedGeneration": 1}]}});
        cluster
            .patch_status(
                "deny-nc",
                &PatchParams::apply("someone-else"),
                &Patch::Apply(&other),
            )
            .await
            .unwrap();
        let change = serde_json::json!({"spec": {"rules": [{"binaries": ["/usr/bin/nc", "/usr/bin/ncat"], "action": "Deny"}]}});
        cluster
            .patch("deny-nc", &PatchParams::default(), &Patch::Merge(&change))
            .await
            .unwrap();
        until("both nodes at generation 2", async || {
            let status = cluster.get("deny-nc").await.ok()?.status?;
            let at_2 = status
                .nodes
                .iter()
                .filter(|n| n.node != "node-c" && n.observed_generation == 2)
                .count();
            (at_2 == 2).then_some(())
        })
        .await;
        let status_writes = |node: &str| status_writes(&audit, "deny-nc", Some(node));
        until("the status writes in the audit log", async || {
            (status_writes("node-a") >= 2 && status_writes("node-b") >= 2).then_some(())
        })
        .await;
        assert_eq!((status_writes("node-a"), status_writes("node-b")), (2, 2));
        assert_eq!(agents[1].gauges().map_binaries.0, 2, "generation 2 applied");

        // Deleted in the API: gone from both agents and their maps; the API policy stays.
        cluster
            .delete("deny-nc", &Default::default())
            .await
            .unwrap();
        namespaced
            .delete("deny-nc", &Default::default())
            .await
            .unwrap();
        for agent in &agents {
            until("the policies deleted", async || {
                kube_policies(agent).is_empty().then_some(())
            })
            .await;
        }
        assert_eq!(agents[0].gauges().map_binaries.0, 1);
        assert_eq!(agents[1].gauges().map_binaries.0, 0);
        assert_eq!(agents[0].list_policies().len(), 1);
    }

    #[tokio::test]
    async fn a_nodes_status_counts_the_containers_as_they_come_and_go() {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let Some(root) = cgroup_root() else {
            return;
        };
        let (_server, audit, client) = server_with_crds("kube_policies_count").await;
        let dir = tempfile::tempdir().unwrap();
        let agent = fake_agent(dir.path(), root.clone(), Mode::Sigkill);
        let refresh = Duration::from_millis(200);
        spawn_with_refresh(client.clone(), "node-a", agent.clone(), refresh);
        // No pod selector: every container.
        let spec: PolicySpec =
            rthooks_policy::yaml::from_str("rules: [{binaries: [/usr/bin/nc], action: Deny}]\n")
                .unwrap();
        let cluster: Api<RuntimePolicy> = Api::all(client.clone());
        cluster
            .create(&Default::default(), &RuntimePolicy::new("count-me", spec))
            .await
            .unwrap();
        let count = async |n: u64| {
            until(
                &format!("node-a's status saying {n} containers"),
                async || {
                    let status = cluster.get("count-me").await.ok()?.status?;
                    status
                        .nodes
                        .iter()
                        .any(|s| s.node == "node-a" && s.containers == n)
                        .then_some(())
                },
            )
            .await
        };
        count(0).await;
        let cgroup = TestCgroup::new(&root, "count");
        agent
            .register(&cgroup.request("count"), "hook", true)
            .unwrap();
        count(1).await;
        assert!(agent.remove_container("count").unwrap());
        count(0).await;
        // Unchanged counts are not written again, however many refreshes passed: one
        // write at the load, one per change.
        let writes = || status_writes(&audit, "count-me", None);
        until("the status writes in the audit log", async || {
            (writes() >= 3).then_some(())
        })
        .await;
        assert_eq!(writes(), 3);
    }
}
