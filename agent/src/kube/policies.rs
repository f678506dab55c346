//! Policies from the Kubernetes API: `RuntimePolicy` and `NamespacedRuntimePolicy`
//! (`rthooks-policy`'s resources), watched beside the policy directory and the agent's
//! API, as policies of origin `kubernetes`. Each node's agent writes its own entry of the
//! resource's `status.nodes` (loaded or not, the error, how many of its containers the
//! policy selects) with server-side apply under its own field manager. A change that leaves
//! `metadata.generation` as it was (status written by some node) is not applied again, so
//! N agents do not wake each other.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

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

/// Watches both kinds until the client's server goes away for good; `node` names this
/// agent's status entries.
pub fn spawn(client: Client, node: &str, agent: Arc<Agent>) {
    tokio::spawn(watch::<RuntimePolicy>(
        client.clone(),
        node.to_string(),
        agent.clone(),
    ));
    tokio::spawn(watch::<NamespacedRuntimePolicy>(
        client,
        node.to_string(),
        agent,
    ));
}

/// One kind's watch: applies, replaces and deletes its policies in `agent`; after a
/// (re)list, deletes those the list no longer has.
pub async fn watch<K: PolicyResource>(client: Client, node: String, agent: Arc<Agent>) {
    let kind = K::kind(&()).to_string();
    let stream =
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    // The generation each policy was last applied at.
    let mut applied: BTreeMap<PolicyKey, i64> = BTreeMap::new();
    let mut listed: BTreeSet<PolicyKey> = BTreeSet::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(obj)) => {
                listed.insert(key(&obj));
                apply(&client, &node, &agent, &mut applied, &obj).await;
            }
            Ok(watcher::Event::Apply(obj)) => {
                apply(&client, &node, &agent, &mut applied, &obj).await
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
    applied: &mut BTreeMap<PolicyKey, i64>,
    obj: &K,
) {
    let policy = obj.to_policy();
    let key = policy.key(Origin::Kubernetes);
    let generation = obj.meta().generation.unwrap_or_default();
    if applied.get(&key) == Some(&generation) {
        return;
    }
    applied.insert(key.clone(), generation);
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
    let entry = NodePolicyStatus {
        node: node.to_string(),
        loaded: error.is_none(),
        error,
        containers: agent.check_policy(&policy).len() as u64,
        observed_generation: generation,
    };
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": {"nodes": [entry]},
    });
    let api = obj.api_for(client.clone());
    let params = PatchParams::apply(&status_field_manager(node));
    if let Err(e) = api
        .patch_status(&obj.name_any(), &params, &Patch::Apply(&patch))
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
    use crate::bpf::Mode;
    use crate::state::tests::FakeMaps;
    use rthooks_policy::{NamespacedPolicySpec, PolicySpec};
    use rthooks_testkit::apiserver::{unavailable, TestApiServer};

    fn agent(dir: &std::path::Path) -> Arc<Agent> {
        Arc::new(
            Agent::new(
                Box::new(FakeMaps::default()),
                Mode::Sigkill,
                "test".into(),
                &dir.join("state"),
                dir.to_path_buf(),
                dir.join("policies"),
                false,
            )
            .unwrap(),
        )
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
        let audit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp/apiserver-audit/kube_policies.log");
        // The log of this run only: the test counts the agents' requests in it.
        let _ = std::fs::remove_file(&audit);
        let server = TestApiServer::start(&audit).await.unwrap();
        server
            .install_crds(&rthooks_policy::resources::crds())
            .await
            .unwrap();
        let client = server.client().await.unwrap();
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
        let status_writes = |node: &str| {
            std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.contains("\"stage\":\"ResponseComplete\"")
                        && l.contains("\"verb\":\"patch\"")
                        && l.contains("/runtimepolicies/deny-nc/status")
                        && l.contains(&format!("rthooks-agent%2F{node}"))
                })
                .count()
        };
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
}
