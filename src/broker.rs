//! The embedded broker: topics, sends, consumer groups with durable offsets.
//!
//! `Broker` ties the storage engine ([`crate::store::Store`]) to the metadata in sled
//! ([`crate::meta::Meta`]). It is what an application embeds, and what the network broker
//! serves. The consumer side (poll, ack, nack, redelivery, dead letters) is in `consume`.

mod consume;
mod trace;

pub(crate) use consume::REPLAY_GROUP;
mod retention;

pub use consume::{
    dead_letter_topic, DeadLetter, GroupDeleted, NackOutcome, Replayed, DLQ_TOPIC_PREFIX,
    INTERNAL_TOPIC_PREFIX, PROP_DLQ_FAILURES, PROP_DLQ_LOG_OFFSET, PROP_DLQ_OFFSET, PROP_DLQ_QUEUE,
    PROP_DLQ_REASON, PROP_DLQ_TOPIC, PROP_REPLAYED_FROM,
};
use consume::{GroupKey, GroupTopic};
pub use retention::{Pin, RetentionFloor, RetentionReport};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use crate::config::{BrokerConfig, TxnConfig, QUEUES_MAX};
use crate::delayed::{DelayThread, DelayedIndex, DelayedInfo, PROP_DELAYED};
use crate::error::{Error, Result};
use crate::idem::{self, Claim, DedupIndex, Space, PROP_IDEMPOTENCY_KEY};
use crate::meta::{Meta, TopicConfig};
use crate::record::{self, Properties, RecordKind, RecordView, FLAG_DELAYED_FIRE, FLAG_TXN_COMMIT};
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

    /// Set the idempotency key (1 to [`idem::IDEMPOTENCY_KEY_BYTES_MAX`] bytes): a second
    /// send of a message with the same key to the same topic within the dedup window is not
    /// stored again and returns the original's receipt. It is kept as the property
    /// [`PROP_IDEMPOTENCY_KEY`], which consumers see too.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Message {
        self.properties
            .insert(PROP_IDEMPOTENCY_KEY.to_owned(), key.into());
        self
    }

    /// The idempotency key, if set.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.properties
            .get(PROP_IDEMPOTENCY_KEY)
            .map(String::as_str)
    }
}

/// Where a sent message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendReceipt {
    /// The topic.
    pub topic: String,
    /// The queue within the topic.
    pub queue: u32,
    /// Its offset in that queue.
    pub offset: u64,
    /// Its position in the commit log.
    pub log_offset: u64,
    /// True when the message carried an idempotency key that was already stored: nothing
    /// was stored now, and this is the original's receipt.
    pub duplicate: bool,
}

/// What [`Broker::send_half_receipt`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HalfReceipt {
    /// The transaction.
    pub txn: TxnId,
    /// True when the half carried an idempotency key that was already stored: nothing was
    /// written now, and `txn` is the original transaction (in whatever state it is now).
    pub duplicate: bool,
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
    /// Which delivery of this message to this group it is: 1 the first, n after n - 1
    /// failed ones (time-outs and nacks).
    pub attempt: u32,
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
    /// Of those, delivered and not acked yet (leased to a consumer).
    #[serde(default)]
    pub in_flight: u64,
    /// Of those, waiting for redelivery after a failed delivery.
    #[serde(default)]
    pub retrying: u64,
    /// Messages from the committed offset to the end of the queue: at least the backlog,
    /// more when later messages were acked before an earlier one.
    #[serde(default)]
    pub lag: u64,
    /// Age of the oldest message the group has not acked (now minus its store timestamp),
    /// ms; `None` when everything is acked.
    #[serde(default)]
    pub oldest_unacked_age_ms: Option<u64>,
}

/// The dead-letter queue of one group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterStats {
    /// Group name.
    pub group: String,
    /// Dead letters ever written.
    pub messages: u64,
    /// Of those, replayed to their topics.
    pub replayed: u64,
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
    /// Dead-letter queues, by group.
    #[serde(default)]
    pub dead_letters: Vec<DeadLetterStats>,
    /// Delayed messages not delivered yet.
    #[serde(default)]
    pub delayed_pending: u64,
    /// Retention: the floor now and what pins it, the last pass, expired messages skipped.
    #[serde(default)]
    pub retention: Option<RetentionStats>,
}

/// Retention figures for [`Stats`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionStats {
    /// The lowest log offset still needed now, and what pins it.
    pub floor: RetentionFloor,
    /// Messages polls skipped because retention had deleted them (since the start).
    pub expired_skipped: u64,
    /// The last pass since the start, if any.
    pub last_pass: Option<RetentionReport>,
}

struct Topic {
    name: String,
    queues: Vec<Arc<ConsumeQueue>>,
    round_robin: AtomicU32,
    counters: crate::metrics::TopicCounters,
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
    delayed: Arc<DelayedIndex>,
    delay_thread: Mutex<Option<DelayThread>>,
    /// Writes idempotency keys to sled between checkpoints.
    dedup_thread: Mutex<Option<crate::worker::Worker<()>>>,
    check_pool: CheckPool,
    /// Remembered idempotency keys.
    dedup: Arc<DedupIndex>,
    /// The key index of `trace` (derived from the log, kept by `index_thread`).
    key_index: Arc<crate::key_index::KeyIndex>,
    /// The event journal of `trace`.
    journal: Arc<crate::trace::Journal>,
    /// Keeps `key_index` in step with the log (shared with `index_thread`).
    indexer: Arc<trace::Indexer>,
    index_thread: Mutex<Option<trace::IndexerThread>>,
    /// Held during a retention pass (the background one or [`Broker::enforce_retention`]).
    retention_pass: Mutex<()>,
    last_retention: Mutex<Option<RetentionReport>>,
    retention_thread: Mutex<Option<crate::worker::Worker<()>>>,
    /// Messages polls skipped because retention had deleted them.
    expired_skipped: AtomicU64,
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

/// Persists the transaction and delayed-message indexes before every checkpoint.
struct TxnHooks {
    txns: Arc<TxnIndex>,
    delayed: Arc<DelayedIndex>,
    meta: Arc<Meta>,
    retention: Duration,
    dedup: Arc<DedupIndex>,
}

impl StoreHooks for TxnHooks {
    fn before_checkpoint(&self) -> Result<()> {
        self.txns.persist(&self.meta, self.retention, now_ms())?;
        self.delayed.persist(&self.meta)?;
        self.dedup.persist(&self.meta, now_ms())
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

/// The index entry of a `Delayed` record.
fn delayed_info_of(view: &RecordView<'_>) -> Result<DelayedInfo> {
    let props = view.properties()?;
    let deliver_at_ms = props
        .get(PROP_DELIVER_AT_MS)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            path: std::path::PathBuf::from("log"),
            offset: view.header.log_offset,
            reason: "delayed message without a delivery time".into(),
        })?;
    Ok(DelayedInfo {
        id: view.header.log_offset,
        size: record::encoded_len(view.topic, view.key, view.props, view.body).unwrap_or_default(),
        topic: view.topic.to_owned(),
        queue: view.header.queue_id,
        key: view.key.to_owned(),
        deliver_at_ms,
    })
}

/// The delayed message a fire record delivers, from its properties.
fn delayed_of(view: &RecordView<'_>) -> Result<u64> {
    let props = view.properties()?;
    props
        .get(PROP_DELAYED)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            path: std::path::PathBuf::from("log"),
            offset: view.header.log_offset,
            reason: "delayed delivery record without the delayed message's id".into(),
        })
}

/// Property of a `Delayed` record: when to deliver it, ms since the Unix epoch.
pub const PROP_DELIVER_AT_MS: &str = "halfmq.deliver_at_ms";

/// Farthest a message can be delayed: 90 days.
pub const DELAY_MAX: Duration = Duration::from_secs(90 * 24 * 3600);

/// Where a delayed message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayedReceipt {
    /// Its id (the log offset of the stored message).
    pub id: u64,
    /// The topic it will be delivered to.
    pub topic: String,
    /// The queue.
    pub queue: u32,
    /// When, ms since the Unix epoch.
    pub deliver_at_ms: u64,
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

/// Check the name of a user topic: a valid topic name not starting with `%`, which the
/// broker keeps for its own topics (dead-letter queues).
fn validate_user_topic_name(topic: &str) -> Result<()> {
    validate_topic_name(topic)?;
    if topic.starts_with(INTERNAL_TOPIC_PREFIX) {
        return Err(Error::Invalid {
            what: "topic name",
            reason: format!(
                "{topic:?}: names starting with {INTERNAL_TOPIC_PREFIX:?} are the broker's own"
            ),
        });
    }
    Ok(())
}

/// Check a consumer-group name (same rules as user topic names, and short enough for its
/// dead-letter topic name).
fn validate_group_name(group: &str) -> Result<()> {
    let ok = validate_user_topic_name(group).is_ok()
        && group.len() + DLQ_TOPIC_PREFIX.len() <= record::TOPIC_BYTES_MAX;
    if ok {
        return Ok(());
    }
    Err(Error::Invalid {
        what: "group name",
        reason: format!(
            "{group:?}: use 1 to {} characters of A-Z a-z 0-9 . _ - not starting with '.'",
            record::TOPIC_BYTES_MAX - DLQ_TOPIC_PREFIX.len()
        ),
    })
}

impl Broker {
    /// Open (or create) a broker on the real file system.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>> {
        Broker::open_with(Arc::new(FsStorage), config)
    }

    /// Open a broker whose log and indexes go through `storage` (a [`crate::store::io::SimStorage`]
    /// in tests). The metadata database and the key index of `trace` always live on the real
    /// file system under `config.data_dir/meta` and `config.data_dir/index`.
    pub fn open_with(storage: Arc<dyn Storage>, config: BrokerConfig) -> Result<Arc<Broker>> {
        config.validate()?;
        let dir = &config.data_dir;
        storage.create_dir_all(dir)?;
        let lock = storage.lock_dir(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
        let meta = Arc::new(Meta::open(&dir.join("meta"))?);
        let txns = Arc::new(TxnIndex::new());
        txns.load(&meta)?;
        let delayed = Arc::new(DelayedIndex::default());
        delayed.load(&meta)?;
        let dedup = Arc::new(DedupIndex::new(idem::Limits::of(&config)));
        dedup.load(&meta, now_ms())?;
        let hooks = Arc::new(TxnHooks {
            txns: txns.clone(),
            delayed: delayed.clone(),
            meta: meta.clone(),
            retention: config.txn.outcome_retention,
            dedup: dedup.clone(),
        });
        let opened_ms = now_ms();
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
                RecordKind::Message if view.header.flags & FLAG_DELAYED_FIRE != 0 => {
                    delayed_of(view).map(|id| delayed.fired(id))
                }
                RecordKind::Delayed => delayed_info_of(view).map(|d| delayed.insert(d)),
                RecordKind::TxnEnd => txn_of(view)
                    .map(|txn| txns.resolve(txn, Outcome::RolledBack, view.header.timestamp_ms)),
                _ => Ok(()),
            };
            let r = r.and_then(|()| dedup.replay(view, opened_ms));
            if let Err(e) = r {
                replay_error.get_or_insert(e);
            }
        };
        // Like sled, the key index lives on the real file system: it is derived data, and a
        // simulated disk's injected faults (a failing fsync) must hit the log they are aimed
        // at, not an index write that happens to run at the same moment.
        let (key_index, index_report) = crate::key_index::KeyIndex::open(
            Arc::new(FsStorage),
            &dir.join("index"),
            config.store.key_index_slots,
            config.store.key_index_entries,
        )?;
        let journal = Arc::new(crate::trace::Journal::open(meta.clone())?);
        journal.start_writer()?;
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
        delayed.forget_beyond(recovery.log_end);
        dedup.forget_beyond(recovery.log_end);
        if index_report.indexed_upto > recovery.log_end {
            // An index of a longer (other) log: useless here.
            tracing::warn!(
                indexed_upto = index_report.indexed_upto,
                log_end = recovery.log_end,
                "the key index is ahead of the log; rebuilding it"
            );
            key_index.rebuild_from(0)?;
        }
        let config_checks_max = config.txn.checks_in_flight_max as usize;
        let key_index = Arc::new(key_index);
        let indexer = Arc::new(trace::Indexer::new(key_index.clone(), store.log_reader()));
        {
            // Retention deleted segments: index files and journal events wholly below the new
            // log start go too (entries left below it are reported as expired).
            let (ki, j) = (key_index.clone(), journal.clone());
            store.on_log_start(Box::new(move |start| {
                if let Err(e) = ki.drop_below(start) {
                    tracing::warn!(error = %e, "cannot delete key index files below the log start");
                }
                if let Err(e) = j.drop_below(start) {
                    tracing::warn!(error = %e, "cannot delete trace events below the log start");
                }
            }));
        }
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
            delayed,
            delay_thread: Mutex::new(None),
            dedup_thread: Mutex::new(None),
            check_pool: CheckPool::new(config_checks_max),
            dedup,
            key_index,
            journal,
            indexer: indexer.clone(),
            index_thread: Mutex::new(Some(trace::IndexerThread::spawn(indexer)?)),
            retention_pass: Mutex::new(()),
            last_retention: Mutex::new(None),
            retention_thread: Mutex::new(None),
            expired_skipped: AtomicU64::new(0),
        });
        broker.load_topics()?;
        if broker.config.txn.check_back {
            *broker.check_thread.lock() =
                Some(crate::txn::checker::spawn(Arc::downgrade(&broker))?);
        }
        *broker.delay_thread.lock() = Some(crate::delayed::spawn(Arc::downgrade(&broker))?);
        *broker.dedup_thread.lock() = Some(idem::spawn_persister(Arc::downgrade(&broker))?);
        if broker.config.retention.enabled() {
            *broker.retention_thread.lock() = Some(retention::spawn(
                Arc::downgrade(&broker),
                broker.config.retention.interval,
            )?);
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
        validate_user_topic_name(name)?;
        self.create_topic_unchecked(name, queues)
    }

    /// [`Broker::create_topic`] that also takes the broker's own topic names.
    fn create_topic_unchecked(&self, name: &str, queues: u32) -> Result<TopicInfo> {
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
        if let Some(key) = idem::key_of(&msg.properties)? {
            return self.send_keyed(&t, qi, msg, &props, key);
        }
        let a = self.store.append(Self::append_of(&t, qi, msg, &props))?;
        t.counters.message_in(msg.body.len());
        Ok(Self::receipt(&t, qi, a))
    }

    /// [`Broker::send`] without blocking the executor while the fsync happens.
    pub async fn send_async(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let (t, qi, props) = self.prepare_send(topic, msg)?;
        if let Some(key) = idem::key_of(&msg.properties)? {
            return self.send_keyed_async(&t, qi, msg, &props, key).await;
        }
        let a = self
            .store
            .append_async(Self::append_of(&t, qi, msg, &props))
            .await?;
        t.counters.message_in(msg.body.len());
        Ok(Self::receipt(&t, qi, a))
    }

    /// Store a message durably now and deliver it to its topic at `deliver_at_ms` (ms since
    /// the Unix epoch; a time in the past means at once), at most [`DELAY_MAX`] ahead.
    /// Until then no consumer sees it; it is delivered also after a restart or a crash.
    pub fn send_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        let (t, qi, props, size) = self.prepare_delayed(topic, msg, deliver_at_ms)?;
        let hook = self.delayed_hook(&t, qi, msg, deliver_at_ms, size);
        let a = self
            .store
            .append_hooked(Self::delayed_append(&t, qi, msg, &props), Some(hook))?;
        Ok(self.delayed_receipt(&t, qi, a.log_offset, deliver_at_ms))
    }

    /// [`Broker::send_delayed`] for async code.
    pub async fn send_delayed_async(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        let (t, qi, props, size) = self.prepare_delayed(topic, msg, deliver_at_ms)?;
        let hook = self.delayed_hook(&t, qi, msg, deliver_at_ms, size);
        let a = self
            .store
            .append_async_hooked(Self::delayed_append(&t, qi, msg, &props), Some(hook))
            .await?;
        Ok(self.delayed_receipt(&t, qi, a.log_offset, deliver_at_ms))
    }

    fn prepare_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<(Arc<Topic>, usize, Vec<u8>, u32)> {
        let max = now_ms() + DELAY_MAX.as_millis() as u64;
        if deliver_at_ms > max {
            return Err(Error::Invalid {
                what: "delivery time",
                reason: format!(
                    "{deliver_at_ms} is more than {} days ahead",
                    DELAY_MAX.as_secs() / 86_400
                ),
            });
        }
        if msg.idempotency_key().is_some() {
            return Err(Error::Invalid {
                what: "idempotency key",
                reason: "delayed messages do not take idempotency keys (yet)".into(),
            });
        }
        let (t, qi, _) = self.prepare_send(topic, msg)?;
        let mut props = msg.properties.clone();
        props.insert(PROP_DELIVER_AT_MS.into(), deliver_at_ms.to_string());
        let props = record::encode_properties(&props)?;
        let size = record::encoded_len(&t.name, &msg.key, &props, &msg.body).map_err(|reason| {
            Error::Invalid {
                what: "message",
                reason,
            }
        })?;
        Ok((t, qi, props, size))
    }

    fn delayed_append<'a>(
        t: &'a Topic,
        qi: usize,
        msg: &'a Message,
        props: &'a [u8],
    ) -> Append<'a> {
        Append {
            kind: RecordKind::Delayed,
            flags: 0,
            topic: &t.name,
            queue_id: t.queues[qi].queue_id(),
            key: &msg.key,
            props,
            body: &msg.body,
            timestamp_ms: now_ms(),
            dispatch_to: None,
        }
    }

    /// Index the delayed message once its record is durable, and wake the timer.
    fn delayed_hook(
        &self,
        t: &Topic,
        qi: usize,
        msg: &Message,
        deliver_at_ms: u64,
        size: u32,
    ) -> crate::store::DurableHook {
        let index = self.delayed.clone();
        let wake = self.delay_thread.lock().as_ref().map(|d| d.sender());
        let mut info = DelayedInfo {
            id: 0,
            size,
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            key: msg.key.clone(),
            deliver_at_ms,
        };
        Box::new(move |log_offset| {
            info.id = log_offset;
            index.insert(info);
            if let Some(tx) = wake {
                let _ = tx.send(crate::delayed::Msg::Wake);
            }
        })
    }

    fn delayed_receipt(&self, t: &Topic, qi: usize, id: u64, deliver_at_ms: u64) -> DelayedReceipt {
        DelayedReceipt {
            id,
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            deliver_at_ms,
        }
    }

    /// Write the idempotency keys of durable records to sled (the background persister's
    /// round). A failure is only logged: the next round, or the next checkpoint, writes them.
    pub(crate) fn persist_idempotency_keys(&self) {
        let durable = self.store.log_stats().durable_offset;
        if let Err(e) = self.dedup.persist_below(&self.meta, now_ms(), durable) {
            tracing::warn!(error = %e, "could not write idempotency keys to sled; will retry");
        }
    }

    pub(crate) fn delayed_index(&self) -> &DelayedIndex {
        &self.delayed
    }

    /// Deliver a delayed message that is due: a `Message` record in its queue, durable,
    /// after which it is no longer pending.
    pub(crate) fn deliver_delayed(&self, d: &DelayedInfo) -> Result<()> {
        let rec = self.store.read_at(d.id, d.size)?;
        let t = self.topic(&d.topic)?;
        let qi = (d.queue as usize).min(t.queues.len() - 1);
        let mut props = rec.properties;
        props.remove(PROP_DELIVER_AT_MS);
        props.insert(PROP_DELAYED.into(), d.id.to_string());
        let props = record::encode_properties(&props)?;
        let q = &t.queues[qi];
        let index = self.delayed.clone();
        let id = d.id;
        self.store.append_hooked(
            Append {
                kind: RecordKind::Message,
                flags: FLAG_DELAYED_FIRE,
                topic: &t.name,
                queue_id: q.queue_id(),
                key: &rec.key,
                props: &props,
                body: &rec.body,
                timestamp_ms: now_ms(),
                dispatch_to: Some(q),
            },
            Some(Box::new(move |_| index.fired(id))),
        )?;
        Ok(())
    }

    /// Delayed messages not delivered yet.
    pub fn delayed_pending(&self) -> u64 {
        self.delayed.pending()
    }

    fn prepare_send(&self, topic: &str, msg: &Message) -> Result<(Arc<Topic>, usize, Vec<u8>)> {
        Self::check_user_properties(&msg.properties)?;
        validate_user_topic_name(topic)?;
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
            duplicate: false,
        }
    }

    /// Figures per queue and consumer group.
    pub fn stats(&self) -> Result<Stats> {
        // Groups with stored acks, and groups that polled since the start but acked nothing
        // yet (their backlog counts too).
        let mut groups_of: BTreeMap<(String, u32), std::collections::BTreeSet<String>> =
            BTreeMap::new();
        let mut replayed: BTreeMap<String, u64> = BTreeMap::new();
        let mut all = self.meta.consumer_queues()?;
        let loaded: Vec<GroupKey> = self.groups.lock().keys().cloned().collect();
        for (g, t) in &loaded {
            if let Some(topic) = self.topics.read().get(t) {
                for q in &topic.queues {
                    all.push((g.clone(), t.clone(), q.queue_id()));
                }
            }
        }
        for (g, t, q) in all {
            if g.starts_with(INTERNAL_TOPIC_PREFIX) {
                // The broker's own group that remembers replayed dead letters.
                if let Some(group) = t.strip_prefix(DLQ_TOPIC_PREFIX) {
                    let acks = self.meta.queue_acks(&g, &t, q)?;
                    replayed.insert(
                        group.to_owned(),
                        acks.committed + acks.acked_above.len() as u64,
                    );
                }
                continue;
            }
            groups_of.entry((t, q)).or_default().insert(g);
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
                    let (in_flight, retrying) = self.leases_of(g, &t.name, q.queue_id());
                    groups.push(GroupLag {
                        group: g.clone(),
                        committed: acks.committed,
                        backlog: messages.saturating_sub(acked),
                        in_flight,
                        retrying,
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
        let dead_letters = queues
            .iter()
            .filter_map(|q| {
                let group = q.topic.strip_prefix(DLQ_TOPIC_PREFIX)?;
                Some(DeadLetterStats {
                    group: group.to_owned(),
                    messages: q.messages,
                    replayed: replayed.get(group).copied().unwrap_or(0),
                })
            })
            .collect();
        Ok(Stats {
            log: self.store.log_stats(),
            queues,
            txn_pending,
            txn_unresolved,
            dead_letters,
            delayed_pending: self.delayed.pending(),
            retention: Some(RetentionStats {
                floor: self.retention_floor()?,
                expired_skipped: self.expired_skipped(),
                last_pass: self.last_retention(),
            }),
        })
    }

    /// How long ago the message at `committed`, the first one a group has not acked, was
    /// stored; `None` past the end of the queue (everything acked).
    fn oldest_unacked_age_ms(&self, q: &ConsumeQueue, committed: u64) -> Result<Option<u64>> {
        // Messages below the queue's start were deleted by retention: never delivered again.
        let committed = committed.max(q.start());
        if committed >= q.len() {
            return Ok(None);
        }
        let rec = match self.store.read_message(q, committed) {
            // Retention deleted it just now: the age of what is left shows next time.
            Err(Error::Expired { .. }) => return Ok(None),
            other => other?,
        };
        Ok(rec.map(|r| now_ms().saturating_sub(r.header.timestamp_ms)))
    }

    /// The storage engine, for tools and tests.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Flush and stop. Later calls fail with [`Error::Closed`]. Dropping the broker does the
    /// same, but can only log errors.
    pub fn close(&self) -> Result<()> {
        if let Some(mut t) = self.retention_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.check_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.delay_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.dedup_thread.lock().take() {
            t.stop();
        }
        self.check_pool.shut_down();
        if let Some(mut t) = self.index_thread.lock().take() {
            t.stop();
        }
        self.store.close()?;
        // Index what the close flushed, and make the index durable, so that the next open
        // has nothing to re-index.
        self.index_catch_up()?;
        self.key_index.persist()?;
        // Check-back events handed to the journal's writer are written before the flush.
        self.journal.write_later()?;
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
        idem::key_of(props)?;
        match props
            .keys()
            .find(|k| k.starts_with(RESERVED_PREFIX) && k.as_str() != PROP_IDEMPOTENCY_KEY)
        {
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
        validate_user_topic_name(topic)?;
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
        self.send_half_receipt(topic, msg, producer_group, opts)
            .map(|r| r.txn)
    }

    /// [`Broker::send_half`] for async code.
    pub async fn send_half_async(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<TxnId> {
        self.send_half_receipt_async(topic, msg, producer_group, opts)
            .await
            .map(|r| r.txn)
    }

    /// [`Broker::send_half`] that also says whether the half was a duplicate of an
    /// idempotency key already stored (then nothing was written and the original
    /// transaction is returned).
    pub fn send_half_receipt(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<HalfReceipt> {
        let (t, qi, props) = self.prepare_half(topic, msg, producer_group, &opts)?;
        let mut reservation = None;
        if let Some(key) = idem::key_of(&msg.properties)? {
            let ikey = idem::index_key(Space::Half, &t.name, key);
            loop {
                match self.dedup.claim(&ikey, now_ms) {
                    Claim::Duplicate(at) => {
                        if let Some(r) = self.original_half(&t, key, &ikey, at)? {
                            return Ok(r);
                        }
                    }
                    Claim::Owner(r) => {
                        reservation = Some(r);
                        break;
                    }
                }
            }
        }
        let (a, hook) = self.half_parts(&t, qi, msg, &props, producer_group, &opts);
        let hook = Self::with_reservation(&a, hook, reservation);
        let appended = self.store.append_hooked(a, Some(hook))?;
        Ok(HalfReceipt {
            txn: TxnId(appended.log_offset),
            duplicate: false,
        })
    }

    /// [`Broker::send_half_receipt`] for async code.
    pub async fn send_half_receipt_async(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<HalfReceipt> {
        let (t, qi, props) = self.prepare_half(topic, msg, producer_group, &opts)?;
        let mut reservation = None;
        if let Some(key) = idem::key_of(&msg.properties)? {
            let ikey = idem::index_key(Space::Half, &t.name, key);
            loop {
                match self.dedup.claim_async(&ikey, now_ms).await {
                    Claim::Duplicate(at) => {
                        if let Some(r) = self.original_half(&t, key, &ikey, at)? {
                            return Ok(r);
                        }
                    }
                    Claim::Owner(r) => {
                        reservation = Some(r);
                        break;
                    }
                }
            }
        }
        let (a, hook) = self.half_parts(&t, qi, msg, &props, producer_group, &opts);
        let hook = Self::with_reservation(&a, hook, reservation);
        let appended = self.store.append_async_hooked(a, Some(hook)).await?;
        Ok(HalfReceipt {
            txn: TxnId(appended.log_offset),
            duplicate: false,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Idempotency keys (see `crate::idem`)
    // ---------------------------------------------------------------------------------------

    /// The encoded size of an append (0 if it cannot be encoded: then the append itself
    /// fails and a hook built with this size is dropped unrun).
    fn size_of(a: &Append<'_>) -> u32 {
        record::encoded_len(a.topic, a.key, a.props, a.body).unwrap_or_default()
    }

    /// `hook`, also completing `reservation` (if any) when the record is durable.
    fn with_reservation(
        a: &Append<'_>,
        hook: crate::store::DurableHook,
        reservation: Option<idem::Reservation>,
    ) -> crate::store::DurableHook {
        match reservation {
            None => hook,
            Some(r) => {
                let done = r.into_hook(Self::size_of(a), a.timestamp_ms);
                Box::new(move |log_offset| {
                    hook(log_offset);
                    done(log_offset);
                })
            }
        }
    }

    fn send_keyed(
        &self,
        t: &Topic,
        qi: usize,
        msg: &Message,
        props: &[u8],
        key: &str,
    ) -> Result<SendReceipt> {
        let ikey = idem::index_key(Space::Message, &t.name, key);
        loop {
            match self.dedup.claim(&ikey, now_ms) {
                Claim::Duplicate(at) => {
                    if let Some(r) = self.original_receipt(t, key, &ikey, at)? {
                        return Ok(r);
                    }
                }
                Claim::Owner(res) => {
                    let a = Self::append_of(t, qi, msg, props);
                    let hook = res.into_hook(Self::size_of(&a), a.timestamp_ms);
                    let appended = self.store.append_observed(a, hook)?;
                    return Ok(Self::receipt(t, qi, appended));
                }
            }
        }
    }

    async fn send_keyed_async(
        &self,
        t: &Topic,
        qi: usize,
        msg: &Message,
        props: &[u8],
        key: &str,
    ) -> Result<SendReceipt> {
        let ikey = idem::index_key(Space::Message, &t.name, key);
        loop {
            match self.dedup.claim_async(&ikey, now_ms).await {
                Claim::Duplicate(at) => {
                    if let Some(r) = self.original_receipt(t, key, &ikey, at)? {
                        return Ok(r);
                    }
                }
                Claim::Owner(res) => {
                    let a = Self::append_of(t, qi, msg, props);
                    let hook = res.into_hook(Self::size_of(&a), a.timestamp_ms);
                    let appended = self.store.append_async_observed(a, hook).await?;
                    return Ok(Self::receipt(t, qi, appended));
                }
            }
        }
    }

    /// Read the record remembered for an idempotency key back from the log, and check that
    /// it is the key's: `None` (and the entry is forgotten) if it is not.
    fn original_record(
        &self,
        kind: RecordKind,
        topic: &str,
        key: &str,
        ikey: &str,
        at: idem::Stored,
    ) -> Result<Option<record::Record>> {
        let rec = self.store.read_at(at.log_offset, at.size)?;
        let ok = rec.header.kind == kind
            && rec.header.flags & FLAG_TXN_COMMIT == 0
            && rec.topic == topic
            && rec.properties.get(PROP_IDEMPOTENCY_KEY).map(String::as_str) == Some(key);
        if ok {
            if !rec.key.is_empty() {
                let event = crate::trace::Event::Duplicate {
                    idempotency_key: key.to_owned(),
                };
                self.trace_events(vec![(at.log_offset, event)]);
            }
            return Ok(Some(rec));
        }
        tracing::warn!(
            topic,
            key,
            log_offset = at.log_offset,
            "the record remembered for an idempotency key is not that key's; forgotten"
        );
        self.dedup.forget(ikey, at.log_offset);
        Ok(None)
    }

    fn original_receipt(
        &self,
        t: &Topic,
        key: &str,
        ikey: &str,
        at: idem::Stored,
    ) -> Result<Option<SendReceipt>> {
        let rec = self.original_record(RecordKind::Message, &t.name, key, ikey, at)?;
        Ok(rec.map(|rec| SendReceipt {
            topic: rec.topic,
            queue: rec.header.queue_id,
            offset: rec.header.queue_offset,
            log_offset: rec.header.log_offset,
            duplicate: true,
        }))
    }

    fn original_half(
        &self,
        t: &Topic,
        key: &str,
        ikey: &str,
        at: idem::Stored,
    ) -> Result<Option<HalfReceipt>> {
        let rec = self.original_record(RecordKind::Half, &t.name, key, ikey, at)?;
        Ok(rec.map(|rec| HalfReceipt {
            txn: TxnId(rec.header.log_offset),
            duplicate: true,
        }))
    }

    /// Idempotency keys remembered now.
    pub fn idempotency_keys(&self) -> u64 {
        self.dedup.len()
    }

    /// Whether an idempotency key of a plain send to `topic` is remembered (within the
    /// window or not yet pruned), and at which log offset.
    pub fn idempotency_key_stored(&self, topic: &str, key: &str) -> Option<u64> {
        self.dedup
            .lookup(&idem::index_key(Space::Message, topic, key))
            .map(|s| s.log_offset)
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
            t.send(crate::txn::checker::Msg::Wake);
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut t) = self.index_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.retention_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.check_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.delay_thread.lock().take() {
            t.stop();
        }
        if let Some(mut t) = self.dedup_thread.lock().take() {
            t.stop();
        }
        self.check_pool.shut_down();
    }
}
