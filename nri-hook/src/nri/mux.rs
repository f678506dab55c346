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
//! The multiplexer behaves as containerd/nri's `pkg/net/multiplex`, which the runtime runs
//! on the other end:
//! * a frame for a connection id nobody opened (or whose [`MuxConn`] was dropped) is read
//!   and ignored; the trunk goes on;
//! * each connection queues at most [`READ_QUEUE_LEN`] frames its reader has not taken
//!   yet. One more closes the trunk and every connection with
//!   [`MuxError::QueueOverflow`]: dropping the frame instead would cut a ttrpc message in
//!   the middle and desynchronise the stream for good;
//! * when the trunk ends, by EOF or by an error on either direction, the mux closes it
//!   entirely (both halves), as upstream's `Close`.
//!
//! One departure, on the safe side: a frame announcing more than [`MAX_PAYLOAD`] bytes is
//! refused before anything is allocated, where upstream allocates whatever the header says.
//!
//! Errors are reported, never papered over: every logical connection fails its reads with
//! the mux's error once the frames queued before it are consumed, and [`Mux::closed`]
//! returns it.

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
/// Frames queued per connection before the trunk is closed; upstream's `readQueueLen`.
pub const READ_QUEUE_LEN: usize = 256;

/// Why the mux stopped.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// A connection had [`READ_QUEUE_LEN`] frames waiting and another one arrived.
    #[error("connection {conn} has {capacity} unread frames queued: cannot queue another")]
    QueueOverflow {
        /// The connection whose reader fell behind.
        conn: ConnId,
        /// Its queue length.
        capacity: usize,
    },
    /// Reading or writing the trunk failed.
    #[error("trunk I/O error")]
    Io(#[source] Arc<io::Error>),
    /// The mux was closed locally.
    #[error("mux closed")]
    Closed,
}

impl From<io::Error> for MuxError {
    fn from(e: io::Error) -> Self {
        MuxError::Io(Arc::new(e))
    }
}

/// How the mux ended: the peer closed the trunk cleanly between frames, or an error.
#[derive(Debug, Clone)]
pub enum MuxEnd {
    /// End of stream at a frame boundary.
    Eof,
    /// See [`MuxError`].
    Error(MuxError),
}

/// A multiplexer over one trunk stream. Dropping it stops its tasks (and so closes the
/// trunk).
pub struct Mux {
    conns: HashMap<ConnId, MuxConn>,
    end: watch::Receiver<Option<MuxEnd>>,
    end_tx: Arc<watch::Sender<Option<MuxEnd>>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Mux {
    /// Starts multiplexing `trunk` with the given logical connections open. Frames for any
    /// other id are ignored, as upstream does.
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
            let (tx, rx) = mpsc::channel(READ_QUEUE_LEN);
            inbound.insert(id, tx);
            conns.insert(
                id,
                MuxConn {
                    id,
                    rx,
                    pending: Vec::new(),
                    pos: 0,
                    frames: frame_tx.clone(),
                    end: end_rx.clone(),
                },
            );
        }
        drop(frame_tx);
        let reader = tokio::spawn(read_loop(rd, inbound, end_tx.clone()));
        let writer = tokio::spawn(write_loop(wr, frame_rx, end_tx.clone()));
        Mux {
            conns,
            end: end_rx,
            end_tx,
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

    /// Stops both trunk tasks, which closes the trunk; logical connections see
    /// [`MuxError::Closed`] (unless the mux had already ended for another reason).
    pub fn close(&self) {
        set_end(&self.end_tx, MuxEnd::Error(MuxError::Closed));
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

/// Resolves once the mux has ended, for whatever reason.
async fn ended(end: &mut watch::Receiver<Option<MuxEnd>>) {
    // An error means every sender is gone, which is an end too.
    let _ = end.wait_for(Option::is_some).await;
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
    let got = read_full(r, &mut hdr).await?;
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
    let got = read_full(r, &mut payload).await?;
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
    inbound: HashMap<ConnId, mpsc::Sender<Vec<u8>>>,
    end: Arc<watch::Sender<Option<MuxEnd>>>,
) {
    let mut end_rx = end.subscribe();
    let result = loop {
        let frame = tokio::select! {
            f = read_frame(&mut rd) => f,
            // The writer failed or the mux was closed: stop reading, dropping our half.
            () = ended(&mut end_rx) => return,
        };
        match frame {
            Ok(None) => break MuxEnd::Eof,
            Ok(Some((conn, payload))) => {
                let Some(tx) = inbound.get(&conn) else {
                    tracing::debug!(
                        conn,
                        len = payload.len(),
                        "ignoring frame for unknown connection"
                    );
                    continue;
                };
                match tx.try_send(payload) {
                    Ok(()) => {}
                    // A dropped MuxConn is a closed connection: its frames are ignored too.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        break MuxEnd::Error(MuxError::QueueOverflow {
                            conn,
                            capacity: READ_QUEUE_LEN,
                        })
                    }
                }
            }
            Err(e) => break MuxEnd::Error(e),
        }
    };
    // The end is set before the queues' senders go, so a connection that drains its queue
    // finds the reason.
    set_end(&end, result);
    drop(inbound);
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut frames: mpsc::UnboundedReceiver<(ConnId, Vec<u8>)>,
    end: Arc<watch::Sender<Option<MuxEnd>>>,
) {
    let mut end_rx = end.subscribe();
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_WRITE_FRAME);
    loop {
        let (conn, payload) = tokio::select! {
            f = frames.recv() => match f {
                Some(f) => f,
                None => break,
            },
            // The reader saw EOF or an error: returning drops our half, which closes the
            // trunk (upstream closes it too).
            () = ended(&mut end_rx) => return,
        };
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
            set_end(&end, MuxEnd::Error(e.into()));
            return;
        }
    }
    // Every MuxConn is gone: half-close so the peer sees EOF.
    let _ = wr.shutdown().await;
}

/// One logical connection: a byte stream whose writes become frames on the trunk.
pub struct MuxConn {
    id: ConnId,
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    pos: usize,
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
            MuxError::Oversize { .. } => io::ErrorKind::InvalidData,
            MuxError::QueueOverflow { .. } | MuxError::Closed => io::ErrorKind::BrokenPipe,
            MuxError::Io(e) => e.kind(),
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
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => {
                    this.pending = d;
                    this.pos = 0;
                }
                // Reader gone and the queue drained: the end says why.
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
        assert!(matches!(timeout(m.closed()).await, MuxEnd::Eof));
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
        assert!(
            matches!(
                end,
                MuxEnd::Error(MuxError::ShortRead {
                    part: "payload",
                    expected: 10,
                    got: 4
                })
            ),
            "{end:?}"
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
        let end = timeout(m.closed()).await;
        assert!(
            matches!(
                end,
                MuxEnd::Error(MuxError::Oversize {
                    conn: 1,
                    len,
                    max: MAX_PAYLOAD
                }) if len == u32::MAX as usize
            ),
            "{end:?}"
        );
        let err = timeout(c.read(&mut [0; 1])).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Writes fail too once the mux is dead.
        assert!(c.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn frames_for_unknown_or_dropped_connections_are_ignored() {
        let (a, mut raw) = duplex(1 << 16);
        let mut m = Mux::new(a, &[1, 2]);
        let mut c1 = m.take(1).unwrap();
        drop(m.take(2).unwrap());
        // Unknown id 7, id 0 (reserved upstream) and the dropped connection 2, each with a
        // payload that must be skipped exactly, then traffic on connection 1.
        raw.write_all(&frame(7, b"??")).await.unwrap();
        raw.write_all(&frame(0, &[0xff; 300])).await.unwrap();
        raw.write_all(&frame(2, b"for nobody")).await.unwrap();
        raw.write_all(&frame(1, b"still here")).await.unwrap();
        let mut got = [0; 10];
        timeout(c1.read_exact(&mut got)).await.unwrap();
        assert_eq!(&got, b"still here");
        // And the way back still works.
        c1.write_all(b"reply").await.unwrap();
        let mut f = [0; 13];
        timeout(raw.read_exact(&mut f)).await.unwrap();
        assert_eq!(f[..], frame(1, b"reply")[..]);
        assert!(m.end_watch().borrow().is_none(), "the mux must still be up");
    }

    #[tokio::test]
    async fn a_full_queue_holds_exactly_read_queue_len_frames() {
        let (a, mut raw) = duplex(1 << 16);
        let mut m = Mux::new(a, &[1, 2]);
        let (mut c1, mut c2) = (m.take(1).unwrap(), m.take(2).unwrap());
        for i in 0..READ_QUEUE_LEN {
            raw.write_all(&frame(1, &[i as u8])).await.unwrap();
        }
        // Frames are demultiplexed in order: once connection 2 has its frame, all
        // READ_QUEUE_LEN frames of connection 1 sit in its queue, and the mux is up.
        raw.write_all(&frame(2, b"ping")).await.unwrap();
        let mut p = [0; 4];
        timeout(c2.read_exact(&mut p)).await.unwrap();
        assert!(m.end_watch().borrow().is_none(), "the mux must still be up");
        let mut got = vec![0; READ_QUEUE_LEN];
        timeout(c1.read_exact(&mut got)).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[tokio::test]
    async fn queue_overflow_closes_the_trunk() {
        let (a, mut raw) = duplex(1 << 16);
        let mut m = Mux::new(a, &[1, 2]);
        let (mut c1, mut c2) = (m.take(1).unwrap(), m.take(2).unwrap());
        for i in 0..=READ_QUEUE_LEN {
            raw.write_all(&frame(1, &[i as u8])).await.unwrap();
        }
        let end = timeout(m.closed()).await;
        assert!(
            matches!(
                end,
                MuxEnd::Error(MuxError::QueueOverflow {
                    conn: 1,
                    capacity: READ_QUEUE_LEN
                })
            ),
            "{end:?}"
        );
        // The trunk is closed: the peer reads EOF (no frame was written to it).
        let mut rest = Vec::new();
        assert_eq!(timeout(raw.read_to_end(&mut rest)).await.unwrap(), 0);
        // The frames queued before the overflow are delivered whole, in order, and never
        // the one that did not fit; then reads fail with the reason.
        let mut got = vec![0; READ_QUEUE_LEN];
        timeout(c1.read_exact(&mut got)).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8));
        let err = timeout(c1.read(&mut [0; 1])).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(err.to_string().contains("unread frames"), "{err}");
        // Every connection of the mux is closed, writes included.
        let err = timeout(c2.read(&mut [0; 1])).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(c2.write_all(b"x").await.is_err());
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
