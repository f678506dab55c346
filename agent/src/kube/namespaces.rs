//! Namespace labels in a reflector store, for policies' `namespaceSelector`: a namespace
//! whose labels change re-evaluates its pods' containers.
use std::collections::BTreeMap;
use std::sync::Arc;

use ::kube::api::DynamicObject;
use ::kube::core::ApiResource;
use ::kube::runtime::reflector::{ObjectRef, Store};

use super::{spawn_watch, ApiState, Change, Watched};

pub type Labels = BTreeMap<String, String>;

/// What the namespace source tells the agent.
pub trait NamespaceEvents: Send + Sync + 'static {
    /// The labels of every namespace whose labels may have changed (one on a watch
    /// event, all of them after a (re)list; a deleted namespace has none).
    fn namespace_labels(&self, changed: &[(String, Labels)]);
}

/// The cluster's namespaces.
pub struct NamespaceSource {
    resource: ApiResource,
    watched: Watched,
}

fn labels_of(obj: &DynamicObject) -> Option<(String, Labels)> {
    let labels = obj.metadata.labels.clone().unwrap_or_default();
    Some((obj.metadata.name.clone()?, labels.into_iter().collect()))
}

impl NamespaceSource {
    pub fn spawn(
        client: ::kube::Client,
        resource: ApiResource,
        events: Arc<dyn NamespaceEvents>,
    ) -> NamespaceSource {
        let react = move |change: Change<'_>, store: &Store<DynamicObject>| match change {
            Change::Applied(o) => {
                events.namespace_labels(&labels_of(o).into_iter().collect::<Vec<_>>())
            }
            Change::Deleted(o) => {
                if let Some((name, _)) = labels_of(o) {
                    events.namespace_labels(&[(name, Labels::new())]);
                }
            }
            Change::Relisted { before } => {
                let mut all: Vec<(String, Labels)> =
                    store.state().iter().filter_map(|o| labels_of(o)).collect();
                for (name, _) in before.iter().filter_map(|o| labels_of(o)) {
                    if !all.iter().any(|(n, _)| *n == name) {
                        all.push((name, Labels::new()));
                    }
                }
                events.namespace_labels(&all);
            }
        };
        let watched = spawn_watch(client, resource.clone(), None, "namespaces", react);
        NamespaceSource { resource, watched }
    }

    pub fn state(&self) -> ApiState {
        self.watched.state.borrow().clone()
    }

    /// The labels of namespace `name`, if the store has it.
    pub fn labels(&self, name: &str) -> Option<Labels> {
        let key = ObjectRef::new_with(name, self.resource.clone());
        let obj = self.watched.store.get(&key)?;
        labels_of(&obj).map(|(_, l)| l)
    }
}
