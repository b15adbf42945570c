//! The async client: one pipelined connection to a broker, with time-outs and reconnects.
//!
//! [`Client`] has every operation; [`Producer`], [`TransactionalProducer`], [`Consumer`] and
//! [`Admin`] are thin views of it for the usual roles. Requests carry correlation ids, so
//! many can be in flight on the one connection. When the connection breaks, requests in
//! flight fail with [`Error::Disconnected`] (for a write: outcome unknown) and the next
//! request reconnects, with backoff, re-registering transaction checkers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
use super::protocol::{self, Push, Request, Response, WireDelivery, WireGroup, WireMessage};
use super::stream::{self, ReadBuf};
use crate::broker::{DeadLetter, DelayedReceipt, HalfReceipt, NackOutcome, Replayed, SendReceipt};
use crate::error::{Error, Result};
use crate::meta::GroupSettings;
use crate::record::Properties;
use crate::txn::{
    CheckAnswer, HalfMessage, HalfOptions, TransactionChecker, TxnId, TxnInfo, TxnState,
};
use crate::Message;

/// Client settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Broker address. Default `127.0.0.1:10911`.
    pub addr: String,
    /// Shared secret, if the broker requires one.
    pub token: Option<String>,
    /// Name sent in the handshake, for the broker's logs.
    pub name: String,
    /// Time-out of each request. Default 30 s.
    pub request_timeout: Duration,
    /// Time-out of connecting (and the handshake). Default 5 s.
    pub connect_timeout: Duration,
    /// Largest frame. Default 4 MiB.
    pub frame_bytes_max: u32,
    /// Longest wait between reconnect attempts. Default 5 s.
    pub reconnect_backoff_max: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addr: "127.0.0.1:10911".into(),
            token: None,
            name: "halfmq-client".into(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            reconnect_backoff_max: Duration::from_secs(5),
        }
    }
}

struct Connection {
    out: mpsc::Sender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    closed: AtomicBool,
    closed_notify: tokio::sync::Notify,
    /// What the broker said when it closed the connection, if anything.
    close_reason: Mutex<Option<String>>,
}

struct Inner {
    config: ClientConfig,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    checkers: Mutex<Vec<(String, Arc<dyn TransactionChecker>)>>,
    next_id: AtomicU64,
    /// Consecutive failed connects, for the backoff.
    failures: AtomicU64,
}

/// A connection to a broker; cheap to clone.
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

fn disconnected(addr: &str, reason: impl Into<String>) -> Error {
    Error::Disconnected {
        addr: addr.to_owned(),
        reason: reason.into(),
    }
}

impl Client {
    /// Connect (and handshake) now, so that a wrong address or token fails here.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let client = Client {
            inner: Arc::new(Inner {
                config,
                conn: tokio::sync::Mutex::new(None),
                checkers: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                failures: AtomicU64::new(0),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The live connection, connecting first if there is none.
    async fn connection(&self) -> Result<Arc<Connection>> {
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
        match self.open().await {
            Ok(c) => {
                self.inner.failures.store(0, Ordering::Relaxed);
                *slot = Some(c.clone());
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
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(&cfg.addr))
            .await
            .map_err(|_| disconnected(&cfg.addr, "connect timed out"))?
            .map_err(|e| disconnected(&cfg.addr, e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(1024);
        let conn = Arc::new(Connection {
            out,
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closed_notify: tokio::sync::Notify::new(),
            close_reason: Mutex::new(None),
        });
        tokio::spawn(async move {
            let _ = stream::write_frames(&mut wr, &mut out_rx).await;
        });
        tokio::spawn(read_loop(rd, conn.clone(), self.clone()));
        let hello = Request::Hello {
            client: cfg.name.clone(),
            token: cfg.token.clone(),
        };
        match tokio::time::timeout(cfg.connect_timeout, self.call_on(&conn, hello)).await {
            Ok(Ok(Response::Hello { .. })) => Ok(conn),
            Ok(Ok(other)) => Err(disconnected(
                &cfg.addr,
                format!("unexpected handshake answer {other:?}"),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(disconnected(&cfg.addr, "handshake timed out")),
        }
    }

    async fn call_on(&self, conn: &Connection, req: Request) -> Result<Response> {
        self.call_on_ref(conn, &req, encoded_len_hint(&req)).await
    }

    /// Send `req` (a `Request`, or a borrowed form of one encoding to the same bytes) and
    /// wait for its answer. `len_hint`: about its encoded size.
    async fn call_on_ref<T: serde::Serialize>(
        &self,
        conn: &Connection,
        req: &T,
        len_hint: usize,
    ) -> Result<Response> {
        let cfg = &self.inner.config;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(frame::FRAME_HEADER_BYTES + len_hint);
        frame::encode_with(
            &mut bytes,
            FrameKind::Request,
            id,
            cfg.frame_bytes_max,
            |out| protocol::encode_append(req, out),
        )?;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        if conn.closed.load(Ordering::Acquire) || conn.out.send(bytes).await.is_err() {
            conn.pending.lock().remove(&id);
            return Err(disconnected(&cfg.addr, "connection closed"));
        }
        match tokio::time::timeout(cfg.request_timeout, rx).await {
            Ok(Ok(Response::Error { code, message })) => Err(Error::Remote { code, message }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => Err(disconnected(
                &cfg.addr,
                conn.close_reason
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "connection lost before the answer".into()),
            )),
            Err(_) => {
                conn.pending.lock().remove(&id);
                Err(Error::Timeout {
                    what: format!("request {id} to {}", cfg.addr),
                    after_ms: cfg.request_timeout.as_millis() as u64,
                })
            }
        }
    }

    /// Send a request and wait for its answer (connecting if needed).
    pub async fn call(&self, req: Request) -> Result<Response> {
        let conn = self.connection().await?;
        self.call_on(&conn, req).await
    }

    /// Wait until the current connection is lost (returns at once if there is none).
    pub async fn closed(&self) {
        let conn = self.inner.conn.lock().await.clone();
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

    /// Store a message durably.
    pub async fn send(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        // `Request::Send` without copying the message into one.
        let req = protocol::SendRef {
            topic,
            message: msg,
        };
        let conn = self.connection().await?;
        let hint = message_len_hint(topic, &msg.key, &msg.body, &msg.properties);
        match self.call_on_ref(&conn, &req, hint).await? {
            Response::Sent {
                topic,
                queue,
                offset,
                log_offset,
                duplicate,
            } => Ok(SendReceipt {
                topic,
                queue,
                offset,
                log_offset,
                duplicate,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Write a half message.
    pub async fn send_half(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<TxnId> {
        self.send_half_receipt(topic, msg, producer_group, opts)
            .await
            .map(|r| r.txn)
    }

    /// Write a half message; the receipt says whether its idempotency key was already
    /// stored (then `txn` is the original transaction and nothing was written).
    pub async fn send_half_receipt(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<HalfReceipt> {
        let req = Request::SendHalf {
            topic: topic.into(),
            message: wire(msg),
            producer_group: producer_group.into(),
            check_immunity_ms: opts.check_immunity.map_or(0, |d| d.as_millis() as u64),
        };
        match self.call(req).await? {
            Response::HalfSent { txn, duplicate } => Ok(HalfReceipt {
                txn: TxnId(txn),
                duplicate,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Commit a transaction.
    pub async fn commit(&self, txn: TxnId) -> Result<()> {
        expect_ok(self.call(Request::Commit { txn: txn.0 }).await?)
    }

    /// Roll back a transaction.
    pub async fn rollback(&self, txn: TxnId) -> Result<()> {
        expect_ok(self.call(Request::Rollback { txn: txn.0 }).await?)
    }

    /// Messages for `group`, waiting up to `wait` for one.
    pub async fn poll(
        &self,
        group: &str,
        topic: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<WireDelivery>> {
        let req = Request::Poll {
            group: group.into(),
            topic: topic.into(),
            max,
            wait_ms: wait.as_millis() as u64,
        };
        match self.call(req).await? {
            Response::Messages(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    /// Acknowledge messages: (queue, offset) pairs of one topic.
    pub async fn ack(&self, group: &str, topic: &str, acks: Vec<(u32, u64)>) -> Result<()> {
        expect_ok(
            self.call(Request::Ack {
                group: group.into(),
                topic: topic.into(),
                acks,
            })
            .await?,
        )
    }

    /// Store a message durably now, to be delivered to its topic at `deliver_at_ms` (ms
    /// since the Unix epoch).
    pub async fn send_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        let req = Request::SendDelayed {
            topic: topic.into(),
            message: wire(msg),
            deliver_at_ms,
        };
        match self.call(req).await? {
            Response::Delayed(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Give back a delivered message: it is delivered again after `delay` (or the group's
    /// retry backoff), or moves to the dead-letter queue past the group's maximum.
    pub async fn nack(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        delay: Option<Duration>,
    ) -> Result<NackOutcome> {
        let req = Request::Nack {
            group: group.into(),
            topic: topic.into(),
            queue,
            offset,
            delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        match self.call(req).await? {
            Response::Nacked(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `max` dead letters of `group` from dead-letter offset `from`.
    pub async fn dead_letters(&self, group: &str, from: u64, max: u32) -> Result<Vec<DeadLetter>> {
        let req = Request::DeadLetters {
            group: group.into(),
            from,
            max,
        };
        match self.call(req).await? {
            Response::DeadLetters(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// Send up to `max` not yet replayed dead letters of `group` back to their topics.
    pub async fn replay_dead_letters(&self, group: &str, max: u32) -> Result<Vec<Replayed>> {
        let req = Request::ReplayDeadLetters {
            group: group.into(),
            max,
        };
        match self.call(req).await? {
            Response::Replayed(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Override a group's delivery settings; returns the settings in force.
    pub async fn set_group(&self, group: &str, settings: GroupSettings) -> Result<WireGroup> {
        let req = Request::SetGroup {
            group: group.into(),
            settings,
        };
        match self.call(req).await? {
            Response::Group(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Forget a consumer group ([`crate::Broker::delete_group`]).
    pub async fn delete_group(&self, group: &str) -> Result<crate::broker::GroupDeleted> {
        match self
            .call(Request::DeleteGroup {
                group: group.into(),
            })
            .await?
        {
            Response::GroupDeleted(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// A group's delivery settings.
    pub async fn group(&self, group: &str) -> Result<WireGroup> {
        match self
            .call(Request::GetGroup {
                group: group.into(),
            })
            .await?
        {
            Response::Group(g) => Ok(g),
            other => Err(unexpected(other)),
        }
    }

    /// Create a topic.
    pub async fn create_topic(&self, name: &str, queues: u32) -> Result<()> {
        expect_ok(
            self.call(Request::CreateTopic {
                name: name.into(),
                queues,
            })
            .await?,
        )
    }

    /// Topics: (name, queues).
    pub async fn topics(&self) -> Result<Vec<(String, u32)>> {
        match self.call(Request::ListTopics).await? {
            Response::Topics(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Run one retention pass on the broker now; its report.
    pub async fn retention(&self) -> Result<crate::RetentionReport> {
        match self.call(Request::Retention).await? {
            Response::Retention(s) => serde_json::from_str(&s).map_err(|e| Error::Decode {
                what: "retention report",
                reason: e.to_string(),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Statistics as JSON (the document `halfmq stats --json` prints).
    pub async fn stats_json(&self) -> Result<String> {
        match self.call(Request::Stats).await? {
            Response::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Every event of every message with this key ([`crate::Broker::trace`]).
    pub async fn trace(&self, key: &str) -> Result<crate::trace::Trace> {
        let key = key.to_owned();
        match self.call(Request::Trace { key }).await? {
            Response::Trace(text) => serde_json::from_str(&text).map_err(|e| Error::Decode {
                what: "trace",
                reason: e.to_string(),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Unfinished transactions.
    pub async fn transactions(&self, state: Option<TxnState>) -> Result<Vec<TxnInfo>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            match self
                .call(Request::ListTxns {
                    state,
                    after,
                    max: 1000,
                })
                .await?
            {
                Response::Txns(page) if page.is_empty() => return Ok(all),
                Response::Txns(page) => {
                    after = page.last().map_or(u64::MAX, |t| t.txn_id.saturating_add(1));
                    all.extend(page);
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Where a transaction is.
    pub async fn transaction_state(&self, txn: TxnId) -> Result<TxnState> {
        match self.call(Request::TxnState { txn: txn.0 }).await? {
            Response::TxnState(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Check an unfinished transaction again now.
    pub async fn rearm(&self, txn: TxnId) -> Result<()> {
        expect_ok(self.call(Request::Rearm { txn: txn.0 }).await?)
    }

    /// Answer check-backs of `producer_group` with `checker` (kept across reconnects).
    pub async fn register_checker(
        &self,
        producer_group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<()> {
        self.inner
            .checkers
            .lock()
            .push((producer_group.to_owned(), checker));
        expect_ok(
            self.call(Request::RegisterChecker {
                producer_group: producer_group.into(),
            })
            .await?,
        )
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

/// About the encoded size of `req`, so that its frame is allocated once.
fn encoded_len_hint(req: &Request) -> usize {
    match req {
        Request::Send { topic, message: m }
        | Request::SendHalf {
            topic, message: m, ..
        }
        | Request::SendDelayed {
            topic, message: m, ..
        } => message_len_hint(topic, &m.key, &m.body, &m.properties) + 64,
        _ => 128,
    }
}

/// About the encoded size of a request carrying this message.
fn message_len_hint(topic: &str, key: &str, body: &[u8], properties: &Properties) -> usize {
    64 + topic.len()
        + key.len()
        + body.len()
        + properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
}

fn wire(msg: &Message) -> WireMessage {
    WireMessage {
        key: msg.key.clone(),
        body: msg.body.clone(),
        properties: msg.properties.clone(),
    }
}

fn unexpected(r: Response) -> Error {
    Error::Decode {
        what: "response",
        reason: format!("unexpected answer {r:?}"),
    }
}

fn expect_ok(r: Response) -> Result<()> {
    match r {
        Response::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

async fn read_loop(mut rd: tokio::net::tcp::OwnedReadHalf, conn: Arc<Connection>, client: Client) {
    let max = client.inner.config.frame_bytes_max;
    let mut buf = ReadBuf::new();
    'read: loop {
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
                        }
                        // Not an answer to a request: the broker says why it closes.
                        (None, Response::Error { code, message }) => {
                            *conn.close_reason.lock() =
                                Some(format!("broker error {code}: {message}"));
                        }
                        (None, _) => {}
                    }
                }
                FrameKind::Push => {
                    let Ok(Push::Check {
                        txn,
                        topic,
                        producer_group,
                        message,
                        created_ms,
                        checks,
                    }) = protocol::decode::<Push>(f.body)
                    else {
                        break 'read;
                    };
                    let half = HalfMessage {
                        txn_id: TxnId(txn),
                        topic,
                        key: message.key,
                        body: message.body,
                        properties: message.properties,
                        producer_group,
                        created_ms,
                        checks,
                    };
                    tokio::spawn(answer_check(
                        client.clone(),
                        conn.clone(),
                        f.correlation,
                        half,
                    ));
                }
                FrameKind::Request => break 'read,
            }
            buf.consume(len);
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

async fn answer_check(client: Client, conn: Arc<Connection>, check: u64, half: HalfMessage) {
    let answer = match client.checker_for(&half.producer_group) {
        Some(checker) => tokio::task::spawn_blocking(move || checker.check(&half))
            .await
            .unwrap_or(CheckAnswer::Unknown),
        None => CheckAnswer::Unknown,
    };
    let id = client.inner.next_id.fetch_add(1, Ordering::Relaxed);
    let Ok(body) = protocol::encode(&Request::CheckAnswer { check, answer }) else {
        return;
    };
    let mut bytes = Vec::new();
    if frame::encode_into(
        &mut bytes,
        FrameKind::Request,
        id,
        &body,
        client.inner.config.frame_bytes_max,
    )
    .is_ok()
    {
        let _ = conn.out.send(bytes).await;
    }
}

/// Sends messages.
#[derive(Debug, Clone)]
pub struct Producer {
    client: Client,
}

impl Producer {
    /// A producer on `client`.
    pub fn new(client: Client) -> Producer {
        Producer { client }
    }

    /// Store a message durably; the receipt says where.
    pub async fn send(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        self.client.send(topic, msg).await
    }

    /// Store a message durably now, to be delivered at `deliver_at_ms`.
    pub async fn send_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        self.client.send_delayed(topic, msg, deliver_at_ms).await
    }
}

/// Writes half messages, commits or rolls them back, and answers check-backs for its group.
#[derive(Debug, Clone)]
pub struct TransactionalProducer {
    client: Client,
    group: String,
}

impl TransactionalProducer {
    /// A transactional producer of `group`, answering its check-backs with `checker`.
    pub async fn new(
        client: Client,
        group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<Self> {
        client.register_checker(group, checker).await?;
        Ok(TransactionalProducer {
            client,
            group: group.to_owned(),
        })
    }

    /// Write a half message.
    pub async fn send_half(&self, topic: &str, msg: &Message, opts: HalfOptions) -> Result<TxnId> {
        self.client.send_half(topic, msg, &self.group, opts).await
    }

    /// Write a half message; says whether it was a duplicate of an idempotency key.
    pub async fn send_half_receipt(
        &self,
        topic: &str,
        msg: &Message,
        opts: HalfOptions,
    ) -> Result<HalfReceipt> {
        self.client
            .send_half_receipt(topic, msg, &self.group, opts)
            .await
    }

    /// Commit.
    pub async fn commit(&self, txn: TxnId) -> Result<()> {
        self.client.commit(txn).await
    }

    /// Roll back.
    pub async fn rollback(&self, txn: TxnId) -> Result<()> {
        self.client.rollback(txn).await
    }
}

/// Receives messages of a topic for a consumer group.
#[derive(Debug, Clone)]
pub struct Consumer {
    client: Client,
    group: String,
    topic: String,
}

impl Consumer {
    /// A consumer of `topic` in `group`.
    pub fn new(client: Client, group: &str, topic: &str) -> Consumer {
        Consumer {
            client,
            group: group.to_owned(),
            topic: topic.to_owned(),
        }
    }

    /// Up to `max` messages, waiting up to `wait` for the first.
    pub async fn poll(&self, max: u32, wait: Duration) -> Result<Vec<WireDelivery>> {
        self.client.poll(&self.group, &self.topic, max, wait).await
    }

    /// Acknowledge delivered messages.
    pub async fn ack(&self, deliveries: &[WireDelivery]) -> Result<()> {
        let acks = deliveries.iter().map(|d| (d.queue, d.offset)).collect();
        self.client.ack(&self.group, &self.topic, acks).await
    }

    /// Give back a delivered message: delivered again after `delay` (or the group's retry
    /// backoff when `None`); past the group's maximum it moves to the dead-letter queue.
    pub async fn nack(&self, d: &WireDelivery, delay: Option<Duration>) -> Result<NackOutcome> {
        self.client
            .nack(&self.group, &self.topic, d.queue, d.offset, delay)
            .await
    }
}

/// Topics, statistics and transactions.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    /// An admin view of `client`.
    pub fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// The client, for every operation.
    pub fn client(&self) -> &Client {
        &self.client
    }
}
