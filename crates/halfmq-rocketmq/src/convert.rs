//! RocketMQ messages to halfmq messages and back.
//!
//! A RocketMQ message's tag and message group are halfmq's own tag and message group
//! (properties `halfmq.tag` and `halfmq.message_group`, which poll filters and FIFO groups
//! use); its other system properties that halfmq has no field for are kept as properties
//! named `rocketmq.*` ([`PROP_KEYS`], [`PROP_MESSAGE_ID`], ...); its user properties are
//! kept as they are. The first of its keys becomes the halfmq key (the queue it goes to,
//! unless it has a message group, and what `halfmq trace` finds it by). A message sent
//! through halfmq's own protocol has none of the `rocketmq.*` properties and is shown to
//! RocketMQ consumers with a message id made from its log offset.

use std::collections::HashMap;
use std::time::Duration;

use halfmq::filter::validate_tag;
use halfmq::{props, Message};

use crate::digest;
use crate::pb::{self, Code, Encoding, MessageType, SystemProperties};
use crate::status::{status, unsupported};

/// Property: the message's tag (halfmq's own, which tag filters match).
pub const PROP_TAG: &str = props::PROP_TAG;
/// Property: the message's message group (halfmq's own, which FIFO groups order by).
pub const PROP_MESSAGE_GROUP: &str = props::PROP_MESSAGE_GROUP;
/// Property where endpoints before tag filters kept a message's tag: still shown as its tag.
const PROP_TAG_BEFORE: &str = "rocketmq.tag";
/// Property: the message's keys, separated by one space (as RocketMQ separates them).
pub const PROP_KEYS: &str = "rocketmq.keys";
/// Property: the producer's message id.
pub const PROP_MESSAGE_ID: &str = "rocketmq.message_id";
/// Property: where the message was made (`born_host`).
pub const PROP_BORN_HOST: &str = "rocketmq.born_host";
/// Property: when the message was made (`born_timestamp`), ms since the Unix epoch.
pub const PROP_BORN_MS: &str = "rocketmq.born_ms";
/// Property: when a delayed message is to be delivered, ms since the Unix epoch (shown to
/// consumers as its `delivery_timestamp`, as RocketMQ shows it).
pub const PROP_DELIVERY_MS: &str = "rocketmq.delivery_ms";
/// Property: `gzip` when the body is compressed (the client compressed it; halfmq stores
/// and hands it on as it came).
pub const PROP_ENCODING: &str = "rocketmq.body_encoding";
/// Property names starting with this are the endpoint's.
pub const PROP_PREFIX: &str = "rocketmq.";

/// The separator of keys in [`PROP_KEYS`].
const KEY_SEPARATOR: char = ' ';

/// Largest message body accepted (RocketMQ's own default), sent to producers in Settings.
pub const BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A RocketMQ message checked and turned into what the broker stores.
#[derive(Debug)]
pub(crate) struct Incoming {
    pub topic: String,
    pub message_id: String,
    pub kind: MessageType,
    pub msg: Message,
    /// For a delayed message: when to deliver it, ms since the Unix epoch.
    pub deliver_at_ms: Option<u64>,
    /// For a transactional message: how long the producer is not to be asked about it.
    pub check_immunity: Option<Duration>,
}

impl Incoming {
    /// Whether it is stored by a plain send: a normal or FIFO message.
    pub(crate) fn is_plain(&self) -> bool {
        let plain = matches!(
            self.kind,
            MessageType::Normal | MessageType::Unspecified | MessageType::Fifo
        );
        plain && self.deliver_at_ms.is_none()
    }

    /// The message as a plain send stores it: its message id is its idempotency key.
    pub(crate) fn keyed(self) -> Message {
        self.msg.with_idempotency_key(self.message_id)
    }
}

/// Check one message of a SendMessage request and turn it into a halfmq message.
pub(crate) fn incoming(m: pb::Message) -> Result<Incoming, pb::Status> {
    let topic = m
        .topic
        .map(|t| t.name)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| status(Code::IllegalTopic, "the message has no topic"))?;
    let sys = m
        .system_properties
        .ok_or_else(|| status(Code::BadRequest, "the message has no system properties"))?;
    if sys.message_id.is_empty() {
        return Err(status(
            Code::IllegalMessageId,
            "the message has no message id",
        ));
    }
    if sys.message_id.len() > halfmq::IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(status(
            Code::IllegalMessageId,
            format!(
                "message id is {} bytes, at most {}",
                sys.message_id.len(),
                halfmq::IDEMPOTENCY_KEY_BYTES_MAX
            ),
        ));
    }
    if m.body.len() > BODY_BYTES_MAX {
        return Err(status(
            Code::MessageBodyTooLarge,
            format!(
                "message body is {} bytes, at most {BODY_BYTES_MAX}",
                m.body.len()
            ),
        ));
    }
    let kind = MessageType::try_from(sys.message_type).map_err(|_| {
        status(
            Code::BadRequest,
            format!("unknown message type {}", sys.message_type),
        )
    })?;
    refuse_unsupported(kind, &sys)?;
    let mut properties = halfmq::Properties::new();
    for (k, v) in m.user_properties {
        if k.starts_with(PROP_PREFIX) || k.starts_with(props::RESERVED_PREFIX) {
            return Err(status(
                Code::IllegalMessagePropertyKey,
                format!(
                    "user property {k:?}: names starting with {PROP_PREFIX:?} or {:?} are the broker's",
                    props::RESERVED_PREFIX
                ),
            ));
        }
        properties.insert(k, v);
    }
    if let Some(tag) = sys.tag.filter(|t| !t.is_empty()) {
        validate_tag("tag", &tag).map_err(|e| status(Code::IllegalMessageTag, e.to_string()))?;
        properties.insert(PROP_TAG.into(), tag);
    }
    if sys
        .keys
        .iter()
        .any(|k| k.is_empty() || k.contains(KEY_SEPARATOR))
    {
        return Err(status(
            Code::IllegalMessageKey,
            "message keys must be non-empty and contain no space",
        ));
    }
    if !sys.keys.is_empty() {
        let joined = sys.keys.join(&KEY_SEPARATOR.to_string());
        properties.insert(PROP_KEYS.into(), joined);
    }
    // The keys after the first (the halfmq key) are the message's further keys, so `halfmq
    // trace` finds it by any of them (the first `props::MORE_KEYS_MAX`; RocketMQ's own limit
    // on keys is the property size).
    let more: Vec<&str> = sys
        .keys
        .iter()
        .skip(1)
        .filter(|k| k.len() <= props::MORE_KEY_BYTES_MAX)
        .take(props::MORE_KEYS_MAX)
        .map(String::as_str)
        .collect();
    if !more.is_empty() {
        properties.insert(props::PROP_KEYS.into(), more.join("\n"));
    }
    properties.insert(PROP_MESSAGE_ID.into(), sys.message_id.clone());
    if !sys.born_host.is_empty() {
        properties.insert(PROP_BORN_HOST.into(), sys.born_host);
    }
    if let Some(ms) = sys.born_timestamp.as_ref().and_then(timestamp_ms) {
        properties.insert(PROP_BORN_MS.into(), ms.to_string());
    }
    match Encoding::try_from(sys.body_encoding).unwrap_or(Encoding::Unspecified) {
        Encoding::Gzip => {
            properties.insert(PROP_ENCODING.into(), "gzip".into());
        }
        Encoding::Identity | Encoding::Unspecified => {}
    }
    let key = sys.keys.first().cloned().unwrap_or_default();
    let mut deliver_at_ms = None;
    let mut check_immunity = None;
    match (kind, sys.message_group) {
        (MessageType::Fifo, Some(g)) if !g.is_empty() => {
            validate_tag("message group", &g)
                .map_err(|e| status(Code::IllegalMessageGroup, e.to_string()))?;
            properties.insert(PROP_MESSAGE_GROUP.into(), g);
        }
        (MessageType::Fifo, _) => {
            return Err(status(
                Code::IllegalMessageGroup,
                "a FIFO message needs a message group",
            ))
        }
        (_, Some(g)) if !g.is_empty() => {
            return Err(status(
                Code::MessagePropertyConflictWithType,
                "only FIFO messages have a message group",
            ))
        }
        _ => {}
    }
    match kind {
        MessageType::Normal | MessageType::Unspecified | MessageType::Fifo => {}
        MessageType::Delay => {
            let at = sys.delivery_timestamp.as_ref().and_then(timestamp_ms);
            let at = at.ok_or_else(|| {
                status(
                    Code::IllegalDeliveryTime,
                    "a DELAY message needs a valid delivery_timestamp",
                )
            })?;
            properties.insert(PROP_DELIVERY_MS.into(), at.to_string());
            deliver_at_ms = Some(at);
        }
        // Refused above.
        MessageType::Lite | MessageType::Priority => {}
        MessageType::Transaction => {
            check_immunity = sys
                .orphaned_transaction_recovery_duration
                .and_then(|d| Duration::try_from(d).ok());
        }
    }
    let msg = Message {
        key,
        body: m.body,
        properties,
    };
    Ok(Incoming {
        topic,
        message_id: sys.message_id,
        kind,
        msg,
        deliver_at_ms,
        check_immunity,
    })
}

/// Lite topics and message priorities (sent by clients of 2025 and later) are refused: stored
/// as a plain message, such a message would lose what its sender asked for.
fn refuse_unsupported(kind: MessageType, sys: &SystemProperties) -> Result<(), pb::Status> {
    let lite = kind == MessageType::Lite || sys.lite_topic.as_ref().is_some_and(|t| !t.is_empty());
    if lite {
        return Err(unsupported(
            "lite topics are not supported; send to a topic (a message group keeps order by key)",
        ));
    }
    if kind == MessageType::Priority || sys.priority.is_some() {
        return Err(unsupported(
            "message priorities are not supported; send to a topic of its own per priority",
        ));
    }
    Ok(())
}

/// ms since the Unix epoch of a protobuf timestamp; `None` before the epoch or invalid.
pub(crate) fn timestamp_ms(t: &prost_types::Timestamp) -> Option<u64> {
    let s = u64::try_from(t.seconds).ok()?;
    let ns = u64::try_from(t.nanos).ok()?;
    s.checked_mul(1000)?.checked_add(ns / 1_000_000)
}

/// A protobuf timestamp of ms since the Unix epoch.
pub(crate) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration.
pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The message id of a stored message: the producer's, or one made from its log offset for a
/// message that came in through halfmq's own protocol.
pub(crate) fn message_id_of(properties: &halfmq::Properties, log_offset: u64) -> String {
    match properties.get(PROP_MESSAGE_ID) {
        Some(id) => id.clone(),
        None => format!("HALFMQ{log_offset:026X}"),
    }
}

/// A stored message as RocketMQ shows it: the user properties apart from the `rocketmq.*`
/// and `halfmq.*` ones, which become system properties. `extra` fills in what only the caller
/// knows (receipt handle, attempt, ...).
pub(crate) fn outgoing(
    topic: &str,
    (key, body, properties): (&str, Vec<u8>, &halfmq::Properties),
    log_offset: u64,
    extra: SystemProperties,
) -> pb::Message {
    let mut user = HashMap::new();
    for (k, v) in properties {
        if !k.starts_with(PROP_PREFIX) && !k.starts_with(props::RESERVED_PREFIX) {
            user.insert(k.clone(), v.clone());
        }
    }
    let keys = match properties.get(PROP_KEYS) {
        Some(k) => k.split(KEY_SEPARATOR).map(str::to_owned).collect(),
        None if !key.is_empty() => vec![key.to_owned()],
        None => Vec::new(),
    };
    let encoding = match properties.get(PROP_ENCODING).map(String::as_str) {
        Some("gzip") => Encoding::Gzip,
        _ => Encoding::Identity,
    };
    let kind = if properties.contains_key(props::PROP_TXN) {
        MessageType::Transaction
    } else if properties.contains_key(props::PROP_DELAYED) {
        MessageType::Delay
    } else if properties.contains_key(PROP_MESSAGE_GROUP) {
        MessageType::Fifo
    } else {
        MessageType::Normal
    };
    let born_ms = properties.get(PROP_BORN_MS).and_then(|v| v.parse().ok());
    let deliver_ms = properties
        .get(PROP_DELIVERY_MS)
        .and_then(|v| v.parse().ok());
    // Clients check the digest of every message they decode (see `digest`).
    let body_digest = pb::Digest {
        r#type: pb::DigestType::Md5 as i32,
        checksum: digest::md5_hex(&body),
    };
    let sys = SystemProperties {
        tag: properties
            .get(PROP_TAG)
            .or_else(|| properties.get(PROP_TAG_BEFORE))
            .cloned(),
        message_group: properties.get(PROP_MESSAGE_GROUP).cloned(),
        keys,
        message_id: message_id_of(properties, log_offset),
        body_encoding: encoding as i32,
        message_type: kind as i32,
        born_host: properties.get(PROP_BORN_HOST).cloned().unwrap_or_default(),
        born_timestamp: born_ms.map(timestamp),
        delivery_timestamp: deliver_ms.map(timestamp),
        body_digest: Some(body_digest),
        ..extra
    };
    pb::Message {
        topic: Some(pb::Resource {
            resource_namespace: String::new(),
            name: topic.to_owned(),
        }),
        user_properties: user,
        system_properties: Some(sys),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(kind: MessageType) -> SystemProperties {
        SystemProperties {
            message_id: "01ABC".into(),
            message_type: kind as i32,
            keys: vec!["order-1".into(), "user-9".into()],
            tag: Some("paid".into()),
            ..SystemProperties::default()
        }
    }

    fn message(kind: MessageType) -> pb::Message {
        pb::Message {
            topic: Some(pb::Resource {
                resource_namespace: String::new(),
                name: "orders".into(),
            }),
            user_properties: HashMap::from([("region".to_owned(), "eu".to_owned())]),
            system_properties: Some(sys(kind)),
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn a_message_goes_in_and_comes_out_the_same() {
        let inc = incoming(message(MessageType::Normal)).expect("valid");
        assert_eq!(
            (inc.topic.as_str(), inc.msg.key.as_str()),
            ("orders", "order-1")
        );
        let out = outgoing(
            "orders",
            (&inc.msg.key, inc.msg.body.clone(), &inc.msg.properties),
            7,
            SystemProperties::default(),
        );
        let s = out.system_properties.expect("system properties");
        assert_eq!(s.message_id, "01ABC");
        assert_eq!(s.keys, vec!["order-1", "user-9"]);
        assert_eq!(s.tag.as_deref(), Some("paid"));
        assert_eq!(
            out.user_properties.get("region").map(String::as_str),
            Some("eu")
        );
        assert_eq!(out.user_properties.len(), 1);
    }

    /// A change made to a test message.
    type Edit = fn(&mut pb::Message);

    /// The code refusing a message of this type changed by `edit`.
    fn refused(kind: MessageType, edit: Edit) -> Code {
        let mut m = message(kind);
        edit(&mut m);
        let e = incoming(m).expect_err("refused");
        Code::try_from(e.code).expect("a known code")
    }

    fn sys_of(m: &mut pb::Message) -> &mut SystemProperties {
        m.system_properties.as_mut().expect("system properties")
    }

    #[test]
    fn bad_messages_get_a_clear_code() {
        let cases: [(MessageType, Edit, Code); 10] = [
            (MessageType::Priority, |_| {}, Code::Unsupported),
            (
                MessageType::Normal,
                |m| sys_of(m).priority = Some(3),
                Code::Unsupported,
            ),
            (MessageType::Lite, |_| {}, Code::Unsupported),
            (
                MessageType::Normal,
                |m| sys_of(m).message_type = 99,
                Code::BadRequest,
            ),
            (
                MessageType::Normal,
                |m| {
                    m.user_properties.insert("rocketmq.tag".into(), "x".into());
                },
                Code::IllegalMessagePropertyKey,
            ),
            (
                MessageType::Normal,
                |m| m.body = vec![0; BODY_BYTES_MAX + 1],
                Code::MessageBodyTooLarge,
            ),
            (MessageType::Delay, |_| {}, Code::IllegalDeliveryTime),
            (MessageType::Fifo, |_| {}, Code::IllegalMessageGroup),
            (
                MessageType::Normal,
                |m| sys_of(m).message_group = Some("g1".into()),
                Code::MessagePropertyConflictWithType,
            ),
            (
                MessageType::Normal,
                |m| sys_of(m).tag = Some("a|b".into()),
                Code::IllegalMessageTag,
            ),
        ];
        for (kind, edit, code) in cases {
            assert_eq!(refused(kind, edit), code);
        }
    }

    #[test]
    fn clients_get_the_body_digest_and_a_delayed_messages_delivery_time() {
        let mut m = message(MessageType::Delay);
        sys_of(&mut m).delivery_timestamp = Some(timestamp(1_700_000_000_250));
        let inc = incoming(m).expect("valid");
        assert_eq!(inc.deliver_at_ms, Some(1_700_000_000_250));
        let out = outgoing(
            "orders",
            (&inc.msg.key, inc.msg.body.clone(), &inc.msg.properties),
            7,
            SystemProperties::default(),
        );
        let s = out.system_properties.expect("system properties");
        assert_eq!(
            s.delivery_timestamp.and_then(|t| timestamp_ms(&t)),
            Some(1_700_000_000_250)
        );
        let d = s.body_digest.expect("a body digest");
        // md5("hello")
        assert_eq!(
            (d.r#type, d.checksum.as_str()),
            (
                pb::DigestType::Md5 as i32,
                "5D41402ABC4B2A76B9719D911017C592"
            )
        );
    }

    #[test]
    fn a_fifo_message_keeps_its_message_group() {
        let mut m = message(MessageType::Fifo);
        sys_of(&mut m).message_group = Some("order-1".into());
        let inc = incoming(m).expect("valid");
        assert_eq!(inc.msg.message_group(), Some("order-1"));
        assert_eq!(inc.msg.tag(), Some("paid"));
        let out = outgoing(
            "orders",
            (&inc.msg.key, inc.msg.body.clone(), &inc.msg.properties),
            7,
            SystemProperties::default(),
        );
        let s = out.system_properties.expect("system properties");
        assert_eq!(s.message_group.as_deref(), Some("order-1"));
        assert_eq!(s.message_type, MessageType::Fifo as i32);
    }
}
