//! A minimal synchronous gRPC client: one unary call on one HTTP/2 connection with prior
//! knowledge (RFC 9113 §3.3), over a UNIX or TCP socket, under one deadline. No async
//! runtime, no threads; [`hpack`] is its header decoder.
//!
//! Why not tonic: its user, the OCI hook, is a process that makes exactly one call and
//! exits. tonic's
//! stack (tokio runtime, hyper, tower, h2) cost as much CPU to set up and tear down as the
//! agent spends handling the request, and doubled the binary (and so the relocations and
//! page faults of every start). This client writes the connection preface, SETTINGS,
//! HEADERS and the request's DATA frames in one `write`, without waiting for the server's
//! SETTINGS (allowed: the defaults apply until they arrive), then reads frames until the
//! stream ends. It honours the server's flow-control windows for requests above 64 KiB,
//! answers SETTINGS and PING, and decodes headers with a full HPACK decoder.
//!
//! Why not the `h2` crate on a current-thread tokio runtime either: measured against this
//! client (feature `h2`, [`h2_variant`], `cargo xtask hook-variants`), it cost the hook
//! 0.27 ms more CPU per invocation and 0.8 MB of binary (oci-hook/README.md).
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};

#[cfg(feature = "h2")]
pub mod h2_variant;
pub mod hpack;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The smallest maximum frame size a peer may announce: always safe to send.
const MAX_FRAME: usize = 16_384;
/// HTTP/2's initial flow-control window, before the peer's SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;
/// Cap on what we accept from the agent (responses are a few bytes).
const MAX_RESPONSE: usize = 4 << 20;
const STREAM: u32 = 1;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("deadline exceeded")]
    Timeout,
    #[error("connection to the agent failed: {0}")]
    Io(#[source] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server answered with a non-OK gRPC status.
    #[error("agent answered {}: {message}", code_name(*code))]
    Status { code: u32, message: String },
}

impl From<hpack::HpackError> for CallError {
    fn from(e: hpack::HpackError) -> Self {
        CallError::Protocol(e.to_string())
    }
}

/// The name tonic and grpc-go give a status code.
pub fn code_name(code: u32) -> String {
    const NAMES: [&str; 17] = [
        "Ok",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("status {code}"), |n| (*n).to_owned())
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(std::path::PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl Target {
    pub(crate) fn authority(&self) -> &str {
        match self {
            // Any authority does for a UNIX socket; this is what gRPC clients send.
            Target::Unix(_) => "localhost",
            Target::Tcp(h) => h,
        }
    }
}

/// A connected, non-blocking socket.
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// Connects to the agent before the deadline.
pub(crate) fn connect(target: &Target, deadline: Instant) -> Result<Stream, CallError> {
    Ok(match target {
        Target::Unix(p) => Stream::Unix(connect_unix(p, deadline)?),
        Target::Tcp(h) => Stream::Tcp(connect_tcp(h, deadline)?),
    })
}

impl Stream {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

/// A non-blocking socket whose every wait is bounded by the call's deadline.
struct Conn {
    stream: Stream,
    deadline: Instant,
    rbuf: Vec<u8>,
    rpos: usize,
}

fn remaining(deadline: Instant) -> Result<Duration, CallError> {
    let now = Instant::now();
    if now >= deadline {
        return Err(CallError::Timeout);
    }
    Ok(deadline - now)
}

/// Waits until `fd` is ready for `events` or the deadline passes.
fn wait(fd: BorrowedFd<'_>, events: PollFlags, deadline: Instant) -> Result<(), CallError> {
    loop {
        let left = remaining(deadline)?;
        // Round up: a poll of 0 ms would spin until the deadline.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut [PollFd::new(fd, events)], timeout) {
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(CallError::Io(e.into())),
        }
    }
}

/// std's `UnixStream::connect` blocks while the agent's accept backlog is full, past any
/// deadline: hence a non-blocking socket of our own.
fn connect_unix(path: &Path, deadline: Instant) -> Result<UnixStream, CallError> {
    let err = |source: Errno| CallError::Connect {
        target: path.display().to_string(),
        source: source.into(),
    };
    let addr = UnixAddr::new(path).map_err(|e| match e {
        Errno::ENAMETOOLONG | Errno::EINVAL => CallError::Connect {
            target: path.display().to_string(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path too long or with a NUL byte",
            ),
        },
        e => err(e),
    })?;
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    let mut backoff = Duration::from_micros(200);
    loop {
        match nix::sys::socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            Err(Errno::EINTR) => {}
            // A UNIX socket whose accept backlog is full answers EAGAIN (not EINPROGRESS,
            // and poll cannot wait for room): retry until the deadline, as a blocking
            // connect would have waited.
            Err(Errno::EAGAIN) => {
                let left = remaining(deadline)?;
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(10));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

fn connect_tcp(hostport: &str, deadline: Instant) -> Result<TcpStream, CallError> {
    let err = |source| CallError::Connect {
        target: hostport.to_owned(),
        source,
    };
    let addrs = hostport.to_socket_addrs().map_err(err)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        let left = remaining(deadline)?;
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => {
                // Frames are written whole; do not let Nagle hold the last one back.
                let _ = s.set_nodelay(true);
                s.set_nonblocking(true).map_err(CallError::Io)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(CallError::Timeout),
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

impl Conn {
    fn connect(target: &Target, deadline: Instant) -> Result<Conn, CallError> {
        Ok(Conn {
            stream: connect(target, deadline)?,
            deadline,
            rbuf: Vec::with_capacity(4096),
            rpos: 0,
        })
    }

    fn write_all(&mut self, mut buf: &[u8]) -> Result<(), CallError> {
        while !buf.is_empty() {
            let r = match &mut self.stream {
                Stream::Unix(s) => s.write(buf),
                Stream::Tcp(s) => s.write(buf),
            };
            match r {
                Ok(0) => return Err(CallError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(self.stream.fd(), PollFlags::POLLOUT, self.deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CallError::Io(e)),
            }
        }
        Ok(())
    }

    /// Makes at least `n` unread bytes available.
    fn fill(&mut self, n: usize) -> Result<(), CallError> {
        if self.rpos > 0 && self.rbuf.len() - self.rpos < n {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        while self.rbuf.len() - self.rpos < n {
            let old = self.rbuf.len();
            self.rbuf.resize(old + n.max(4096), 0);
            let r = match &mut self.stream {
                Stream::Unix(s) => s.read(&mut self.rbuf[old..]),
                Stream::Tcp(s) => s.read(&mut self.rbuf[old..]),
            };
            self.rbuf.truncate(old + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => {
                    return Err(CallError::Protocol(
                        "the agent closed the connection before answering".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(self.stream.fd(), PollFlags::POLLIN, self.deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CallError::Io(e)),
            }
        }
        Ok(())
    }

    /// Reads one frame: (type, flags, stream id, payload).
    fn read_frame(&mut self) -> Result<(u8, u8, u32, Vec<u8>), CallError> {
        self.fill(9)?;
        let h = &self.rbuf[self.rpos..self.rpos + 9];
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (typ, flags) = (h[3], h[4]);
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        // We never raise SETTINGS_MAX_FRAME_SIZE, so nothing larger may come.
        if len > MAX_FRAME {
            return Err(CallError::Protocol(format!("frame of {len} bytes")));
        }
        self.fill(9 + len)?;
        let payload = self.rbuf[self.rpos + 9..self.rpos + 9 + len].to_vec();
        self.rpos += 9 + len;
        Ok((typ, flags, id, payload))
    }
}

fn frame(out: &mut Vec<u8>, typ: u8, flags: u8, id: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[typ, flags]);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Strips the padding (and priority fields) of a HEADERS or DATA payload.
fn unpad(typ: u8, flags: u8, p: &[u8]) -> Result<&[u8], CallError> {
    let bad = || CallError::Protocol("bad padding".into());
    let (mut start, mut end) = (0, p.len());
    if flags & PADDED != 0 {
        let pad = usize::from(*p.first().ok_or_else(bad)?);
        start = 1;
        end = end.checked_sub(pad).ok_or_else(bad)?;
    }
    if typ == HEADERS && flags & PRIORITY != 0 {
        start += 5;
    }
    if start > end {
        return Err(bad());
    }
    Ok(&p[start..end])
}

/// The gRPC response: headers seen so far and the message bytes.
#[derive(Default)]
pub(crate) struct Response {
    pub(crate) http_status: Option<String>,
    grpc_status: Option<String>,
    grpc_message: String,
    body: Vec<u8>,
}

/// gRPC percent-encodes `grpc-message`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes a unary call: `path` is `/package.Service/Method`, `message` the encoded
/// protobuf request, `user_agent` what the `user-agent` header names. Returns the encoded
/// response message.
pub fn unary(
    target: &Target,
    user_agent: &str,
    path: &str,
    message: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, CallError> {
    let deadline = Instant::now() + timeout;
    let mut conn = Conn::connect(target, deadline)?;

    let body = frame_message(message)?;

    let mut out = Vec::with_capacity(256 + body.len().min(DEFAULT_WINDOW as usize) + 9 * 5);
    out.extend_from_slice(PREFACE);
    let mut settings = Vec::new();
    settings.extend_from_slice(&SETTINGS_ENABLE_PUSH.to_be_bytes());
    settings.extend_from_slice(&0u32.to_be_bytes());
    frame(&mut out, SETTINGS, 0, 0, &settings);
    let mut block = Vec::with_capacity(128);
    block.push(0x83); // :method POST (static index 3)
    block.push(0x86); // :scheme http (static index 6)
    hpack::write_literal(&mut block, 4, "", path); // :path
    hpack::write_literal(&mut block, 1, "", target.authority()); // :authority
    hpack::write_literal(&mut block, 31, "", "application/grpc"); // content-type
    hpack::write_literal(&mut block, 0, "te", "trailers");
    hpack::write_literal(&mut block, 0, "user-agent", user_agent);
    frame(&mut out, HEADERS, END_HEADERS, STREAM, &block);

    // Send what the initial windows allow now; the rest as the agent opens them.
    let (mut conn_window, mut stream_window) = (DEFAULT_WINDOW, DEFAULT_WINDOW);
    let mut peer_initial_window = DEFAULT_WINDOW;
    let mut sent = 0usize;
    let mut send_more = |out: &mut Vec<u8>, cw: &mut i64, sw: &mut i64| {
        while sent < body.len() {
            let room = (*cw).min(*sw);
            let n = (body.len() - sent).min(MAX_FRAME);
            if room < n as i64 {
                break;
            }
            let last = sent + n == body.len();
            frame(
                out,
                DATA,
                if last { END_STREAM } else { 0 },
                STREAM,
                &body[sent..sent + n],
            );
            sent += n;
            *cw -= n as i64;
            *sw -= n as i64;
        }
        sent == body.len()
    };
    let mut all_sent = send_more(&mut out, &mut conn_window, &mut stream_window);
    conn.write_all(&out)?;

    let mut decoder = hpack::Decoder::default();
    let mut resp = Response::default();
    // A header block in progress (HEADERS then CONTINUATION frames).
    let mut block: Option<(Vec<u8>, bool)> = None;
    loop {
        let (typ, flags, id, payload) = conn.read_frame()?;
        if let Some((buf, end_stream)) = &mut block {
            if typ != CONTINUATION || id != STREAM {
                return Err(CallError::Protocol("header block interrupted".into()));
            }
            buf.extend_from_slice(&payload);
            if flags & END_HEADERS != 0 {
                let end_stream = *end_stream;
                let list = decoder.decode(buf)?;
                block = None;
                resp.headers(list);
                if end_stream {
                    break;
                }
            }
            continue;
        }
        match typ {
            SETTINGS if flags & ACK == 0 => {
                if payload.len() % 6 != 0 || id != 0 {
                    return Err(CallError::Protocol("malformed SETTINGS".into()));
                }
                for s in payload.chunks_exact(6) {
                    let key = u16::from_be_bytes([s[0], s[1]]);
                    let val = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
                    if key == SETTINGS_INITIAL_WINDOW_SIZE {
                        // Applies to open streams as a delta from the previous value
                        // (RFC 9113 §6.9.2).
                        stream_window += i64::from(val) - peer_initial_window;
                        peer_initial_window = i64::from(val);
                    }
                }
                let mut ack = Vec::with_capacity(9);
                frame(&mut ack, SETTINGS, ACK, 0, &[]);
                if !all_sent {
                    all_sent = send_more(&mut ack, &mut conn_window, &mut stream_window);
                }
                conn.write_all(&ack)?;
            }
            WINDOW_UPDATE => {
                let inc = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .ok_or_else(|| CallError::Protocol("malformed WINDOW_UPDATE".into()))?;
                match id {
                    0 => conn_window += i64::from(inc),
                    STREAM => stream_window += i64::from(inc),
                    _ => {}
                }
                if !all_sent {
                    let mut more = Vec::new();
                    all_sent = send_more(&mut more, &mut conn_window, &mut stream_window);
                    conn.write_all(&more)?;
                }
            }
            PING if flags & ACK == 0 => {
                let mut pong = Vec::with_capacity(17);
                frame(&mut pong, PING, ACK, 0, &payload);
                conn.write_all(&pong)?;
            }
            GOAWAY => {
                let last = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .unwrap_or(0);
                if last < STREAM {
                    let code = payload
                        .get(4..8)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(0);
                    return Err(CallError::Protocol(format!(
                        "the agent closed the connection (GOAWAY, error code {code})"
                    )));
                }
            }
            RST_STREAM if id == STREAM => {
                let code = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                return Err(CallError::Protocol(format!(
                    "the agent reset the stream (error code {code})"
                )));
            }
            PUSH_PROMISE => {
                return Err(CallError::Protocol("unexpected PUSH_PROMISE".into()));
            }
            HEADERS if id == STREAM => {
                let data = unpad(typ, flags, &payload)?.to_vec();
                let end_stream = flags & END_STREAM != 0;
                if flags & END_HEADERS == 0 {
                    block = Some((data, end_stream));
                    continue;
                }
                let list = decoder.decode(&data)?;
                resp.headers(list);
                if end_stream {
                    break;
                }
            }
            DATA if id == STREAM => {
                resp.push_body(unpad(typ, flags, &payload)?)?;
                if flags & END_STREAM != 0 {
                    break;
                }
            }
            // SETTINGS and PING acks, PRIORITY, frames of other streams, unknown types.
            _ => {}
        }
    }

    resp.into_message()
}

impl Response {
    pub(crate) fn headers(&mut self, list: Vec<(Vec<u8>, Vec<u8>)>) {
        for (n, v) in list {
            let v = String::from_utf8_lossy(&v).into_owned();
            match n.as_slice() {
                b":status" => self.http_status = Some(v),
                b"grpc-status" => self.grpc_status = Some(v),
                b"grpc-message" => self.grpc_message = percent_decode(&v),
                _ => {}
            }
        }
    }

    pub(crate) fn push_body(&mut self, data: &[u8]) -> Result<(), CallError> {
        if self.body.len() + data.len() > MAX_RESPONSE {
            return Err(CallError::Protocol("response too large".into()));
        }
        self.body.extend_from_slice(data);
        Ok(())
    }

    /// The response message once the stream ended, or the error its status names.
    pub(crate) fn into_message(self) -> Result<Vec<u8>, CallError> {
        match self.http_status.as_deref() {
            Some("200") => {}
            Some(s) => return Err(CallError::Protocol(format!("HTTP status {s}"))),
            None => return Err(CallError::Protocol("no :status".into())),
        }
        let code: u32 = match self.grpc_status.as_deref() {
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| CallError::Protocol(format!("grpc-status {s:?}")))?,
            None => return Err(CallError::Protocol("no grpc-status".into())),
        };
        if code != 0 {
            return Err(CallError::Status {
                code,
                message: self.grpc_message,
            });
        }
        let b = &self.body;
        if b.len() < 5 {
            return Err(CallError::Protocol("no response message".into()));
        }
        if b[0] != 0 {
            return Err(CallError::Protocol("compressed response".into()));
        }
        let n = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() != 5 + n {
            return Err(CallError::Protocol("response length mismatch".into()));
        }
        Ok(b[5..].to_vec())
    }
}

/// gRPC's length-prefixed message: uncompressed flag, big-endian length, message.
pub(crate) fn frame_message(message: &[u8]) -> Result<Vec<u8>, CallError> {
    let len = u32::try_from(message.len())
        .map_err(|_| CallError::Protocol("request too large".into()))?;
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&len.to_be_bytes());
    body.extend_from_slice(message);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("pod%20not%20found"), "pod not found");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("caf%C3%A9"), "café");
    }

    #[test]
    fn padding() {
        assert_eq!(unpad(DATA, PADDED, &[2, b'a', 0, 0]).unwrap(), b"a");
        assert!(unpad(DATA, PADDED, &[5, b'a']).is_err());
        assert!(unpad(DATA, PADDED, &[]).is_err());
        assert_eq!(
            unpad(HEADERS, PRIORITY, &[0, 0, 0, 0, 9, b'h']).unwrap(),
            b"h"
        );
        assert!(unpad(HEADERS, PRIORITY, &[0, 0]).is_err());
    }

    #[test]
    fn status_names_match_tonic() {
        assert_eq!(code_name(14), "Unavailable");
        assert_eq!(code_name(4), "DeadlineExceeded");
        assert_eq!(code_name(99), "status 99");
    }
}
