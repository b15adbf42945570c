//! The embedded broker: topics, sends, transactions, delayed delivery, consumer groups with
//! durable offsets.
//!
//! `Broker` ties the storage engine ([`halfmq_store::Store`]) to the metadata in sled
//! (`crate::meta`). It is what an application embeds, and what the network broker serves.
//! This module holds the broker's state and what every part shares; each part is a child
//! module adding methods to it:
//!
//! - `open`: opening (recovery replay into the indexes, the threads) and closing;
//! - `topics`: topic creation and lookup, and the queue a message goes to;
//! - `send`: plain sends; `idem`: idempotency keys on the send path, and the thread that
//!   persists them;
//! - `txn`: half messages, commit and rollback, checker registration; `checker`: the
//!   check-back thread;
//! - `delayed`: delayed sends and the timer thread that delivers them;
//! - `consume`: poll, ack, nack, redelivery, dead letters and replay, group settings;
//! - `stats`, `retention`, `trace` (with `story`): what the broker reports;
//! - `wait`: how one operation is waited for, blocking or async.
//!
//! Threads that drive the broker (check-back, delayed delivery, idempotency-key persister,
//! retention) live here, under `broker`, and hold only a `Weak<Broker>`; the leaf modules of
//! the crate (`meta`, `txn`, `idem`, `delayed`, `delivery`, `journal`) never see a `Broker`.

mod checker;
mod consume;
mod delayed;
mod derived;
mod idem;
mod open;
mod retention;
mod send;
mod send_batch;
mod stats;
mod story;
mod topics;
mod trace;
mod txn;
mod wait;

pub use consume::{dead_letter_topic, Decided, DeliveredLease, Polled, Settlement};
pub use delayed::DELAY_MAX;
pub use send_batch::{check_batch, StagedSend};

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::config::BrokerConfig;
use crate::delayed::DelayedIndex;
use crate::idem::DedupIndex;
use crate::meta::Meta;
use crate::txn::TxnIndex;
use checker::{CheckPool, CheckerThread};
use consume::{GroupKey, GroupTopic};
use delayed::DelayThread;
use halfmq_store::consume_queue::ConsumeQueue;
use halfmq_store::record::{self, RecordKind, RecordView};
use halfmq_store::{validate_topic_name, Append, RecoveryReport, Store};
use halfmq_types::clock::SharedClock;
use halfmq_types::error::{Error, Result};
use halfmq_types::filter::validate_tag;
use halfmq_types::props::{
    DLQ_TOPIC_PREFIX, INTERNAL_TOPIC_PREFIX, PROP_MESSAGE_GROUP, PROP_TAG, RESERVED_PREFIX,
    USER_SETTABLE,
};
use halfmq_types::stats::RetentionReport;

/// The embedded broker. All methods take `&self`; share it with an `Arc`.
pub struct Broker {
    config: BrokerConfig,
    /// The clock every deadline is decided by (`config.clock`).
    clock: SharedClock,
    /// The clock of leases and redelivery waits (`config.lease_clock`, else `clock`).
    lease_clock: SharedClock,
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
    /// Transaction checkers by producer group.
    checkers: crate::checkers::Checkers,
    check_thread: Mutex<Option<CheckerThread>>,
    delayed: Arc<DelayedIndex>,
    delay_thread: Mutex<Option<DelayThread>>,
    /// Writes idempotency keys to sled between checkpoints.
    dedup_thread: Mutex<Option<halfmq_store::worker::Worker<()>>>,
    check_pool: CheckPool,
    /// Remembered idempotency keys.
    dedup: Arc<DedupIndex>,
    /// The key index of `trace` (derived from the log, kept by `index_thread`).
    key_index: Arc<halfmq_store::key_index::KeyIndex>,
    /// The event journal of `trace`.
    journal: Arc<crate::journal::Journal>,
    /// Keeps `key_index` in step with the log (shared with `index_thread`).
    indexer: Arc<trace::Indexer>,
    index_thread: Mutex<Option<trace::IndexerThread>>,
    /// Held during a retention pass (the background one or [`Broker::enforce_retention`]).
    retention_pass: Mutex<()>,
    last_retention: Mutex<Option<RetentionReport>>,
    retention_thread: Mutex<Option<halfmq_store::worker::Worker<()>>>,
    /// Messages polls skipped because retention had deleted them.
    expired_skipped: AtomicU64,
    /// What opening found wrong with sled and did about it.
    meta_recovery: halfmq_types::stats::MetaRecovery,
    /// Lease numbers and the key of receipts' checksums.
    leases: consume::LeaseKeys,
}

/// A topic and its queues, as the send path uses them.
struct Topic {
    name: String,
    queues: Vec<Arc<ConsumeQueue>>,
    round_robin: AtomicU32,
    counters: crate::metrics::TopicCounters,
}

impl Topic {
    /// The append of a record of `kind` in queue `qi`. Only a message is indexed in its
    /// consume queue at once; a half or a delayed message becomes visible later, as a record
    /// of its own (the commit, the fire).
    fn append<'a>(
        &'a self,
        qi: usize,
        kind: RecordKind,
        (key, props, body): (&'a str, &'a [u8], &'a [u8]),
        timestamp_ms: u64,
    ) -> Append<'a> {
        let q = &self.queues[qi];
        Append {
            kind,
            flags: 0,
            topic: &self.name,
            queue_id: q.queue_id(),
            key,
            props,
            body,
            timestamp_ms,
            dispatch_to: (kind == RecordKind::Message).then_some(q),
        }
    }
}

/// A number the broker put in a record's properties and reads back (on recovery, or to
/// follow a story): a record without it is damaged.
fn required_prop(view: &RecordView<'_>, name: &str, missing: &str) -> Result<u64> {
    view.properties()?
        .get(name)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Corrupt {
            path: std::path::PathBuf::from("log"),
            offset: view.header.log_offset,
            reason: missing.to_owned(),
        })
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("data_dir", &self.config.data_dir)
            .finish()
    }
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
    /// What recovery found when this broker was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// What opening found wrong with the metadata database (`meta/`) and did about it:
    /// a rebuild of the state derived from the log, consumer positions lost or clamped,
    /// transaction outcomes forgotten (also in [`Broker::stats`]).
    pub fn meta_recovery(&self) -> &halfmq_types::stats::MetaRecovery {
        &self.meta_recovery
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The storage engine, for tools and tests.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn txn_index(&self) -> &TxnIndex {
        &self.txns
    }

    pub(crate) fn check_pool(&self) -> &CheckPool {
        &self.check_pool
    }

    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Now, by the broker's clock (ms since the Unix epoch).
    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Now, by the clock of leases and redelivery waits (ms since the Unix epoch).
    pub(crate) fn lease_now(&self) -> u64 {
        self.lease_clock.now_ms()
    }

    /// For tests that move a [`ManualClock`](crate::ManualClock): act now on what is due by
    /// the broker's clock, instead of when the timer threads next look (they sleep on real
    /// time, up to half a second). Runs one round of the check-back thread (due checks start;
    /// their answers are applied as they come in) and one of the delayed-delivery timer, and
    /// returns once both are done. Redelivery and the idempotency window need no such call:
    /// polls and sends read the clock themselves.
    #[doc(hidden)]
    pub fn run_due_now(&self) {
        let mut rounds = Vec::new();
        if let Some(t) = self.check_thread.lock().as_ref() {
            let (tx, rx) = std::sync::mpsc::channel();
            t.send(checker::Msg::Round(tx));
            rounds.push(rx);
        }
        if let Some(t) = self.delay_thread.lock().as_ref() {
            let (tx, rx) = std::sync::mpsc::channel();
            t.send(delayed::Msg::Round(tx));
            rounds.push(rx);
        }
        for rx in rounds {
            // A stopped thread drops its sender: nothing to wait for then.
            let _ = rx.recv_timeout(std::time::Duration::from_secs(30));
        }
    }

    /// Stop the broker's own threads (close and drop): the ones that drive it first, then
    /// the key indexer, which the close runs once more itself after the store is closed.
    fn stop_threads(&self) {
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
    }

    fn check_user_message(msg: &halfmq_types::Message) -> Result<()> {
        let props = &msg.properties;
        crate::idem::key_of(props)?;
        halfmq_types::validate_more_keys(msg)?;
        if let Some(tag) = props.get(PROP_TAG) {
            validate_tag("tag", tag)?;
        }
        if let Some(g) = props.get(PROP_MESSAGE_GROUP) {
            validate_tag("message group", g)?;
        }
        match props
            .keys()
            .find(|k| k.starts_with(RESERVED_PREFIX) && !USER_SETTABLE.contains(&k.as_str()))
        {
            Some(k) => Err(Error::Invalid {
                what: "property name",
                reason: format!("{k:?}: names starting with {RESERVED_PREFIX:?} are reserved"),
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop_threads();
    }
}
