//! The connection under a [`Client`]: one TCP stream, requests pipelined on it by correlation
//! id, a reader task that hands each answer to its waiting request and answers check-backs,
//! and reconnects with backoff that register the transaction checkers again.
//!
//! With several addresses ([`ClientConfig::addr`] `A,B,C`, the nodes of a replicated
//! cluster) the client follows the leader: a connect that fails moves on to the next
//! address, and an answer `NOT_LEADER` (the request was not carried out) moves to the
//! leader it names, or to the next address while an election is under way, and the request
//! is made again there. Checkers are registered again on each new connection, so after the
//! leader dies they find the new one by themselves. A request whose fate is unknown (the
//! connection broke before its answer) is not made again: that is the caller's choice
//! (with an idempotency key it is safe).
//!
//! The operations themselves (send, poll, ack, ...) are in `client.rs`; this file knows
//! nothing of them but how to send a request and wait for its [`Response`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::config::ClientConfig;
use crate::frame::{self, FrameKind};
use crate::protocol::{self, Push, Request, Response};
use crate::stream::{self, ReadBuf};
use halfmq_types::error::{Error, Result};
use halfmq_types::{CheckAnswer, HalfMessage, TransactionChecker};

/// One open connection. When its reader stops (the broker closed it, bad bytes), it is
/// marked closed and every request waiting on it fails.
struct Connection {
    out: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    closed: AtomicBool,
    closed_notify: tokio::sync::Notify,
    /// What the broker said when it closed the connection, if anything.
    close_reason: Mutex<Option<String>>,
    /// The broker closed the connection as idle (error 105): it carried out no request of
    /// it that is still unanswered, so those may be sent again (PROTOCOL.md, "Idle
    /// time-out").
    closed_idle: AtomicBool,
    /// Answers the reader handed out from its last read: more than one, and their requesters
    /// may be about to send again, so the writer waits for them to join its write.
    answered_together: AtomicUsize,
    /// Told when the client leaves this connection for another node: the reader stops.
    leave: tokio::sync::Notify,
}

impl Connection {
    /// The client leaves this connection (for the leader): no request is sent on it any
    /// more, and its reader stops, which closes it once the requests on it are answered
    /// or failed.
    fn abandon(&self) {
        self.closed.store(true, Ordering::Release);
        self.closed_notify.notify_waiters();
        self.leave.notify_one();
    }

    /// Whether a request queued now may have company soon (see
    /// [`stream::write_frames_gathering`]): other requests are outstanding, or the last read
    /// released several requesters at once. A lone producer's request is written at once.
    fn more_may_come(&self) -> bool {
        self.answered_together.load(Ordering::Relaxed) > 1 || self.pending.lock().len() > 1
    }
}

struct Inner {
    config: ClientConfig,
    /// Held across a reconnect, so only one task reconnects at a time.
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The connection in `conn`, read without waiting: every request looks here first, so
    /// requests on a live connection never queue on the reconnect lock.
    live: Mutex<Option<Arc<Connection>>>,
    checkers: Mutex<Vec<(String, Arc<dyn TransactionChecker>)>>,
    /// The addresses of [`ClientConfig::addr`] (and leaders named that it did not list), and
    /// the one connected to or tried next.
    addrs: Mutex<(Vec<String>, usize)>,
    next_id: AtomicU64,
    /// Consecutive failed connects, for the backoff.
    failures: AtomicU64,
    /// Sends queued for automatic batching (`batcher.rs`).
    batcher: crate::batcher::lanes::Batcher,
}

/// A connection to a broker; cheap to clone (the clones share the connection).
///
/// Every operation of the embedded `Broker` that makes sense over the network is here, with
/// the same name and the same types, as an `async fn`. [`crate::Producer`],
/// [`crate::TransactionalProducer`], [`crate::Consumer`] and [`crate::Admin`] are thin views
/// of it for the usual roles.
///
/// Requests carry correlation ids, so many can be in flight on the one connection. When the
/// connection breaks, requests in flight fail with [`Error::Disconnected`] (for a write:
/// outcome unknown) and the next request reconnects, with backoff, registering the
/// transaction checkers again. A broker's error comes back as the same [`Error`] variant
/// ([`Error::from_wire`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.inner.config.addr)
            .finish()
    }
}

/// About the encoded size of a request carrying this message, so that its frame is allocated
/// once.
pub(crate) fn message_len_hint(
    topic: &str,
    key: &str,
    body: &[u8],
    properties: &halfmq_types::Properties,
) -> usize {
    128 + topic.len()
        + key.len()
        + body.len()
        + properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
}

/// Pause before asking again when a node knows no leader (an election is under way).
const ELECTION_PAUSE: Duration = Duration::from_millis(100);

/// Most times one request follows `NOT_LEADER` to another node.
const LEADER_HOPS_MAX: u32 = 16;

/// The addresses of [`ClientConfig::addr`]: comma-separated, blanks ignored.
fn split_addrs(addr: &str) -> Vec<String> {
    addr.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

fn disconnected(addr: &str, reason: impl Into<String>) -> Error {
    Error::Disconnected {
        addr: addr.to_owned(),
        reason: reason.into(),
    }
}

impl Client {
    /// Connect (and handshake) now, so that a wrong address or token fails here.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let addrs = split_addrs(&config.addr);
        let client = Client {
            inner: Arc::new(Inner {
                config,
                conn: tokio::sync::Mutex::new(None),
                live: Mutex::new(None),
                checkers: Mutex::new(Vec::new()),
                addrs: Mutex::new((addrs, 0)),
                next_id: AtomicU64::new(1),
                failures: AtomicU64::new(0),
                batcher: crate::batcher::lanes::Batcher::default(),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The sends queued for automatic batching.
    pub(crate) fn batcher(&self) -> &crate::batcher::lanes::Batcher {
        &self.inner.batcher
    }

    /// The live connection, connecting first if there is none.
    async fn connection(&self) -> Result<Arc<Connection>> {
        if let Some(c) = self.inner.live.lock().as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        // Boxed: the reconnect's state (connect, handshake, checkers) is large and rare, and
        // would otherwise make every request's future as large.
        Box::pin(self.reconnect()).await
    }

    /// Connect, unless another task did while this one waited for the lock.
    async fn reconnect(&self) -> Result<Arc<Connection>> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let failures = self.inner.failures.load(Ordering::Relaxed);
        if failures > 0 {
            let wait = Duration::from_millis(50u64.saturating_mul(1 << failures.min(10)))
                .min(self.inner.config.reconnect_backoff_max);
            tokio::time::sleep(wait).await;
        }
        // With several addresses: each once, and a few leader changes on top.
        let tries = match self.inner.addrs.lock().0.len() {
            0 | 1 => 1,
            n => n + 3,
        };
        let mut last = None;
        for _ in 0..tries {
            let c = match self.open().await {
                Ok(c) => c,
                Err(e) => {
                    self.move_on();
                    last = Some(e);
                    continue;
                }
            };
            self.inner.failures.store(0, Ordering::Relaxed);
            match self.register_checkers(&c).await {
                Ok(()) => {}
                // A node that does not lead takes no checker: follow it to the leader.
                Err(e) if self.follow(&e, &c).await => {
                    last = Some(e);
                    continue;
                }
                Err(e) => {
                    self.keep(&mut slot, &c);
                    return Err(e);
                }
            }
            self.keep(&mut slot, &c);
            return Ok(c);
        }
        self.inner.failures.fetch_add(1, Ordering::Relaxed);
        Err(last
            .unwrap_or_else(|| disconnected(&self.inner.config.addr, "no address to connect to")))
    }

    /// Make `c` the live connection.
    fn keep(&self, slot: &mut Option<Arc<Connection>>, c: &Arc<Connection>) {
        *slot = Some(c.clone());
        *self.inner.live.lock() = Some(c.clone());
    }

    /// Register the checkers kept on `c` (again, after a reconnect).
    async fn register_checkers(&self, c: &Connection) -> Result<()> {
        let groups: Vec<String> = self
            .inner
            .checkers
            .lock()
            .iter()
            .map(|(g, _)| g.clone())
            .collect();
        for producer_group in groups {
            self.call_on(c, Request::RegisterChecker { producer_group })
                .await?;
        }
        Ok(())
    }

    /// With several addresses, after error `e` on `conn`: if it is `NOT_LEADER`, leave
    /// `conn` for the leader it names (or, while there is none, for the next address after
    /// a pause for the election) and return true: the request was not carried out, and may
    /// be made again there. False for any other error, and with one address.
    async fn follow(&self, e: &Error, conn: &Connection) -> bool {
        let Some(leader) = protocol::leader_addr(e) else {
            return false;
        };
        {
            let mut a = self.inner.addrs.lock();
            if a.0.len() < 2 {
                return false;
            }
            match leader {
                Some(addr) => {
                    a.1 = match a.0.iter().position(|x| *x == addr) {
                        Some(i) => i,
                        None => {
                            a.0.push(addr);
                            a.0.len() - 1
                        }
                    };
                }
                None => a.1 = (a.1 + 1) % a.0.len(),
            }
        }
        conn.abandon();
        if protocol::leader_addr(e) == Some(None) {
            tokio::time::sleep(ELECTION_PAUSE).await;
        }
        true
    }

    /// Try the next address next time.
    fn move_on(&self) {
        let mut a = self.inner.addrs.lock();
        a.1 = (a.1 + 1) % a.0.len().max(1);
    }

    /// The address connected to, or tried next.
    fn addr(&self) -> String {
        let a = self.inner.addrs.lock();
        a.0.get(a.1)
            .cloned()
            .unwrap_or_else(|| self.inner.config.addr.clone())
    }

    async fn open(&self) -> Result<Arc<Connection>> {
        let cfg = &self.inner.config;
        let addr = self.addr();
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| disconnected(&addr, "connect timed out"))?
            .map_err(|e| disconnected(&addr, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(1024);
        let conn = Arc::new(Connection {
            out,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closed_notify: tokio::sync::Notify::new(),
            close_reason: Mutex::new(None),
            closed_idle: AtomicBool::new(false),
            answered_together: AtomicUsize::new(0),
            leave: tokio::sync::Notify::new(),
        });
        // A weak handle: the connection owns the writer's channel, which closes (ending the
        // writer) when the connection is dropped.
        let gather = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let more = || gather.upgrade().is_some_and(|c| c.more_may_come());
            let _ = stream::write_frames_gathering(&mut wr, &mut out_rx, more).await;
        });
        tokio::spawn(read_loop(rd, conn.clone(), self.clone()));
        let hello = Request::Hello {
            client: cfg.name.clone(),
            token: cfg.token.clone(),
        };
        match tokio::time::timeout(cfg.connect_timeout, self.call_on(&conn, hello)).await {
            Ok(Ok(Response::Hello { .. })) => Ok(conn),
            Ok(Ok(other)) => Err(disconnected(
                &addr,
                format!("unexpected handshake answer {other:?}"),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(disconnected(&addr, "handshake timed out")),
        }
    }

    async fn call_on(&self, conn: &Connection, req: Request) -> Result<Response> {
        let timeout = self.inner.config.request_timeout;
        self.call_on_ref(conn, &req, 128, timeout).await
    }

    /// The frame of request `req` with a new correlation id, allocated once: `len_hint` is
    /// about the body's encoded size.
    fn frame<T: serde::Serialize>(&self, req: &T, len_hint: usize) -> Result<(u64, Vec<u8>)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(frame::FRAME_HEADER_BYTES + len_hint);
        frame::encode_with(
            &mut bytes,
            FrameKind::Request,
            id,
            self.inner.config.frame_bytes_max,
            |out| protocol::encode_append(req, out),
        )?;
        Ok((id, bytes))
    }

    /// Send `req` (a `Request`, or a borrowed form of one encoding to the same bytes) and
    /// wait up to `timeout` for its answer. A broker's error answer is its [`Error`].
    async fn call_on_ref<T: serde::Serialize>(
        &self,
        conn: &Connection,
        req: &T,
        len_hint: usize,
        timeout: Duration,
    ) -> Result<Response> {
        let addr = &self.inner.config.addr;
        let (id, bytes) = self.frame(req, len_hint)?;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        if conn.closed.load(Ordering::Acquire) || conn.out.send(bytes).await.is_err() {
            conn.pending.lock().remove(&id);
            return Err(disconnected(addr, "connection closed"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Response::Error { code, message })) => Err(Error::from_wire(code, message)),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(disconnected(
                addr,
                conn.close_reason
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "connection lost before the answer".into()),
            )),
            Err(_) => {
                conn.pending.lock().remove(&id);
                Err(Error::Timeout {
                    what: format!("request {id} to {addr}"),
                    after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }

    /// Send a request (owned or borrowed, see [`Client::call`]) on the live connection,
    /// connecting first if needed, and wait up to the request time-out plus `extra` for its
    /// answer.
    pub(crate) async fn request<T: serde::Serialize>(
        &self,
        req: &T,
        len_hint: usize,
        extra: Duration,
    ) -> Result<Response> {
        let timeout = self.inner.config.request_timeout.saturating_add(extra);
        let mut hops = 0;
        loop {
            let conn = self.connection().await?;
            match self.call_on_ref(&conn, req, len_hint, timeout).await {
                // Written as the broker closed the connection for idleness: not carried out, so
                // sent again, once, on a new connection.
                Err(Error::Disconnected { .. }) if conn.closed_idle.load(Ordering::Acquire) => {
                    let conn = self.connection().await?;
                    return self.call_on_ref(&conn, req, len_hint, timeout).await;
                }
                // Refused by a node that does not lead: made again on the leader.
                Err(e) if hops < LEADER_HOPS_MAX && self.follow(&e, &conn).await => hops += 1,
                answer => return answer,
            }
        }
    }

    /// Send a request and wait for its answer (connecting if needed): the protocol itself,
    /// for what the typed methods do not cover. A `Response::Error` comes back as the
    /// broker's [`Error`].
    pub async fn call(&self, req: Request) -> Result<Response> {
        let hint = match &req {
            Request::Send { topic, message: m }
            | Request::SendHalf {
                topic, message: m, ..
            }
            | Request::SendDelayed {
                topic, message: m, ..
            } => message_len_hint(topic, &m.key, &m.body, &m.properties),
            _ => 128,
        };
        self.request(&req, hint, Duration::ZERO).await
    }

    /// Wait until the current connection is lost (returns at once if there is none).
    pub async fn closed(&self) {
        let conn = self.inner.live.lock().clone();
        let Some(conn) = conn else { return };
        loop {
            let n = conn.closed_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if conn.closed.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }

    /// Keep `checker` for `producer_group`'s check-backs, also across reconnects.
    pub(crate) fn keep_checker(&self, producer_group: &str, checker: Arc<dyn TransactionChecker>) {
        self.inner
            .checkers
            .lock()
            .push((producer_group.to_owned(), checker));
    }

    fn checker_for(&self, group: &str) -> Option<Arc<dyn TransactionChecker>> {
        self.inner
            .checkers
            .lock()
            .iter()
            .find(|(g, _)| g == group)
            .map(|(_, c)| c.clone())
    }
}

async fn read_loop(mut rd: tokio::net::tcp::OwnedReadHalf, conn: Arc<Connection>, client: Client) {
    let max = client.inner.config.frame_bytes_max;
    let mut buf = ReadBuf::new();
    'read: loop {
        let mut answered = 0;
        loop {
            let len = match buf.next_frame(max) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => break 'read,
            };
            let Ok(f) = frame::parse_ref(&buf.pending()[..len]) else {
                break 'read;
            };
            match f.kind {
                FrameKind::Response => {
                    let Ok(resp) = protocol::decode::<Response>(f.body) else {
                        break 'read;
                    };
                    let waiting = conn.pending.lock().remove(&f.correlation);
                    match (waiting, resp) {
                        (Some(tx), resp) => {
                            let _ = tx.send(resp);
                            answered += 1;
                        }
                        // Not an answer to a request: the broker says why it closes.
                        (None, Response::Error { code, message }) => {
                            if code == protocol::codes::IDLE {
                                conn.closed_idle.store(true, Ordering::Release);
                            }
                            *conn.close_reason.lock() =
                                Some(format!("broker error {code}: {message}"));
                        }
                        (None, _) => {}
                    }
                }
                FrameKind::Push => {
                    let Ok(push) = protocol::decode::<Push>(f.body) else {
                        break 'read;
                    };
                    tokio::spawn(answer_check(
                        client.clone(),
                        conn.clone(),
                        f.correlation,
                        push.into_half(),
                    ));
                }
                FrameKind::Request => break 'read,
            }
            buf.consume(len);
        }
        if answered > 0 {
            conn.answered_together.store(answered, Ordering::Relaxed);
        }
        let read = tokio::select! {
            r = buf.read_from(&mut rd) => r,
            () = conn.leave.notified() => break,
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    conn.closed.store(true, Ordering::Release);
    conn.pending.lock().clear();
    conn.closed_notify.notify_waiters();
}

/// Ask the checker registered for the half's group (`Unknown` without one, or if it
/// panics) and send the answer; it gets no response.
async fn answer_check(client: Client, conn: Arc<Connection>, check: u64, half: HalfMessage) {
    let answer = match client.checker_for(&half.producer_group) {
        Some(checker) => tokio::task::spawn_blocking(move || checker.check(&half))
            .await
            .unwrap_or(CheckAnswer::Unknown),
        None => CheckAnswer::Unknown,
    };
    if let Ok((_, bytes)) = client.frame(&Request::CheckAnswer { check, answer }, 32) {
        let _ = conn.out.send(bytes).await;
    }
}

#[cfg(test)]
pub(crate) mod tests;
