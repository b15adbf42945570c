//! The embedded broker: topics, sends, consumer groups with durable offsets.
//!
//! `Broker` ties the storage engine ([`crate::store::Store`]) to the metadata in sled
//! ([`crate::meta::Meta`]). It is what an application embeds, and what the network broker
//! serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::config::{BrokerConfig, TxnConfig, QUEUES_MAX};
use crate::error::{Error, Result};
use crate::meta::{Meta, TopicConfig};
use crate::record::{self, Properties, RecordKind, RecordView, FLAG_TXN_COMMIT};
use crate::store::consume_queue::{key_hash, ConsumeQueue};
use crate::store::io::{FsStorage, Storage};
use crate::store::{validate_topic_name, Append, RecoveryReport, Store, StoreHooks};
use crate::txn::checker::{CheckPool, CheckerThread};
use crate::txn::{
    HalfMessage, HalfOptions, Outcome, TransactionChecker, TxnId, TxnIndex, TxnInfo, TxnState,
    PROP_CHECK_IMMUNITY_MS, PROP_PRODUCER_GROUP, PROP_TXN, RESERVED_PREFIX,
};

/// A message to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Key: messages with the same key go to the same queue, in order. Also what `trace`
    /// looks up. Empty means no key.
    pub key: String,
    /// Payload.
    pub body: Vec<u8>,
    /// User properties.
    pub properties: Properties,
}

impl Message {
    /// A message with this body and no key.
    pub fn new(body: impl Into<Vec<u8>>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// Set the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.key = key.into();
        self
    }

    /// Add a property.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.insert(name.into(), value.into());
        self
    }
}

/// Where a sent message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SendReceipt {
    /// The topic.
    pub topic: String,
    /// The queue within the topic.
    pub queue: u32,
    /// Its offset in that queue.
    pub offset: u64,
    /// Its position in the commit log.
    pub log_offset: u64,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The topic.
    pub topic: String,
    /// The queue within the topic.
    pub queue: u32,
    /// Offset in the queue: what to ack.
    pub offset: u64,
    /// Position in the commit log.
    pub log_offset: u64,
    /// Key ("" for none).
    pub key: String,
    /// Payload.
    pub body: Vec<u8>,
    /// User properties.
    pub properties: Properties,
    /// When it was stored, ms since the Unix epoch.
    pub timestamp_ms: u64,
}

/// A topic and its queues.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Number of queues.
    pub queues: u32,
}

/// Per-queue figures for [`Broker::stats`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Topic.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
    /// Messages stored (the queue's end offset).
    pub messages: u64,
    /// Per consumer group: (group, committed offset, backlog = messages not yet acked).
    pub groups: Vec<GroupLag>,
}

/// One consumer group's position in one queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupLag {
    /// Group name.
    pub group: String,
    /// Every message before this offset is acked.
    pub committed: u64,
    /// Messages of the queue the group has not acked.
    pub backlog: u64,
    /// Messages from the committed offset to the end of the queue: at least the backlog,
    /// more when later messages were acked before an earlier one.
    #[serde(default)]
    pub lag: u64,
    /// Age of the oldest message the group has not acked (now minus its store timestamp),
    /// ms; `None` when everything is acked.
    #[serde(default)]
    pub oldest_unacked_age_ms: Option<u64>,
}

/// Figures for people and monitoring.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// The commit log.
    pub log: crate::store::LogStats,
    /// Every queue of every topic.
    pub queues: Vec<QueueStats>,
    /// Transactions waiting for an outcome.
    pub txn_pending: u64,
    /// Transactions checked `check_max` times without an answer (need a person).
    pub txn_unresolved: u64,
}

struct Topic {
    name: String,
    queues: Vec<Arc<ConsumeQueue>>,
    round_robin: AtomicU32,
    counters: crate::metrics::TopicCounters,
}

/// In-memory state of one group in one queue.
#[derive(Debug, Default)]
struct Cursor {
    /// Durable: every message before this is acked.
    committed: u64,
    /// Durable: acked messages at or after `committed`.
    acked_above: BTreeSet<u64>,
    /// Next message to hand out (in memory only: after a restart, delivery resumes at
    /// `committed`, so un-acked messages are delivered again).
    next: u64,
}

/// (group, topic).
type GroupKey = (String, String);

struct GroupTopic {
    cursors: Vec<Cursor>,
    /// Queue to start the next poll at, so no queue starves.
    start: usize,
}

/// The embedded broker. All methods take `&self`; share it with an `Arc`.
pub struct Broker {
    config: BrokerConfig,
    // Field order matters on drop: `meta` before `store`, so that the last handle on sled
    // (held by the store's checkpoint hooks) goes away inside the store's drop, before it
    // releases the directory lock. Otherwise a new opener could take the lock while sled
    // is still open.
    meta: Arc<Meta>,
    store: Store,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    groups: Mutex<HashMap<GroupKey, Arc<Mutex<GroupTopic>>>>,
    recovery: RecoveryReport,
    txns: Arc<TxnIndex>,
    /// Transaction checkers by producer group: (registration id, checker).
    checkers: RwLock<HashMap<String, Vec<Registered>>>,
    checker_ids: AtomicU64,
    checker_rr: AtomicUsize,
    check_thread: Mutex<Option<CheckerThread>>,
    check_pool: CheckPool,
}

/// The record that ends a transaction, ready to append.
struct EndRecord {
    info: TxnInfo,
    outcome: Outcome,
    props: Vec<u8>,
    body: Vec<u8>,
    /// The consume queue a commit is indexed in.
    queue: Option<Arc<ConsumeQueue>>,
}

impl EndRecord {
    fn append(&self) -> Append<'_> {
        let committed = self.outcome == Outcome::Committed;
        Append {
            kind: if committed {
                RecordKind::Message
            } else {
                RecordKind::TxnEnd
            },
            flags: if committed { FLAG_TXN_COMMIT } else { 0 },
            topic: &self.info.topic,
            queue_id: self.info.queue,
            key: &self.info.key,
            props: &self.props,
            body: &self.body,
            timestamp_ms: now_ms(),
            dispatch_to: self.queue.as_ref(),
        }
    }

    /// Mark the transaction finished in the index once the record is durable.
    fn hook(&self, txns: &Arc<TxnIndex>) -> crate::store::DurableHook {
        let (txns, txn, outcome) = (txns.clone(), self.info.txn_id, self.outcome);
        Box::new(move |_| txns.resolve(txn, outcome, now_ms()))
    }
}

/// A registered checker: (registration id, checker).
type Registered = (u64, Arc<dyn TransactionChecker>);

/// Persists the transaction index before every checkpoint.
struct TxnHooks {
    txns: Arc<TxnIndex>,
    meta: Arc<Meta>,
    retention: Duration,
}

impl StoreHooks for TxnHooks {
    fn before_checkpoint(&self) -> Result<()> {
        self.txns.persist(&self.meta, self.retention, now_ms())
    }
}

/// Turn a half record into the index entry of its transaction.
fn txn_info_of(view: &RecordView<'_>, cfg: &TxnConfig) -> Result<TxnInfo> {
    let props = view.properties()?;
    let immunity_ms = props
        .get(PROP_CHECK_IMMUNITY_MS)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let first_check = (cfg.timeout.as_millis() as u64).max(immunity_ms);
    Ok(TxnInfo {
        txn_id: view.header.log_offset,
        state: TxnState::Pending,
        topic: view.topic.to_owned(),
        queue: view.header.queue_id,
        key: view.key.to_owned(),
        producer_group: props.get(PROP_PRODUCER_GROUP).cloned().unwrap_or_default(),
        size: 0,
        created_ms: view.header.timestamp_ms,
        checks: 0,
        next_check_ms: view.header.timestamp_ms + first_check,
        last_check_ms: 0,
        last_answer: None,
    })
}

/// The transaction a commit or rollback record ends, from its properties.
fn txn_of(view: &RecordView<'_>) -> Result<u64> {
    let props = view.properties()?;
    props
        .get(PROP_TXN)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            path: std::path::PathBuf::from("log"),
            offset: view.header.log_offset,
            reason: "transaction outcome record without a transaction id".into(),
        })
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("data_dir", &self.config.data_dir)
            .finish()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Check a consumer-group name (same rules as topic names).
fn validate_group_name(group: &str) -> Result<()> {
    validate_topic_name(group).map_err(|_| Error::Invalid {
        what: "group name",
        reason: format!(
            "{group:?}: use 1 to 127 characters of A-Z a-z 0-9 . _ - not starting with '.'"
        ),
    })
}

impl Broker {
    /// Open (or create) a broker on the real file system.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>> {
        Broker::open_with(Arc::new(FsStorage), config)
    }

    /// Open a broker whose log and indexes go through `storage` (a [`crate::store::io::SimStorage`]
    /// in tests). The metadata database always lives on the real file system under
    /// `config.data_dir/meta`.
    pub fn open_with(storage: Arc<dyn Storage>, config: BrokerConfig) -> Result<Arc<Broker>> {
        config.validate()?;
        let dir = &config.data_dir;
        storage.create_dir_all(dir)?;
        let lock = storage.lock_dir(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
        let meta = Arc::new(Meta::open(&dir.join("meta"))?);
        let txns = Arc::new(TxnIndex::new());
        txns.load(&meta)?;
        let hooks = Arc::new(TxnHooks {
            txns: txns.clone(),
            meta: meta.clone(),
            retention: config.txn.outcome_retention,
        });
        // Replay the transaction records after the checkpoint over the persisted index.
        let mut replay_error = None;
        let mut on_record = |view: &RecordView<'_>| {
            let r = match view.header.kind {
                RecordKind::Half => txn_info_of(view, &config.txn).map(|mut info| {
                    info.size =
                        crate::record::encoded_len(view.topic, view.key, view.props, view.body)
                            .unwrap_or_default();
                    txns.insert_half(info);
                }),
                RecordKind::Message if view.header.flags & FLAG_TXN_COMMIT != 0 => txn_of(view)
                    .map(|txn| txns.resolve(txn, Outcome::Committed, view.header.timestamp_ms)),
                RecordKind::TxnEnd => txn_of(view)
                    .map(|txn| txns.resolve(txn, Outcome::RolledBack, view.header.timestamp_ms)),
                _ => Ok(()),
            };
            if let Err(e) = r {
                replay_error.get_or_insert(e);
            }
        };
        let (store, recovery) = Store::open_locked(
            storage,
            dir,
            config.store.clone(),
            lock,
            &mut on_record,
            Some(hooks as Arc<dyn StoreHooks>),
        )?;
        if let Some(e) = replay_error {
            return Err(e);
        }
        txns.forget_beyond(recovery.log_end);
        let config_checks_max = config.txn.checks_in_flight_max as usize;
        let broker = Arc::new(Broker {
            config,
            store,
            meta,
            topics: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            recovery,
            txns,
            checkers: RwLock::new(HashMap::new()),
            checker_ids: AtomicU64::new(1),
            checker_rr: AtomicUsize::new(0),
            check_thread: Mutex::new(None),
            check_pool: CheckPool::new(config_checks_max),
        });
        broker.load_topics()?;
        if broker.config.txn.check_back {
            *broker.check_thread.lock() = Some(CheckerThread::spawn(Arc::downgrade(&broker))?);
        }
        Ok(broker)
    }

    /// Make sure every topic the log knows about has a configuration, and load them all.
    fn load_topics(&self) -> Result<()> {
        let mut by_topic: BTreeMap<String, u32> = BTreeMap::new();
        for q in self.store.queues() {
            let e = by_topic.entry(q.topic().to_owned()).or_default();
            *e = (*e).max(q.queue_id() + 1);
        }
        for (name, max_queue) in by_topic {
            if self.meta.topic(&name)?.is_none() {
                // The log has messages of a topic the metadata lost: keep them reachable.
                tracing::warn!(topic = %name, "topic found in the log but not in metadata; restoring it");
                let queues = max_queue.max(self.config.default_queues);
                self.meta.create_topic(
                    &name,
                    TopicConfig {
                        queues,
                        created_ms: now_ms(),
                    },
                )?;
            }
        }
        for (name, cfg) in self.meta.topics()? {
            self.install_topic(&name, cfg)?;
        }
        Ok(())
    }

    fn install_topic(&self, name: &str, cfg: TopicConfig) -> Result<Arc<Topic>> {
        let mut queues = Vec::with_capacity(cfg.queues as usize);
        for q in 0..cfg.queues {
            queues.push(self.store.queue(name, q)?);
        }
        let topic = Arc::new(Topic {
            name: name.to_owned(),
            queues,
            round_robin: AtomicU32::new(0),
            counters: crate::metrics::TopicCounters::new(name),
        });
        self.topics.write().insert(name.to_owned(), topic.clone());
        Ok(topic)
    }

    /// What recovery found when this broker was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// Create a topic with `queues` queues. Creating an existing topic with the same number
    /// of queues is a no-op; with another number it is an error.
    pub fn create_topic(&self, name: &str, queues: u32) -> Result<TopicInfo> {
        validate_topic_name(name)?;
        if queues == 0 || queues > QUEUES_MAX {
            return Err(Error::Invalid {
                what: "queue count",
                reason: format!("{queues} is outside 1 ..= {QUEUES_MAX}"),
            });
        }
        let cfg = self.meta.create_topic(
            name,
            TopicConfig {
                queues,
                created_ms: now_ms(),
            },
        )?;
        if cfg.queues != queues {
            return Err(Error::TopicExists {
                topic: name.to_owned(),
                existing: cfg.queues,
                requested: queues,
            });
        }
        if !self.topics.read().contains_key(name) {
            self.install_topic(name, cfg)?;
        }
        Ok(TopicInfo {
            name: name.to_owned(),
            queues,
        })
    }

    /// Every topic, by name.
    pub fn topics(&self) -> Vec<TopicInfo> {
        let mut out: Vec<TopicInfo> = self
            .topics
            .read()
            .values()
            .map(|t| TopicInfo {
                name: t.name.clone(),
                queues: t.queues.len() as u32,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        if let Some(t) = self.topics.read().get(name) {
            return Ok(t.clone());
        }
        if !self.config.auto_create_topics {
            validate_topic_name(name)?;
            return Err(Error::UnknownTopic(name.to_owned()));
        }
        self.create_topic(name, self.config.default_queues)?;
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownTopic(name.to_owned()))
    }

    /// The queue a message goes to: by a stable hash of its key, or round robin without one.
    fn pick_queue(topic: &Topic, key: &str) -> usize {
        let n = topic.queues.len() as u32;
        if key.is_empty() {
            (topic.round_robin.fetch_add(1, Ordering::Relaxed) % n) as usize
        } else {
            (key_hash(key) % n) as usize
        }
    }

    /// Store a message. Returns once it is acknowledged under the flush policy (by default:
    /// durable on disk). Blocks the calling thread; async code uses [`Broker::send_async`].
    pub fn send(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let (t, qi, props) = self.prepare_send(topic, msg)?;
        let a = self.store.append(Self::append_of(&t, qi, msg, &props))?;
        t.counters.message_in(msg.body.len());
        Ok(Self::receipt(&t, qi, a))
    }

    /// [`Broker::send`] without blocking the executor while the fsync happens.
    pub async fn send_async(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let (t, qi, props) = self.prepare_send(topic, msg)?;
        let a = self
            .store
            .append_async(Self::append_of(&t, qi, msg, &props))
            .await?;
        t.counters.message_in(msg.body.len());
        Ok(Self::receipt(&t, qi, a))
    }

    fn prepare_send(&self, topic: &str, msg: &Message) -> Result<(Arc<Topic>, usize, Vec<u8>)> {
        Self::check_user_properties(&msg.properties)?;
        let t = self.topic(topic)?;
        let qi = Self::pick_queue(&t, &msg.key);
        let props = record::encode_properties(&msg.properties)?;
        Ok((t, qi, props))
    }

    fn append_of<'a>(t: &'a Topic, qi: usize, msg: &'a Message, props: &'a [u8]) -> Append<'a> {
        let q = &t.queues[qi];
        Append {
            kind: RecordKind::Message,
            flags: 0,
            topic: &t.name,
            queue_id: q.queue_id(),
            key: &msg.key,
            props,
            body: &msg.body,
            timestamp_ms: now_ms(),
            dispatch_to: Some(q),
        }
    }

    fn receipt(t: &Topic, qi: usize, a: crate::store::Appended) -> SendReceipt {
        SendReceipt {
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            // The store hands out a queue offset for every dispatched append.
            offset: a.queue_offset.unwrap_or_default(),
            log_offset: a.log_offset,
        }
    }

    fn group_topic(&self, group: &str, topic: &Topic) -> Result<Arc<Mutex<GroupTopic>>> {
        let key = (group.to_owned(), topic.name.clone());
        let mut groups = self.groups.lock();
        if let Some(g) = groups.get(&key) {
            return Ok(g.clone());
        }
        let mut cursors = Vec::with_capacity(topic.queues.len());
        for q in &topic.queues {
            let acks = self.meta.queue_acks(group, &topic.name, q.queue_id())?;
            cursors.push(Cursor {
                committed: acks.committed,
                next: acks.committed,
                acked_above: acks.acked_above,
            });
        }
        let g = Arc::new(Mutex::new(GroupTopic { cursors, start: 0 }));
        groups.insert(key, g.clone());
        Ok(g)
    }

    /// Hand out up to `max` messages of `topic` that `group` has not been given yet, from all
    /// queues. Each message goes to one consumer of the group. Messages not acked are
    /// delivered again after a restart (at-least-once).
    pub fn poll(&self, group: &str, topic: &str, max: usize) -> Result<Vec<Delivery>> {
        self.poll_limited(group, topic, max, usize::MAX)
    }

    /// [`Broker::poll`] that also stops before the messages' bytes (key, body, properties)
    /// would pass `max_bytes`; at least one message is returned when any is there.
    pub fn poll_limited(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>> {
        validate_group_name(group)?;
        let t = self.topic(topic)?;
        let g = self.group_topic(group, &t)?;
        let mut g = g.lock();
        let n = t.queues.len();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = g.start;
        g.start = (start + 1) % n;
        'queues: for i in 0..n {
            if out.len() >= max {
                break;
            }
            let qi = (start + i) % n;
            let q = &t.queues[qi];
            let c = &mut g.cursors[qi];
            while out.len() < max && c.next < q.len() {
                let want = max - out.len();
                let batch = self.store.read_messages(q, c.next, want)?;
                if batch.is_empty() {
                    break;
                }
                for (offset, rec) in batch {
                    if c.acked_above.contains(&offset) {
                        c.next = offset + 1;
                        continue;
                    }
                    let size = t.name.len()
                        + rec.key.len()
                        + rec.body.len()
                        + rec
                            .properties
                            .iter()
                            .map(|(k, v)| k.len() + v.len() + 16)
                            .sum::<usize>()
                        + 64;
                    if !out.is_empty() && bytes + size > max_bytes {
                        break 'queues;
                    }
                    bytes += size;
                    c.next = offset + 1;
                    out.push(Delivery {
                        topic: t.name.clone(),
                        queue: q.queue_id(),
                        offset,
                        log_offset: rec.header.log_offset,
                        key: rec.key,
                        body: rec.body,
                        properties: rec.properties,
                        timestamp_ms: rec.header.timestamp_ms,
                    });
                }
            }
        }
        crate::metrics::delivered(group, &t.name, out.len());
        Ok(out)
    }

    /// Like [`Broker::poll`], but waits up to `timeout` for a message when there is none.
    pub fn poll_wait(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.poll(group, topic, max)?;
            let now = std::time::Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let t = self.topic(topic)?;
            let g = self.group_topic(group, &t)?;
            let from: Vec<u64> = g.lock().cursors.iter().map(|c| c.next).collect();
            self.store
                .wait_for_messages(&t.queues, &from, deadline - now);
        }
    }

    /// [`Broker::poll_limited`] that waits up to `timeout` for a message without blocking
    /// the executor.
    pub async fn poll_wait_async(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self.poll_limited(group, topic, max, max_bytes)?;
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            let t = self.topic(topic)?;
            let g = self.group_topic(group, &t)?;
            let from: Vec<u64> = g.lock().cursors.iter().map(|c| c.next).collect();
            self.store
                .wait_for_messages_async(&t.queues, &from, deadline)
                .await;
        }
    }

    /// Acknowledge one message; durable when this returns.
    pub fn ack(&self, group: &str, topic: &str, queue: u32, offset: u64) -> Result<()> {
        self.ack_many(group, topic, &[(queue, offset)])
    }

    /// Acknowledge several messages of one topic with one durable write.
    pub fn ack_many(&self, group: &str, topic: &str, acks: &[(u32, u64)]) -> Result<()> {
        validate_group_name(group)?;
        let t = self.topic(topic)?;
        let g = self.group_topic(group, &t)?;
        let mut g = g.lock();
        let mut by_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &(queue, offset) in acks {
            let bad = |reason: String| Error::BadAck {
                group: group.to_owned(),
                topic: topic.to_owned(),
                queue,
                offset,
                reason,
            };
            let Some(q) = t.queues.get(queue as usize) else {
                return Err(bad(format!("the topic has {} queues", t.queues.len())));
            };
            if offset >= q.len() {
                return Err(bad(format!("the queue has {} messages", q.len())));
            }
            by_queue.entry(queue).or_default().push(offset);
        }
        for (queue, offsets) in by_queue {
            let c = &mut g.cursors[queue as usize];
            let mut added = Vec::new();
            let mut acked = c.acked_above.clone();
            for off in offsets {
                if off >= c.committed && acked.insert(off) {
                    added.push(off);
                }
            }
            if added.is_empty() {
                continue; // all acked before: acks are idempotent
            }
            let mut committed = c.committed;
            let mut removed = Vec::new();
            while acked.remove(&committed) {
                removed.push(committed);
                committed += 1;
            }
            added.retain(|o| *o >= committed);
            removed.retain(|o| c.acked_above.contains(o));
            self.meta
                .store_acks(group, topic, queue, committed, &added, &removed)?;
            c.committed = committed;
            c.acked_above = acked;
            c.next = c.next.max(committed);
        }
        crate::metrics::acked(group, &t.name, acks.len());
        Ok(())
    }

    /// Figures per queue and consumer group.
    pub fn stats(&self) -> Result<Stats> {
        let mut groups_of: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        for (g, t, q) in self.meta.consumer_queues()? {
            groups_of.entry((t, q)).or_default().push(g);
        }
        let mut queues = Vec::new();
        for info in self.topics() {
            let Some(t) = self.topics.read().get(&info.name).cloned() else {
                continue;
            };
            for q in &t.queues {
                let messages = q.len();
                let mut groups = Vec::new();
                for g in groups_of
                    .get(&(t.name.clone(), q.queue_id()))
                    .into_iter()
                    .flatten()
                {
                    let acks = self.meta.queue_acks(g, &t.name, q.queue_id())?;
                    let acked = acks.committed + acks.acked_above.len() as u64;
                    groups.push(GroupLag {
                        group: g.clone(),
                        committed: acks.committed,
                        backlog: messages.saturating_sub(acked),
                        lag: messages.saturating_sub(acks.committed),
                        oldest_unacked_age_ms: self.oldest_unacked_age_ms(q, acks.committed)?,
                    });
                }
                queues.push(QueueStats {
                    topic: t.name.clone(),
                    queue: q.queue_id(),
                    messages,
                    groups,
                });
            }
        }
        let (txn_pending, txn_unresolved) = self.txns.counts();
        Ok(Stats {
            log: self.store.log_stats(),
            queues,
            txn_pending,
            txn_unresolved,
        })
    }

    /// How long ago the message at `committed`, the first one a group has not acked, was
    /// stored; `None` past the end of the queue (everything acked).
    fn oldest_unacked_age_ms(&self, q: &ConsumeQueue, committed: u64) -> Result<Option<u64>> {
        if committed >= q.len() {
            return Ok(None);
        }
        let rec = self.store.read_message(q, committed)?;
        Ok(rec.map(|r| now_ms().saturating_sub(r.header.timestamp_ms)))
    }

    /// The storage engine, for tools and tests.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Flush and stop. Later calls fail with [`Error::Closed`]. Dropping the broker does the
    /// same, but can only log errors.
    pub fn close(&self) -> Result<()> {
        if let Some(mut t) = self.check_thread.lock().take() {
            t.stop();
        }
        self.check_pool.shut_down();
        self.store.close()?;
        self.meta.flush()
    }

    // ---------------------------------------------------------------------------------------
    // Transactions
    // ---------------------------------------------------------------------------------------

    pub(crate) fn txn_index(&self) -> &TxnIndex {
        &self.txns
    }

    pub(crate) fn check_pool(&self) -> &CheckPool {
        &self.check_pool
    }

    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }

    fn check_user_properties(props: &Properties) -> Result<()> {
        match props.keys().find(|k| k.starts_with(RESERVED_PREFIX)) {
            Some(k) => Err(Error::Invalid {
                what: "property name",
                reason: format!("{k:?}: names starting with {RESERVED_PREFIX:?} are reserved"),
            }),
            None => Ok(()),
        }
    }

    fn prepare_half(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: &HalfOptions,
    ) -> Result<(Arc<Topic>, usize, Vec<u8>)> {
        validate_group_name(producer_group)?;
        Self::check_user_properties(&msg.properties)?;
        let t = self.topic(topic)?;
        let qi = Self::pick_queue(&t, &msg.key);
        let mut props = msg.properties.clone();
        props.insert(PROP_PRODUCER_GROUP.into(), producer_group.into());
        if let Some(d) = opts.check_immunity {
            props.insert(PROP_CHECK_IMMUNITY_MS.into(), d.as_millis().to_string());
        }
        Ok((t, qi, record::encode_properties(&props)?))
    }

    fn half_hook(
        &self,
        t: &Topic,
        qi: usize,
        msg: &Message,
        group: &str,
        opts: &HalfOptions,
        size_hint: u32,
    ) -> crate::store::DurableHook {
        let txns = self.txns.clone();
        let first_check = (self.config.txn.timeout.as_millis() as u64)
            .max(opts.check_immunity.map_or(0, |d| d.as_millis() as u64));
        let created_ms = now_ms();
        let mut info = TxnInfo {
            txn_id: 0,
            state: TxnState::Pending,
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            key: msg.key.clone(),
            producer_group: group.to_owned(),
            size: size_hint,
            created_ms,
            checks: 0,
            next_check_ms: created_ms + first_check,
            last_check_ms: 0,
            last_answer: None,
        };
        Box::new(move |log_offset| {
            info.txn_id = log_offset;
            txns.insert_half(info);
        })
    }

    fn half_append<'a>(
        t: &'a Topic,
        qi: usize,
        msg: &'a Message,
        props: &'a [u8],
        ts: u64,
    ) -> Append<'a> {
        Append {
            kind: RecordKind::Half,
            flags: 0,
            topic: &t.name,
            queue_id: t.queues[qi].queue_id(),
            key: &msg.key,
            props,
            body: &msg.body,
            timestamp_ms: ts,
            dispatch_to: None,
        }
    }

    /// The half record to append and the hook that indexes it once durable.
    fn half_parts<'a>(
        &self,
        t: &'a Topic,
        qi: usize,
        msg: &'a Message,
        props: &'a [u8],
        producer_group: &str,
        opts: &HalfOptions,
    ) -> (Append<'a>, crate::store::DurableHook) {
        let a = Self::half_append(t, qi, msg, props, now_ms());
        // The record was sized when it was prepared; a size that does not fit is refused by
        // the append itself, so 0 here never reaches the index.
        let size = record::encoded_len(a.topic, a.key, a.props, a.body).unwrap_or_default();
        let hook = self.half_hook(t, qi, msg, producer_group, opts, size);
        (a, hook)
    }

    /// Write a half message: durable when this returns (under any flush policy), invisible to
    /// every consumer until [`Broker::commit`]. If neither commit nor rollback comes within
    /// the transaction time-out, a checker of `producer_group` is asked.
    pub fn send_half(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<TxnId> {
        let (t, qi, props) = self.prepare_half(topic, msg, producer_group, &opts)?;
        let (a, hook) = self.half_parts(&t, qi, msg, &props, producer_group, &opts);
        let appended = self.store.append_hooked(a, Some(hook))?;
        Ok(TxnId(appended.log_offset))
    }

    /// [`Broker::send_half`] for async code.
    pub async fn send_half_async(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<TxnId> {
        let (t, qi, props) = self.prepare_half(topic, msg, producer_group, &opts)?;
        let (a, hook) = self.half_parts(&t, qi, msg, &props, producer_group, &opts);
        let appended = self.store.append_async_hooked(a, Some(hook)).await?;
        Ok(TxnId(appended.log_offset))
    }

    /// Read a pending half message back from the log.
    pub(crate) fn read_half(&self, info: &TxnInfo) -> Result<HalfMessage> {
        let rec = self.store.read_at(info.txn_id, info.size)?;
        if rec.header.kind != RecordKind::Half {
            return Err(Error::Corrupt {
                path: std::path::PathBuf::from("log"),
                offset: info.txn_id,
                reason: format!(
                    "transaction {} points at a {:?} record",
                    info.txn_id, rec.header.kind
                ),
            });
        }
        let mut properties = rec.properties;
        properties.retain(|k, _| !k.starts_with(RESERVED_PREFIX));
        Ok(HalfMessage {
            txn_id: TxnId(info.txn_id),
            topic: rec.topic,
            key: rec.key,
            body: rec.body,
            properties,
            producer_group: info.producer_group.clone(),
            created_ms: info.created_ms,
            checks: info.checks,
        })
    }

    /// Commit: the message becomes visible, exactly once, in its topic and key's queue.
    /// Durable when this returns. Committing again is a no-op; committing a rolled-back
    /// transaction is [`Error::TxnConflict`]; an unknown id is [`Error::UnknownTxn`].
    pub fn commit(&self, txn: TxnId) -> Result<()> {
        self.finish(txn, Outcome::Committed)
    }

    /// Roll back: the message is discarded and never visible. Durable when this returns.
    /// Rolling back again is a no-op; rolling back a committed transaction is
    /// [`Error::TxnConflict`]; an unknown id is [`Error::UnknownTxn`].
    pub fn rollback(&self, txn: TxnId) -> Result<()> {
        self.finish(txn, Outcome::RolledBack)
    }

    /// [`Broker::commit`] for async code.
    pub async fn commit_async(&self, txn: TxnId) -> Result<()> {
        self.finish_async(txn, Outcome::Committed).await
    }

    /// [`Broker::rollback`] for async code.
    pub async fn rollback_async(&self, txn: TxnId) -> Result<()> {
        self.finish_async(txn, Outcome::RolledBack).await
    }

    fn finish(&self, txn: TxnId, outcome: Outcome) -> Result<()> {
        let Some(end) = self.begin_finish(txn, outcome)? else {
            return Ok(());
        };
        let r = self
            .store
            .append_hooked(end.append(), Some(end.hook(&self.txns)));
        self.end_finish(&end, r)
    }

    async fn finish_async(&self, txn: TxnId, outcome: Outcome) -> Result<()> {
        let Some(end) = self.begin_finish(txn, outcome)? else {
            return Ok(());
        };
        let r = self
            .store
            .append_async_hooked(end.append(), Some(end.hook(&self.txns)))
            .await;
        self.end_finish(&end, r)
    }

    /// Claim the transaction and build the record that ends it; `None` when the same
    /// outcome is already recorded.
    fn begin_finish(&self, txn: TxnId, outcome: Outcome) -> Result<Option<EndRecord>> {
        let info = match self.txns.begin_resolve(txn.0, outcome, &self.meta)? {
            crate::txn::Begin::Done => return Ok(None),
            crate::txn::Begin::Write(info) => info,
        };
        let end = self.end_record(info, outcome);
        if end.is_err() {
            self.txns.abort_resolve(txn.0);
        }
        end.map(Some)
    }

    fn end_finish(&self, end: &EndRecord, r: Result<crate::store::Appended>) -> Result<()> {
        match r {
            Err(e) => {
                self.txns.abort_resolve(end.info.txn_id);
                Err(e)
            }
            Ok(_) => {
                if end.outcome == Outcome::Committed {
                    crate::metrics::message_in(&end.info.topic, end.body.len());
                }
                Ok(())
            }
        }
    }

    /// A commit is the half's message (its user properties plus the transaction id) as one
    /// Message record; a rollback is a TxnEnd record with just the transaction id.
    fn end_record(&self, info: TxnInfo, outcome: Outcome) -> Result<EndRecord> {
        let (body, mut props, queue) = match outcome {
            Outcome::Committed => {
                let half = self.read_half(&info)?;
                (
                    half.body,
                    half.properties,
                    Some(self.store.queue(&info.topic, info.queue)?),
                )
            }
            Outcome::RolledBack => (Vec::new(), Properties::new(), None),
        };
        props.insert(PROP_TXN.into(), info.txn_id.to_string());
        let props = record::encode_properties(&props)?;
        Ok(EndRecord {
            info,
            outcome,
            props,
            body,
            queue,
        })
    }

    /// Register the checker asked about unfinished transactions of `producer_group`. Several
    /// may be registered per group (one per producer); each check asks one of them, in turn.
    /// Returns an id for [`Broker::unregister_checker`].
    pub fn register_checker(
        &self,
        producer_group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<u64> {
        validate_group_name(producer_group)?;
        let id = self.checker_ids.fetch_add(1, Ordering::Relaxed);
        self.checkers
            .write()
            .entry(producer_group.to_owned())
            .or_default()
            .push((id, checker));
        Ok(id)
    }

    /// Remove a checker registered with [`Broker::register_checker`].
    pub fn unregister_checker(&self, producer_group: &str, id: u64) {
        let mut all = self.checkers.write();
        if let Some(v) = all.get_mut(producer_group) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                all.remove(producer_group);
            }
        }
    }

    pub(crate) fn checker_for(&self, producer_group: &str) -> Option<Arc<dyn TransactionChecker>> {
        let all = self.checkers.read();
        let v = all.get(producer_group)?;
        let i = self.checker_rr.fetch_add(1, Ordering::Relaxed) % v.len();
        Some(v[i].1.clone())
    }

    /// Unfinished transactions, oldest first: all, or those in `state`.
    pub fn transactions(&self, state: Option<TxnState>) -> Vec<TxnInfo> {
        self.txns.list(state)
    }

    /// Transactions that were checked `check_max` times without an answer. They stay stored
    /// and can be committed, rolled back or re-armed.
    pub fn unresolved_transactions(&self) -> Vec<TxnInfo> {
        self.txns.list(Some(TxnState::Unresolved))
    }

    /// Where a transaction is. Finished ones are known for `outcome_retention`.
    pub fn transaction_state(&self, txn: TxnId) -> Result<TxnState> {
        if let Some(info) = self.txns.get(txn.0) {
            return Ok(info.state);
        }
        match self.txns.finished(txn.0, &self.meta)? {
            Some(Outcome::Committed) => Ok(TxnState::Committed),
            Some(Outcome::RolledBack) => Ok(TxnState::RolledBack),
            None => Err(Error::UnknownTxn(txn.0)),
        }
    }

    /// Check an unfinished transaction again now, with its check count reset (for
    /// unresolved ones once the producer is back).
    pub fn rearm(&self, txn: TxnId) -> Result<()> {
        let info = self
            .txns
            .rearm(txn.0, now_ms())
            .ok_or(Error::UnknownTxn(txn.0))?;
        self.txns.persist_checks(&self.meta, &[info])?;
        if let Some(t) = self.check_thread.lock().as_ref() {
            let _ = t.tx.send(crate::txn::checker::Msg::Wake);
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut t) = self.check_thread.lock().take() {
            t.stop();
        }
        self.check_pool.shut_down();
    }
}
