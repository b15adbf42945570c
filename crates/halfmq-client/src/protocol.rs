//! Requests, responses and pushes: one definition shared by the server and the client.
//!
//! Every frame body is the bincode encoding (with a size limit) of one of the enums here:
//! a [`FrameKind::Request`] carries a [`Request`], a [`FrameKind::Response`] the
//! [`Response`] with the request's correlation id, and a [`FrameKind::Push`] a [`Push`]
//! the broker sends on its own (a check-back question), answered by a
//! [`Request::CheckAnswer`].
//!
//! [`FrameKind::Request`]: super::frame::FrameKind::Request
//! [`FrameKind::Response`]: super::frame::FrameKind::Response
//! [`FrameKind::Push`]: super::frame::FrameKind::Push

use serde::{Deserialize, Serialize};

mod borrowed;
pub(crate) mod convert;

pub(crate) use borrowed::{
    AckRef, MessageRef, MessagesRef, SendBatchRef, SendDelayedRef, SendHalfRef, SendRef,
};

use halfmq_types::codec;
use halfmq_types::error::{Error, Result};
use halfmq_types::{
    CheckAnswer, DeadLetter, DelayedReceipt, GroupDeleted, GroupSettings, NackOutcome, Properties,
    Replayed, TxnInfo, TxnState,
};

/// A message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// Key ("" for none).
    pub key: String,
    /// Payload.
    #[serde(with = "body_bytes")]
    pub body: Vec<u8>,
    /// User properties.
    pub properties: Properties,
}

/// A body as serde bytes: the same encoding as a `Vec<u8>`, copied at once.
use halfmq_types::codec::bytes as body_bytes;

/// A delivered message on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelivery {
    /// Topic.
    pub topic: String,
    /// Queue.
    pub queue: u32,
    /// Offset in the queue (what to ack).
    pub offset: u64,
    /// Position in the commit log.
    pub log_offset: u64,
    /// When it was stored, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The message.
    pub message: WireMessage,
    /// Which delivery to this group it is (1 the first).
    pub attempt: u32,
}

/// A delivered message with the receipt of its lease, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireReceived {
    /// The delivery.
    pub delivery: WireDelivery,
    /// Its receipt handle.
    pub receipt: String,
}

/// Client → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First request on every connection.
    Hello {
        /// Client name, for logs.
        client: String,
        /// The shared secret, when the broker requires one.
        token: Option<String>,
    },
    /// Store a message durably.
    Send {
        /// Topic.
        topic: String,
        /// The message.
        message: WireMessage,
    },
    /// Write a half message.
    SendHalf {
        /// Topic.
        topic: String,
        /// The message.
        message: WireMessage,
        /// Producer group asked at check-back.
        producer_group: String,
        /// Check-immunity time in ms (0: none).
        check_immunity_ms: u64,
    },
    /// Commit a transaction.
    Commit {
        /// Transaction id.
        txn: u64,
    },
    /// Roll back a transaction.
    Rollback {
        /// Transaction id.
        txn: u64,
    },
    /// Hand out messages to a consumer group, waiting up to `wait_ms` for one.
    Poll {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// At most this many.
        max: u32,
        /// Long-poll wait in ms (0: answer at once).
        wait_ms: u64,
    },
    /// Acknowledge messages.
    Ack {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// (queue, offset) pairs.
        acks: Vec<(u32, u64)>,
    },
    /// Create a topic.
    CreateTopic {
        /// Name.
        name: String,
        /// Queues.
        queues: u32,
    },
    /// List topics.
    ListTopics,
    /// Broker statistics.
    Stats,
    /// List unfinished transactions (all, or in one state).
    ListTxns {
        /// Filter.
        state: Option<TxnState>,
        /// First transaction id of the page (0: from the start).
        after: u64,
        /// Most transactions in the page (the broker may return fewer so that the answer
        /// fits a frame; an empty page means there are no more).
        max: u32,
    },
    /// Where one transaction is.
    TxnState {
        /// Transaction id.
        txn: u64,
    },
    /// Check an unfinished transaction again now.
    Rearm {
        /// Transaction id.
        txn: u64,
    },
    /// This connection answers check-backs for `producer_group` from now on.
    RegisterChecker {
        /// Producer group.
        producer_group: String,
    },
    /// The answer to a [`Push::Check`].
    CheckAnswer {
        /// The push's correlation id.
        check: u64,
        /// The answer.
        answer: CheckAnswer,
    },
    /// Give back a delivered message: redeliver after `delay_ms` (or the group's backoff).
    Nack {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Offset in the queue.
        offset: u64,
        /// Wait before redelivery in ms; `None`: the group's retry backoff.
        delay_ms: Option<u64>,
    },
    /// List a group's dead letters.
    DeadLetters {
        /// Consumer group.
        group: String,
        /// First dead-letter offset.
        from: u64,
        /// At most this many.
        max: u32,
    },
    /// Send a group's not yet replayed dead letters back to their topics.
    ReplayDeadLetters {
        /// Consumer group.
        group: String,
        /// At most this many.
        max: u32,
    },
    /// Override a group's delivery settings (`None` fields: the broker default).
    SetGroup {
        /// Consumer group.
        group: String,
        /// The overrides.
        settings: GroupSettings,
    },
    /// A group's delivery settings.
    GetGroup {
        /// Consumer group.
        group: String,
    },
    /// Store a message durably now; deliver it to its topic at `deliver_at_ms`.
    SendDelayed {
        /// Topic.
        topic: String,
        /// The message.
        message: WireMessage,
        /// When, ms since the Unix epoch.
        deliver_at_ms: u64,
    },
    /// Run one retention pass now; answered with its report as JSON.
    Retention,
    /// Every event of every message with this key (the embedded `Broker::trace`). Answered with
    /// [`Response::Trace`].
    Trace {
        /// The key (exact).
        key: String,
    },
    /// Forget a consumer group (the embedded `Broker::delete_group`). Answered with
    /// [`Response::GroupDeleted`].
    DeleteGroup {
        /// Consumer group.
        group: String,
    },
    /// Store many messages to one topic (the embedded `Broker::send_batch`): one run of
    /// records, one group commit. Answered with [`Response::SentBatch`], one answer per
    /// message in order, or with `Response::Error` when the batch as a whole is refused
    /// (unknown topic, over `SEND_BATCH_MESSAGES_MAX` or `SEND_BATCH_BYTES_MAX`).
    SendBatch {
        /// Topic.
        topic: String,
        /// The messages.
        messages: Vec<WireMessage>,
    },
    /// [`Request::Poll`] with a lease duration and a tag filter, answered with
    /// [`Response::Received`]: each delivery with its receipt.
    Receive {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// At most this many.
        max: u32,
        /// Long-poll wait in ms (0: answer at once).
        wait_ms: u64,
        /// Lease of each message handed out, ms; `None`: the group's visibility time-out.
        lease_ms: Option<u64>,
        /// Tag filter expression: `*` (or empty) for all, or `a || b`.
        filter: String,
    },
    /// Acknowledge messages by their receipts (all or nothing).
    AckReceipts {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Receipt handles.
        receipts: Vec<String>,
    },
    /// Nack a message by its receipt.
    NackReceipt {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Receipt handle.
        receipt: String,
        /// Wait before redelivery in ms; `None`: the group's retry backoff.
        delay_ms: Option<u64>,
    },
    /// Change the lease of a delivered message, answered with [`Response::LeaseChanged`].
    ChangeLease {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Receipt handle of the lease now.
        receipt: String,
        /// The new lease, from now, in ms.
        lease_ms: u64,
    },
    /// [`Request::SetGroup`] with the FIFO override (which `GroupSettings`' wire form does
    /// not carry), answered with [`Response::GroupSettings`].
    SetGroupSettings {
        /// Consumer group.
        group: String,
        /// The overrides (without `fifo`).
        settings: GroupSettings,
        /// FIFO message groups: on, off, or `None` for the broker default.
        fifo: Option<bool>,
    },
    /// [`Request::GetGroup`] answered with [`Response::GroupSettings`].
    GetGroupSettings {
        /// Consumer group.
        group: String,
    },
    /// Move a delivered message to the group's dead-letter queue now, by its receipt;
    /// answered with [`Response::Nacked`] (`DeadLettered`).
    DeadLetterReceipt {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Receipt handle of the lease now.
        receipt: String,
        /// Why, kept with the dead letter.
        reason: String,
    },
    /// The replicated cluster as this broker sees it; answered with
    /// [`Response::ClusterStatus`], or [`codes::BAD_REQUEST`] by a broker started without
    /// `--peers`.
    ClusterStatus,
    /// Add node `id`, whose client address is `addr`, to the cluster's members: first as
    /// a learner until it has the log (or a snapshot), then as a voter. Answered
    /// [`Response::Ok`] by the leader once the change is committed; a follower answers
    /// [`codes::NOT_LEADER`].
    ClusterAddNode {
        /// The new node's id (its `--node-id`).
        id: u64,
        /// Its client address (peers use the port after it).
        addr: String,
    },
    /// Remove node `id` from the cluster's members. Answered like
    /// [`Request::ClusterAddNode`].
    ClusterRemoveNode {
        /// The node's id.
        id: u64,
    },
    /// Read up to `max` messages of one queue from queue offset `from` on, without
    /// delivering them to anyone (no group, no lease, nothing written); answered with
    /// [`Response::Messages`] (attempt 0). Any node of a replicated cluster answers it from
    /// what it has applied (polls are the leader's), so it shows what each node holds.
    Browse {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// First queue offset (one below the queue's start reads from its start).
        from: u64,
        /// Most messages (cut to 10,000).
        max: u32,
    },
}

/// One message's answer in a [`Response::SentBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendResult {
    /// The message was stored (or its idempotency key's original was).
    Sent {
        /// Queue.
        queue: u32,
        /// Offset in the queue.
        offset: u64,
        /// Position in the log.
        log_offset: u64,
        /// The message's idempotency key was already stored (or an earlier message of the
        /// batch carries it): this is the original.
        duplicate: bool,
    },
    /// This message failed; the others are unaffected.
    Error {
        /// Stable error code, as in `Response::Error`.
        code: u16,
        /// What went wrong, for people.
        message: String,
    },
}

/// A group's delivery settings on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGroup {
    /// Visibility time-out in force, ms.
    pub visibility_timeout_ms: u64,
    /// Failed deliveries before dead-lettering, in force.
    pub max_retries: u32,
    /// Retry backoff in force, ms.
    pub retry_backoff_ms: Vec<u64>,
    /// The group's own overrides.
    pub overrides: GroupSettings,
}

/// Broker → client, answering the request with the same correlation id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`.
    Hello {
        /// Broker version string.
        server: String,
    },
    /// The request succeeded and has nothing to return.
    Ok,
    /// A message was stored.
    Sent {
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Offset in the queue.
        offset: u64,
        /// Position in the log.
        log_offset: u64,
        /// The message's idempotency key was already stored: this is the original.
        duplicate: bool,
    },
    /// A half message was written.
    HalfSent {
        /// Its transaction id.
        txn: u64,
        /// The half's idempotency key was already stored: this is the original transaction.
        duplicate: bool,
    },
    /// Messages for a poll (possibly none).
    Messages(Vec<WireDelivery>),
    /// Topics: (name, queues).
    Topics(Vec<(String, u32)>),
    /// Statistics as JSON text (the same document `halfmq stats --json` prints).
    Stats(String),
    /// Unfinished transactions.
    Txns(Vec<TxnInfo>),
    /// A transaction's state.
    TxnState(TxnState),
    /// The request failed.
    Error {
        /// Stable error code ([`crate::Error::code`]; 100+ for protocol errors).
        code: u16,
        /// What went wrong, for people.
        message: String,
    },
    /// What a nack did.
    Nacked(NackOutcome),
    /// Dead letters.
    DeadLetters(Vec<DeadLetter>),
    /// Dead letters sent back to their topics.
    Replayed(Vec<Replayed>),
    /// A group's delivery settings.
    Group(WireGroup),
    /// A delayed message was stored.
    Delayed(DelayedReceipt),
    /// The report of a retention pass as JSON text (what `halfmq retention --json` prints).
    Retention(String),
    /// A trace as JSON text (the document `halfmq trace KEY --json` prints).
    Trace(String),
    /// What deleting a group removed.
    GroupDeleted(GroupDeleted),
    /// Answer to `SendBatch`: one per message, in the order sent.
    SentBatch {
        /// Topic.
        topic: String,
        /// Each message's answer.
        results: Vec<SendResult>,
    },
    /// Messages for a `Receive` (possibly none), each with its receipt.
    Received(Vec<WireReceived>),
    /// Answer to `ChangeLease`: the receipt of the new lease.
    LeaseChanged {
        /// Receipt handle.
        receipt: String,
    },
    /// A group's delivery settings with FIFO (answer to `SetGroupSettings` and
    /// `GetGroupSettings`).
    GroupSettings {
        /// The settings as in [`Response::Group`].
        group: WireGroup,
        /// FIFO message groups in force.
        fifo: bool,
        /// The group's own FIFO override.
        fifo_override: Option<bool>,
    },
    /// The answer to [`Request::ClusterStatus`]: one JSON object, as
    /// `halfmq cluster status --json` prints it (`{"leader": 1, "term": 7, "nodes": [...]}`).
    ClusterStatus(String),
}

/// Broker → client, unasked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// Check-back: what happened to this transaction?
    Check {
        /// Transaction id.
        txn: u64,
        /// Topic.
        topic: String,
        /// Producer group.
        producer_group: String,
        /// The half message.
        message: WireMessage,
        /// When the half was written.
        created_ms: u64,
        /// Checks before this one.
        checks: u32,
    },
}

/// Protocol error codes (beyond [`crate::Error::code`]).
pub mod codes {
    /// The first request was not `Hello`, or the token is wrong.
    pub const UNAUTHORIZED: u16 = 100;
    /// The frame could not be decoded.
    pub const BAD_FRAME: u16 = 101;
    /// The broker has too many connections.
    pub const TOO_MANY_CONNECTIONS: u16 = 102;
    /// The broker is shutting down.
    pub const SHUTTING_DOWN: u16 = 103;
    /// A request type this connection may not send (a `CheckAnswer` for no check, ...).
    pub const BAD_REQUEST: u16 = 104;
    /// The connection had nothing to do for the broker's `idle_timeout` and is closed. No
    /// request was in flight on it: one whose answer has not come was not carried out.
    pub const IDLE: u16 = 105;
    /// A replicated broker that is not the leader was asked to write: nothing was written.
    /// The message is [`super::not_leader_message`]'s: it names the leader's client address
    /// when one is known ([`super::leader_addr`] reads it back).
    pub const NOT_LEADER: u16 = 106;
}

/// The words of a [`codes::NOT_LEADER`] answer before the leader's address.
const LEADER_AT: &str = "not the leader; the leader is at ";

/// The message of a [`codes::NOT_LEADER`] answer: the leader's client address, or that
/// there is none known (an election is under way).
pub fn not_leader_message(leader: Option<&str>) -> String {
    match leader {
        Some(addr) => format!("{LEADER_AT}{addr}"),
        None => "not the leader; no leader is known (an election is under way)".to_owned(),
    }
}

/// For a [`codes::NOT_LEADER`] error: `Some` with the leader's address when the broker
/// named one, `Some(None)` when it knew of none; `None` for any other error.
pub fn leader_addr(e: &Error) -> Option<Option<String>> {
    match e {
        Error::Remote { code, message } if *code == codes::NOT_LEADER => {
            Some(message.strip_prefix(LEADER_AT).map(str::to_owned))
        }
        _ => None,
    }
}

/// Encode a protocol value.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    codec::encode(v, "protocol message")
}

/// Encode a protocol value at the end of `out` (the same bytes as [`encode`], without a new
/// buffer). On error `out` may hold part of the value: the caller truncates it.
pub fn encode_append<T: Serialize>(v: &T, out: &mut Vec<u8>) -> Result<()> {
    codec::encode_append(v, out, "protocol message")
}

/// Decode a protocol value (bounded by the codec's size limit).
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    codec::decode(bytes, "protocol message")
}

impl Response {
    /// The response for a failed request.
    pub fn from_error(e: &Error) -> Response {
        Response::Error {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `WireMessage` as it was declared before its body became serde bytes.
    #[derive(Serialize, Deserialize)]
    struct SeqMessage {
        key: String,
        body: Vec<u8>,
        properties: Properties,
    }

    #[test]
    fn body_bytes_are_the_same_as_a_sequence_of_u8() {
        for len in [0usize, 1, 250, 251, 1024, 65_536, 70_000] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut properties = Properties::new();
            properties.insert("a".into(), "b".into());
            let wire = WireMessage {
                key: "k".into(),
                body: body.clone(),
                properties: properties.clone(),
            };
            let seq = SeqMessage {
                key: "k".into(),
                body,
                properties,
            };
            let a = encode(&wire).unwrap();
            assert_eq!(a, encode(&seq).unwrap(), "bincode, body of {len} bytes");
            let back: WireMessage = decode(&a).unwrap();
            assert_eq!(back, wire);
            let json = serde_json::to_string(&wire).unwrap();
            assert_eq!(
                json,
                serde_json::to_string(&seq).unwrap(),
                "json, {len} bytes"
            );
            let back: WireMessage = serde_json::from_str(&json).unwrap();
            assert_eq!(back, wire);
        }
    }

    /// A follower's `NOT_LEADER` answer gives the client the leader's address back, or says
    /// that none is known; no other error reads as one.
    #[test]
    fn not_leader_carries_the_leaders_address() {
        let from =
            |leader: Option<&str>| Error::from_wire(codes::NOT_LEADER, not_leader_message(leader));
        assert_eq!(
            leader_addr(&from(Some("127.0.0.1:10921"))),
            Some(Some("127.0.0.1:10921".to_owned()))
        );
        assert_eq!(leader_addr(&from(None)), Some(None));
        let other = Error::from_wire(codes::IDLE, not_leader_message(Some("a:1")));
        assert_eq!(leader_addr(&other), None);
        assert_eq!(leader_addr(&Error::Closed), None);
    }

    /// Every broker error crosses the wire as `Response::Error` and comes back on the client
    /// as the same variant: same code, same text, same fields.
    #[test]
    fn every_error_variant_crosses_the_wire() {
        use crate::frame::{self, FrameKind, FRAME_BYTES_MAX_DEFAULT};
        use halfmq_types::error::wire::{every_variant, fields};
        for e in every_variant() {
            let mut bytes = Vec::new();
            let resp = Response::from_error(&e);
            frame::encode_with(
                &mut bytes,
                FrameKind::Response,
                9,
                FRAME_BYTES_MAX_DEFAULT,
                |out| encode_append(&resp, out),
            )
            .unwrap();
            let len = frame::check(&bytes, FRAME_BYTES_MAX_DEFAULT)
                .unwrap()
                .unwrap();
            let f = frame::parse_ref(&bytes[..len]).unwrap();
            let Response::Error { code, message } = decode::<Response>(f.body).unwrap() else {
                panic!("not an error answer");
            };
            let back = Error::from_wire(code, message);
            assert_eq!(back.code(), e.code(), "{e}");
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(fields(&back), fields(&e));
        }
    }

    #[test]
    fn a_body_longer_than_its_input_is_an_error() {
        let wire = WireMessage {
            key: String::new(),
            body: vec![1, 2, 3],
            properties: Properties::new(),
        };
        let bytes = encode(&wire).unwrap();
        // Claim a longer body than there is.
        let mut bad = bytes.clone();
        bad[1] = 200;
        assert!(decode::<WireMessage>(&bad).is_err());
        assert!(decode::<WireMessage>(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_batch_and_its_answers_round_trip() {
        let messages: Vec<WireMessage> = (0..3u8)
            .map(|i| WireMessage {
                key: format!("k{i}"),
                body: vec![i; 10 * usize::from(i)],
                properties: Properties::from([("p".to_owned(), i.to_string())]),
            })
            .collect();
        let req = Request::SendBatch {
            topic: "orders".into(),
            messages,
        };
        assert_eq!(decode::<Request>(&encode(&req).unwrap()).unwrap(), req);
        let outcomes = [
            Ok(halfmq_types::SendReceipt {
                topic: "orders".into(),
                queue: 2,
                offset: 7,
                log_offset: 4096,
                duplicate: true,
            }),
            Err(Error::UnknownTopic("orders".into())),
        ];
        let resp = Response::SentBatch {
            topic: "orders".into(),
            results: outcomes.iter().map(SendResult::from_outcome).collect(),
        };
        let back = decode::<Response>(&encode(&resp).unwrap()).unwrap();
        assert_eq!(back, resp);
        let Response::SentBatch { topic, results } = back else {
            panic!("not a batch answer");
        };
        let mut got = results.into_iter().map(|r| r.into_outcome(&topic));
        assert_eq!(got.next().unwrap().unwrap(), *outcomes[0].as_ref().unwrap());
        let e = got.next().unwrap().unwrap_err();
        assert!(
            matches!(e, Error::UnknownTopic(ref t) if t == "orders"),
            "{e}"
        );
    }

    #[test]
    fn a_malformed_batch_is_refused_as_a_whole() {
        let req = Request::SendBatch {
            topic: "t".into(),
            messages: vec![
                WireMessage {
                    key: String::new(),
                    body: vec![1; 20],
                    properties: Properties::new(),
                };
                3
            ],
        };
        let bytes = encode(&req).unwrap();
        // Cut short inside the last message, and claiming more messages than there are.
        assert!(decode::<Request>(&bytes[..bytes.len() - 5]).is_err());
        let mut more = bytes.clone();
        let count_at = 1 + 1 + 1; // variant, topic length, topic
        assert_eq!(more[count_at], 3);
        more[count_at] = 4;
        assert!(decode::<Request>(&more).is_err());
        // A count far larger than the input fails without allocating for it.
        let mut huge = bytes[..count_at].to_vec();
        huge.extend_from_slice(&[0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
        assert!(decode::<Request>(&huge).is_err());
    }
}
