//! The NRI connection multiplexer.
//!
//! NRI runs two ttrpc conversations over one UNIX stream: the plugin *serves* `Plugin` on
//! logical connection [`PLUGIN_SERVICE_CONN`] and *calls* `Runtime` on
//! [`RUNTIME_SERVICE_CONN`]. Every chunk on the trunk is a frame:
//!
//! ```text
//! | conn id: u32 BE | payload length: u32 BE | payload ... |
//! ```
//!
//! Each logical connection is exposed as a [`MuxConn`], a plain byte stream
//! (`AsyncRead + AsyncWrite`) that ttrpc can run over. Connection ids are agreed out of
//! band: there is no open/close signalling, both sides just use 1 and 2.
//!
//! Errors are reported, never papered over: a trunk that ends inside a frame, a frame
//! longer than [`MAX_PAYLOAD`], or a frame for a connection that was not opened closes the
//! mux with a [`MuxError`]; every logical connection then fails its reads with that error
//! and [`Mux::closed`] returns it.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Identifies a logical connection inside the mux.
pub type ConnId = u32;

/// The plugin's ttrpc server (service `Plugin`) lives on this connection.
pub const PLUGIN_SERVICE_CONN: ConnId = 1;
/// The plugin's ttrpc client (service `Runtime`) lives on this connection.
pub const RUNTIME_SERVICE_CONN: ConnId = 2;

/// Frame header length: connection id + payload length.
pub const HEADER_LEN: usize = 8;
/// Largest payload accepted, as upstream: a ttrpc header (10 bytes) plus the largest ttrpc
/// message (4 MiB).
pub const MAX_PAYLOAD: usize = 10 + (4 << 20);
/// Largest frame this side writes. The Go mux hands one frame to one `Read` call and fails
/// with ENOMEM when the reader's buffer is smaller, and Go ttrpc reads through a 4 KiB
/// `bufio.Reader`: staying below that keeps every frame readable by upstream.
pub const MAX_WRITE_FRAME: usize = 4096 - 16;

/// Why the mux stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The trunk ended inside a frame.
    #[error("trunk closed mid-frame: {got} of {expected} bytes of the {part}")]
    ShortRead {
        /// "header" or "payload".
        part: &'static str,
        /// Bytes the frame needed.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// A frame announced a payload above [`MAX_PAYLOAD`].
    #[error("oversized frame for connection {conn}: {len} bytes (max {max})")]
    Oversize {
        /// Connection id of the frame.
        conn: ConnId,
        /// Announced payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame arrived for a connection that was never opened.
    #[error("frame for unknown connection id {0}")]
    UnknownConn(ConnId),
    /// Reading or writing the trunk failed.
    #[error("trunk I/O error: {0}")]
    Io(String),
    /// The mux was closed locally.
    #[error("mux closed")]
    Closed,
}

/// How the mux ended: the peer closed the trunk cleanly between frames, or an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MuxEnd {
    /// End of stream at a frame boundary.
    Eof,
    /// See [`MuxError`].
    Error(MuxError),
}

enum Inbound {
    Data(Vec<u8>),
    Failed(MuxError),
}

/// A multiplexer over one trunk stream. Dropping it stops its tasks (and so closes the
/// trunk).
pub struct Mux {
    conns: HashMap<ConnId, MuxConn>,
    end: watch::Receiver<Option<MuxEnd>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Mux {
    /// Starts multiplexing `trunk` with the given logical connections open. Frames for any
    /// other id are an error ([`MuxError::UnknownConn`]).
    ///
    /// Must be called inside a tokio runtime.
    pub fn new<T>(trunk: T, ids: &[ConnId]) -> Self
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(trunk);
        let (frame_tx, frame_rx) = mpsc::unbounded_channel::<(ConnId, Vec<u8>)>();
        let (end_tx, end_rx) = watch::channel(None);
        let end_tx = Arc::new(end_tx);
        let mut conns = HashMap::new();
        let mut inbound = HashMap::new();
        for &id in ids {
            let (tx, rx) = mpsc::unbounded_channel();
            inbound.insert(id, tx);
            conns.insert(
                id,
                MuxConn {
                    id,
                    rx,
                    pending: Vec::new(),
                    pos: 0,
                    failed: None,
                    frames: frame_tx.clone(),
                    end: end_rx.clone(),
                },
            );
        }
        drop(frame_tx);
        let reader = tokio::spawn(read_loop(rd, inbound, end_tx.clone()));
        let writer = tokio::spawn(write_loop(wr, frame_rx, end_tx));
        Mux {
            conns,
            end: end_rx,
            reader,
            writer,
        }
    }

    /// Takes the logical connection `id` (once).
    pub fn take(&mut self, id: ConnId) -> Option<MuxConn> {
        self.conns.remove(&id)
    }

    /// Waits until the mux stops and tells why.
    pub async fn closed(&self) -> MuxEnd {
        let mut end = self.end.clone();
        loop {
            if let Some(e) = end.borrow_and_update().clone() {
                return e;
            }
            if end.changed().await.is_err() {
                return MuxEnd::Error(MuxError::Closed);
            }
        }
    }

    /// A handle that can wait for the end without borrowing the mux.
    pub fn end_watch(&self) -> watch::Receiver<Option<MuxEnd>> {
        self.end.clone()
    }

    /// Stops both trunk tasks; logical connections see [`MuxError::Closed`].
    pub fn close(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        self.close();
    }
}

fn set_end(end: &watch::Sender<Option<MuxEnd>>, e: MuxEnd) {
    // The first reason wins: a write failure after a read error must not hide it.
    end.send_if_modified(|cur| {
        if cur.is_none() {
            *cur = Some(e);
            true
        } else {
            false
        }
    });
}

/// Reads exactly `buf.len()` bytes; `Ok(n < len)` means EOF after `n` bytes.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(ConnId, Vec<u8>)>, MuxError> {
    let mut hdr = [0u8; HEADER_LEN];
    let got = read_full(r, &mut hdr)
        .await
        .map_err(|e| MuxError::Io(e.to_string()))?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(MuxError::ShortRead {
            part: "header",
            expected: HEADER_LEN,
            got,
        });
    }
    let conn = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
    let len = u32::from_be_bytes(hdr[4..8].try_into().unwrap()) as usize;
    // Checked before allocating: a corrupt length must not make us allocate 4 GiB.
    if len > MAX_PAYLOAD {
        return Err(MuxError::Oversize {
            conn,
            len,
            max: MAX_PAYLOAD,
        });
    }
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)
        .await
        .map_err(|e| MuxError::Io(e.to_string()))?;
    if got < len {
        return Err(MuxError::ShortRead {
            part: "payload",
            expected: len,
            got,
        });
    }
    Ok(Some((conn, payload)))
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    inbound: HashMap<ConnId, mpsc::UnboundedSender<Inbound>>,
    end: Arc<watch::Sender<Option<MuxEnd>>>,
) {
    let result = loop {
        match read_frame(&mut rd).await {
            Ok(None) => break MuxEnd::Eof,
            Ok(Some((conn, payload))) => match inbound.get(&conn) {
                Some(tx) => {
                    // A dropped MuxConn just discards its data; the other one goes on.
                    let _ = tx.send(Inbound::Data(payload));
                }
                None => break MuxEnd::Error(MuxError::UnknownConn(conn)),
            },
            Err(e) => break MuxEnd::Error(e),
        }
    };
    if let MuxEnd::Error(e) = &result {
        for tx in inbound.values() {
            let _ = tx.send(Inbound::Failed(e.clone()));
        }
    }
    set_end(&end, result);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut frames: mpsc::UnboundedReceiver<(ConnId, Vec<u8>)>,
    end: Arc<watch::Sender<Option<MuxEnd>>>,
) {
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_WRITE_FRAME);
    while let Some((conn, payload)) = frames.recv().await {
        buf.clear();
        buf.extend_from_slice(&conn.to_be_bytes());
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&payload);
        // One write per frame, header and payload together, so frames never interleave.
        if let Err(e) = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        }
        .await
        {
            set_end(&end, MuxEnd::Error(MuxError::Io(e.to_string())));
            return;
        }
    }
    // Every MuxConn is gone: half-close so the peer sees EOF.
    let _ = wr.shutdown().await;
}

/// One logical connection: a byte stream whose writes become frames on the trunk.
pub struct MuxConn {
    id: ConnId,
    rx: mpsc::UnboundedReceiver<Inbound>,
    pending: Vec<u8>,
    pos: usize,
    failed: Option<MuxError>,
    frames: mpsc::UnboundedSender<(ConnId, Vec<u8>)>,
    end: watch::Receiver<Option<MuxEnd>>,
}

impl std::fmt::Debug for MuxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConn").field("id", &self.id).finish()
    }
}

impl MuxConn {
    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    fn io_error(e: &MuxError) -> io::Error {
        let kind = match e {
            MuxError::ShortRead { .. } => io::ErrorKind::UnexpectedEof,
            MuxError::Oversize { .. } | MuxError::UnknownConn(_) => io::ErrorKind::InvalidData,
            MuxError::Closed => io::ErrorKind::BrokenPipe,
            MuxError::Io(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, e.clone())
    }
}

impl AsyncRead for MuxConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.pending.len() {
                let n = (this.pending.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.pending[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &this.failed {
                return Poll::Ready(Err(Self::io_error(e)));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Inbound::Data(d))) => {
                    this.pending = d;
                    this.pos = 0;
                }
                Poll::Ready(Some(Inbound::Failed(e))) => this.failed = Some(e),
                // Reader gone: clean EOF, or aborted by Mux::close / drop.
                Poll::Ready(None) => {
                    return match this.end.borrow().clone() {
                        Some(MuxEnd::Error(e)) => Poll::Ready(Err(Self::io_error(&e))),
                        _ => Poll::Ready(Ok(())),
                    };
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for MuxConn {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(MuxEnd::Error(e)) = self.end.borrow().clone() {
            return Poll::Ready(Err(Self::io_error(&e)));
        }
        let n = buf.len().min(MAX_WRITE_FRAME);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        // Unbounded: NRI traffic is request/response and small, and the single writer task
        // drains it as fast as the socket takes it.
        match self.frames.send((self.id, buf[..n].to_vec())) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(Self::io_error(&MuxError::Closed))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // NRI has no per-connection close; the trunk closes when the mux goes.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::duplex;

    fn frame(conn: ConnId, payload: &[u8]) -> Vec<u8> {
        let mut v = conn.to_be_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    async fn timeout<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    async fn interleaved_streams_are_demultiplexed() {
        let (a, b) = duplex(1 << 16);
        let mut ma = Mux::new(a, &[1, 2]);
        let mut mb = Mux::new(b, &[1, 2]);
        let (mut a1, mut a2) = (ma.take(1).unwrap(), ma.take(2).unwrap());
        let (mut b1, mut b2) = (mb.take(1).unwrap(), mb.take(2).unwrap());
        for i in 0..50u8 {
            a1.write_all(&[i; 3]).await.unwrap();
            a2.write_all(&[100 + i; 5]).await.unwrap();
        }
        let mut got1 = vec![0; 150];
        let mut got2 = vec![0; 250];
        timeout(b1.read_exact(&mut got1)).await.unwrap();
        timeout(b2.read_exact(&mut got2)).await.unwrap();
        for i in 0..50usize {
            assert_eq!(&got1[i * 3..i * 3 + 3], &[i as u8; 3]);
            assert_eq!(&got2[i * 5..i * 5 + 5], &[100 + i as u8; 5]);
        }
        // And back the other way.
        b2.write_all(b"pong").await.unwrap();
        let mut p = [0; 4];
        timeout(a2.read_exact(&mut p)).await.unwrap();
        assert_eq!(&p, b"pong");
    }

    #[tokio::test]
    async fn large_writes_are_split_into_small_frames() {
        let (a, mut raw) = duplex(1 << 20);
        let mut m = Mux::new(a, &[1]);
        let mut c = m.take(1).unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        c.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            let mut hdr = [0; 8];
            timeout(raw.read_exact(&mut hdr)).await.unwrap();
            assert_eq!(u32::from_be_bytes(hdr[..4].try_into().unwrap()), 1);
            let len = u32::from_be_bytes(hdr[4..].try_into().unwrap()) as usize;
            assert!(len <= MAX_WRITE_FRAME);
            let mut p = vec![0; len];
            raw.read_exact(&mut p).await.unwrap();
            got.extend(p);
        }
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn fragmented_frames_are_reassembled() {
        let (a, mut raw) = duplex(64);
        let mut m = Mux::new(a, &[1, 2]);
        let mut c2 = m.take(2).unwrap();
        let mut bytes = frame(2, b"hello ");
        bytes.extend(frame(1, b"ignored by c2"));
        bytes.extend(frame(2, b"world"));
        // Dribble the trunk one byte at a time.
        let writer = tokio::spawn(async move {
            for b in bytes {
                raw.write_all(&[b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            raw
        });
        let mut got = [0; 11];
        timeout(c2.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"hello world");
        drop(writer.await.unwrap());
        assert_eq!(timeout(m.closed()).await, MuxEnd::Eof);
        // Clean EOF: reads return 0.
        let mut rest = Vec::new();
        assert_eq!(timeout(c2.read_to_end(&mut rest)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn peer_closing_mid_frame_is_a_short_read() {
        let (a, mut raw) = duplex(1024);
        let mut m = Mux::new(a, &[1]);
        let mut c = m.take(1).unwrap();
        let f = frame(1, b"0123456789");
        raw.write_all(&f[..12]).await.unwrap();
        drop(raw);
        let end = timeout(m.closed()).await;
        assert_eq!(
            end,
            MuxEnd::Error(MuxError::ShortRead {
                part: "payload",
                expected: 10,
                got: 4
            })
        );
        let mut buf = [0; 4];
        let err = timeout(c.read(&mut buf)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn peer_closing_mid_header_is_a_short_read() {
        let (a, mut raw) = duplex(1024);
        let m = Mux::new(a, &[1]);
        raw.write_all(&[0, 0, 0]).await.unwrap();
        drop(raw);
        assert!(matches!(
            timeout(m.closed()).await,
            MuxEnd::Error(MuxError::ShortRead {
                part: "header",
                got: 3,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn oversize_frame_is_rejected() {
        let (a, mut raw) = duplex(1024);
        let mut m = Mux::new(a, &[1]);
        let mut c = m.take(1).unwrap();
        let mut hdr = 1u32.to_be_bytes().to_vec();
        hdr.extend_from_slice(&u32::MAX.to_be_bytes());
        raw.write_all(&hdr).await.unwrap();
        assert_eq!(
            timeout(m.closed()).await,
            MuxEnd::Error(MuxError::Oversize {
                conn: 1,
                len: u32::MAX as usize,
                max: MAX_PAYLOAD
            })
        );
        let err = timeout(c.read(&mut [0; 1])).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Writes fail too once the mux is dead.
        assert!(c.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn unknown_conn_id_is_rejected() {
        let (a, mut raw) = duplex(1024);
        let m = Mux::new(a, &[1, 2]);
        raw.write_all(&frame(7, b"??")).await.unwrap();
        assert_eq!(
            timeout(m.closed()).await,
            MuxEnd::Error(MuxError::UnknownConn(7))
        );
    }

    #[tokio::test]
    async fn close_ends_connections() {
        let (a, _raw) = duplex(1024);
        let mut m = Mux::new(a, &[1]);
        let mut c = m.take(1).unwrap();
        m.close();
        drop(m);
        let r = timeout(c.read(&mut [0; 1])).await;
        assert!(matches!(r, Ok(0)) || r.is_err());
    }
}
