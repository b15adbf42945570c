//! One connection: read frames, check the handshake, start one task per request (at most
//! `in_flight_max` at once), write the answers, and close cleanly: on bad input after an
//! error frame saying why, on shutdown after the requests in flight are answered. Also the
//! check-back pushes of a connection registered as a producer group's checker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use halfmq::{Broker, CheckAnswer, Error, HalfMessage, Result, TransactionChecker};
use halfmq_client::frame::{self, FrameKind};
use halfmq_client::protocol::{self, codes, Push, Request, Response};
use halfmq_client::stream::{self, ReadBuf};

mod handlers;

use super::{encode_frame, ServerConfig};
use handlers::handle;

/// What the connection's tasks share.
pub(super) struct Conn {
    pub(super) broker: Arc<Broker>,
    pub(super) config: Arc<ServerConfig>,
    out: mpsc::Sender<Vec<u8>>,
    /// Check-backs waiting for this connection's answer: push id → reply channel.
    checks: Mutex<HashMap<u64, std::sync::mpsc::Sender<CheckAnswer>>>,
    next_push: AtomicU64,
    /// Checker registrations to undo when the connection ends: (group, id).
    registered: Mutex<Vec<(String, u64)>>,
}

impl Conn {
    /// From now on this connection answers the check-backs of `producer_group`, until it
    /// closes.
    pub(super) fn register_checker(self: &Arc<Conn>, producer_group: String) -> Result<()> {
        let checker = Arc::new(NetChecker {
            conn: Arc::downgrade(self),
        });
        let id = self.broker.register_checker(&producer_group, checker)?;
        self.registered.lock().push((producer_group, id));
        Ok(())
    }
}

pub(super) async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(config.in_flight_max * 2 + 8);
    let writer = tokio::spawn(async move {
        let _ = stream::write_frames(&mut wr, &mut out_rx).await;
        let _ = wr.shutdown().await;
    });
    let conn = Arc::new(Conn {
        broker,
        config: config.clone(),
        out,
        checks: Mutex::new(HashMap::new()),
        next_push: AtomicU64::new(1),
        registered: Mutex::new(Vec::new()),
    });
    let in_flight = Arc::new(Semaphore::new(config.in_flight_max));
    let mut buf = ReadBuf::new();
    let mut authed = false;
    let connected = tokio::time::Instant::now();
    let mut frame_started: Option<tokio::time::Instant> = None;
    let result = loop {
        // Every complete frame in the buffer first.
        let next = match buf.next_frame(config.frame_bytes_max) {
            Ok(n) => n,
            Err(e) => break Err(e),
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
                Err(e) => break Err(e),
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
                        break Ok(());
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
                p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break Ok(()) },
                _ = shutdown.changed() => break Ok(()),
            };
            let conn = conn.clone();
            let stop = shutdown.clone();
            // One task per request. A handler that panics still gets its request an answer:
            // the guard, dropped unanswered as the task unwinds, sends the error.
            let answer = Answer::new(
                conn.out.clone(),
                correlation,
                config.frame_bytes_max,
                permit,
            );
            tokio::spawn(async move {
                let resp = handle(&conn, req, stop).await;
                answer.send(&resp).await;
            });
            continue;
        }
        // Need more bytes. A started frame must be complete within frame_timeout of its
        // first byte, and the handshake within hello_timeout of the connection; between
        // frames an authenticated connection may idle as long as it likes.
        if buf.is_empty() {
            frame_started = None;
        } else if frame_started.is_none() {
            frame_started = Some(tokio::time::Instant::now());
        }
        let deadline = match (frame_started, authed) {
            (Some(t), _) => Some(t + config.frame_timeout),
            (None, false) => Some(connected + config.hello_timeout),
            (None, true) => None,
        };
        let read = buf.read_from(&mut rd);
        let timed = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, read).await,
                None => Ok(read.await),
            }
        };
        let r = tokio::select! {
            r = timed => r,
            _ = shutdown.changed() => break Ok(()),
        };
        match r {
            Ok(Ok(0)) => {
                break if buf.is_empty() {
                    Ok(())
                } else {
                    Err(Error::Decode {
                        what: "frame",
                        reason: "connection closed in the middle of a frame".into(),
                    })
                };
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(Error::io(peer.to_string(), "read", e)),
            Err(_) => {
                break Err(Error::Decode {
                    what: "frame",
                    reason: if frame_started.is_some() {
                        format!("frame not completed within {:?}", config.frame_timeout)
                    } else {
                        format!("no Hello within {:?}", config.hello_timeout)
                    },
                })
            }
        }
    };
    if let Err(e) = &result {
        // Tell the client why, then close this connection only.
        let resp = Response::Error {
            code: codes::BAD_FRAME,
            message: e.to_string(),
        };
        send_response(&conn, 0, &resp).await;
        tracing::debug!(%peer, error = %e, "closing a connection after bad input");
    }
    // Finish what is in flight, then stop the writer.
    let _ = in_flight.acquire_many(config.in_flight_max as u32).await;
    for (group, id) in conn.registered.lock().drain(..) {
        conn.broker.unregister_checker(&group, id);
    }
    conn.checks.lock().clear();
    drop(conn);
    let _ = writer.await;
    result
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

/// The answer a request owes, and its place among the connection's requests in flight
/// (the permit). Dropped without [`Answer::send`] (its handler panicked and the task
/// unwinds), it sends the error answer itself: at once if the outgoing queue has room,
/// otherwise from a task of its own that waits for room, holding the permit until then.
pub(super) struct Answer {
    out: mpsc::Sender<Vec<u8>>,
    id: u64,
    frame_bytes_max: u32,
    permit: Option<OwnedSemaphorePermit>,
}

impl Answer {
    pub(super) fn new(
        out: mpsc::Sender<Vec<u8>>,
        id: u64,
        frame_bytes_max: u32,
        permit: OwnedSemaphorePermit,
    ) -> Answer {
        Answer {
            out,
            id,
            frame_bytes_max,
            permit: Some(permit),
        }
    }

    pub(super) async fn send(mut self, resp: &Response) {
        let bytes = response_frame(self.id, resp, self.frame_bytes_max);
        if let Some(bytes) = bytes {
            let _ = self.out.send(bytes).await;
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
        match self.out.try_send(bytes) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(bytes)) => {
                let out = self.out.clone();
                // The guard lives in a task on the runtime, so there is one to spawn on.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = out.send(bytes).await;
                        drop(permit);
                    });
                }
            }
        }
    }
}

async fn send_response(conn: &Conn, id: u64, resp: &Response) {
    if let Some(bytes) = response_frame(id, resp, conn.config.frame_bytes_max) {
        let _ = conn.out.send(bytes).await;
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
            .is_some_and(|bytes| conn.out.try_send(bytes).is_ok());
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
