//! Messages, deliveries and receipts: the same types in the embedded broker and the client.

use std::collections::BTreeMap;

use crate::lease::Receipt;
use crate::props::{
    MORE_KEYS_MAX, MORE_KEY_BYTES_MAX, PROP_IDEMPOTENCY_KEY, PROP_KEYS, PROP_MESSAGE_GROUP,
    PROP_TAG,
};

/// User properties of a message: names to values. Names starting with
/// [`crate::props::RESERVED_PREFIX`] are halfmq's own.
pub type Properties = BTreeMap<String, String>;

/// Longest idempotency key, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;

/// Most messages in one batch send (`Broker::send_batch`, the `SendBatch` request).
pub const SEND_BATCH_MESSAGES_MAX: usize = 4096;

/// Most bytes in one batch send, counted as [`Message::payload_bytes`] summed over its
/// messages. A batch's records go into the store's pending batch at once, so this stays
/// below the store's default `pending_bytes_max` (8 MiB).
pub const SEND_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A message to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// Key: messages with the same key go to the same queue, in order. Also what `trace`
    /// looks up. Empty means no key.
    pub key: String,
    /// Payload.
    pub body: Vec<u8>,
    /// User properties.
    pub properties: Properties,
}

impl Message {
    /// The bytes the message carries: its key, body and properties (names and values). What
    /// [`SEND_BATCH_BYTES_MAX`] counts.
    pub fn payload_bytes(&self) -> usize {
        self.key.len()
            + self.body.len()
            + self
                .properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// A message with this body and no key.
    pub fn new(body: impl Into<Vec<u8>>) -> Message {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// Set the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.key = key.into();
        self
    }

    /// Add a property.
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Set the idempotency key (1 to [`IDEMPOTENCY_KEY_BYTES_MAX`] bytes): a second
    /// send of a message with the same key to the same topic within the dedup window is not
    /// stored again and returns the original's receipt. It is kept as the property
    /// [`PROP_IDEMPOTENCY_KEY`], which consumers see too.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Message {
        self.properties
            .insert(PROP_IDEMPOTENCY_KEY.to_owned(), key.into());
        self
    }

    /// The idempotency key, if set.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.properties
            .get(PROP_IDEMPOTENCY_KEY)
            .map(String::as_str)
    }

    /// Set the tag (1 to [`crate::filter::TAG_BYTES_MAX`] bytes, no `|`), which a poll's
    /// tag filter matches. Kept as the property [`PROP_TAG`].
    pub fn with_tag(mut self, tag: impl Into<String>) -> Message {
        self.properties.insert(PROP_TAG.to_owned(), tag.into());
        self
    }

    /// The tag, if set.
    pub fn tag(&self) -> Option<&str> {
        self.properties.get(PROP_TAG).map(String::as_str)
    }

    /// Set the message group (same rules as a tag): messages with the same message group go
    /// to the same queue (it picks the queue instead of the key), and a FIFO consumer group
    /// gets them one at a time, in order. Kept as the property [`PROP_MESSAGE_GROUP`].
    pub fn with_message_group(mut self, group: impl Into<String>) -> Message {
        self.properties
            .insert(PROP_MESSAGE_GROUP.to_owned(), group.into());
        self
    }

    /// The message group, if set.
    pub fn message_group(&self) -> Option<&str> {
        self.properties.get(PROP_MESSAGE_GROUP).map(String::as_str)
    }

    /// Add further keys (RocketMQ's keys after the first): `trace` finds the message by any
    /// of them as by its key; they do not pick the queue. The message needs a key. Each is 1
    /// to [`MORE_KEY_BYTES_MAX`] bytes without a line break, at most [`MORE_KEYS_MAX`] in
    /// all; kept as the property [`PROP_KEYS`], one per line.
    pub fn with_more_keys<I, K>(mut self, keys: I) -> Message
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        let mut all: Vec<String> = self.more_keys().map(str::to_owned).collect();
        all.extend(keys.into_iter().map(Into::into));
        self.properties.insert(PROP_KEYS.to_owned(), all.join("\n"));
        self
    }

    /// The further keys (see [`Message::with_more_keys`]).
    pub fn more_keys(&self) -> impl Iterator<Item = &str> {
        self.properties
            .get(PROP_KEYS)
            .map(String::as_str)
            .into_iter()
            .flat_map(crate::props::more_keys)
    }
}

/// Check a message's further keys ([`Message::with_more_keys`]): the message has a key,
/// and each further key is 1 to [`MORE_KEY_BYTES_MAX`] bytes without a line break, at most
/// [`MORE_KEYS_MAX`] of them.
pub fn validate_more_keys(msg: &Message) -> crate::error::Result<()> {
    let Some(v) = msg.properties.get(PROP_KEYS) else {
        return Ok(());
    };
    let bad = |reason: String| {
        Err(crate::error::Error::Invalid {
            what: "further keys",
            reason,
        })
    };
    if msg.key.is_empty() {
        return bad("a message with further keys needs a key".into());
    }
    let lines: Vec<&str> = v.split('\n').collect();
    if lines.len() > MORE_KEYS_MAX {
        return bad(format!("{} keys: at most {MORE_KEYS_MAX}", lines.len()));
    }
    match lines
        .iter()
        .find(|k| k.is_empty() || k.len() > MORE_KEY_BYTES_MAX)
    {
        Some(k) => bad(format!(
            "a key of {} bytes: use 1 to {MORE_KEY_BYTES_MAX} bytes, one per line",
            k.len()
        )),
        None => Ok(()),
    }
}

/// Where a sent message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SendReceipt {
    /// The topic.
    pub topic: String,
    /// The queue within the topic.
    pub queue: u32,
    /// Its offset in that queue.
    pub offset: u64,
    /// Its position in the commit log.
    pub log_offset: u64,
    /// True when the message carried an idempotency key that was already stored: nothing
    /// was stored now, and this is the original's receipt.
    pub duplicate: bool,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The topic.
    pub topic: String,
    /// The queue within the topic.
    pub queue: u32,
    /// Offset in the queue: what to ack.
    pub offset: u64,
    /// Position in the commit log.
    pub log_offset: u64,
    /// Key ("" for none).
    pub key: String,
    /// Payload.
    pub body: Vec<u8>,
    /// User properties.
    pub properties: Properties,
    /// When it was stored, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Which delivery of this message to this group it is: 1 the first, n after n - 1
    /// failed ones (time-outs and nacks).
    pub attempt: u32,
    /// Proof of this delivery's lease, for `ack_receipts`, `nack_receipt` and
    /// `change_lease`. `None` only for a delivery that came through the network request
    /// `Poll`, which predates receipts (the Rust client polls with `Receive`).
    pub receipt: Option<Receipt>,
}

impl Delivery {
    /// The tag, if the message has one.
    pub fn tag(&self) -> Option<&str> {
        self.properties.get(PROP_TAG).map(String::as_str)
    }

    /// The message group, if the message has one.
    pub fn message_group(&self) -> Option<&str> {
        self.properties.get(PROP_MESSAGE_GROUP).map(String::as_str)
    }
}

/// Where a delayed message was stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayedReceipt {
    /// Its id (the log offset of the stored message).
    pub id: u64,
    /// The topic it will be delivered to.
    pub topic: String,
    /// The queue.
    pub queue: u32,
    /// When, ms since the Unix epoch.
    pub deliver_at_ms: u64,
}

/// A topic and its queues.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Number of queues.
    pub queues: u32,
}
