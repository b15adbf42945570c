//! The connection under a [`Client`]: one TCP stream, requests pipelined on it by correlation
//! id, a reader task that hands each answer to its waiting request and answers check-backs,
//! and reconnects with backoff that register the transaction checkers again; with several
//! addresses (a replicated cluster), each request follows the leader (the decisions are in
//! `follow.rs`).
//!
//! The operations themselves (send, poll, ack, ...) are in `client.rs`; this file knows
//! nothing of them but how to send a request and wait for its [`Response`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::follow::{self, Addrs, KeyMaker, Step};
use crate::frame::{self, FrameKind};
use crate::protocol::{self, Push, Request, Response};
use crate::stream::{self, ReadBuf};
use halfmq_types::error::{Error, Result};
use halfmq_types::{CheckAnswer, HalfMessage, Message, TransactionChecker};

/// One open connection. When its reader stops (the broker closed it, bad bytes), it is
/// marked closed and every request waiting on it fails.
struct Connection {
    /// The broker's address.
    addr: String,
    /// The generation of the client's addresses ([`Addrs`]) it was opened under: once the
    /// client asks another address, it is retired.
    generation: u64,
    /// The reader and writer tasks, aborted when the connection is retired (which closes
    /// its socket).
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
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
}

impl Connection {
    /// Whether a request queued now may have company soon (see
    /// [`stream::write_frames_gathering`]): other requests are outstanding, or the last read
    /// released several requesters at once. A lone producer's request is written at once.
    fn more_may_come(&self) -> bool {
        self.answered_together.load(Ordering::Relaxed) > 1 || self.pending.lock().len() > 1
    }

    /// Mark closed, fail the requests still waiting, and stop the reader and the writer,
    /// which closes the socket.
    fn shut(&self) {
        self.closed.store(true, Ordering::Release);
        self.pending.lock().clear();
        self.closed_notify.notify_waiters();
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }

    /// Close a connection the client no longer uses (it asks another address now) once
    /// its requests in flight were answered, or after `wait`.
    fn retire(self: Arc<Self>, wait: Duration) {
        tokio::spawn(async move {
            let until = Instant::now() + wait;
            while !self.pending.lock().is_empty()
                && !self.closed.load(Ordering::Acquire)
                && Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.shut();
        });
    }
}

struct Inner {
    config: ClientConfig,
    /// The addresses of [`ClientConfig::addr`] and which one is asked.
    addrs: Mutex<Addrs>,
    /// The configuration names several addresses: the client follows the leader among them,
    /// and sends without an idempotency key get one.
    follows: bool,
    /// The keys of [`Client::keyed`].
    keys: KeyMaker,
    /// Held across a reconnect, so only one task reconnects at a time.
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The connection in `conn`, read without waiting: every request looks here first, so
    /// requests on a live connection never queue on the reconnect lock.
    live: Mutex<Option<Arc<Connection>>>,
    checkers: Mutex<Vec<(String, Arc<dyn TransactionChecker>)>>,
    next_id: AtomicU64,
    /// Consecutive failed connects, for the backoff.
    failures: AtomicU64,
    /// Sends queued for automatic batching (`batcher.rs`).
    batcher: crate::batcher::lanes::Batcher,
}

impl Drop for Inner {
    /// The last handle of the client is gone: close its connection (its reader and writer
    /// tasks hold it, not the client, so they would keep the socket open).
    fn drop(&mut self) {
        for conn in [self.live.get_mut().take(), self.conn.get_mut().take()]
            .into_iter()
            .flatten()
        {
            conn.shut();
        }
    }
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
///
/// With several addresses ([`ClientConfig::addr`] `"A,B,C"`, the nodes of a replicated
/// cluster) the client follows the leader (with one, it talks to that broker alone and
/// every error, "not the leader" too, is the caller's): a request answered "not the leader" is made
/// again on the leader the answer names (or, with none known, on the next address after a
/// short pause); a node that cannot be reached is left for the next address; a request
/// whose fate is unknown (its node went away or could not get it confirmed) is made again
/// on the next address only when that cannot do it twice: a send with an idempotency key,
/// a commit or rollback, a read. Every send without an idempotency key gets one
/// ([`Client::keyed`]), so a failover neither loses nor duplicates an acknowledged send.
/// All of it within [`ClientConfig::failover_timeout`] per request; each attempt has the
/// request time-out.
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

fn disconnected(addr: &str, reason: impl Into<String>) -> Error {
    Error::Disconnected {
        addr: addr.to_owned(),
        reason: reason.into(),
    }
}

impl Client {
    /// Connect (and handshake) now, so that a wrong address or token fails here.
    /// With several addresses, the first that answers (within
    /// [`ClientConfig::failover_timeout`]).
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let addrs = Addrs::parse(&config.addr);
        let client = Client {
            inner: Arc::new(Inner {
                config,
                follows: addrs.len() > 1,
                addrs: Mutex::new(addrs),
                keys: KeyMaker::new(),
                conn: tokio::sync::Mutex::new(None),
                live: Mutex::new(None),
                checkers: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                failures: AtomicU64::new(0),
                batcher: crate::batcher::lanes::Batcher::default(),
            }),
        };
        let start = Instant::now();
        let mut tried = follow::Tried::default();
        loop {
            let (asked, generation) = client.inner.addrs.lock().current()?;
            let e = match client.connection().await {
                Ok(_) => return Ok(client),
                Err(e) => e,
            };
            tried.note(&asked, &e);
            let step = follow::step_after(&e, false, false, client.inner.follows);
            if step == Step::Fail || start.elapsed() >= client.inner.config.failover_timeout {
                return Err(tried.give_up(e, start.elapsed()));
            }
            client.inner.addrs.lock().step(generation, &step);
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The sends queued for automatic batching.
    pub(crate) fn batcher(&self) -> &crate::batcher::lanes::Batcher {
        &self.inner.batcher
    }

    /// `msg`, with an idempotency key made for it (`hmq-<random client id>-<counter>`, kept
    /// as the property consumers see) when the client has several addresses and it carries
    /// none: a send made again on a new leader is then stored once.
    pub fn keyed<'m>(&self, msg: &'m Message) -> Cow<'m, Message> {
        if self.inner.follows && msg.idempotency_key().is_none() {
            Cow::Owned(msg.clone().with_idempotency_key(self.inner.keys.key()))
        } else {
            Cow::Borrowed(msg)
        }
    }

    /// True when the connection is open and to the address asked now.
    fn usable(&self, c: &Connection) -> bool {
        !c.closed.load(Ordering::Acquire) && c.generation == self.inner.addrs.lock().generation()
    }

    /// The live connection, connecting first if there is none.
    async fn connection(&self) -> Result<Arc<Connection>> {
        let live = self.inner.live.lock().clone();
        if let Some(c) = live {
            if self.usable(&c) {
                return Ok(c);
            }
        }
        // Boxed: the reconnect's state (connect, handshake, checkers) is large and rare, and
        // would otherwise make every request's future as large.
        Box::pin(self.reconnect()).await
    }

    /// Connect, unless another task did while this one waited for the lock.
    async fn reconnect(&self) -> Result<Arc<Connection>> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.take() {
            if self.usable(&c) {
                *slot = Some(c.clone());
                return Ok(c);
            }
            // Open, but to an address no longer asked: its requests in flight (a long poll
            // at most) are still answered there.
            let cfg = &self.inner.config;
            let wait = cfg.request_timeout.saturating_add(Duration::from_secs(60));
            *self.inner.live.lock() = None;
            c.retire(wait);
        }
        // Backoff once every address failed, growing with each round that failed.
        let rounds = self.inner.failures.load(Ordering::Relaxed)
            / u64::try_from(self.inner.addrs.lock().len().max(1)).unwrap_or(1);
        if rounds > 0 {
            let wait = Duration::from_millis(50u64.saturating_mul(1 << rounds.min(10)))
                .min(self.inner.config.reconnect_backoff_max);
            tokio::time::sleep(wait).await;
        }
        match self.open().await {
            Ok(c) => {
                self.inner.failures.store(0, Ordering::Relaxed);
                *slot = Some(c.clone());
                *self.inner.live.lock() = Some(c.clone());
                drop(slot);
                // Checkers registered before a reconnect are registered again.
                let groups: Vec<String> = self
                    .inner
                    .checkers
                    .lock()
                    .iter()
                    .map(|(g, _)| g.clone())
                    .collect();
                for producer_group in groups {
                    self.call_on(&c, Request::RegisterChecker { producer_group })
                        .await?;
                }
                Ok(c)
            }
            Err(e) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn open(&self) -> Result<Arc<Connection>> {
        let cfg = &self.inner.config;
        let (addr, generation) = self.inner.addrs.lock().current()?;
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| disconnected(&addr, "connect timed out"))?
            .map_err(|e| disconnected(&addr, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(1024);
        let conn = Arc::new(Connection {
            addr,
            generation,
            tasks: Mutex::new(Vec::new()),
            out,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closed_notify: tokio::sync::Notify::new(),
            close_reason: Mutex::new(None),
            closed_idle: AtomicBool::new(false),
            answered_together: AtomicUsize::new(0),
        });
        // A weak handle: the connection owns the writer's channel, which closes (ending the
        // writer) when the connection is dropped.
        let gather = Arc::downgrade(&conn);
        let writer = tokio::spawn(async move {
            let more = || gather.upgrade().is_some_and(|c| c.more_may_come());
            let _ = stream::write_frames_gathering(&mut wr, &mut out_rx, more).await;
        });
        // The reader holds the client weakly: a client dropped by every owner closes its
        // connection (`Inner`'s drop), instead of living on in its own reader task.
        let reader = tokio::spawn(read_loop(
            rd,
            conn.clone(),
            Arc::downgrade(&self.inner),
            cfg.frame_bytes_max,
        ));
        *conn.tasks.lock() = vec![writer.abort_handle(), reader.abort_handle()];
        let hello = Request::Hello {
            client: cfg.name.clone(),
            token: cfg.token.clone(),
        };
        match tokio::time::timeout(cfg.connect_timeout, self.call_on(&conn, hello)).await {
            Ok(Ok(Response::Hello { .. })) => Ok(conn),
            Ok(Ok(other)) => Err(disconnected(
                &conn.addr,
                format!("unexpected handshake answer {other:?}"),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(disconnected(&conn.addr, "handshake timed out")),
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
        let addr = &conn.addr;
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
    /// answer; following the leader (see [`Client`]) within
    /// [`ClientConfig::failover_timeout`]. `resend`: the request may be made again when its
    /// fate is unknown ([`follow::may_resend`]).
    pub(crate) async fn request<T: serde::Serialize>(
        &self,
        req: &T,
        len_hint: usize,
        extra: Duration,
        resend: bool,
    ) -> Result<Response> {
        let start = Instant::now();
        let timeout = self.inner.config.request_timeout.saturating_add(extra);
        let mut tried = follow::Tried::default();
        loop {
            let (asked, generation) = self.inner.addrs.lock().current()?;
            let (e, sent) = match self.connection().await {
                Ok(conn) => match self.request_on(&conn, req, len_hint, timeout).await {
                    Ok(r) => return Ok(r),
                    Err(e) => (e, true),
                },
                Err(e) => {
                    tried.note(&asked, &e);
                    (e, false)
                }
            };
            let step = follow::step_after(&e, sent, resend, self.inner.follows);
            // Only a request that never left names every address: one sent keeps its own
            // error (its fate is what the caller must know).
            let give_up = |e| {
                if sent {
                    e
                } else {
                    tried.give_up(e, start.elapsed())
                }
            };
            let pause = match &step {
                Step::Fail => return Err(give_up(e)),
                // A node naming itself the leader it is not (its view is changing): not at
                // once again.
                Step::GoTo(addr) if *addr == asked => follow::ELECTION_PAUSE,
                Step::GoTo(_) => Duration::ZERO,
                Step::MoveOn { pause } => *pause,
            };
            if start.elapsed() + pause >= self.inner.config.failover_timeout {
                return Err(give_up(e));
            }
            tracing::debug!(error = %e, ?step, "following the leader");
            self.inner.addrs.lock().step(generation, &step);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// [`Client::request`]'s one attempt on `conn`.
    async fn request_on<T: serde::Serialize>(
        &self,
        conn: &Arc<Connection>,
        req: &T,
        len_hint: usize,
        timeout: Duration,
    ) -> Result<Response> {
        match self.call_on_ref(conn, req, len_hint, timeout).await {
            // Written as the broker closed the connection for idleness: not carried out, so
            // sent again, once, on a new connection.
            Err(Error::Disconnected { .. }) if conn.closed_idle.load(Ordering::Acquire) => {
                let conn = self.connection().await?;
                self.call_on_ref(&conn, req, len_hint, timeout).await
            }
            answer => answer,
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
        let resend = follow::may_resend(&req);
        self.request(&req, hint, Duration::ZERO, resend).await
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

async fn read_loop(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    conn: Arc<Connection>,
    client: std::sync::Weak<Inner>,
    max: u32,
) {
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
                    // A check-back for a client nobody holds any more: nothing to ask.
                    let Some(inner) = client.upgrade() else {
                        break 'read;
                    };
                    tokio::spawn(answer_check(
                        Client { inner },
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
        match buf.read_from(&mut rd).await {
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
