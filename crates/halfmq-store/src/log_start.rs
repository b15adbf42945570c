//! The persisted start of the log: where retention cut it, and where every consume queue
//! starts at that point.
//!
//! ```text
//! logstart.<seq as 20 digits>
//!   0   8  magic "HALFMQLS"
//!   8   4  format version u32 LE = 1
//!  12   4  crc32 of the payload
//!  16   8  payload length u64 LE
//!  24      payload: bincode of LogStart
//! ```
//!
//! Retention writes a new file (write, fsync, fsync directory) *before* it deletes any
//! segment, then removes older log-start files. So after a crash at any point the newest
//! valid file says where the log starts; segments below it are orphans of an unfinished
//! delete and recovery removes them, and a missing segment at or above it is a hole
//! (corruption), never silently accepted.
//!
//! The queue starts make a full index rebuild possible when the log no longer begins at 0:
//! queue `(t, q)` resumes at queue offset `first`, whose entries below are "expired".

use std::path::Path;

use crate::io::Storage;
use crate::seqfile::{self, Kind};
use halfmq_types::error::Result;

const KIND: Kind = Kind {
    prefix: "logstart.",
    magic: b"HALFMQLS",
    version: 1,
    what: "log start",
    keep_older: 0,
};

/// What a log-start file records.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogStart {
    /// Sequence number (the file name).
    pub seq: u64,
    /// Base offset of the first segment kept: every segment below it is deleted (or about to
    /// be).
    pub base: u64,
    /// (topic, queue id, first queue offset whose message is at or after `base`). Queues not
    /// listed start at 0.
    pub queues: Vec<(String, u32, u64)>,
}

/// Load the newest valid log-start file, if any. A damaged newest file is skipped with a
/// warning (the previous one is kept until a newer one is durable, so it is older but
/// never wrong: it only makes recovery remove fewer orphans).
pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<LogStart>> {
    seqfile::load(storage, dir, &KIND, |ls: &LogStart| ls.seq)
}

/// Durably write `ls` as a new file, then remove all older ones.
pub fn store(storage: &dyn Storage, dir: &Path, ls: &LogStart) -> Result<()> {
    seqfile::store(storage, dir, &KIND, ls.seq, ls)
}
