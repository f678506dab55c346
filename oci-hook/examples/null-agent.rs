//! A RuntimeHook server that accepts every request at once: measures the hook's own share
//! of a registration, without the agent's work (`cargo run --release --example null-agent
//! -- /tmp/null.sock`, then point `--grpc-address unix:///tmp/null.sock` at it).
use rthooks_api::tetragon::fine_guidance_sensors_server::{
    FineGuidanceSensors, FineGuidanceSensorsServer,
};
use rthooks_api::tetragon::{RuntimeHookRequest, RuntimeHookResponse};

struct Null;

#[tonic::async_trait]
impl FineGuidanceSensors for Null {
    async fn runtime_hook(
        &self,
        _: tonic::Request<RuntimeHookRequest>,
    ) -> Result<tonic::Response<RuntimeHookResponse>, tonic::Status> {
        Ok(tonic::Response::new(RuntimeHookResponse {}))
    }
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: null-agent SOCKET");
    let _ = std::fs::remove_file(&path);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tonic::transport::Server::builder()
            .add_service(FineGuidanceSensorsServer::new(Null))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
            .await
            .unwrap();
    });
}
