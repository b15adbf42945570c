//! Every reserved name in one place: the properties halfmq writes into records, and the
//! prefixes of its internal topics. Properties whose names start with [`RESERVED_PREFIX`]
//! are refused in user messages; the broker, the trace and the client all read them from here.

/// Property names starting with this are reserved for halfmq.
pub const RESERVED_PREFIX: &str = "halfmq.";

/// Property of a commit record: the transaction id.
pub const PROP_TXN: &str = "halfmq.txn";

/// Property of a half record: the producer group asked at check-back.
pub const PROP_PRODUCER_GROUP: &str = "halfmq.producer_group";

/// Property of a half record: the check-immunity time in ms.
pub const PROP_CHECK_IMMUNITY_MS: &str = "halfmq.check_immunity_ms";

/// Property holding a message's idempotency key.
pub const PROP_IDEMPOTENCY_KEY: &str = "halfmq.idempotency_key";

/// Property holding a message's tag (RocketMQ's tag): what a poll's tag filter
/// (`crate::filter::TagFilter`) matches.
pub const PROP_TAG: &str = "halfmq.tag";

/// Property holding a message's message group: messages with the same message group go to
/// the same queue, and a FIFO consumer group gets them one at a time, in order.
pub const PROP_MESSAGE_GROUP: &str = "halfmq.message_group";

/// Property holding a message's further keys (RocketMQ's keys after the first), one per
/// line: `trace` finds the message by any of them as by its key. See [`more_keys`].
pub const PROP_KEYS: &str = "halfmq.keys";

/// At most this many further keys per message.
pub const MORE_KEYS_MAX: usize = 32;

/// At most this many bytes per further key.
pub const MORE_KEY_BYTES_MAX: usize = 1024;

/// The further keys in the value of [`PROP_KEYS`].
pub fn more_keys(value: &str) -> impl Iterator<Item = &str> {
    value.split('\n').filter(|k| !k.is_empty())
}

/// Whether a record with key `key` and properties `props` (as stored) is found by `wanted`:
/// its key, or one of its further keys.
pub fn has_key(
    key: &str,
    props: &std::collections::BTreeMap<String, String>,
    wanted: &str,
) -> bool {
    key == wanted
        || props
            .get(PROP_KEYS)
            .is_some_and(|v| more_keys(v).any(|k| k == wanted))
}

/// The reserved properties a user message may carry (each is checked where it is used).
pub const USER_SETTABLE: [&str; 4] = [
    PROP_IDEMPOTENCY_KEY,
    PROP_TAG,
    PROP_MESSAGE_GROUP,
    PROP_KEYS,
];

/// Property of a `Delayed` record: when to deliver it, ms since the Unix epoch.
pub const PROP_DELIVER_AT_MS: &str = "halfmq.deliver_at_ms";

/// Property of a fire record: the log offset of the `Delayed` record it delivers.
pub const PROP_DELAYED: &str = "halfmq.delayed";

/// Property of a dead letter: the topic it came from.
pub const PROP_DLQ_TOPIC: &str = "halfmq.dlq.topic";

/// Property of a dead letter: its queue there.
pub const PROP_DLQ_QUEUE: &str = "halfmq.dlq.queue";

/// Property of a dead letter: its queue offset there.
pub const PROP_DLQ_OFFSET: &str = "halfmq.dlq.offset";

/// Property of a dead letter: its log offset there.
pub const PROP_DLQ_LOG_OFFSET: &str = "halfmq.dlq.log_offset";

/// Property of a dead letter: why its last delivery failed.
pub const PROP_DLQ_REASON: &str = "halfmq.dlq.reason";

/// Property of a dead letter: failed deliveries.
pub const PROP_DLQ_FAILURES: &str = "halfmq.dlq.failures";

/// Property of a replayed message: `group/dead-letter offset` it was replayed from.
pub const PROP_REPLAYED_FROM: &str = "halfmq.replayed_from";

/// Topics whose names start with this are the broker's own (dead-letter queues).
pub const INTERNAL_TOPIC_PREFIX: &str = "%";

/// Dead letters of group `G` are in topic `%DLQ%G`.
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";

/// The group that remembers which dead letters were replayed.
pub const REPLAY_GROUP: &str = "%replay";
