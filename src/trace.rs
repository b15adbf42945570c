//! "Where is my confirmation?": every event of every message with a given key
//! ([`crate::Broker::trace`]).
//!
//! Two sources, merged per message:
//!
//! - **The commit log**, found through the key index ([`crate::key_index`]): the half, the
//!   commit or rollback, the stored message (topic, queue, offset), a delayed message and its
//!   fire, dead-letter copies and replayed copies. Every record is read back and its key
//!   compared, so the log is always what is shown.
//! - **The event journal**, a sled tree (`trace_events`) keyed by the record's log offset and
//!   a sequence number, for what is not itself a record: check-backs and their answers,
//!   "unresolved", deliveries (with the attempt), acks, nacks and time-outs (with the next
//!   attempt time), dead-lettering, replays, and refused idempotency-key duplicates.
//!
//! Journal writes are sled inserts without a flush of their own. An ack's event is inserted
//! just before the ack's own flushed sled write, and sled's log is written in order, so an ack
//! that survives a crash always keeps its event. Delivery, nack, check-back and duplicate
//! events become durable with the next sled flush (the next ack, checkpoint, or sled's own
//! flush timer, about half a second): a crash can lose the last of those. The "now" line is
//! computed from the live state (consumer offsets, leases, the transaction index), never from
//! the journal, so a lost event can make the history shorter but never makes "now" wrong.
//!
//! Events are only recorded for records with a key (nothing could look the others up).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::record::{RecordKind, FLAG_DELAYED_FIRE, FLAG_TXN_COMMIT};

/// What kind of record a traced record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecKind {
    /// A plain message.
    Message,
    /// A half (transactional) message.
    Half,
    /// The commit of a transaction (the visible message).
    Commit,
    /// The rollback of a transaction.
    Rollback,
    /// A delayed message, stored until its time.
    Delayed,
    /// The delivery of a delayed message (the visible message).
    Fire,
}

impl RecKind {
    fn of(kind: RecordKind, flags: u16) -> Option<RecKind> {
        match kind {
            RecordKind::Message if flags & FLAG_TXN_COMMIT != 0 => Some(RecKind::Commit),
            RecordKind::Message if flags & FLAG_DELAYED_FIRE != 0 => Some(RecKind::Fire),
            RecordKind::Message => Some(RecKind::Message),
            RecordKind::Half => Some(RecKind::Half),
            RecordKind::TxnEnd => Some(RecKind::Rollback),
            RecordKind::Delayed => Some(RecKind::Delayed),
            RecordKind::SegmentEnd => None,
        }
    }
}

/// Something that happened to a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A half message was written (from the log).
    Half {
        /// Transaction id (the half's log offset).
        txn: u64,
        /// Topic it goes to once committed.
        topic: String,
        /// Queue it goes to once committed.
        queue: u32,
        /// Producer group asked at check-back.
        producer_group: String,
    },
    /// The transaction was committed (from the log).
    Committed {
        /// Transaction id.
        txn: u64,
    },
    /// The transaction was rolled back (from the log).
    RolledBack {
        /// Transaction id.
        txn: u64,
    },
    /// A delayed message was stored, invisible until its time (from the log).
    DelayedStored {
        /// Topic it will be delivered to.
        topic: String,
        /// When, ms since the Unix epoch.
        deliver_at_ms: u64,
    },
    /// A delayed message's time came: it was copied into its queue (from the log).
    DelayedFired {
        /// The delayed message's id (its log offset).
        id: u64,
    },
    /// The message was stored and is visible to consumers (from the log).
    Stored {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Offset in the queue.
        offset: u64,
    },
    /// A copy was stored in a dead-letter topic (from the log).
    DeadLetterStored {
        /// The dead-letter topic.
        topic: String,
        /// Offset in it.
        offset: u64,
        /// Why, as the copy says.
        reason: String,
    },
    /// A send with the same idempotency key was answered with this message and not stored.
    Duplicate {
        /// The idempotency key.
        idempotency_key: String,
    },
    /// A check-back asked the producer group about the transaction.
    CheckAsked {
        /// Producer group asked.
        producer_group: String,
        /// Which check this is (1 = first).
        check: u32,
    },
    /// A check-back ended: `commit`, `rollback`, `unknown`, or why there was no answer.
    CheckAnswered {
        /// Which check this was.
        check: u32,
        /// The answer.
        answer: String,
    },
    /// Checked `check_max` times without an answer: needs a person.
    Unresolved {
        /// Checks made.
        checks: u32,
    },
    /// Handed to a consumer of `group`.
    Delivered {
        /// Consumer group.
        group: String,
        /// 1 for the first delivery to this group, 2 for the next, ...
        attempt: u32,
    },
    /// Acknowledged by `group`.
    Acked {
        /// Consumer group.
        group: String,
    },
    /// Delivery to `group` failed (nack or time-out) and will be retried at `next_at_ms`.
    Retried {
        /// Consumer group.
        group: String,
        /// The attempt that failed.
        attempt: u32,
        /// Why (nack, time-out).
        reason: String,
        /// When it will be delivered again, ms since the Unix epoch.
        next_at_ms: u64,
    },
    /// Given up on for `group` and moved to its dead-letter topic.
    DeadLettered {
        /// Consumer group.
        group: String,
        /// Attempts made.
        attempts: u32,
        /// Why.
        reason: String,
        /// Dead-letter topic.
        dlq_topic: String,
        /// Log offset of the copy in the dead-letter topic.
        dlq_log_offset: u64,
    },
    /// Sent again from the dead-letter topic of `group`, as a new message.
    Replayed {
        /// Consumer group.
        group: String,
        /// Topic of the new message.
        new_topic: String,
        /// Log offset of the new message.
        new_log_offset: u64,
    },
}

/// An event as stored in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What.
    pub event: Event,
}

/// The event journal: see the module docs.
pub struct Journal {
    events: sled::Tree,
    /// Orders the events of one record: see [`Journal::open`].
    seq: std::sync::atomic::AtomicU64,
    /// Encoded events handed over by [`Journal::record_later`], not yet in sled.
    later: parking_lot::Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// The thread that writes `later` (see [`Journal::start_writer`]).
    writer: parking_lot::Mutex<Option<crate::worker::Worker<bool>>>,
}

/// How often the writer thread moves handed-over events to sled.
const WRITE_LATER_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Open the journal's tree in `meta`.
    ///
    /// Events of one record are ordered by a sequence number in their key. It starts at the
    /// opening time in µs, so events recorded after a restart sort after earlier ones (unless
    /// the clock went back), and counts up in memory. (sled's `generate_id` did this durably,
    /// but a call could stall for milliseconds behind sled's own work.)
    pub fn open(meta: Arc<Meta>) -> Result<Journal> {
        let events = meta.tree("trace_events")?;
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Ok(Journal {
            events,
            seq: std::sync::atomic::AtomicU64::new(start_us),
            later: parking_lot::Mutex::new(Vec::new()),
            writer: parking_lot::Mutex::new(None),
        })
    }

    /// Start the thread that writes events handed over by [`Journal::record_later`] (every
    /// 100 ms). It stops when the journal is dropped.
    pub(crate) fn start_writer(self: &Arc<Self>) -> Result<()> {
        let me = Arc::downgrade(self);
        let w = crate::worker::Worker::spawn(
            "halfmq-journal",
            || false,
            move |rx, _| loop {
                match rx.recv_timeout(WRITE_LATER_EVERY) {
                    Ok(true) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(false) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let Some(j) = me.upgrade() else { return };
                if let Err(e) = j.write_later() {
                    tracing::warn!(error = %e, "cannot record trace events");
                }
            },
        )?;
        *self.writer.lock() = Some(w);
        Ok(())
    }

    /// Hand events over to the writer thread: for callers whose latency matters more than
    /// the event being in sled at once (the check-back loop). Readers see them at once
    /// ([`Journal::events`] writes them first); a crash can lose them, like any event not
    /// flushed yet.
    pub(crate) fn record_later(&self, events: Vec<(u64, Event)>) {
        if events.is_empty() {
            return;
        }
        let at = crate::broker::now_ms();
        let mut encoded = Vec::with_capacity(events.len());
        for (log_offset, event) in events {
            match self.encode(log_offset, at, event) {
                Ok(kv) => encoded.push(kv),
                Err(e) => tracing::warn!(error = %e, "cannot record a trace event"),
            }
        }
        self.later.lock().extend(encoded);
    }

    /// Move the handed-over events to sled (in the order they were handed over).
    pub(crate) fn write_later(&self) -> Result<()> {
        let batch = std::mem::take(&mut *self.later.lock());
        for (k, v) in batch {
            self.events.insert(k, v)?;
        }
        Ok(())
    }

    fn encode(&self, log_offset: u64, at_ms: u64, event: Event) -> Result<(Vec<u8>, Vec<u8>)> {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut k = Vec::with_capacity(16);
        k.extend_from_slice(&log_offset.to_be_bytes());
        k.extend_from_slice(&seq.to_be_bytes());
        // JSON, not bincode: `Event` is an internally tagged enum, which bincode cannot read.
        let v = serde_json::to_vec(&Recorded { at_ms, event }).map_err(|e| Error::Decode {
            what: "trace event",
            reason: format!("encode: {e}"),
        })?;
        Ok((k, v))
    }

    /// Record an event of the record at `log_offset`, now (not flushed: see the module docs).
    pub fn record(&self, log_offset: u64, event: Event) -> Result<()> {
        let (k, v) = self.encode(log_offset, crate::broker::now_ms(), event)?;
        self.events.insert(k, v)?;
        Ok(())
    }

    /// Record several events, now (not flushed).
    pub fn record_many(&self, events: Vec<(u64, Event)>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let at = crate::broker::now_ms();
        // Plain inserts, not one atomic `apply_batch`: events need no atomicity, and a sled
        // batch takes sled's global write lock, which waits for sled's own flushes.
        for (log_offset, event) in events {
            let (k, v) = self.encode(log_offset, at, event)?;
            self.events.insert(k, v)?;
        }
        Ok(())
    }

    /// [`Journal::record_many`] for callers where a failure must not fail the operation: it
    /// only loses history, so it is logged.
    pub(crate) fn record_or_log(&self, events: Vec<(u64, Event)>) {
        if let Err(e) = self.record_many(events) {
            tracing::warn!(error = %e, "cannot record trace events");
        }
    }

    /// Every event of the record at `log_offset`, in the order they were recorded.
    pub fn events(&self, log_offset: u64) -> Result<Vec<Recorded>> {
        self.write_later()?;
        let mut out = Vec::new();
        for kv in self.events.scan_prefix(log_offset.to_be_bytes()) {
            let (k, v) = kv?;
            if k.len() != 16 {
                continue;
            }
            match serde_json::from_slice(&v) {
                Ok(r) => out.push(r),
                // One unreadable event (written by a newer version, say) hides only itself.
                Err(e) => tracing::warn!(log_offset, error = %e, "unreadable trace event skipped"),
            }
        }
        Ok(out)
    }

    /// Forget the events of records below `log_offset` (for retention). Returns how many.
    pub fn drop_below(&self, log_offset: u64) -> Result<u64> {
        let mut n = 0;
        for kv in self.events.range(..log_offset.to_be_bytes().to_vec()) {
            let (k, _) = kv?;
            self.events.remove(k)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Everything known about the messages with one key: [`crate::Broker::trace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// The key looked up.
    pub key: String,
    /// One entry per message (a transaction and its outcome, a delayed message and its
    /// delivery, a message and its dead-letter copy count as one), in log order.
    pub messages: Vec<TracedMessage>,
    /// Records with this key that retention has deleted from the log since they were
    /// indexed (only their existence is known).
    pub expired: u32,
}

/// The story of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedMessage {
    /// Topic.
    pub topic: String,
    /// Transaction id, for transactional messages.
    pub txn: Option<u64>,
    /// Log offset of the first record of the story (the half, the delayed message, or the
    /// message itself).
    pub log_offset: u64,
    /// The dead-letter queue it was replayed from (`group/offset`), for a replayed message.
    pub replayed_from: Option<String>,
    /// What happened, oldest first.
    pub events: Vec<TraceLine>,
    /// Where it is now.
    pub now: Now,
}

/// One event of a [`TracedMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceLine {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// The log offset of the record it is about.
    pub log_offset: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// Where a message is now, from the live state (transaction index, consumer offsets,
/// leases), not from the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Now {
    /// `pending`, `unresolved`, `rolled_back`, `delayed`, `stored` or `finished` (a
    /// transaction whose outcome record is no longer in the log).
    pub state: String,
    /// Since when, ms since the Unix epoch.
    pub since_ms: u64,
    /// Check-backs so far (transactions).
    pub checks: u32,
    /// The last check-back's answer.
    pub last_answer: Option<String>,
    /// Next check-back (pending transactions) or delivery time (delayed messages), ms since
    /// the Unix epoch.
    pub next_at_ms: Option<u64>,
    /// Where it is stored: (topic, queue, offset).
    pub stored_at: Option<(String, u32, u64)>,
    /// Per consumer group that reads the topic.
    pub groups: Vec<GroupNow>,
    /// The same as one line for people.
    pub line: String,
}

/// One consumer group's view of a stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupNow {
    /// Group name.
    pub group: String,
    /// Handed to a consumer of the group (now or before a restart).
    pub delivered: bool,
    /// Latest attempt known (0 when only the group's position shows it was handed out).
    pub attempts: u32,
    /// Acknowledged (a dead-lettered message is acked by the move).
    pub acked: bool,
    /// With a consumer now, lease ending at this time (ms since the Unix epoch).
    pub in_flight_until_ms: Option<u64>,
    /// Waiting for redelivery at this time (ms since the Unix epoch).
    pub retry_at_ms: Option<u64>,
    /// Moved to this dead-letter topic.
    pub dead_letter_topic: Option<String>,
    /// Its dead-letter copy was replayed.
    pub replayed: bool,
}

impl GroupNow {
    fn describe(&self) -> String {
        let g = &self.group;
        if let Some(dlq) = &self.dead_letter_topic {
            return if self.replayed {
                format!("group {g}: dead-lettered to {dlq}, then replayed as a new message")
            } else {
                format!("group {g}: parked in dead-letter queue {dlq} (replay with `halfmq dlq replay`)")
            };
        }
        if self.acked {
            return format!("group {g}: acked");
        }
        let attempt = if self.attempts > 0 {
            format!(" (attempt {})", self.attempts)
        } else {
            String::new()
        };
        if let Some(at) = self.retry_at_ms {
            return format!(
                "group {g}: delivery failed{attempt}, redelivery at {}",
                format_ms(at)
            );
        }
        if let Some(until) = self.in_flight_until_ms {
            return format!(
                "group {g}: delivered{attempt}, not acked (lease until {})",
                format_ms(until)
            );
        }
        if self.delivered {
            format!("group {g}: delivered{attempt}, not acked")
        } else {
            format!("group {g}: not delivered yet")
        }
    }
}

impl Event {
    /// (short name, details) for people.
    fn describe(&self) -> (&'static str, String) {
        match self {
            Event::Half {
                txn,
                topic,
                queue,
                producer_group,
            } => (
                "half",
                format!("txn {txn} for {topic} queue {queue}, producer group {producer_group}"),
            ),
            Event::Committed { txn } => ("committed", format!("txn {txn}")),
            Event::RolledBack { txn } => ("rolled back", format!("txn {txn}")),
            Event::DelayedStored {
                topic,
                deliver_at_ms,
            } => (
                "delayed",
                format!("for {topic} until {}", format_ms(*deliver_at_ms)),
            ),
            Event::DelayedFired { id } => ("fired", format!("delayed message {id} is due")),
            Event::Stored {
                topic,
                queue,
                offset,
            } => ("stored", format!("{topic} queue {queue} offset {offset}")),
            Event::DeadLetterStored {
                topic,
                offset,
                reason,
            } => ("dlq stored", format!("{topic} offset {offset}: {reason}")),
            Event::Duplicate { idempotency_key } => (
                "duplicate",
                format!("a resend with idempotency key {idempotency_key:?} was answered with this message"),
            ),
            Event::CheckAsked {
                producer_group,
                check,
            } => (
                "check asked",
                format!("check {check}, producer group {producer_group}"),
            ),
            Event::CheckAnswered { check, answer } => {
                ("check answer", format!("check {check}: {answer}"))
            }
            Event::Unresolved { checks } => (
                "UNRESOLVED",
                format!("no answer after {checks} checks: needs a person"),
            ),
            Event::Delivered { group, attempt } => {
                ("delivered", format!("group {group}, attempt {attempt}"))
            }
            Event::Acked { group } => ("acked", format!("group {group}")),
            Event::Retried {
                group,
                attempt,
                reason,
                next_at_ms,
            } => (
                "retry",
                format!(
                    "group {group}, attempt {attempt} failed: {reason}; next at {}",
                    format_ms(*next_at_ms)
                ),
            ),
            Event::DeadLettered {
                group,
                attempts,
                reason,
                dlq_topic,
                dlq_log_offset,
            } => (
                "dead-lettered",
                format!(
                    "group {group}, after {attempts} attempts: {reason}; moved to {dlq_topic} (log {dlq_log_offset})"
                ),
            ),
            Event::Replayed {
                group,
                new_topic,
                new_log_offset,
            } => (
                "replayed",
                format!("from group {group}'s dead letters, as a new message in {new_topic} (log {new_log_offset})"),
            ),
        }
    }
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.messages.is_empty() {
            writeln!(
                f,
                "no message with key {:?} (keys are exact and case-sensitive)",
                self.key
            )?;
            if self.expired > 0 {
                writeln!(
                    f,
                    "({} older records with this key were deleted by retention)",
                    self.expired
                )?;
            }
            return Ok(());
        }
        let n = self.messages.len();
        writeln!(
            f,
            "key {:?}: {n} message{} (times UTC)",
            self.key,
            if n == 1 { "" } else { "s" }
        )?;
        for m in &self.messages {
            writeln!(f)?;
            match (m.txn, &m.replayed_from) {
                (Some(t), _) => writeln!(f, "transaction {t}, topic {}", m.topic)?,
                (None, Some(from)) => writeln!(
                    f,
                    "message at log {}, topic {}, replayed from dead letter {from}",
                    m.log_offset, m.topic
                )?,
                (None, None) => writeln!(f, "message at log {}, topic {}", m.log_offset, m.topic)?,
            }
            for l in &m.events {
                let (what, details) = l.event.describe();
                writeln!(f, "  {}  {what:<13} {details}", format_ms(l.at_ms))?;
            }
            writeln!(f, "  now: {}", m.now.line)?;
        }
        if self.expired > 0 {
            writeln!(
                f,
                "\n({} older records with this key were deleted by retention)",
                self.expired
            )?;
        }
        Ok(())
    }
}

/// A record with the key, read back from the log.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) log_offset: u64,
    pub(crate) kind: RecKind,
    pub(crate) topic: String,
    pub(crate) queue: u32,
    pub(crate) queue_offset: u64,
    pub(crate) timestamp_ms: u64,
    pub(crate) props: crate::record::Properties,
}

impl Found {
    pub(crate) fn of(r: &crate::record::Record) -> Option<Found> {
        Some(Found {
            log_offset: r.header.log_offset,
            kind: RecKind::of(r.header.kind, r.header.flags)?,
            topic: r.topic.clone(),
            queue: r.header.queue_id,
            queue_offset: r.header.queue_offset,
            timestamp_ms: r.header.timestamp_ms,
            props: r.properties.clone(),
        })
    }

    fn prop_u64(&self, name: &str) -> Option<u64> {
        self.props.get(name).and_then(|v| v.parse().ok())
    }

    fn is_dead_letter(&self) -> bool {
        self.kind == RecKind::Message
            && self.topic.starts_with(crate::broker::DLQ_TOPIC_PREFIX)
            && self.props.contains_key(crate::broker::PROP_DLQ_LOG_OFFSET)
    }

    /// The log offset of the first record of the story it belongs to (before dead-letter
    /// copies are attached to their original).
    fn root(&self) -> u64 {
        match self.kind {
            RecKind::Commit | RecKind::Rollback => self.prop_u64(crate::txn::PROP_TXN),
            RecKind::Fire => self.prop_u64(crate::delayed::PROP_DELAYED),
            _ => None,
        }
        .unwrap_or(self.log_offset)
    }
}

/// Group records into stories: (root log offset, records in log order), in log order.
pub(crate) fn stories(found: Vec<Found>) -> Vec<(u64, Vec<Found>)> {
    let mut out: Vec<(u64, Vec<Found>)> = Vec::new();
    let mut root_of: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for f in found {
        let mut root = f.root();
        if f.is_dead_letter() {
            if let Some(orig) = f.prop_u64(crate::broker::PROP_DLQ_LOG_OFFSET) {
                root = root_of.get(&orig).copied().unwrap_or(orig);
            }
        }
        root_of.insert(f.log_offset, root);
        match out.iter().position(|s| s.0 == root) {
            Some(i) => out[i].1.push(f),
            None => out.push((root, vec![f])),
        }
    }
    out
}

/// Join the traced records with their journal and the live state into a [`TracedMessage`].
pub(crate) fn story(
    b: &crate::broker::Broker,
    journal: &Journal,
    root: u64,
    records: Vec<Found>,
) -> Result<TracedMessage> {
    let first = records.first();
    let topic = first.map(|f| f.topic.clone()).unwrap_or_default();
    let txn = records
        .iter()
        .any(|f| matches!(f.kind, RecKind::Half | RecKind::Commit | RecKind::Rollback))
        .then_some(root);
    let replayed_from = first.and_then(|f| f.props.get(crate::broker::PROP_REPLAYED_FROM).cloned());
    let mut lines = Vec::new();
    let mut journal_events: Vec<(u64, Recorded)> = Vec::new();
    let mut stored: Option<&Found> = None;
    let mut dead_copies: Vec<&Found> = Vec::new();
    let mut rolled_back_at = None;
    let mut delayed: Option<(&Found, u64)> = None;
    for f in &records {
        let mut push = |event| {
            lines.push(TraceLine {
                at_ms: f.timestamp_ms,
                log_offset: f.log_offset,
                event,
            })
        };
        let stored_event = || Event::Stored {
            topic: f.topic.clone(),
            queue: f.queue,
            offset: f.queue_offset,
        };
        match f.kind {
            RecKind::Half => push(Event::Half {
                txn: f.log_offset,
                topic: f.topic.clone(),
                queue: f.queue,
                producer_group: f
                    .props
                    .get(crate::txn::PROP_PRODUCER_GROUP)
                    .cloned()
                    .unwrap_or_default(),
            }),
            RecKind::Commit => {
                push(Event::Committed { txn: root });
                push(stored_event());
                stored = Some(f);
            }
            RecKind::Rollback => {
                push(Event::RolledBack { txn: root });
                rolled_back_at = Some(f.timestamp_ms);
            }
            RecKind::Delayed => {
                let at = f
                    .prop_u64(crate::broker::PROP_DELIVER_AT_MS)
                    .unwrap_or_default();
                push(Event::DelayedStored {
                    topic: f.topic.clone(),
                    deliver_at_ms: at,
                });
                delayed = Some((f, at));
            }
            RecKind::Fire => {
                push(Event::DelayedFired { id: root });
                push(stored_event());
                stored = Some(f);
            }
            RecKind::Message if f.is_dead_letter() && stored.is_some() => {
                push(Event::DeadLetterStored {
                    topic: f.topic.clone(),
                    offset: f.queue_offset,
                    reason: f
                        .props
                        .get(crate::broker::PROP_DLQ_REASON)
                        .cloned()
                        .unwrap_or_default(),
                });
                dead_copies.push(f);
            }
            RecKind::Message => {
                push(stored_event());
                stored = Some(f);
            }
        }
        for r in journal.events(f.log_offset)? {
            lines.push(TraceLine {
                at_ms: r.at_ms,
                log_offset: f.log_offset,
                event: r.event.clone(),
            });
            journal_events.push((f.log_offset, r));
        }
    }
    // Stable: what happened in the same millisecond keeps log and journal order.
    lines.sort_by_key(|l| l.at_ms);
    let now = match stored {
        Some(f) => now_stored(b, f, &dead_copies, &journal_events)?,
        None => now_unstored(b, txn, &records, rolled_back_at, delayed),
    };
    Ok(TracedMessage {
        topic,
        txn,
        log_offset: first.map_or(root, |f| f.log_offset),
        replayed_from,
        events: lines,
        now,
    })
}

fn now_stored(
    b: &crate::broker::Broker,
    f: &Found,
    dead_copies: &[&Found],
    journal: &[(u64, Recorded)],
) -> Result<Now> {
    use crate::broker::{dead_letter_topic, DLQ_TOPIC_PREFIX, REPLAY_GROUP};
    let (topic, queue, offset) = (&f.topic, f.queue, f.queue_offset);
    let mut names: BTreeSet<String> = b
        .meta()
        .consumer_queues()?
        .into_iter()
        .filter(|(_, t, q)| t == topic && *q == queue)
        .map(|(g, _, _)| g)
        .collect();
    names.extend(b.polling_groups(topic));
    for (o, r) in journal {
        if *o != f.log_offset {
            continue;
        }
        if let Event::Delivered { group, .. } | Event::Acked { group } = &r.event {
            names.insert(group.clone());
        }
    }
    names.remove(REPLAY_GROUP);
    let mut groups = Vec::new();
    for g in names {
        let acks = b.meta().queue_acks(&g, topic, queue)?;
        let acked = offset < acks.committed || acks.acked_above.contains(&offset);
        let journal_attempt = journal
            .iter()
            .filter(|(o, _)| *o == f.log_offset)
            .filter_map(|(_, r)| match &r.event {
                Event::Delivered { group, attempt } if *group == g => Some(*attempt),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let live = b.lease_of(&g, topic, queue, offset);
        let mut gn = GroupNow {
            group: g.clone(),
            delivered: acked || journal_attempt > 0,
            attempts: journal_attempt,
            acked,
            in_flight_until_ms: None,
            retry_at_ms: None,
            dead_letter_topic: None,
            replayed: false,
        };
        if let Some(l) = live {
            gn.delivered |= l.delivered || l.failures > 0 || l.handed_out;
            gn.attempts = gn.attempts.max(l.failures + u32::from(l.delivered));
            if l.delivered {
                gn.in_flight_until_ms = Some(l.due_ms);
            } else if l.failures > 0 && l.due_ms != u64::MAX && l.due_ms != 0 {
                gn.retry_at_ms = Some(l.due_ms);
            }
        }
        let dlq = dead_letter_topic(&g);
        if let Some(copy) = dead_copies.iter().find(|c| c.topic == dlq) {
            gn.dead_letter_topic = Some(dlq.clone());
            let replay = b.meta().queue_acks(REPLAY_GROUP, &dlq, 0)?;
            gn.replayed = copy.queue_offset < replay.committed
                || replay.acked_above.contains(&copy.queue_offset);
        }
        groups.push(gn);
    }
    let mut line = if f.topic.starts_with(DLQ_TOPIC_PREFIX) {
        format!("parked in dead-letter queue {topic} at offset {offset}")
    } else {
        let what = match f.kind {
            RecKind::Commit => "committed, stored",
            RecKind::Fire => "delivered on time, stored",
            _ => "stored",
        };
        format!("{what} at {topic} queue {queue} offset {offset}")
    };
    if f.topic.starts_with(DLQ_TOPIC_PREFIX) {
        let replay = b.meta().queue_acks(REPLAY_GROUP, topic, 0)?;
        if offset < replay.committed || replay.acked_above.contains(&offset) {
            line = format!("replayed from dead-letter queue {topic} (offset {offset})");
        }
    } else if groups.is_empty() {
        line.push_str("; no consumer group reads this topic yet");
    }
    for g in &groups {
        line.push_str("; ");
        line.push_str(&g.describe());
    }
    Ok(Now {
        state: "stored".into(),
        since_ms: f.timestamp_ms,
        checks: 0,
        last_answer: None,
        next_at_ms: None,
        stored_at: Some((topic.clone(), queue, offset)),
        groups,
        line,
    })
}

fn now_unstored(
    b: &crate::broker::Broker,
    txn: Option<u64>,
    records: &[Found],
    rolled_back_at: Option<u64>,
    delayed: Option<(&Found, u64)>,
) -> Now {
    let mut now = Now {
        state: "finished".into(),
        since_ms: records.first().map_or(0, |f| f.timestamp_ms),
        checks: 0,
        last_answer: None,
        next_at_ms: None,
        stored_at: None,
        groups: Vec::new(),
        line: String::new(),
    };
    if let Some((f, at)) = delayed {
        now.state = "delayed".into();
        now.next_at_ms = Some(at);
        now.line = format!(
            "DELAYED: stored for {} since {}, to be delivered at {}; not visible to consumers yet",
            f.topic,
            format_ms(f.timestamp_ms),
            format_ms(at)
        );
        return now;
    }
    let Some(txn) = txn else {
        now.line = "unknown".into();
        return now;
    };
    if let Some(at) = rolled_back_at {
        now.state = "rolled_back".into();
        now.since_ms = at;
        now.line = format!(
            "rolled back at {}: never visible to consumers",
            format_ms(at)
        );
        return now;
    }
    match b.txn_index().get(txn) {
        Some(info) => {
            now.checks = info.checks;
            now.last_answer = info.last_answer.clone();
            let last = info
                .last_answer
                .as_deref()
                .map(|a| format!(", last answer: {a}"))
                .unwrap_or_default();
            if info.state == crate::txn::TxnState::Unresolved {
                now.state = "unresolved".into();
                now.line = format!(
                    "UNRESOLVED since {}: checked {} times{last}; not visible. \
                     Resolve by hand: halfmq txn commit {txn} (or rollback, or rearm)",
                    format_ms(info.created_ms),
                    info.checks
                );
            } else {
                now.state = "pending".into();
                now.next_at_ms = Some(info.next_check_ms);
                now.line = format!(
                    "PENDING (half written, not committed) since {}: checked {} times{last}; \
                     next check at {}; not visible to consumers",
                    format_ms(info.created_ms),
                    info.checks,
                    format_ms(info.next_check_ms)
                );
            }
        }
        None => {
            let outcome = b.txn_index().finished(txn, b.meta()).ok().flatten();
            now.line = match outcome {
                Some(o) => format!(
                    "{} (its outcome record is no longer in the log)",
                    o.as_str()
                ),
                None => "finished; its outcome is no longer known".into(),
            };
        }
    }
    now
}

/// `2026-11-30 19:02:01.123` (UTC) for ms since the Unix epoch.
pub fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(format_ms(0), "1970-01-01 00:00:00.000");
        assert_eq!(format_ms(951_782_400_001), "2000-02-29 00:00:00.001");
        assert_eq!(format_ms(1_796_066_521_123), "2026-11-30 19:22:01.123");
    }

    #[test]
    fn journal_keeps_order_and_fields_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Arc::new(Meta::open(&dir.path().join("meta")).unwrap());
        let j = Journal::open(meta).unwrap();
        let delivered = Event::Delivered {
            group: "g".into(),
            attempt: 1,
        };
        j.record(7, delivered.clone()).unwrap();
        j.record_many(vec![
            (8, Event::Acked { group: "g".into() }),
            (7, Event::Acked { group: "g".into() }),
        ])
        .unwrap();
        let ev: Vec<Event> = j.events(7).unwrap().into_iter().map(|r| r.event).collect();
        assert_eq!(ev, vec![delivered, Event::Acked { group: "g".into() }]);
        assert_eq!(j.events(8).unwrap().len(), 1);
        assert!(j.events(9).unwrap().is_empty());
        assert_eq!(j.drop_below(8).unwrap(), 2);
        assert!(j.events(7).unwrap().is_empty());
        assert_eq!(j.events(8).unwrap().len(), 1);
    }
}
