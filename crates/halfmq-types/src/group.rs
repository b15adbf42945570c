//! Consumer-group types: delivery settings and per-group overrides, nack outcomes, dead
//! letters.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::message::SendReceipt;

/// How a consumer group gets a message again that it did not ack, and when it gives up.
/// These are the defaults of every group; one group can override them with
/// `Broker::set_group_settings`. It is `#[non_exhaustive]`: start from
/// `DeliveryConfig::default()` and change fields or use the `with_` setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// FIFO message groups: a message with a message group
    /// ([`crate::Message::with_message_group`]) is handed out only after the one before it
    /// in its message group is acked or dead-lettered. Other message groups are not held
    /// up. Default off.
    pub fifo: bool,
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
            fifo: false,
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

crate::with_setters! {
    DeliveryConfig {
        /// Sets [`DeliveryConfig::visibility_timeout`].
        with_visibility_timeout => visibility_timeout: Duration;
        /// Sets [`DeliveryConfig::max_retries`].
        with_max_retries => max_retries: u32;
        /// Sets [`DeliveryConfig::retry_backoff`].
        with_retry_backoff => retry_backoff: Vec<Duration>;
        /// Sets [`DeliveryConfig::fifo`].
        with_fifo => fifo: bool;
    }
}

/// Per-group overrides of the broker's `DeliveryConfig`; `None` keeps the broker default.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupSettings {
    /// Visibility time-out in ms.
    pub visibility_timeout_ms: Option<u64>,
    /// Failed deliveries before dead-lettering.
    pub max_retries: Option<u32>,
    /// Waits before redelivery after a nack without a delay, in ms.
    pub retry_backoff_ms: Option<Vec<u64>>,
    /// FIFO message groups ([`DeliveryConfig::fifo`]). Not part of this struct's serde
    /// form, which is the older layout kept by sled and by the `SetGroup` request: the broker
    /// keeps it on its own, and the wire carries it in `SetGroupSettings` and
    /// `GroupSettings`.
    #[serde(skip)]
    pub fifo: Option<bool>,
}

/// What a nack did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NackOutcome {
    /// The message will be delivered again (as attempt `attempt`) at `at_ms`.
    Redeliver {
        /// The number of the next delivery (1 is the first).
        attempt: u32,
        /// When, ms since the Unix epoch.
        at_ms: u64,
    },
    /// It failed `max_retries + 1` times and moved to the group's dead-letter queue.
    DeadLettered {
        /// Where the dead letter is.
        dead_letter: SendReceipt,
    },
}

/// A message in a dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The group whose deliveries failed.
    pub group: String,
    /// Offset in the dead-letter queue.
    pub dlq_offset: u64,
    /// Topic, queue and queue offset it came from.
    pub topic: String,
    /// Queue it came from.
    pub queue: u32,
    /// Queue offset it had.
    pub offset: u64,
    /// Log offset it had.
    pub log_offset: u64,
    /// Key.
    pub key: String,
    /// Payload size.
    pub body_len: usize,
    /// Why its last delivery failed.
    pub reason: String,
    /// Failed deliveries.
    pub failures: u32,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub at_ms: u64,
    /// Replayed to its topic since.
    pub replayed: bool,
}

/// A dead letter sent back to its topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replayed {
    /// Offset in the dead-letter queue.
    pub dlq_offset: u64,
    /// Key.
    pub key: String,
    /// Where the new copy is.
    pub receipt: SendReceipt,
}

/// What `Broker::delete_group` removed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupDeleted {
    /// The group.
    pub group: String,
    /// (topic, queue) pairs it had offsets for.
    pub queues: u64,
    /// Its dead-letter topic, kept, if it has one.
    pub dead_letter_queue: Option<String>,
}
