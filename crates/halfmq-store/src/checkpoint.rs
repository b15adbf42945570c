//! Recovery checkpoints: "every consume-queue index is durable up to this log offset, with
//! these lengths". Recovery starts reading the log there instead of at its beginning.
//!
//! ```text
//! checkpoint.<seq as 20 digits>
//!   0   8  magic "HALFMQCP"
//!   8   4  format version u32 LE = 1
//!  12   4  crc32 of the payload
//!  16   8  payload length u64 LE
//!  24      payload: bincode of Checkpoint
//! ```
//!
//! A new checkpoint is a new file (written, synced, then its directory synced) and the
//! older ones are removed after, so a crash at any point leaves at least one valid
//! checkpoint or none; with none, recovery rebuilds the indexes from the start of the log.

use std::path::Path;

use crate::io::Storage;
use crate::seqfile::{self, Kind};
use halfmq_types::error::Result;

const KIND: Kind = Kind {
    prefix: "checkpoint.",
    magic: b"HALFMQCP",
    version: 1,
    what: "checkpoint",
    keep_older: 1,
};

/// What a checkpoint records.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Sequence number (the file name).
    pub seq: u64,
    /// Every message record before this log offset is in its consume queue, durably.
    pub log_offset: u64,
    /// Length of every consume queue at `log_offset`: (topic, queue id, entries).
    pub queues: Vec<(String, u32, u64)>,
    /// Written by a clean close: `log_offset` is the end of the log and nothing was written
    /// after it, so recovery need not look for a torn tail.
    pub clean: bool,
}

/// Load the newest valid checkpoint, if any. Damaged checkpoint files are skipped with a
/// warning: they are derived data and the log can always be re-read.
pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<Checkpoint>> {
    seqfile::load(storage, dir, &KIND, |cp: &Checkpoint| cp.seq)
}

/// Durably write `cp` as a new checkpoint file, then remove all but the previous one.
pub fn store(storage: &dyn Storage, dir: &Path, cp: &Checkpoint) -> Result<()> {
    seqfile::store(storage, dir, &KIND, cp.seq, cp)
}
