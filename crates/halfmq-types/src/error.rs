//! One typed error for every halfmq crate, embedded and over the network.
//!
//! Every variant a user can hit names what it is about: the file and offset of a corrupt
//! record, the setting that is wrong, the topic that does not exist. Errors that cross the
//! wire carry a stable numeric code ([`Error::code`]) and their text, from which the client
//! rebuilds the same variant ([`Error::from_wire`], in [`wire`]).

use std::path::PathBuf;

pub mod wire;

/// The crate's result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in halfmq.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file failed.
    #[error("I/O error on {path}: {op}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done (`"write"`, `"sync"`, `"open"`, ...).
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// The disk is full. Nothing acknowledged was lost; the write that needed the space was
    /// refused and may be retried once space is freed.
    #[error("disk full while {op} {path}: the write was refused, nothing acknowledged is lost")]
    DiskFull {
        /// The file that could not grow.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
    },

    /// An earlier write or fsync failed, so the store no longer knows what is on disk and
    /// refuses further writes (the "fsyncgate" lesson: never retry an fsync and pretend).
    /// Reopen the store to recover from what is durable.
    #[error("the store stopped accepting writes after an earlier I/O failure: {0}; reopen it to recover")]
    Poisoned(String),

    /// A record or file is damaged somewhere recovery may not cut it off (not the torn tail of
    /// the newest segment).
    #[error("corrupt data in {path} at byte {offset}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte position inside that file.
        offset: u64,
        /// What was wrong.
        reason: String,
    },

    /// Acknowledged data in the commit log is damaged: a record that fails its checks lies
    /// at or below the durable end that a later group commit (or the checkpoint) recorded,
    /// so it was acknowledged and recovery may not cut it. Nothing has been changed; `halfmq
    /// repair` copies the damaged bytes aside and reports what they held.
    #[error("acknowledged data is damaged in {path} at byte {offset}: {reason}; run `halfmq repair` to quarantine it")]
    Damaged {
        /// The damaged segment file.
        path: PathBuf,
        /// Byte position inside that file.
        offset: u64,
        /// What was wrong, and how recovery knows it was acknowledged.
        reason: String,
    },

    /// The message at this queue offset was lost to damage: `halfmq repair` replaced its
    /// damaged record with a quarantine record (its bytes are kept in the data directory's
    /// `quarantine/`). Polls skip it; a direct read gets this error.
    #[error("{topic}/{queue}@{offset} was lost to damage and quarantined by repair")]
    Lost {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// The queue offset asked for.
        offset: u64,
    },

    /// Bytes could not be decoded as a record, frame or metadata value.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration `{setting}`: {reason}")]
    Config {
        /// The name of the setting, as written in the config file or flag.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// Another process holds the data directory.
    #[error("data directory {path} is locked by another process (lock file {lock})")]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },

    /// The topic does not exist and automatic topic creation is off.
    #[error("unknown topic `{0}` (create it first, or enable auto-create-topics)")]
    UnknownTopic(String),

    /// A topic exists already with a different number of queues.
    #[error("topic `{topic}` exists with {existing} queues, not {requested}")]
    TopicExists {
        /// The topic.
        topic: String,
        /// Queues it has.
        existing: u32,
        /// Queues asked for.
        requested: u32,
    },

    /// A queue id outside the topic's queues.
    #[error("topic `{topic}` has no queue {queue} (it has {queues})")]
    UnknownQueue {
        /// The topic.
        topic: String,
        /// The queue asked for.
        queue: u32,
        /// How many queues the topic has.
        queues: u32,
    },

    /// A name, key, body or property is not acceptable.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was rejected (`"topic name"`, `"key"`, `"message"`).
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// An ack for a message that the group was never given, or an offset past the queue's end.
    #[error("cannot ack {topic}/{queue}@{offset} for group `{group}`: {reason}")]
    BadAck {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The queue.
        queue: u32,
        /// The queue offset.
        offset: u64,
        /// Why.
        reason: String,
    },

    /// No consumer group of this name has any state in the broker.
    #[error("unknown consumer group `{0}` (it has no offsets, settings or deliveries)")]
    UnknownGroup(String),

    /// No transaction with this id is pending, unresolved, or remembered as finished.
    #[error("unknown transaction {0} (never written, or finished longer ago than the outcome retention)")]
    UnknownTxn(u64),

    /// The transaction already has the opposite outcome; the first outcome stands.
    #[error("transaction {txn} is already {stands}; the first outcome stands")]
    TxnConflict {
        /// The transaction id.
        txn: u64,
        /// The outcome that stands (`"committed"` or `"rolled back"`).
        stands: &'static str,
    },

    /// The broker answered a request with an error the client cannot rebuild as one of the
    /// other variants ([`Error::from_wire`]): a protocol error (code 100 and up), or a code or
    /// text this build does not know.
    #[error("broker error {code}: {message}")]
    Remote {
        /// Stable error code ([`Error::code`] on the broker; 100+ for protocol errors).
        code: u16,
        /// The broker's message.
        message: String,
    },

    /// No answer in time. For a write, the outcome is unknown: it may or may not have been
    /// stored (retry with the same key, or check with `trace`).
    #[error("{what}: no answer within {after_ms} ms")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after_ms: u64,
    },

    /// The connection to the broker is gone (or could not be made). For a write in flight,
    /// the outcome is unknown.
    #[error("not connected to the broker at {addr}: {reason}")]
    Disconnected {
        /// The broker address.
        addr: String,
        /// Why.
        reason: String,
    },

    /// The metadata store (sled) failed.
    #[error("metadata store error: {0}")]
    Meta(String),

    /// The store was closed.
    #[error("the store is closed")]
    Closed,

    /// The message was deleted by retention: its log segment is gone. A poll skips such
    /// messages (and counts them); a direct read gets this error.
    #[error("{topic}/{queue}@{offset} was deleted by retention (the queue now starts at {first})")]
    Expired {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// The queue offset asked for.
        offset: u64,
        /// The first queue offset whose message is still in the log.
        first: u64,
    },

    /// A receipt no lease of this broker issued: not a receipt at all, modified, made up,
    /// or issued before the broker last opened (leases do not survive a restart; the
    /// message is delivered again).
    #[error("invalid receipt `{receipt}`: {reason}")]
    BadReceipt {
        /// The receipt as given (at most 64 bytes of it).
        receipt: String,
        /// Why.
        reason: String,
    },

    /// A receipt of a lease that has ended: the message was delivered again after the lease
    /// ran out, or the lease was nacked or changed (a change returns a new receipt).
    #[error("stale receipt for {topic}/{queue}@{offset} of group `{group}`: {reason}")]
    StaleReceipt {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The queue.
        queue: u32,
        /// The queue offset.
        offset: u64,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Build an [`Error::Io`], turning "no space left on device" into [`Error::DiskFull`].
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Error {
        let path = path.into();
        // The standard library maps ENOSPC to `StorageFull`.
        if source.kind() == std::io::ErrorKind::StorageFull {
            return Error::DiskFull { path, op };
        }
        Error::Io { path, op, source }
    }

    /// A stable numeric code for this error, used on the wire.
    pub fn code(&self) -> u16 {
        match self {
            Error::Io { .. } => 1,
            Error::DiskFull { .. } => 2,
            Error::Poisoned(_) => 3,
            Error::Corrupt { .. } => 4,
            Error::Decode { .. } => 5,
            Error::Config { .. } => 6,
            Error::Locked { .. } => 7,
            Error::UnknownTopic(_) => 8,
            Error::TopicExists { .. } => 9,
            Error::UnknownQueue { .. } => 10,
            Error::Invalid { .. } => 11,
            Error::BadAck { .. } => 12,
            Error::Meta(_) => 13,
            Error::Closed => 14,
            Error::UnknownTxn(_) => 15,
            Error::TxnConflict { .. } => 16,
            Error::Remote { code, .. } => *code,
            Error::Timeout { .. } => 17,
            Error::Disconnected { .. } => 18,
            Error::Expired { .. } => 19,
            Error::UnknownGroup(_) => 20,
            Error::Damaged { .. } => 21,
            Error::Lost { .. } => 22,
            Error::BadReceipt { .. } => 23,
            Error::StaleReceipt { .. } => 24,
        }
    }
}
