//! What one connection has to write, bounded in bytes, and the writer's time limit.
//!
//! Room for outgoing bytes is a semaphore of `out_bytes_max` permits, one per byte. A request
//! takes room for its answer *before* it is carried out (a poll: before it hands anything
//! out), and gives back what its answer did not use; a frame holds its room until the writer
//! has written it. So a client that does not read stops the broker from producing for it:
//! once its room is used up, its requests wait before doing anything, the connection's reader
//! stops at `in_flight_max` of them, and TCP pushes back on the client. What is queued for
//! one connection never passes `out_bytes_max`.
//!
//! The writer goes through [`TimedWrite`]: a write that takes no byte for `write_timeout`
//! fails, and the connection is cut (see `connection.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use halfmq_client::frame::FRAME_HEADER_BYTES;

/// The network server's counters, for all connections ([`super::Server::net_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NetStats {
    /// Connections open now.
    pub open: u64,
    /// Bytes of frames queued to be written now, all connections together.
    pub out_bytes: u64,
    /// The most bytes ever queued at once for one connection: never above `out_bytes_max`.
    pub out_bytes_peak: u64,
    /// Connections cut because a write took no byte for `write_timeout` (or, at shutdown,
    /// their queued answers were not written within it).
    pub write_timeouts: u64,
    /// Connections closed after `idle_timeout` with nothing to do.
    pub idle_closed: u64,
}

/// Where [`NetStats`] is counted.
#[derive(Debug, Default)]
pub(crate) struct NetCounters {
    pub(super) open: AtomicUsize,
    out_bytes: AtomicUsize,
    out_bytes_peak: AtomicUsize,
    pub(super) write_timeouts: AtomicU64,
    pub(super) idle_closed: AtomicU64,
}

impl NetCounters {
    pub(crate) fn stats(&self) -> NetStats {
        NetStats {
            open: self.open.load(Ordering::Relaxed) as u64,
            out_bytes: self.out_bytes.load(Ordering::Relaxed) as u64,
            out_bytes_peak: self.out_bytes_peak.load(Ordering::Relaxed) as u64,
            write_timeouts: self.write_timeouts.load(Ordering::Relaxed),
            idle_closed: self.idle_closed.load(Ordering::Relaxed),
        }
    }
}

/// What the frames of one connection share with its outbox.
#[derive(Debug)]
struct OutState {
    /// Bytes of frames queued and not yet written.
    queued: AtomicUsize,
    /// When the last frame was written, as nanoseconds since `base`.
    written_at: AtomicU64,
    base: Instant,
    counters: Arc<NetCounters>,
}

/// The sending side of one connection's outgoing frames; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Queued>,
    room: Arc<Semaphore>,
    max: usize,
    state: Arc<OutState>,
}

/// Room taken for an answer not written yet: given back when dropped.
#[derive(Debug)]
pub(crate) struct Room(OwnedSemaphorePermit);

impl Room {
    /// Bytes of room held.
    pub(crate) fn bytes(&self) -> usize {
        self.0.num_permits()
    }
}

/// Cuts an [`Outbox`] without keeping its channel open (the writer holds one).
#[derive(Debug)]
pub(crate) struct Cutter(Arc<Semaphore>);

impl Cutter {
    /// Every wait for room ends with `None`, now and later.
    pub(crate) fn cut(&self) {
        self.0.close();
    }
}

/// A frame in the queue, holding its room until it is written (or dropped unwritten).
#[derive(Debug)]
pub(crate) struct Queued {
    bytes: Vec<u8>,
    _room: OwnedSemaphorePermit,
    state: Arc<OutState>,
}

impl AsRef<[u8]> for Queued {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let n = self.bytes.len();
        self.state.queued.fetch_sub(n, Ordering::Relaxed);
        self.state
            .counters
            .out_bytes
            .fetch_sub(n, Ordering::Relaxed);
        let at = u64::try_from(self.state.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.state.written_at.store(at, Ordering::Relaxed);
    }
}

impl Outbox {
    /// An outbox of `max` bytes and the receiver its frames come out of.
    pub(crate) fn new(max: usize, counters: Arc<NetCounters>) -> (Outbox, mpsc::Receiver<Queued>) {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        // Every frame holds at least a header's worth of room, so the bytes bound the count
        // and a frame that has its room always finds a place in the channel.
        let (tx, rx) = mpsc::channel(max / FRAME_HEADER_BYTES + 1);
        let outbox = Outbox {
            tx,
            room: Arc::new(Semaphore::new(max)),
            max,
            state: Arc::new(OutState {
                queued: AtomicUsize::new(0),
                written_at: AtomicU64::new(0),
                base: Instant::now(),
                counters,
            }),
        };
        (outbox, rx)
    }

    fn permits(&self, n: usize) -> u32 {
        // `max` is at most u32::MAX (ServerConfig::validate), so is what is clamped to it.
        u32::try_from(n.clamp(1, self.max)).unwrap_or(u32::MAX)
    }

    /// Wait for `n` bytes of room (at most the whole outbox). `None` once the connection is
    /// cut: nothing will be written any more.
    pub(crate) async fn reserve(&self, n: usize) -> Option<Room> {
        let permits = self.permits(n);
        self.room
            .clone()
            .acquire_many_owned(permits)
            .await
            .ok()
            .map(Room)
    }

    /// `n` bytes of room if they are free now.
    pub(crate) fn try_reserve(&self, n: usize) -> Option<Room> {
        let permits = self.permits(n);
        self.room
            .clone()
            .try_acquire_many_owned(permits)
            .ok()
            .map(Room)
    }

    /// Queue `bytes` in `room`; room not needed is given back. If `bytes` needs more, the
    /// room is given back and all of it waited for again (holding some while waiting for
    /// more could leave every answer waiting for room another one holds). Returns whether the
    /// frame was queued (not: the connection is cut).
    pub(crate) async fn send_in(&self, room: Room, bytes: Vec<u8>) -> bool {
        if bytes.len().clamp(1, self.max) > room.bytes() {
            drop(room);
            return self.send(bytes).await;
        }
        self.push(room, bytes)
    }

    /// Queue `bytes`, waiting for room first. Returns whether it was queued.
    pub(crate) async fn send(&self, bytes: Vec<u8>) -> bool {
        match self.reserve(bytes.len()).await {
            Some(room) => self.push(room, bytes),
            None => false,
        }
    }

    /// Queue `bytes` if `room` holds enough for them (the rest is given back), or if there is
    /// room free now; otherwise hand `bytes` back.
    pub(crate) fn try_send_in(&self, room: Option<Room>, bytes: Vec<u8>) -> Result<bool, Vec<u8>> {
        let need = bytes.len().clamp(1, self.max);
        let room = match room {
            Some(r) if r.0.num_permits() >= need => r,
            other => {
                drop(other);
                match self.try_reserve(need) {
                    Some(r) => r,
                    None => return Err(bytes),
                }
            }
        };
        Ok(self.push(room, bytes))
    }

    /// Queue `bytes` now if there is room for them; whether it was queued.
    pub(crate) fn try_send(&self, bytes: Vec<u8>) -> bool {
        self.try_send_in(None, bytes).unwrap_or(false)
    }

    fn push(&self, mut room: Room, bytes: Vec<u8>) -> bool {
        let n = bytes.len();
        let need = n.clamp(1, self.max);
        if room.0.num_permits() > need {
            // The answer is smaller than the room taken for it: the rest goes back now.
            drop(room.0.split(room.0.num_permits() - need));
        }
        let queued = self.state.queued.fetch_add(n, Ordering::Relaxed) + n;
        let counters = &self.state.counters;
        counters.out_bytes.fetch_add(n, Ordering::Relaxed);
        counters.out_bytes_peak.fetch_max(queued, Ordering::Relaxed);
        let frame = Queued {
            bytes,
            _room: room.0,
            state: self.state.clone(),
        };
        // Full cannot happen (see `new`); closed: the writer is gone and the frame is dropped.
        self.tx.try_send(frame).is_ok()
    }

    /// Whether anything holds room: an answer being made or a frame not yet written.
    pub(crate) fn busy(&self) -> bool {
        self.room.available_permits() < self.max
    }

    /// When the last frame was written (the outbox's creation if none was).
    pub(crate) fn written_at(&self) -> Instant {
        let nanos = self.state.written_at.load(Ordering::Relaxed);
        self.state.base + Duration::from_nanos(nanos)
    }

    /// What cuts this outbox.
    pub(crate) fn cutter(&self) -> Cutter {
        Cutter(self.room.clone())
    }
}

/// A writer whose writes fail with [`io::ErrorKind::TimedOut`] when the inner writer takes no
/// byte for `limit`. Between writes no time is counted.
pub(crate) struct TimedWrite<W> {
    inner: W,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<W> TimedWrite<W> {
    pub(crate) fn new(inner: W, limit: Duration) -> TimedWrite<W> {
        TimedWrite {
            inner,
            limit,
            stalled: None,
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for TimedWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = this.limit;
                let timer = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client took no bytes for {limit:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
