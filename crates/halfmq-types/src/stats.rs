//! Figures for people and monitoring: what `Broker::stats` returns (embedded and over the network),
//! and the retention floor and pass reports. Plain data, so that the metrics facade and the
//! network server can read it without reaching into the broker.

/// Per-queue figures for `Broker::stats`.
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
    pub log: LogStats,
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
    /// What opening found wrong with the metadata database (sled) and did about it.
    #[serde(default)]
    pub meta: MetaRecovery,
}

/// What opening found wrong with the metadata database (`meta/`, sled) and what it did, for
/// [`Stats`]: all empty when sled was as new as the log's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetaRecovery {
    /// Why the state derived from the log (pending halves and outcomes, delayed messages,
    /// idempotency keys) was rebuilt from the log, if it was: `meta/` missing, empty,
    /// damaged or older than the checkpoint.
    pub rebuilt: Option<String>,
    /// The log offset the rebuild read the log from.
    #[serde(default)]
    pub rebuilt_from: u64,
    /// Records the rebuild read.
    #[serde(default)]
    pub records_replayed: u64,
    /// Where the damaged database was moved (`meta.damaged.<ms>`), if it could not be used.
    #[serde(default)]
    pub moved_aside: Option<String>,
    /// Consumer positions that may have gone back (their messages are delivered again).
    #[serde(default)]
    pub offsets_lost: Vec<OffsetReport>,
    /// Committed offsets past the end of their queue (the log lost its end), lowered to it.
    #[serde(default)]
    pub offsets_clamped: Vec<OffsetReport>,
    /// Transaction outcomes at or past the end of the log, forgotten (their ids are handed
    /// out again).
    #[serde(default)]
    pub outcomes_fenced: u64,
}

impl MetaRecovery {
    /// Whether opening found nothing wrong.
    pub fn is_clean(&self) -> bool {
        self == &MetaRecovery::default()
    }
}

/// One consumer position [`MetaRecovery`] reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffsetReport {
    /// The group; `None` for every group (their names were lost with the database).
    pub group: Option<String>,
    /// Topic.
    pub topic: String,
    /// Queue.
    pub queue: u32,
    /// The committed offset found (lost: what it is now).
    pub committed: u64,
    /// The end of the queue (messages stored).
    pub end: u64,
}

impl std::fmt::Display for OffsetReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.group {
            Some(g) => write!(f, "group {g}, ")?,
            None => f.write_str("every group, ")?,
        }
        write!(
            f,
            "topic {}, queue {}: committed {} of {}",
            self.topic, self.queue, self.committed, self.end
        )
    }
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

/// What holds the retention floor where it is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pin {
    /// A consumer group has not acked this message yet.
    Group {
        /// Group.
        group: String,
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Its first un-acked queue offset.
        offset: u64,
    },
    /// No consumer group has consumed this topic yet: its messages are kept.
    Unconsumed {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Its first message still in the log.
        offset: u64,
    },
    /// Dead letters of this group that were neither replayed nor acked by anyone.
    DeadLetters {
        /// The group whose dead letters they are.
        group: String,
        /// The first such dead letter (offset in `%DLQ%<group>`).
        offset: u64,
    },
    /// A transaction waiting for its outcome.
    Half {
        /// Transaction id (the half's log offset).
        txn: u64,
    },
    /// A delayed message not delivered yet.
    Delayed {
        /// Its id (log offset).
        id: u64,
    },
    /// The record of a remembered idempotency key (see `dedup_window`).
    IdempotencyKey,
    /// The newest recovery checkpoint (moves every `checkpoint_bytes` of log).
    Checkpoint,
}

impl std::fmt::Display for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pin::Group {
                group,
                topic,
                queue,
                offset,
            } => write!(
                f,
                "group {group}, topic {topic}, queue {queue}, offset {offset}"
            ),
            Pin::Unconsumed {
                topic,
                queue,
                offset,
            } => write!(
                f,
                "topic {topic}, queue {queue}, offset {offset}: no consumer group has consumed it"
            ),
            Pin::DeadLetters { group, offset } => write!(
                f,
                "dead letters of group {group} from offset {offset}: not replayed or acked"
            ),
            Pin::Half { txn } => write!(f, "pending half, transaction {txn}"),
            Pin::Delayed { id } => write!(f, "pending delayed message {id}"),
            Pin::IdempotencyKey => write!(f, "an idempotency key within dedup_window"),
            Pin::Checkpoint => write!(f, "the recovery checkpoint"),
        }
    }
}

/// The lowest log offset still needed, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionFloor {
    /// Nothing at or above this log offset may be deleted.
    pub floor: u64,
    /// What sets it; `None` when nothing below the durable end of the log is needed.
    pub pinned_by: Option<Pin>,
}

/// What one retention pass found and did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetentionReport {
    /// The floor and what set it.
    pub floor: RetentionFloor,
    /// Log start before the pass.
    pub log_start_before: u64,
    /// Log start after the pass.
    pub log_start: u64,
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Their bytes.
    pub bytes_deleted: u64,
    /// Bytes of all segment files after the pass.
    pub log_bytes: u64,
    /// A limit is exceeded but the oldest segment is still needed (see `floor.pinned_by`).
    pub held_by_floor: bool,
    /// No limit is configured: nothing is ever deleted.
    pub disabled: bool,
    /// Time to compute the floor, µs.
    pub floor_us: u64,
    /// Time of the whole pass, µs.
    pub pass_us: u64,
}

/// Statistics of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogStats {
    /// Segment files.
    pub segments: usize,
    /// Log offset of the first record.
    pub first_offset: u64,
    /// Everything before this offset is durable.
    pub durable_offset: u64,
    /// Everything before this offset is written to the OS.
    pub written_offset: u64,
    /// Log fsyncs (group commits) since open.
    pub syncs: u64,
    /// Records written since open.
    pub records: u64,
    /// Base offset of the first segment: everything below was deleted by retention.
    #[serde(default)]
    pub log_start: u64,
    /// Bytes of all segment files (what the log takes on disk).
    #[serde(default)]
    pub log_bytes: u64,
    /// Consume-queue entries that a read found damaged and rebuilt from the log since open.
    #[serde(default)]
    pub index_entries_rebuilt: u64,
    /// Group commits written by the writer of their only record on its own thread, not by
    /// the flusher thread: a lone producer's rounds (see `StoreConfig::tasks_may_lead`).
    #[serde(default)]
    pub rounds_led: u64,
}
