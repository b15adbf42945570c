//! Configuration, with each default documented next to its field.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::{HEADER_BYTES, RECORD_BYTES_MAX};
use crate::store::segment::SEGMENT_HEADER_BYTES;

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FlushPolicy {
    /// `send` returns only after the record is on disk (`fdatasync`). Concurrent senders share
    /// one fsync (group commit). Nothing acknowledged is lost on `kill -9` or power loss.
    Sync,
    /// `send` returns once the record is written to the operating system; a background flush
    /// makes it durable at least every `interval`. Survives `kill -9` of the process, but a
    /// power loss or kernel crash can lose what was acknowledged in the last `interval`.
    Async {
        /// Longest time an acknowledged record may stay unsynced.
        interval: Duration,
    },
}

/// Storage engine settings.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
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

/// Transaction check-back settings. RocketMQ's defaults are the starting point: a 6 s
/// time-out and at most 15 checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnConfig {
    /// A half with no outcome is first checked this long after it was written (a per-message
    /// check-immunity time may push that later). Default 6 s.
    pub timeout: Duration,
    /// Wait after the first check that did not resolve the transaction; doubles after each
    /// further one up to `check_backoff_max`. Default 30 s.
    pub check_interval: Duration,
    /// Longest wait between two checks. Default 5 min.
    pub check_backoff_max: Duration,
    /// Checks before a transaction becomes *unresolved* (listed, counted, logged, still
    /// resolvable by hand; never dropped). Default 15.
    pub check_max: u32,
    /// How long one check may take before it counts as "no answer". Default 5 s.
    pub check_answer_timeout: Duration,
    /// Checks running at once; further due halves wait for a free slot. Default 64.
    pub checks_in_flight_max: u32,
    /// How long the outcome of a finished transaction is remembered, so that a repeated
    /// commit or rollback is answered exactly. Default 24 h.
    pub outcome_retention: Duration,
    /// Run the check-back thread. Default true; tools that only read (`halfmq stats`) turn
    /// it off so that opening a data directory never resolves anything.
    pub check_back: bool,
}

impl Default for TxnConfig {
    fn default() -> Self {
        TxnConfig {
            timeout: Duration::from_secs(6),
            check_interval: Duration::from_secs(30),
            check_backoff_max: Duration::from_secs(300),
            check_max: 15,
            check_answer_timeout: Duration::from_secs(5),
            checks_in_flight_max: 64,
            outcome_retention: Duration::from_secs(24 * 3600),
            check_back: true,
        }
    }
}

impl TxnConfig {
    /// Check every setting, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        let ms = |d: Duration| d.as_millis();
        let nonzero = [
            ("txn_timeout_ms", self.timeout),
            ("txn_check_interval_ms", self.check_interval),
            ("txn_check_backoff_max_ms", self.check_backoff_max),
            ("txn_check_answer_timeout_ms", self.check_answer_timeout),
            ("txn_outcome_retention_ms", self.outcome_retention),
        ];
        for (setting, d) in nonzero {
            if d.is_zero() || ms(d) > u128::from(u32::MAX) * 1000 {
                return Err(Error::Config {
                    setting,
                    reason: format!("{d:?} is out of range"),
                });
            }
        }
        if self.check_backoff_max < self.check_interval {
            return Err(Error::Config {
                setting: "txn_check_backoff_max_ms",
                reason: "must be at least txn_check_interval_ms".into(),
            });
        }
        if self.check_max == 0 || self.check_max > 10_000 {
            return Err(Error::Config {
                setting: "txn_check_max",
                reason: format!("{} is outside 1 ..= 10000", self.check_max),
            });
        }
        if self.checks_in_flight_max == 0 || self.checks_in_flight_max > 4096 {
            return Err(Error::Config {
                setting: "txn_checks_in_flight_max",
                reason: format!("{} is outside 1 ..= 4096", self.checks_in_flight_max),
            });
        }
        Ok(())
    }
}

/// How a consumer group gets a message again that it did not ack, and when it gives up.
/// These are the defaults of every group; one group can override them with
/// [`crate::Broker::set_group_settings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// A delivered message not acked (or nacked) within this time is delivered again, and the
    /// attempt counts as failed. Default 30 s.
    pub visibility_timeout: Duration,
    /// Failed deliveries (time-outs and nacks) after which the message is redelivered no more
    /// but moved to the group's dead-letter queue: with the default 16, a message is
    /// delivered at most 17 times. 0 ..= 1000.
    pub max_retries: u32,
    /// Wait before redelivery n after a nack without a delay: `retry_backoff[n - 1]`, the last
    /// entry for every later one. Default: RocketMQ's levels 1 s, 5 s, 10 s, 30 s, 1 min,
    /// 2 min, ..., 10 min, 20 min, 30 min, 1 h, 2 h.
    pub retry_backoff: Vec<Duration>,
}

/// RocketMQ's delay levels, in seconds.
const RETRY_BACKOFF_S: [u64; 18] = [
    1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200,
];

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            visibility_timeout: Duration::from_secs(30),
            max_retries: 16,
            retry_backoff: RETRY_BACKOFF_S
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect(),
        }
    }
}

/// Longest visibility time-out or retry wait: one day.
const DELIVERY_WAIT_MAX: Duration = Duration::from_secs(24 * 3600);

impl DeliveryConfig {
    /// Check every setting, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        let vt = self.visibility_timeout;
        if vt < Duration::from_millis(10) || vt > DELIVERY_WAIT_MAX {
            return Err(Error::Config {
                setting: "visibility_timeout_ms",
                reason: format!("{vt:?} is outside 10 ms ..= 24 h"),
            });
        }
        if self.max_retries > 1000 {
            return Err(Error::Config {
                setting: "max_retries",
                reason: format!("{} is outside 0 ..= 1000", self.max_retries),
            });
        }
        if self.retry_backoff.is_empty()
            || self.retry_backoff.len() > 1000
            || self.retry_backoff.iter().any(|d| *d > DELIVERY_WAIT_MAX)
        {
            return Err(Error::Config {
                setting: "retry_backoff_ms",
                reason: "give 1 to 1000 waits, each at most 24 h".into(),
            });
        }
        Ok(())
    }

    /// The wait before redelivering after failure number `failures` (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let i = (failures.max(1) as usize - 1).min(self.retry_backoff.len().saturating_sub(1));
        self.retry_backoff.get(i).copied().unwrap_or_default()
    }
}

/// Settings of an embedded [`crate::Broker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Data directory. Default `./halfmq-data`.
    pub data_dir: PathBuf,
    /// Storage engine settings.
    pub store: StoreConfig,
    /// Queues of a topic created on first use. Default 4; 1 ..= 1024.
    pub default_queues: u32,
    /// Create a topic on first send or poll. Default true.
    pub auto_create_topics: bool,
    /// Transaction check-back.
    pub txn: TxnConfig,
    /// Redelivery, retries and dead letters: the defaults of every consumer group.
    pub delivery: DeliveryConfig,
    /// How long an idempotency key is remembered after its message was stored: a second send
    /// with the same key within this window returns the original instead of storing again.
    /// Default 24 h. The count and byte bounds below may make it shorter under load.
    pub dedup_window: Duration,
    /// Most idempotency keys remembered; the oldest is forgotten first. Default 1,000,000.
    pub dedup_keys_max: u64,
    /// Most memory the remembered keys may take, counted as key bytes plus 96 per key; the
    /// oldest is forgotten first. Default 256 MiB.
    pub dedup_bytes_max: u64,
    /// Retention: when old log segments are deleted. Default: never (keep everything).
    pub retention: RetentionConfig,
}

/// Retention: which old log segments to delete. A segment is deleted only when a limit is
/// exceeded *and* nothing still needs any record in it (see `README.md`, "Retention"): every
/// consumer group has acked past it, no pending half, delayed message, un-replayed dead
/// letter or remembered idempotency key is in it, and the recovery checkpoint is after it.
/// With neither limit set (the default) nothing is ever deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Delete the oldest segments while all segment files together are larger than this.
    /// Default `None` (no size limit). At least 2 segments' worth.
    pub bytes_max: Option<u64>,
    /// Delete segments whose newest record is older than this. Default `None` (no age
    /// limit). At least 1 s.
    pub age_max: Option<Duration>,
    /// How often the background retention pass runs when a limit is set. Default 60 s;
    /// 10 ms ..= 1 day.
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            bytes_max: None,
            age_max: None,
            interval: Duration::from_secs(60),
        }
    }
}

impl RetentionConfig {
    /// Whether a limit is set (otherwise retention never deletes anything).
    pub fn enabled(&self) -> bool {
        self.bytes_max.is_some() || self.age_max.is_some()
    }

    /// Check every setting against the segment size, naming the first that is wrong.
    pub fn validate(&self, segment_bytes: u64) -> Result<()> {
        if let Some(b) = self.bytes_max {
            if b < 2 * segment_bytes {
                return Err(Error::Config {
                    setting: "retention_bytes",
                    reason: format!(
                        "{b} is less than two segments ({} bytes): the newest segment is never deleted",
                        2 * segment_bytes
                    ),
                });
            }
        }
        if let Some(a) = self.age_max {
            if a < Duration::from_secs(1) || a > Duration::from_secs(100 * 366 * 86_400) {
                return Err(Error::Config {
                    setting: "retention_age",
                    reason: format!("{a:?} is outside 1 s ..= 100 years"),
                });
            }
        }
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(86_400)
        {
            return Err(Error::Config {
                setting: "retention_interval",
                reason: format!("{:?} is outside 10 ms ..= 1 day", self.interval),
            });
        }
        Ok(())
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            data_dir: PathBuf::from("halfmq-data"),
            store: StoreConfig::default(),
            default_queues: 4,
            auto_create_topics: true,
            txn: TxnConfig::default(),
            delivery: DeliveryConfig::default(),
            dedup_window: Duration::from_secs(24 * 3600),
            dedup_keys_max: 1_000_000,
            dedup_bytes_max: 256 * 1024 * 1024,
            retention: RetentionConfig::default(),
        }
    }
}

/// Most queues one topic may have.
pub const QUEUES_MAX: u32 = 1024;

impl BrokerConfig {
    /// A configuration for `data_dir` with every other setting at its default.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            data_dir: data_dir.into(),
            ..BrokerConfig::default()
        }
    }

    /// Check every setting, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        self.store.validate()?;
        self.txn.validate()?;
        self.delivery.validate()?;
        self.retention.validate(self.store.segment_bytes)?;
        if self.default_queues == 0 || self.default_queues > QUEUES_MAX {
            return Err(Error::Config {
                setting: "default_queues",
                reason: format!("{} is outside 1 ..= {QUEUES_MAX}", self.default_queues),
            });
        }
        if self.dedup_window.is_zero() || self.dedup_window > Duration::from_secs(366 * 86_400) {
            return Err(Error::Config {
                setting: "dedup_window_ms",
                reason: format!("{:?} is outside 1 ms ..= 366 days", self.dedup_window),
            });
        }
        if self.dedup_keys_max == 0 || self.dedup_keys_max > 1 << 32 {
            return Err(Error::Config {
                setting: "dedup_keys_max",
                reason: format!("{} is outside 1 ..= 2^32", self.dedup_keys_max),
            });
        }
        if self.dedup_bytes_max < 4096 || self.dedup_bytes_max > 1 << 40 {
            return Err(Error::Config {
                setting: "dedup_bytes_max",
                reason: format!("{} is outside 4096 ..= 1 TiB", self.dedup_bytes_max),
            });
        }
        Ok(())
    }
}
