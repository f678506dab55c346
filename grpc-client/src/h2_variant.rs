//! The same one unary call as [`crate::unary`], made with the `h2` crate on a
//! current-thread tokio runtime with only I/O and a timer (for the deadline) enabled: the
//! candidate measured against the hand-written client (oci-hook/README.md, "HTTP/2 client
//! and allocator"). The socket is connected as the hand-written client connects it (same
//! errors, same full-backlog retry); only the HTTP/2 layer differs.
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate as grpc;
use crate::{CallError, Target};

fn h2_error(e: h2::Error) -> CallError {
    match e.get_io() {
        Some(io) => CallError::Io(std::io::Error::new(io.kind(), io.to_string())),
        None => CallError::Protocol(e.to_string()),
    }
}

/// See [`crate::unary`]: same arguments, same result.
pub fn unary(
    target: &Target,
    user_agent: &str,
    path: &str,
    message: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, CallError> {
    let deadline = Instant::now() + timeout;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(CallError::Io)?;
    rt.block_on(async {
        tokio::time::timeout_at(
            deadline.into(),
            call(target, user_agent, path, message, deadline),
        )
        .await
        .unwrap_or(Err(CallError::Timeout))
    })
}

async fn call(
    target: &Target,
    user_agent: &str,
    path: &str,
    message: &[u8],
    deadline: Instant,
) -> Result<Vec<u8>, CallError> {
    match grpc::connect(target, deadline)? {
        grpc::Stream::Unix(s) => {
            let io = tokio::net::UnixStream::from_std(s).map_err(CallError::Io)?;
            exchange(io, target, user_agent, path, message).await
        }
        grpc::Stream::Tcp(s) => {
            let io = tokio::net::TcpStream::from_std(s).map_err(CallError::Io)?;
            exchange(io, target, user_agent, path, message).await
        }
    }
}

async fn exchange<T>(
    io: T,
    target: &Target,
    user_agent: &str,
    path: &str,
    message: &[u8],
) -> Result<Vec<u8>, CallError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = h2::client::Builder::new()
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(h2_error)?;
    // The connection task reads and writes the socket while this one waits on the stream.
    let driver = tokio::spawn(connection);
    let result = async {
        let mut client = client.ready().await.map_err(h2_error)?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{}{path}", target.authority()))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("user-agent", user_agent)
            .body(())
            .map_err(|e| CallError::Protocol(e.to_string()))?;
        let (response, mut send) = client.send_request(request, false).map_err(h2_error)?;
        // h2 queues what the peer's windows do not allow yet and sends it as they open.
        send.send_data(Bytes::from(grpc::frame_message(message)?), true)
            .map_err(h2_error)?;
        let response = response.await.map_err(h2_error)?;
        let (head, mut body) = response.into_parts();
        let mut resp = grpc::Response {
            http_status: Some(head.status.as_str().to_owned()),
            ..Default::default()
        };
        resp.headers(header_list(&head.headers));
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(h2_error)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            resp.push_body(&chunk)?;
        }
        if let Some(trailers) = body.trailers().await.map_err(h2_error)? {
            resp.headers(header_list(&trailers));
        }
        resp.into_message()
    }
    .await;
    driver.abort();
    result
}

fn header_list(h: &http::HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}
