//! gRPC services on the agent's UNIX socket: Tetragon's `FineGuidanceSensors/RuntimeHook`
//! (what the OCI hook calls) and our `rthooks.v1.Agent`.
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use rthooks_api::tetragon::fine_guidance_sensors_server::{
    FineGuidanceSensors, FineGuidanceSensorsServer,
};
use rthooks_api::tetragon::{runtime_hook_request, RuntimeHookRequest, RuntimeHookResponse};
use rthooks_api::v1;
use rthooks_api::v1::agent_server::{Agent as AgentApi, AgentServer};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::error::Error;
use crate::policy::{parse_policies, Origin, PolicyKey};
use crate::state::PolicySource;

pub struct Service(pub Arc<Agent>);

/// Runs blocking work (map and state-file writes, ~0.1–0.5 ms) for a request the runtime
/// is waiting on. On the multi-threaded runtime it runs in place: `spawn_blocking` hands
/// it to another thread and back, two wake-ups that made the hook's p99 several times its
/// p50 on a loaded host. Other runtimes (tests) cannot block in place.
async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        Ok(tokio::task::block_in_place(f))
    } else {
        tokio::task::spawn_blocking(f).await
    }
}

#[tonic::async_trait]
impl FineGuidanceSensors for Service {
    async fn runtime_hook(
        &self,
        request: Request<RuntimeHookRequest>,
    ) -> Result<Response<RuntimeHookResponse>, Status> {
        let start = Instant::now();
        let Some(runtime_hook_request::Event::CreateContainer(req)) = request.into_inner().event
        else {
            self.0.metrics().hook_request("invalid", start.elapsed());
            return Err(Status::invalid_argument(
                "RuntimeHookRequest without an event",
            ));
        };
        let agent = self.0.clone();
        let result = match agent.identify(&req) {
            Ok(mut found) => match agent.labels_from_api(&mut found).await {
                Ok(()) => run_blocking(move || agent.register_identified(found, "hook", true))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(rec) => {
                self.0.metrics().hook_request("ok", start.elapsed());
                tracing::info!(
                    container = %rec.identity.container_id,
                    name = %rec.identity.container_name,
                    pod = %format!("{}/{}", rec.identity.pod_namespace, rec.identity.pod_name),
                    cgroup_id = rec.cgroup_id,
                    cgroup = %rec.cgroup_path,
                    micros = start.elapsed().as_micros() as u64,
                    "container registered"
                );
                Ok(Response::new(RuntimeHookResponse {}))
            }
            Err(e) => {
                let result = match e {
                    Error::Cgroup { .. } => "cgroup_error",
                    Error::InvalidRequest(_) => "invalid",
                    Error::PodLabels(_) => "pod_labels_unavailable",
                    _ => "error",
                };
                self.0.metrics().hook_request(result, start.elapsed());
                tracing::warn!(error = %e, "RuntimeHook refused");
                Err(e.into())
            }
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for Service {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn list_containers(
        &self,
        _: Request<v1::ListContainersRequest>,
    ) -> Result<Response<v1::ListContainersResponse>, Status> {
        Ok(Response::new(v1::ListContainersResponse {
            containers: self.0.list_containers(),
        }))
    }

    async fn report_container(
        &self,
        request: Request<v1::ReportContainerRequest>,
    ) -> Result<Response<v1::ReportContainerResponse>, Status> {
        let r = request.into_inner();
        let req = r
            .container
            .ok_or_else(|| Status::invalid_argument("ReportContainer without a container"))?;
        let source = if r.source.is_empty() {
            "report".to_string()
        } else {
            r.source
        };
        let agent = self.0.clone();
        let rec = run_blocking(move || agent.register(&req, &source, r.hook_ran))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        if !rec.covered {
            tracing::warn!(container = %rec.identity.container_id, source = %rec.source, "container started without our hook: not covered from its first instruction");
        }
        Ok(Response::new(v1::ReportContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<v1::RemoveContainerRequest>,
    ) -> Result<Response<v1::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let removed = self.0.remove_container(&id)?;
        Ok(Response::new(v1::RemoveContainerResponse { removed }))
    }

    async fn list_policies(
        &self,
        _: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        Ok(Response::new(v1::ListPoliciesResponse {
            policies: self.0.list_policies(),
        }))
    }

    async fn add_policy(
        &self,
        request: Request<v1::AddPolicyRequest>,
    ) -> Result<Response<v1::AddPolicyResponse>, Status> {
        let mut policies = parse_policies(&request.into_inner().yaml).map_err(Error::from)?;
        if policies.len() != 1 {
            return Err(Status::invalid_argument(
                "AddPolicy takes exactly one policy document",
            ));
        }
        let rec = self.0.add_policy(policies.remove(0), PolicySource::Api)?;
        tracing::info!(policy = %rec.key(), slot = rec.slot, "policy added through the API");
        Ok(Response::new(v1::AddPolicyResponse {
            policy: Some(crate::agent::to_api_policy(&rec)),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        let r = request.into_inner();
        // The API deletes its own policies (files and Kubernetes manage theirs).
        let key = PolicyKey {
            origin: Origin::Api,
            namespace: (!r.namespace.is_empty()).then_some(r.namespace),
            name: r.name,
        };
        self.0.delete_policy(&key)?;
        tracing::info!(policy = %key, "policy deleted through the API");
        Ok(Response::new(v1::DeletePolicyResponse {}))
    }

    async fn check_policy(
        &self,
        request: Request<v1::CheckPolicyRequest>,
    ) -> Result<Response<v1::CheckPolicyResponse>, Status> {
        let policies = parse_policies(&request.into_inner().yaml).map_err(Error::from)?;
        let mut selected = Vec::new();
        for p in &policies {
            selected.extend(self.0.check_policy(p));
        }
        Ok(Response::new(v1::CheckPolicyResponse { selected }))
    }

    type GetEventsStream = EventStream;

    async fn get_events(
        &self,
        _: Request<v1::GetEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let stream = BroadcastStream::new(self.0.subscribe_events()).filter_map(|e| e.ok().map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Binds the socket: parent directory created (0700), a stale socket replaced, mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(dir, e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another agent is serving this socket",
                ),
            ));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(path, e))?;
    Ok(listener)
}

/// Accepted connections from allowed uids only (root, ourselves, and `extra`): the socket's
/// mode already keeps others out; this also holds when the socket is bind-mounted.
pub fn authorized_incoming(
    listener: UnixListener,
    extra: Vec<u32>,
) -> impl Stream<Item = std::io::Result<UnixStream>> {
    let own = nix::unistd::getuid().as_raw();
    tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 || cred.uid() == own || extra.contains(&cred.uid()) => Some(Ok(stream)),
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a connection from an unauthorized uid");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; connection refused");
                None
            }
        },
        Err(e) => Some(Err(e)),
    })
}

pub fn services(agent: Arc<Agent>) -> (FineGuidanceSensorsServer<Service>, AgentServer<Service>) {
    (
        FineGuidanceSensorsServer::new(Service(agent.clone())),
        AgentServer::new(Service(agent)),
    )
}
