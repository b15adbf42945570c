//! One connection: read frames, check the handshake, start one task per request (at most
//! `in_flight_max` at once), write the answers, and close cleanly: on bad input after an
//! error frame saying why, on shutdown after the requests in flight are answered, after
//! `idle_timeout` with nothing to do. The writer is bounded in bytes and in time (see
//! `outbox.rs`): a client that takes no bytes for `write_timeout` is cut. Also the check-back
//! pushes of a connection registered as a producer group's checker.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use halfmq::{Broker, CheckAnswer, Error, HalfMessage, Result, TransactionChecker};
use halfmq_client::frame::{self, FrameKind};
use halfmq_client::protocol::{self, codes, Push, Request, Response};
use halfmq_client::stream::{self, ReadBuf};

mod handlers;

use super::outbox::{Cutter, NetCounters, Outbox, Queued, Room, TimedWrite};
use super::{encode_frame, ServerConfig};
use handlers::{answer_room, handle};

/// What the connection's tasks share.
pub(super) struct Conn {
    pub(super) broker: Arc<Broker>,
    /// The cluster node whose broker this is, on a replicated broker.
    pub(super) replica: Option<Arc<halfmq_raft::ReplicaNode>>,
    pub(super) config: Arc<ServerConfig>,
    pub(super) out: Outbox,
    /// Check-backs waiting for this connection's answer: push id → reply channel.
    checks: Mutex<HashMap<u64, std::sync::mpsc::Sender<CheckAnswer>>>,
    next_push: AtomicU64,
    /// Checker registrations to undo when the connection ends: (group, id).
    registered: Mutex<Vec<(String, u64)>>,
    /// Set when the node this connection registered checkers on stops leading: the
    /// connection is closed, so that its producer finds the new leader and registers there.
    stepped_down: watch::Sender<bool>,
}

impl Conn {
    /// From now on this connection answers the check-backs of `producer_group`, until it
    /// closes. On a replicated node only the leader takes a checker (it alone checks
    /// back); the others answer `NOT_LEADER` with the leader's address, and a leader that
    /// steps down closes the connection.
    pub(super) fn register_checker(self: &Arc<Conn>, producer_group: String) -> Response {
        let checker = Arc::new(NetChecker {
            conn: Arc::downgrade(self),
        });
        let Some(node) = &self.replica else {
            return match self.broker.register_checker(&producer_group, checker) {
                Ok(id) => {
                    self.registered.lock().push((producer_group, id));
                    Response::Ok
                }
                Err(e) => Response::from_error(&e),
            };
        };
        let id = match super::replicated::register_checker(node, &producer_group, checker) {
            Ok(id) => id,
            Err(resp) => return resp,
        };
        let first = {
            let mut registered = self.registered.lock();
            registered.push((producer_group, id));
            registered.len() == 1
        };
        if first {
            let (node, conn) = (node.clone(), Arc::downgrade(self));
            tokio::spawn(async move {
                let lost = node.lost_leadership();
                tokio::pin!(lost);
                loop {
                    tokio::select! {
                        () = &mut lost => break,
                        // Ends with the connection (it holds no strong handle, which would
                        // keep the connection's writer open).
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            if conn.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
                if let Some(conn) = conn.upgrade() {
                    conn.stepped_down.send_replace(true);
                }
            });
        }
        Response::Ok
    }

    /// Undo this connection's checker registrations.
    fn unregister_checkers(&self) {
        for (group, id) in self.registered.lock().drain(..) {
            match &self.replica {
                Some(node) => node.unregister_checker(&group, id),
                None => self.broker.unregister_checker(&group, id),
            }
        }
    }
}

/// What ends a request's wait (a long poll): the server stopping, or the connection being
/// cut (nothing can be written to it any more).
#[derive(Clone)]
pub(super) struct Stop {
    server: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
}

impl Stop {
    pub(super) fn is_stopped(&self) -> bool {
        *self.server.borrow() || *self.cut.borrow()
    }

    /// Returns once the server stops or the connection is cut.
    pub(super) async fn stopped(&mut self) {
        tokio::select! {
            () = wait_true(&mut self.server) => {}
            () = wait_true(&mut self.cut) => {}
        }
    }
}

/// Returns once `rx` is true; never if its sender is gone without saying so.
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why the reader stopped.
enum Ending {
    /// The client closed its side, or the handshake failed (already answered).
    Closed,
    /// The server stops.
    Stopped,
    /// The writer failed or timed out: nothing more can be written.
    Cut,
    /// Nothing to do for `idle_timeout`.
    Idle,
    /// The node stopped leading, and this connection's checkers must find the new leader.
    SteppedDown,
    /// Bad input: the connection is closed after an error frame saying why.
    Bad(Error),
}

/// What the reader's wait for more bytes is timed against.
#[derive(Clone, Copy)]
enum Waiting {
    Frame,
    Hello,
    Idle,
}

pub(super) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    (broker, replica): (Arc<Broker>, Option<Arc<halfmq_raft::ReplicaNode>>),
    config: Arc<ServerConfig>,
    counters: Arc<NetCounters>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (mut rd, wr) = stream.into_split();
    let (out, out_rx) = Outbox::new(config.out_bytes_max, counters.clone());
    let (cut_tx, mut cut) = watch::channel(false);
    let in_flight = Arc::new(Semaphore::new(config.in_flight_max));
    let writer = tokio::spawn(write_loop(
        wr,
        out_rx,
        out.cutter(),
        config.write_timeout,
        shutdown.clone(),
        cut_tx,
        peer,
        counters.clone(),
        Owed(in_flight.clone(), config.in_flight_max),
    ));
    let stop = Stop {
        server: shutdown.clone(),
        cut: cut.clone(),
    };
    let (stepped_down, mut left) = watch::channel(false);
    let conn = Arc::new(Conn {
        broker,
        replica,
        config: config.clone(),
        out,
        checks: Mutex::new(HashMap::new()),
        next_push: AtomicU64::new(1),
        registered: Mutex::new(Vec::new()),
        stepped_down,
    });
    let mut buf = ReadBuf::new();
    let mut authed = false;
    let connected = Instant::now();
    let mut last_read = connected;
    let mut frame_started: Option<Instant> = None;
    let ending = loop {
        // Every complete frame in the buffer first.
        let next = match buf.next_frame(config.frame_bytes_max) {
            Ok(n) => n,
            Err(e) => break Ending::Bad(e),
        };
        if let Some(len) = next {
            // Decoded straight from the read buffer: the body is copied once, into the request.
            let decoded = match frame::parse_ref(&buf.pending()[..len]) {
                Ok(f) if f.kind == FrameKind::Request => {
                    protocol::decode::<Request>(f.body).map(|req| (f.correlation, req))
                }
                Ok(f) => Err(Error::Decode {
                    what: "frame",
                    reason: format!("a client may not send {:?} frames", f.kind),
                }),
                Err(e) => Err(e),
            };
            buf.consume(len);
            let (correlation, req) = match decoded {
                Ok(x) => x,
                Err(e) => break Ending::Bad(e),
            };
            if !authed {
                match &req {
                    Request::Hello { token, client } if token_ok(&config.token, token) => {
                        authed = true;
                        tracing::debug!(%peer, client, "client connected");
                        let resp = Response::Hello {
                            server: format!("halfmq {}", env!("CARGO_PKG_VERSION")),
                        };
                        send_response(&conn, correlation, &resp).await;
                        continue;
                    }
                    _ => {
                        let resp = Response::Error {
                            code: codes::UNAUTHORIZED,
                            message: "the first request must be Hello with the right token".into(),
                        };
                        send_response(&conn, correlation, &resp).await;
                        break Ending::Closed;
                    }
                }
            }
            if let Request::CheckAnswer { check, answer } = req {
                let waiting = conn.checks.lock().remove(&check);
                match waiting {
                    Some(tx) => {
                        let _ = tx.send(answer);
                    }
                    None => tracing::debug!(%peer, check, "answer for a check that is over"),
                }
                continue;
            }
            let permit = tokio::select! {
                p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break Ending::Closed },
                _ = shutdown.changed() => break Ending::Stopped,
                _ = cut.changed() => break Ending::Cut,
                _ = left.changed() => break Ending::SteppedDown,
            };
            let conn = conn.clone();
            let stop = stop.clone();
            // One task per request. A handler that panics still gets its request an answer:
            // the guard, dropped unanswered as the task unwinds, sends the error.
            let mut answer = Answer::new(
                conn.out.clone(),
                correlation,
                config.frame_bytes_max,
                permit,
            );
            tokio::spawn(async move {
                // Room for the answer before anything is done (a poll takes its own, see
                // `handle`): a client that does not read gets nothing more carried out.
                if let Some(room) = answer_room(&req, conn.config.frame_bytes_max) {
                    if !answer.reserve(room).await {
                        // Cut: no answer can be written, so the request is not carried out.
                        answer.abandon();
                        return;
                    }
                }
                let resp = handle(&conn, req, stop, &mut answer).await;
                answer.send(&resp).await;
            });
            continue;
        }
        // Need more bytes. A started frame must be complete within frame_timeout of its
        // first byte, the handshake within hello_timeout of the connection, and between
        // frames an authenticated connection may have nothing to do for idle_timeout.
        if buf.is_empty() {
            frame_started = None;
        } else if frame_started.is_none() {
            frame_started = Some(Instant::now());
        }
        let (deadline, waiting) = match (frame_started, authed) {
            (Some(t), _) => (t + config.frame_timeout, Waiting::Frame),
            (None, false) => (connected + config.hello_timeout, Waiting::Hello),
            (None, true) => (
                last_read.max(conn.out.written_at()) + config.idle_timeout,
                Waiting::Idle,
            ),
        };
        let read = tokio::time::timeout_at(deadline, buf.read_from(&mut rd));
        let r = tokio::select! {
            r = read => r,
            _ = shutdown.changed() => break Ending::Stopped,
            _ = cut.changed() => break Ending::Cut,
            _ = left.changed() => break Ending::SteppedDown,
        };
        match r {
            Ok(Ok(0)) => {
                break if buf.is_empty() {
                    Ending::Closed
                } else {
                    Ending::Bad(Error::Decode {
                        what: "frame",
                        reason: "connection closed in the middle of a frame".into(),
                    })
                };
            }
            Ok(Ok(_)) => last_read = Instant::now(),
            Ok(Err(e)) => break Ending::Bad(Error::io(peer.to_string(), "read", e)),
            Err(_) => match waiting {
                Waiting::Frame => {
                    break Ending::Bad(Error::Decode {
                        what: "frame",
                        reason: format!("frame not completed within {:?}", config.frame_timeout),
                    })
                }
                Waiting::Hello => {
                    break Ending::Bad(Error::Decode {
                        what: "frame",
                        reason: format!("no Hello within {:?}", config.hello_timeout),
                    })
                }
                Waiting::Idle => {
                    let busy = in_flight.available_permits() < config.in_flight_max
                        || conn.out.busy()
                        || !conn.registered.lock().is_empty();
                    if busy {
                        // Not idle: count again from now.
                        last_read = Instant::now();
                    } else if Instant::now()
                        >= last_read.max(conn.out.written_at()) + config.idle_timeout
                    {
                        break Ending::Idle;
                    }
                }
            },
        }
    };
    let result = match ending {
        Ending::Closed | Ending::Stopped | Ending::Cut => Ok(()),
        Ending::SteppedDown => {
            tracing::info!(%peer, "closing a checker's connection: this node stopped leading");
            Ok(())
        }
        Ending::Idle => {
            counters.idle_closed.fetch_add(1, Ordering::Relaxed);
            halfmq::metrics::connection_closed_by_broker("idle");
            tracing::debug!(%peer, "closing an idle connection");
            let resp = Response::Error {
                code: codes::IDLE,
                message: format!(
                    "closing the connection: nothing to do for {:?}",
                    config.idle_timeout
                ),
            };
            send_response(&conn, 0, &resp).await;
            Ok(())
        }
        Ending::Bad(e) => {
            // Tell the client why, then close this connection only.
            let resp = Response::Error {
                code: codes::BAD_FRAME,
                message: e.to_string(),
            };
            send_response(&conn, 0, &resp).await;
            tracing::debug!(%peer, error = %e, "closing a connection after bad input");
            Err(e)
        }
    };
    // Finish what is in flight, then stop the writer. Long polls end at once when the server
    // stops or the connection is cut; requests waiting for room end when it is cut, at most
    // write_timeout after the client last took a byte (or after the stop).
    let _ = in_flight.acquire_many(config.in_flight_max as u32).await;
    conn.unregister_checkers();
    conn.checks.lock().clear();
    drop(conn);
    let _ = writer.await;
    result
}

/// The requests of a connection not answered yet: the permits of its `in_flight` semaphore
/// that are taken (a request's permit goes back once its answer is queued).
struct Owed(Arc<Semaphore>, usize);

impl Owed {
    /// Whether some request still owes an answer, which the same event (a group commit) may
    /// be making ready now: then the writer waits for it to join its write, and otherwise a
    /// lone answer is written at once (see `stream::write_frames_gathering`).
    fn any(&self) -> bool {
        self.0.available_permits() < self.1
    }
}

/// Write the connection's frames until every sender is gone, each write taking at least a
/// byte within `limit` and, once the server stops, everything within `limit`. On failure
/// the connection is cut: no more room is handed out, the waits for it end, the queued
/// frames are dropped, the socket is reset, and `cut` says so.
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Queued>,
    cutter: Cutter,
    limit: Duration,
    mut shutdown: watch::Receiver<bool>,
    cut: watch::Sender<bool>,
    peer: SocketAddr,
    counters: Arc<NetCounters>,
    owed: Owed,
) {
    let mut wr = TimedWrite::new(wr, limit);
    let written = {
        let frames = stream::write_frames_gathering(&mut wr, &mut rx, || owed.any());
        let late = async {
            wait_true(&mut shutdown).await;
            tokio::time::sleep(limit).await;
        };
        tokio::select! {
            r = frames => r,
            () = late => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("answers not written within {limit:?} of the stop"),
            )),
        }
    };
    let Err(e) = written else {
        let _ = wr.get_mut().shutdown().await;
        return;
    };
    if e.kind() == io::ErrorKind::TimedOut {
        counters.write_timeouts.fetch_add(1, Ordering::Relaxed);
        halfmq::metrics::connection_closed_by_broker("write_timeout");
        tracing::warn!(%peer, error = %e, "cutting a connection whose client does not read");
    } else {
        tracing::debug!(%peer, error = %e, "writing to a connection failed");
    }
    cutter.cut();
    let _ = cut.send(true);
    // Reset rather than close: what the client never took is dropped by the kernel too.
    let _ = wr.get_mut().as_ref().set_zero_linger();
    rx.close();
    while rx.try_recv().is_ok() {}
}

fn token_ok(want: &Option<String>, got: &Option<String>) -> bool {
    match want {
        None => true,
        Some(w) => got.as_deref().is_some_and(|g| {
            // Compare in constant time for equal lengths.
            g.len() == w.len()
                && g.bytes()
                    .zip(w.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        }),
    }
}

/// The answer a request owes, the room taken for it, and its place among the connection's
/// requests in flight (the permit). Dropped without [`Answer::send`] (its handler panicked
/// and the task unwinds), it sends the error answer itself: at once if its room or the
/// outbox has enough, otherwise from a task of its own that waits for room, holding the
/// permit until then.
pub(super) struct Answer {
    out: Outbox,
    id: u64,
    frame_bytes_max: u32,
    room: Option<Room>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Answer {
    pub(super) fn new(
        out: Outbox,
        id: u64,
        frame_bytes_max: u32,
        permit: OwnedSemaphorePermit,
    ) -> Answer {
        Answer {
            out,
            id,
            frame_bytes_max,
            room: None,
            permit: Some(permit),
        }
    }

    /// Take room for an answer of `n` bytes (waiting for it), unless already held; false
    /// once the connection is cut.
    pub(super) async fn reserve(&mut self, n: usize) -> bool {
        if self.room.as_ref().is_some_and(|r| r.bytes() >= n) {
            return true;
        }
        self.room = None;
        self.room = self.out.reserve(n).await;
        self.room.is_some()
    }

    /// Give the room back (a long poll does while it waits).
    pub(super) fn release(&mut self) {
        self.room = None;
    }

    /// No answer will be sent (the connection is cut).
    pub(super) fn abandon(mut self) {
        self.permit = None;
    }

    pub(super) async fn send(mut self, resp: &Response) {
        if let Some(bytes) = response_frame(self.id, resp, self.frame_bytes_max) {
            match self.room.take() {
                Some(room) => self.out.send_in(room, bytes).await,
                None => self.out.send(bytes).await,
            };
        }
        // Answered: the permit goes back now and `drop` has nothing left to do.
        self.permit = None;
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let resp = Response::Error {
            code: Error::Poisoned(String::new()).code(),
            message: "the broker failed while handling this request".into(),
        };
        let Some(bytes) = response_frame(self.id, &resp, self.frame_bytes_max) else {
            return;
        };
        if let Err(bytes) = self.out.try_send_in(self.room.take(), bytes) {
            let out = self.out.clone();
            // The guard lives in a task on the runtime, so there is one to spawn on.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    out.send(bytes).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn send_response(conn: &Conn, id: u64, resp: &Response) {
    if let Some(bytes) = response_frame(id, resp, conn.config.frame_bytes_max) {
        conn.out.send(bytes).await;
    }
}

/// `resp` as a frame; if it cannot be encoded (too large), the error saying so instead.
fn response_frame(id: u64, resp: &Response, frame_bytes_max: u32) -> Option<Vec<u8>> {
    let bytes = match encode_frame(FrameKind::Response, id, resp, frame_bytes_max) {
        Ok(b) => b,
        Err(e) => {
            let fallback = Response::Error {
                code: e.code(),
                message: e.to_string(),
            };
            encode_frame(FrameKind::Response, id, &fallback, frame_bytes_max).ok()?
        }
    };
    Some(bytes)
}

/// Asks a connected producer about a transaction of its group.
struct NetChecker {
    conn: std::sync::Weak<Conn>,
}

impl TransactionChecker for NetChecker {
    fn check(&self, half: &HalfMessage) -> CheckAnswer {
        let Some(conn) = self.conn.upgrade() else {
            return CheckAnswer::Unknown;
        };
        let id = conn.next_push.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        conn.checks.lock().insert(id, tx);
        let push = Push::check(half);
        // Wait a little longer than the broker does, so that a silent client is recorded by
        // the broker as "no answer" rather than as "unknown".
        let timeout = conn.broker.config().txn.check_answer_timeout + Duration::from_secs(1);
        let sent = encode_frame(FrameKind::Push, id, &push, conn.config.frame_bytes_max)
            .ok()
            .is_some_and(|bytes| conn.out.try_send(bytes));
        drop(conn);
        let answer = if sent {
            rx.recv_timeout(timeout).unwrap_or(CheckAnswer::Unknown)
        } else {
            CheckAnswer::Unknown
        };
        if let Some(conn) = self.conn.upgrade() {
            conn.checks.lock().remove(&id);
        }
        answer
    }
}
