//! The agent's API on a started [`Agent`], blocking (tests are synchronous).

use std::time::Duration;

use rthooks_api::tetragon::fine_guidance_sensors_client::FineGuidanceSensorsClient;
use rthooks_api::tetragon::{runtime_hook_request, CreateContainer, RuntimeHookRequest};
use rthooks_api::v1;
use rthooks_api::v1::agent_client::AgentClient;

use crate::Agent;

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime")
}

impl Agent {
    /// The client runtime, made on first use: an agent whose API is never called (the
    /// e2e suite's, started from async code) has none, and so none to drop there, which
    /// tokio refuses.
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.get_or_init(runtime)
    }

    /// The agent's events, parsed (lines that are not JSON are skipped).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.event_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Runs a future on this agent's client runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt().block_on(f)
    }

    /// A gRPC channel to the agent; panics when it does not answer in 5 s.
    pub fn channel(&self) -> tonic::transport::Channel {
        self.rt()
            .block_on(rthooks_api::client::connect_unix(
                &self.address(),
                Duration::from_secs(5),
            ))
            .expect("connecting to the agent")
    }

    fn api(&self) -> AgentClient<tonic::transport::Channel> {
        AgentClient::new(self.channel())
    }

    /// `Status`, or None when the agent does not answer.
    pub fn try_status(&self) -> Option<v1::StatusResponse> {
        self.rt().block_on(async {
            let ch = rthooks_api::client::connect_unix(&self.address(), Duration::from_secs(1))
                .await
                .ok()?;
            let r = AgentClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .ok()?;
            Some(r.into_inner())
        })
    }

    /// `Status`.
    pub fn status(&self) -> v1::StatusResponse {
        self.try_status().expect("Status")
    }

    /// "lsm" or "sigkill".
    pub fn mode(&self) -> String {
        self.status().enforcement_mode
    }

    /// Entries of the BPF map `name`, as `Status` reports them.
    pub fn map_entries(&self, name: &str) -> u64 {
        self.status()
            .maps
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no map {name} in Status"))
            .entries
    }

    /// `ListContainers`.
    pub fn containers(&self) -> Vec<v1::Container> {
        let mut api = self.api();
        self.rt()
            .block_on(api.list_containers(v1::ListContainersRequest {}))
            .expect("ListContainers")
            .into_inner()
            .containers
    }

    /// `ListPolicies`.
    pub fn policies(&self) -> Vec<v1::Policy> {
        let mut api = self.api();
        self.rt()
            .block_on(api.list_policies(v1::ListPoliciesRequest {}))
            .expect("ListPolicies")
            .into_inner()
            .policies
    }

    /// `AddPolicy`.
    pub fn add_policy(&self, yaml: &str) -> Result<v1::Policy, tonic::Status> {
        let mut api = self.api();
        self.rt()
            .block_on(api.add_policy(v1::AddPolicyRequest { yaml: yaml.into() }))
            .map(|r| r.into_inner().policy.expect("AddPolicy returns the policy"))
    }

    /// `DeletePolicy` of a cluster-wide policy.
    pub fn delete_policy(&self, name: &str) -> Result<(), tonic::Status> {
        let mut api = self.api();
        self.rt()
            .block_on(api.delete_policy(v1::DeletePolicyRequest {
                name: name.into(),
                namespace: String::new(),
            }))
            .map(|_| ())
    }

    /// `CheckPolicy`: the containers a policy would select.
    pub fn check_policy(&self, yaml: &str) -> Vec<v1::Container> {
        let mut api = self.api();
        self.rt()
            .block_on(api.check_policy(v1::CheckPolicyRequest { yaml: yaml.into() }))
            .expect("CheckPolicy")
            .into_inner()
            .selected
    }

    /// What the OCI hook sends, through the same gRPC method.
    pub fn runtime_hook(&self, req: CreateContainer) -> Result<(), tonic::Status> {
        let mut client = FineGuidanceSensorsClient::new(self.channel());
        self.rt()
            .block_on(client.runtime_hook(RuntimeHookRequest {
                event: Some(runtime_hook_request::Event::CreateContainer(req)),
            }))
            .map(|_| ())
    }
}
