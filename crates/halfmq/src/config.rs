//! Configuration, with each default documented next to its field.
//!
//! The structs are `#[non_exhaustive]`, so that settings can be added without breaking
//! anyone: start from `Default` (or [`BrokerConfig::new`]) and change fields, or chain the
//! `with_*` setters.
//!
//! ```
//! use std::time::Duration;
//! use halfmq::{BrokerConfig, TxnConfig};
//!
//! let config = BrokerConfig::new("/tmp/halfmq-example")
//!     .with_default_queues(8)
//!     .with_txn(TxnConfig::default().with_timeout(Duration::from_secs(10)));
//! assert_eq!(config.txn.timeout, Duration::from_secs(10));
//! ```

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use halfmq_store::StoreConfig;
use halfmq_types::clock::{Clock, SharedClock, SystemClock};
use halfmq_types::error::{Error, Result};

/// Builder-style setters, one per field: `with_x => x: T` makes `with_x(v)` set `x` to `v`.
macro_rules! setters {
    ($($setter:ident => $field:ident: $ty:ty),* $(,)?) => {
        $(
            #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
            #[must_use]
            pub fn $setter(mut self, $field: $ty) -> Self {
                self.$field = $field;
                self
            }
        )*
    };
}

/// Transaction check-back settings. RocketMQ's defaults are the starting point: a 6 s
/// time-out and at most 15 checks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    setters! {
        with_timeout => timeout: Duration,
        with_check_interval => check_interval: Duration,
        with_check_backoff_max => check_backoff_max: Duration,
        with_check_max => check_max: u32,
        with_check_answer_timeout => check_answer_timeout: Duration,
        with_checks_in_flight_max => checks_in_flight_max: u32,
        with_outcome_retention => outcome_retention: Duration,
        with_check_back => check_back: bool,
    }

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

/// The delivery settings of consumer groups live with the other group types, so that the
/// network client returns the very same type.
pub use halfmq_types::group::DeliveryConfig;

/// Settings of an embedded [`crate::Broker`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// The clock every deadline is decided by: check-backs, redelivery and retry waits,
    /// delayed delivery, the idempotency window, retention by age, the times of records and
    /// trace events. Default: the system clock. Tests set a
    /// [`ManualClock`](halfmq_types::clock::ManualClock) and move it by hand.
    pub clock: ClockSetting,
    /// The clock of consumers' leases and redelivery waits (visibility time-outs, nack
    /// delays, lease changes), when it is not [`clock`](Self::clock) (`None`, the default).
    /// A replicated cluster's nodes set the system clock here: their `clock` only moves as
    /// the log is applied, while leases are each node's own and run on real time.
    pub lease_clock: Option<ClockSetting>,
    /// Run the delayed-delivery timer thread. Default true. A replicated cluster's nodes
    /// turn it off: their leader fires delayed messages through the log instead
    /// ([`crate::Broker::due_delayed`], [`crate::Broker::fire_delayed`]).
    pub delayed_timer: bool,
}

/// The clock of a broker ([`BrokerConfig::clock`]): the system clock, or a shared
/// [`Clock`]. Two settings are equal when both are the system clock or both are the very
/// same shared clock.
#[derive(Clone, Default)]
pub struct ClockSetting(Option<SharedClock>);

impl ClockSetting {
    /// The system clock.
    pub fn system() -> ClockSetting {
        ClockSetting(None)
    }

    /// The clock, shared.
    pub fn shared(&self) -> SharedClock {
        match &self.0 {
            Some(c) => c.clone(),
            None => Arc::new(SystemClock),
        }
    }
}

impl From<SharedClock> for ClockSetting {
    fn from(clock: SharedClock) -> ClockSetting {
        ClockSetting(Some(clock))
    }
}

impl fmt::Debug for ClockSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(c) => c.fmt(f),
            None => SystemClock.fmt(f),
        }
    }
}

impl PartialEq for ClockSetting {
    fn eq(&self, other: &ClockSetting) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
            _ => false,
        }
    }
}

impl Eq for ClockSetting {}

/// Retention: which old log segments to delete. A segment is deleted only when a limit is
/// exceeded *and* nothing still needs any record in it (see `README.md`, "Retention"): every
/// consumer group has acked past it, no pending half, delayed message, un-replayed dead
/// letter or remembered idempotency key is in it, and the recovery checkpoint is after it.
/// With neither limit set (the default) nothing is ever deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    setters! {
        with_bytes_max => bytes_max: Option<u64>,
        with_age_max => age_max: Option<Duration>,
        with_interval => interval: Duration,
    }

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
            clock: ClockSetting::system(),
            lease_clock: None,
            delayed_timer: true,
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

    setters! {
        with_data_dir => data_dir: PathBuf,
        with_store => store: StoreConfig,
        with_default_queues => default_queues: u32,
        with_auto_create_topics => auto_create_topics: bool,
        with_txn => txn: TxnConfig,
        with_delivery => delivery: DeliveryConfig,
        with_dedup_window => dedup_window: Duration,
        with_dedup_keys_max => dedup_keys_max: u64,
        with_dedup_bytes_max => dedup_bytes_max: u64,
        with_retention => retention: RetentionConfig,
        with_delayed_timer => delayed_timer: bool,
    }

    /// Sets [`clock`](Self::clock): decide every deadline by `clock` (a
    /// [`ManualClock`](halfmq_types::clock::ManualClock) in tests; its clones share its
    /// time, so keep one to move it).
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = ClockSetting::from(Arc::new(clock) as SharedClock);
        self
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
