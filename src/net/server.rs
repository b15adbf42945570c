//! The network broker: a tokio accept loop serving an embedded [`Broker`].
//!
//! Each connection has a reader (frames in, one task per request so many can be in flight)
//! and a writer (frames out, from a bounded channel). Limits everywhere: frame size,
//! connections, requests in flight per connection, time to finish a started frame. Bad input
//! of any kind gets an error frame where possible and closes that one connection.
//!
//! A connection that registers as a checker for a producer group answers that group's
//! check-backs: the broker pushes a `Check` frame and waits for the `CheckAnswer` request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
use super::protocol::{self, codes, Push, Request, Response, WireDelivery, WireGroup, WireMessage};
use super::stream::{self, ReadBuf};
use crate::error::{Error, Result};
use crate::txn::{CheckAnswer, HalfMessage, HalfOptions, TransactionChecker, TxnId};
use crate::{Broker, Message};

/// Network settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to listen on. Default 127.0.0.1:10911.
    pub listen: SocketAddr,
    /// Shared secret every connection must present in its `Hello`. Required for a
    /// non-loopback address.
    pub token: Option<String>,
    /// Largest frame accepted or sent. Default 4 MiB.
    pub frame_bytes_max: u32,
    /// Most connections at once. Default 1024.
    pub connections_max: usize,
    /// Most requests in flight on one connection. Default 64.
    pub in_flight_max: usize,
    /// A frame that has started must be complete within this. Default 30 s.
    pub frame_timeout: Duration,
    /// A connection must have sent its Hello within this. Default 10 s.
    pub hello_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 10911)),
            token: None,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            connections_max: 1024,
            in_flight_max: 64,
            frame_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// Check the settings; a non-loopback address without a token is refused.
    pub fn validate(&self) -> Result<()> {
        if !self.listen.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            return Err(Error::Config {
                setting: "listen",
                reason: format!(
                    "{} is not a loopback address: set a token (--token or HALFMQ_TOKEN) so that \
                     only clients that know it can connect",
                    self.listen
                ),
            });
        }
        if self.frame_bytes_max < 64 * 1024 || self.frame_bytes_max > 64 * 1024 * 1024 {
            return Err(Error::Config {
                setting: "frame_bytes_max",
                reason: format!("{} is outside 64 KiB ..= 64 MiB", self.frame_bytes_max),
            });
        }
        if self.frame_timeout.is_zero() || self.hello_timeout.is_zero() {
            return Err(Error::Config {
                setting: "frame_timeout_ms",
                reason: "frame_timeout_ms and hello_timeout_ms must be > 0".into(),
            });
        }
        if self.connections_max == 0 || self.in_flight_max == 0 {
            return Err(Error::Config {
                setting: "connections_max",
                reason: "connections_max and in_flight_max must be > 0".into(),
            });
        }
        Ok(())
    }
}

/// A running server.
pub struct Server {
    local: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind and start serving `broker`.
    pub async fn start(broker: Arc<Broker>, config: ServerConfig) -> Result<Server> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io(config.listen.to_string(), "listen", e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io(config.listen.to_string(), "listen", e))?;
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, broker, Arc::new(config), rx));
        Ok(Server {
            local,
            shutdown,
            task,
        })
    }

    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stop accepting, let every connection finish its in-flight requests, and wait.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                if open.load(Ordering::Acquire) >= config.connections_max {
                    tracing::warn!(%peer, "refusing a connection: connections_max reached");
                    crate::metrics::connection_refused();
                    conns.spawn(refuse(stream, config.frame_bytes_max));
                    continue;
                }
                open.fetch_add(1, Ordering::AcqRel);
                crate::metrics::connection_opened();
                let (broker, config, open, shutdown) =
                    (broker.clone(), config.clone(), open.clone(), shutdown.clone());
                conns.spawn(async move {
                    if let Err(e) = serve_connection(stream, peer, broker, config, shutdown).await {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    open.fetch_sub(1, Ordering::AcqRel);
                    crate::metrics::connection_closed();
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    while conns.join_next().await.is_some() {}
}

async fn refuse(mut stream: TcpStream, frame_bytes_max: u32) {
    let resp = Response::Error {
        code: codes::TOO_MANY_CONNECTIONS,
        message: "too many connections".into(),
    };
    if let Ok(bytes) = encode_frame(FrameKind::Response, 0, &resp, frame_bytes_max) {
        let _ = stream.write_all(&bytes).await;
    }
}

fn encode_frame<T: serde::Serialize>(kind: FrameKind, id: u64, v: &T, max: u32) -> Result<Vec<u8>> {
    // Most answers are small (a `Sent` is about 40 bytes): one allocation, body in place.
    let mut out = Vec::with_capacity(128);
    frame::encode_with(&mut out, kind, id, max, |out| {
        protocol::encode_append(v, out)
    })?;
    Ok(out)
}

/// What the connection's tasks share.
struct Conn {
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    out: mpsc::Sender<Vec<u8>>,
    /// Check-backs waiting for this connection's answer: push id → reply channel.
    checks: Mutex<HashMap<u64, std::sync::mpsc::Sender<CheckAnswer>>>,
    next_push: AtomicU64,
    /// Checker registrations to undo when the connection ends: (group, id).
    registered: Mutex<Vec<(String, u64)>>,
}

async fn serve_connection(
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
struct Answer {
    out: mpsc::Sender<Vec<u8>>,
    id: u64,
    frame_bytes_max: u32,
    permit: Option<OwnedSemaphorePermit>,
}

impl Answer {
    fn new(
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

    async fn send(mut self, resp: &Response) {
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

fn to_message(m: WireMessage) -> Message {
    Message {
        key: m.key,
        body: m.body,
        properties: m.properties,
    }
}

fn result_response<T>(r: Result<T>, ok: impl FnOnce(T) -> Response) -> Response {
    match r {
        Ok(v) => ok(v),
        Err(e) => Response::from_error(&e),
    }
}

/// Run blocking broker work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(Error::Poisoned("a request handler panicked".into())))
}

async fn handle(conn: &Arc<Conn>, req: Request, mut shutdown: watch::Receiver<bool>) -> Response {
    let b = conn.broker.clone();
    match req {
        Request::Hello { .. } => Response::Hello {
            server: format!("halfmq {}", env!("CARGO_PKG_VERSION")),
        },
        Request::Send { topic, message } => {
            let r = b.send_async(&topic, &to_message(message)).await;
            result_response(r, |s| Response::Sent {
                topic: s.topic,
                queue: s.queue,
                offset: s.offset,
                log_offset: s.log_offset,
                duplicate: s.duplicate,
            })
        }
        Request::SendDelayed {
            topic,
            message,
            deliver_at_ms,
        } => result_response(
            b.send_delayed_async(&topic, &to_message(message), deliver_at_ms)
                .await,
            Response::Delayed,
        ),
        Request::SendHalf {
            topic,
            message,
            producer_group,
            check_immunity_ms,
        } => {
            let opts = HalfOptions {
                check_immunity: (check_immunity_ms > 0)
                    .then(|| Duration::from_millis(check_immunity_ms)),
            };
            let r = b
                .send_half_receipt_async(&topic, &to_message(message), &producer_group, opts)
                .await;
            result_response(r, |h| Response::HalfSent {
                txn: h.txn.0,
                duplicate: h.duplicate,
            })
        }
        Request::Commit { txn } => {
            result_response(b.commit_async(TxnId(txn)).await, |()| Response::Ok)
        }
        Request::Rollback { txn } => {
            result_response(b.rollback_async(TxnId(txn)).await, |()| Response::Ok)
        }
        Request::Poll {
            group,
            topic,
            max,
            wait_ms,
        } => {
            let max_bytes = conn.config.frame_bytes_max as usize - 64 * 1024;
            let poll = b.poll_wait_async(
                &group,
                &topic,
                (max as usize).min(POLL_MESSAGES_MAX),
                max_bytes,
                Duration::from_millis(wait_ms.min(60_000)),
            );
            // A long poll ends early (empty) when the broker stops. Waiting is the only await
            // point in it, so nothing has been handed out when it is cut short.
            let r = if *shutdown.borrow() {
                Ok(Vec::new())
            } else {
                tokio::select! {
                    r = poll => r,
                    _ = shutdown.changed() => Ok(Vec::new()),
                }
            };
            result_response(r, |ds| {
                Response::Messages(
                    ds.into_iter()
                        .map(|d| WireDelivery {
                            topic: d.topic,
                            queue: d.queue,
                            offset: d.offset,
                            log_offset: d.log_offset,
                            timestamp_ms: d.timestamp_ms,
                            message: WireMessage {
                                key: d.key,
                                body: d.body,
                                properties: d.properties,
                            },
                            attempt: d.attempt,
                        })
                        .collect(),
                )
            })
        }
        Request::Ack { group, topic, acks } => result_response(
            blocking(move || b.ack_many(&group, &topic, &acks)).await,
            |()| Response::Ok,
        ),
        Request::Nack {
            group,
            topic,
            queue,
            offset,
            delay_ms,
        } => result_response(
            blocking(move || {
                b.nack(
                    &group,
                    &topic,
                    queue,
                    offset,
                    delay_ms.map(Duration::from_millis),
                )
            })
            .await,
            Response::Nacked,
        ),
        Request::DeadLetters { group, from, max } => {
            // As many as fit in a frame: a dead letter's listing is small (no body).
            let max = (max as usize).clamp(1, 10_000);
            result_response(
                blocking(move || b.dead_letters(&group, from, max)).await,
                Response::DeadLetters,
            )
        }
        Request::ReplayDeadLetters { group, max } => {
            let max = (max as usize).clamp(1, 10_000);
            result_response(
                blocking(move || b.replay_dead_letters(&group, max)).await,
                Response::Replayed,
            )
        }
        Request::SetGroup { group, settings } => result_response(
            blocking(move || {
                b.set_group_settings(&group, &settings)
                    .map(|d| WireGroup::new(&d, settings))
            })
            .await,
            Response::Group,
        ),
        Request::DeleteGroup { group } => result_response(
            blocking(move || b.delete_group(&group)).await,
            Response::GroupDeleted,
        ),
        Request::GetGroup { group } => result_response(
            blocking(move || b.group_settings(&group).map(|(d, s)| WireGroup::new(&d, s))).await,
            Response::Group,
        ),
        Request::CreateTopic { name, queues } => result_response(
            blocking(move || b.create_topic(&name, queues)).await,
            |_| Response::Ok,
        ),
        Request::ListTopics => {
            Response::Topics(b.topics().into_iter().map(|t| (t.name, t.queues)).collect())
        }
        Request::Retention => {
            let r = blocking(move || b.enforce_retention())
                .await
                .and_then(|rep| {
                    serde_json::to_string(&rep).map_err(|e| Error::Invalid {
                        what: "retention report",
                        reason: e.to_string(),
                    })
                });
            result_response(r, Response::Retention)
        }
        Request::Stats => {
            let r = blocking(move || b.stats()).await.and_then(|s| {
                serde_json::to_string(&s).map_err(|e| Error::Invalid {
                    what: "stats",
                    reason: e.to_string(),
                })
            });
            result_response(r, Response::Stats)
        }
        Request::ListTxns { state, after, max } => {
            // One page: ids from `after` on, as many as fit in a frame.
            let room = conn.config.frame_bytes_max as usize - 64 * 1024;
            let mut bytes = 0;
            let mut page = Vec::new();
            for t in b
                .transactions(state)
                .into_iter()
                .filter(|t| t.txn_id >= after)
            {
                let size = t.topic.len()
                    + t.key.len()
                    + t.producer_group.len()
                    + t.last_answer.as_ref().map_or(0, String::len)
                    + 96;
                if page.len() >= max.clamp(1, 10_000) as usize
                    || (!page.is_empty() && bytes + size > room)
                {
                    break;
                }
                bytes += size;
                page.push(t);
            }
            Response::Txns(page)
        }
        Request::TxnState { txn } => result_response(
            blocking(move || b.transaction_state(TxnId(txn))).await,
            Response::TxnState,
        ),
        Request::Rearm { txn } => {
            result_response(blocking(move || b.rearm(TxnId(txn))).await, |()| {
                Response::Ok
            })
        }
        Request::RegisterChecker { producer_group } => {
            let checker = Arc::new(NetChecker {
                conn: Arc::downgrade(conn),
            });
            match b.register_checker(&producer_group, checker) {
                Ok(id) => {
                    conn.registered.lock().push((producer_group, id));
                    Response::Ok
                }
                Err(e) => Response::from_error(&e),
            }
        }
        Request::CheckAnswer { .. } => Response::Error {
            code: codes::BAD_REQUEST,
            message: "CheckAnswer is handled by the connection".into(),
        },
        Request::Trace { key } => {
            // Room for the frame's own header and the response envelope.
            let room = (conn.config.frame_bytes_max as usize).saturating_sub(64 * 1024);
            let r = blocking(move || b.trace(&key)).await.and_then(|t| {
                let text = serde_json::to_string(&t).map_err(|e| Error::Invalid {
                    what: "trace",
                    reason: e.to_string(),
                })?;
                if text.len() > room {
                    return Err(Error::Invalid {
                        what: "trace",
                        reason: format!(
                            "{} messages with this key do not fit in one answer ({} bytes); \
                             use `halfmq trace KEY --data-dir` on a stopped broker",
                            t.messages.len(),
                            text.len()
                        ),
                    });
                }
                Ok(text)
            });
            result_response(r, Response::Trace)
        }
    }
}

/// Most messages one poll answer carries.
const POLL_MESSAGES_MAX: usize = 10_000;

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
        let push = Push::Check {
            txn: half.txn_id.0,
            topic: half.topic.clone(),
            producer_group: half.producer_group.clone(),
            message: WireMessage {
                key: half.key.clone(),
                body: half.body.clone(),
                properties: half.properties.clone(),
            },
            created_ms: half.created_ms,
            checks: half.checks,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_of(bytes: &[u8]) -> (u64, Response) {
        let f = frame::parse_ref(bytes).unwrap();
        (f.correlation, protocol::decode(f.body).unwrap())
    }

    async fn panicking_handler(answer: Answer) {
        let _answer = answer;
        panic!("handler bug");
    }

    #[tokio::test]
    async fn a_handler_that_panics_still_answers() {
        for queue_full in [false, true] {
            let (out, mut rx) = mpsc::channel(1);
            if queue_full {
                out.send(b"earlier frame".to_vec()).await.unwrap();
            }
            let in_flight = Arc::new(Semaphore::new(1));
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let answer = Answer::new(out, 42, FRAME_BYTES_MAX_DEFAULT, permit);
            assert!(tokio::spawn(panicking_handler(answer)).await.is_err());
            if queue_full {
                // The answer waits for room, and so does the request's permit.
                assert_eq!(in_flight.available_permits(), 0);
                assert_eq!(rx.recv().await.unwrap(), b"earlier frame");
            }
            let (id, resp) = answer_of(&rx.recv().await.unwrap());
            assert_eq!(id, 42);
            assert!(
                matches!(resp, Response::Error { code, .. } if code == Error::Poisoned(String::new()).code()),
                "{resp:?}"
            );
            // The permit comes back once the answer is queued.
            let _ = in_flight.acquire().await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_answered_request_sends_one_frame_and_frees_its_permit() {
        let (out, mut rx) = mpsc::channel(4);
        let in_flight = Arc::new(Semaphore::new(1));
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        Answer::new(out, 7, FRAME_BYTES_MAX_DEFAULT, permit)
            .send(&Response::Ok)
            .await;
        assert_eq!(in_flight.available_permits(), 1);
        assert_eq!(answer_of(&rx.recv().await.unwrap()), (7, Response::Ok));
        assert!(rx.recv().await.is_none());
    }
}
