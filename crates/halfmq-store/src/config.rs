//! Storage engine settings, with each default documented next to its field.
//!
//! [`StoreConfig`] can grow without breaking its users. It is `#[non_exhaustive]`, so code
//! outside this crate cannot write it as a struct literal; start from
//! [`StoreConfig::default`] and change what you need, either by assigning the public
//! fields or with the `with_<field>` setters, which take and return the config so that one
//! expression builds it:
//!
//! ```
//! use std::time::Duration;
//! use halfmq_store::{FlushPolicy, StoreConfig};
//!
//! let config = StoreConfig::default()
//!     .with_segment_bytes(16 * 1024 * 1024)
//!     .with_flush(FlushPolicy::Async { interval: Duration::from_millis(10) });
//! assert_eq!(config.segment_bytes, 16 * 1024 * 1024);
//!
//! let mut same = StoreConfig::default();
//! same.segment_bytes = 16 * 1024 * 1024;
//! same.flush = FlushPolicy::Async { interval: Duration::from_millis(10) };
//! assert_eq!(config, same);
//! ```
//!
//! Every new setting gets a field with its default documented next to it, a `with_` setter
//! and a check in [`StoreConfig::validate`].
//!
//! [`FlushPolicy`] stays an exhaustive enum on purpose: a new way of acknowledging writes
//! changes what a caller may assume survives a crash, so code that matches on the policy
//! should fail to compile until someone has decided what the new one means for it.

use std::time::Duration;

use halfmq_types::error::{Error, Result};

use crate::record::{HEADER_BYTES, RECORD_BYTES_MAX};
use crate::segment::SEGMENT_HEADER_BYTES;

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FlushPolicy {
    /// `send` returns only after the record is on disk (`fdatasync`). Concurrent senders share
    /// one fsync (group commit). Nothing acknowledged is lost on `kill -9` or power loss.
    Sync,
    /// `send` returns once the record is written to the operating system; a background flush
    /// makes it durable at least every `interval`. Survives `kill -9` of the process, but a
    /// power loss or kernel crash can lose what was acknowledged in the last `interval`.
    /// Readers see a record only once it is durable (its consume-queue entry waits for the
    /// sync), so what a power loss takes back was never delivered.
    Async {
        /// Longest time an acknowledged record may stay unsynced.
        interval: Duration,
    },
}

/// Storage engine settings. Start from [`StoreConfig::default`]; see the module docs for
/// the two ways to change a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Size of one commit-log segment file (preallocated). Default 64 MiB; at least 64 KiB.
    pub segment_bytes: u64,
    /// When `send` returns. Default [`FlushPolicy::Sync`].
    pub flush: FlushPolicy,
    /// Largest record accepted (header, topic, key, properties and body). Default 1 MiB, so
    /// that any message fits in one network frame (4 MiB by default); at most a quarter of a
    /// segment.
    pub record_bytes_max: u32,
    /// Bytes that may wait for the flusher before senders are made to wait (back-pressure).
    /// Default 8 MiB. This also bounds how much an unclean stop can leave half-written at the
    /// end of the log.
    pub pending_bytes_max: u64,
    /// How often consume-queue indexes are synced and a recovery checkpoint is written, in
    /// log bytes. Default 64 MiB. Recovery re-reads at most about this much of the log.
    pub checkpoint_bytes: u64,
    /// Hash slots per key-index file (`index/*.idx`, see [`crate::key_index`]). Default
    /// 4 Mi (16 MiB of slot table, the only part of the index held in memory). Tests use
    /// tiny values to force collisions.
    pub key_index_slots: u32,
    /// Entries per key-index file before a new file is started. Default 4 Mi (a 176 MiB
    /// file with the default slots), so 10 M keyed records need three files.
    pub key_index_entries: u32,
    /// Sealed segments (the newest, besides the active one) left in the operating system's
    /// page cache. At each roll, the segment this many places before the one just sealed
    /// is dropped from the page cache (`posix_fadvise(DONTNEED)`, on a background thread),
    /// so the log's cached window stays bounded and the writer's new pages reuse the dropped
    /// ones instead of fresh memory (see `crate::prepare` for what that bought). Default
    /// `Some(2)`: with 64 MiB segments, the newest 128–192 MiB of the log stay cached for
    /// readers that keep up. `None`: leave the page cache to the operating system. Only on
    /// real files ([`crate::io::Storage::zero_fill_ahead`]).
    pub page_cache_segments: Option<u32>,
    /// Whether a writer waiting in an async task ([`crate::Ticket::wait_async`]) may write a
    /// group-commit round itself, as a thread waiting in [`crate::Ticket::wait`] always may:
    /// when the last round held one record, the writer of the next batch's first record
    /// writes and syncs it on its own thread instead of waking the flusher thread and being
    /// woken back by it (see `crate::flush::lead`). That saves a lone producer two thread
    /// wake-ups per message, but blocks the executor thread for the write and the fsync
    /// (about one fsync's time), so it is for runtimes with a spare worker, such as the
    /// broker's. Default `false`: a task never blocks its executor thread.
    pub tasks_may_lead: bool,
    /// Whether every group-commit round begins with a mark record holding the durable end
    /// (`record::RecordKind::Mark`), which recovery reads to tell damage to acknowledged
    /// records from a torn tail. Default `true`. `false` only for a log that is not the
    /// durable record of anything, such as a replicated node's broker (rebuilt from the
    /// raft log at every start, never recovered): without marks a record's log offset
    /// depends only on the records before it, not on how they were grouped into rounds,
    /// so the same records give the same log, byte for byte, whatever the timing. Recovery
    /// of such a log has only the checkpoint to go by.
    pub marks: bool,
    /// Whether group-commit rounds `fdatasync` the log. Default `true`. `false` only for a
    /// directory that is rebuilt at every open and is the durable record of nothing, such
    /// as a replicated node's broker (its raft log and snapshot journal are what a crash
    /// leaves, and the broker is rebuilt from them on a fresh directory at every start):
    /// a round's write then counts as durable at once, under either [`FlushPolicy`] (its
    /// records are visible and their hooks run when the write returns), no round, segment
    /// roll or sync-forcing hook fsyncs it, and no next segment is zero-filled ahead (that
    /// only saves fsync time). Checkpoints still sync what they write, and sled (the
    /// broker's) is unaffected. A `kill -9` loses nothing the process wrote; a power loss
    /// can take back any of it.
    pub fsync: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_bytes: 64 * 1024 * 1024,
            flush: FlushPolicy::Sync,
            record_bytes_max: 1024 * 1024,
            pending_bytes_max: 8 * 1024 * 1024,
            checkpoint_bytes: 64 * 1024 * 1024,
            key_index_slots: 4 * 1024 * 1024,
            key_index_entries: 4 * 1024 * 1024,
            page_cache_segments: Some(2),
            tasks_may_lead: false,
            marks: true,
            fsync: true,
        }
    }
}

halfmq_types::with_setters! {
    StoreConfig {
        /// Sets [`StoreConfig::segment_bytes`].
        with_segment_bytes => segment_bytes: u64;
        /// Sets [`StoreConfig::flush`].
        with_flush => flush: FlushPolicy;
        /// Sets [`StoreConfig::record_bytes_max`].
        with_record_bytes_max => record_bytes_max: u32;
        /// Sets [`StoreConfig::pending_bytes_max`].
        with_pending_bytes_max => pending_bytes_max: u64;
        /// Sets [`StoreConfig::checkpoint_bytes`].
        with_checkpoint_bytes => checkpoint_bytes: u64;
        /// Sets [`StoreConfig::key_index_slots`].
        with_key_index_slots => key_index_slots: u32;
        /// Sets [`StoreConfig::key_index_entries`].
        with_key_index_entries => key_index_entries: u32;
        /// Sets [`StoreConfig::page_cache_segments`].
        with_page_cache_segments => page_cache_segments: Option<u32>;
        /// Sets [`StoreConfig::tasks_may_lead`].
        with_tasks_may_lead => tasks_may_lead: bool;
        /// Sets [`StoreConfig::marks`].
        with_marks => marks: bool;
        /// Sets [`StoreConfig::fsync`].
        with_fsync => fsync: bool;
    }
}

impl StoreConfig {
    /// Check every setting, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes < 64 * 1024 || self.segment_bytes > (1 << 40) {
            return Err(Error::Config {
                setting: "segment_bytes",
                reason: format!("{} is outside 64 KiB ..= 1 TiB", self.segment_bytes),
            });
        }
        let room = (self.segment_bytes - SEGMENT_HEADER_BYTES - HEADER_BYTES as u64) / 4;
        if (self.record_bytes_max as usize) < HEADER_BYTES + 1
            || u64::from(self.record_bytes_max) > room
            || self.record_bytes_max > RECORD_BYTES_MAX
        {
            return Err(Error::Config {
                setting: "record_bytes_max",
                reason: format!(
                    "{} must be between {} and min({room}, {RECORD_BYTES_MAX}) for segments of {} bytes",
                    self.record_bytes_max,
                    HEADER_BYTES + 1,
                    self.segment_bytes
                ),
            });
        }
        if self.pending_bytes_max < u64::from(self.record_bytes_max) {
            return Err(Error::Config {
                setting: "pending_bytes_max",
                reason: format!(
                    "{} is smaller than record_bytes_max ({})",
                    self.pending_bytes_max, self.record_bytes_max
                ),
            });
        }
        if self.checkpoint_bytes == 0 {
            return Err(Error::Config {
                setting: "checkpoint_bytes",
                reason: "must be > 0".into(),
            });
        }
        for (setting, v) in [
            ("key_index_slots", self.key_index_slots),
            ("key_index_entries", self.key_index_entries),
        ] {
            if v == 0 || v > crate::key_index::FILE_ITEMS_MAX {
                return Err(Error::Config {
                    setting,
                    reason: format!("{v} is outside 1 ..= {}", crate::key_index::FILE_ITEMS_MAX),
                });
            }
        }
        if let FlushPolicy::Async { interval } = self.flush {
            if interval.is_zero() || interval > Duration::from_secs(60) {
                return Err(Error::Config {
                    setting: "flush_interval",
                    reason: format!("{interval:?} is outside 1 ns ..= 60 s"),
                });
            }
        }
        Ok(())
    }
}
