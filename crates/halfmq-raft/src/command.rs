//! What a raft entry carries: a [`Batch`] of broker commands, and what applying each one
//! answered ([`Applied`]).
//!
//! One batch is one raft entry, appended with one write and fsynced once on every node: a
//! caller that has many commands to make durable together (a group commit's worth of
//! sends) proposes them as one batch. The batch carries the leader's clock when it was
//! proposed ([`Batch::time_ms`]); every node applies it with its broker's clock set to that
//! time (never backwards), so that the records each node writes (their timestamps, and so
//! their log offsets and transaction ids) are the same bytes on every node.
//!
//! Applying is deterministic given the same broker state: the commands are the broker's own
//! write operations, each a function of the state and its arguments. A command that fails
//! (an unknown topic, an ack past the end) fails the same way on every node, and its error
//! is the answer; it does not stop the batch.

use halfmq::{
    Broker, Decided, DelayedReceipt, DeliveredLease, GroupDeleted, GroupSettings, HalfOptions,
    Message, Replayed, SendReceipt, Settlement, TxnId,
};
use halfmq_types::error::{Error, Result};
use halfmq_types::Outcome as TxnOutcome;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A message as the raft log carries it (the fields of [`halfmq::Message`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageData {
    /// Key; empty for none.
    pub key: String,
    /// Payload (encoded as one run of bytes: `halfmq_types::codec::bytes`).
    #[serde(with = "halfmq_types::codec::bytes")]
    pub body: Vec<u8>,
    /// User properties, by name.
    pub properties: Vec<(String, String)>,
}

impl From<&Message> for MessageData {
    fn from(m: &Message) -> MessageData {
        MessageData {
            key: m.key.clone(),
            body: m.body.clone(),
            properties: m
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl MessageData {
    /// The broker's message.
    pub fn to_message(&self) -> Message {
        Message {
            key: self.key.clone(),
            body: self.body.clone(),
            properties: self.properties.iter().cloned().collect(),
        }
    }
}

/// One write operation of the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// [`Broker::create_topic`].
    CreateTopic {
        /// Topic name.
        topic: String,
        /// Queues.
        queues: u32,
    },
    /// [`Broker::send_batch`]: one run of records, one group commit on each node.
    Send {
        /// Topic.
        topic: String,
        /// The messages, in order.
        messages: Vec<MessageData>,
    },
    /// [`Broker::send_half_receipt`].
    SendHalf {
        /// Topic it becomes visible in on commit.
        topic: String,
        /// The message.
        message: MessageData,
        /// The producer group asked at check-back.
        producer_group: String,
        /// [`HalfOptions::check_immunity`], in ms.
        check_immunity_ms: Option<u64>,
    },
    /// [`Broker::commit`].
    Commit(TxnId),
    /// [`Broker::rollback`].
    Rollback(TxnId),
    /// [`Broker::ack_many`].
    Ack {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// (queue, offset) pairs.
        acks: Vec<(u32, u64)>,
    },
    /// [`Broker::set_group_settings`], without the FIFO override ([`GroupSettings`]'s serde
    /// form does not carry it, so this applies `fifo: None` on every node): kept for logs
    /// that hold it; [`Command::SetGroup`] is what the server proposes.
    GroupSettings {
        /// Consumer group.
        group: String,
        /// Its overrides.
        settings: GroupSettings,
    },
    /// One check-back of a pending transaction, made by the leader (the only node that asks
    /// checkers): what came of it. Every node records it at the batch's time, so the check
    /// counts and the next check's time agree ([`Broker::record_check_answer`],
    /// [`Broker::record_check_failed`]).
    Check {
        /// The transaction.
        txn: TxnId,
        /// What the check found.
        result: CheckResult,
    },
    /// [`Broker::rearm`]: check the transaction again now, its count reset.
    Rearm(TxnId),
    /// [`Broker::set_group_settings`] with the FIFO override, which [`GroupSettings`]'s
    /// serde form leaves out.
    SetGroup {
        /// Consumer group.
        group: String,
        /// Its overrides (their `fifo` is ignored: `fifo` below is the one).
        settings: GroupSettings,
        /// The FIFO override.
        fifo: Option<bool>,
    },
    /// [`Broker::send_delayed`]: stored now, delivered when the leader fires it.
    SendDelayed {
        /// Topic it is delivered to.
        topic: String,
        /// The message.
        message: MessageData,
        /// When, ms since the Unix epoch.
        deliver_at_ms: u64,
    },
    /// Deliver these delayed messages now ([`Broker::fire_delayed`]), proposed by the leader
    /// when they are due by its clock: each node delivers exactly these, at the batch's
    /// time, so the records agree; one fired before is left alone.
    Fire(Vec<u64>),
    /// A failed delivery the leader decided should be delivered again
    /// ([`halfmq::Settlement::Retry`]: a nack, or a visibility time-out its poll found):
    /// every node records the failure count and the redelivery time
    /// ([`Broker::settle_retry`]), so a new leader redelivers with the count the old one
    /// reached. Nothing changes where the message is acked.
    Retry {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Queue offset.
        offset: u64,
        /// Failed deliveries so far.
        failures: u32,
        /// When it may be delivered again, ms since the Unix epoch (the leader's clock).
        due_ms: u64,
        /// Why the last delivery failed.
        reason: String,
    },
    /// A message the leader decided to move to the group's dead-letter queue
    /// ([`halfmq::Settlement::DeadLetter`]): every node appends the same dead letter at the
    /// batch's time and acks the original ([`Broker::settle_dead_letter`]); where it is
    /// acked already (moved before) nothing changes.
    DeadLetter {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// Queue.
        queue: u32,
        /// Queue offset.
        offset: u64,
        /// Failed deliveries.
        failures: u32,
        /// Why.
        reason: String,
    },
    /// [`Broker::replay_dead_letters`]: up to `max` dead letters of `group` sent back to
    /// their topics. What is replayed follows from the replicated state alone (the
    /// dead-letter queue and what was replayed from it), so every node replays the same.
    Replay {
        /// Consumer group.
        group: String,
        /// Most dead letters.
        max: u32,
    },
    /// Deliveries the leader made ([`Broker::settle_delivered`]): every other node records
    /// each message as with a consumer until its lease runs out, so a new leader delivers
    /// it again only after that time-out, with the attempt counted.
    Delivered {
        /// Consumer group.
        group: String,
        /// Topic.
        topic: String,
        /// The leases.
        leases: Vec<LeaseData>,
    },
    /// [`Broker::delete_group_settled`]: forget a consumer group, decided by the leader
    /// once none of the group's messages is with a consumer by its leases
    /// ([`Broker::check_group_deletion`]).
    DeleteGroup(String),
}

/// A delivery's lease as the raft log carries it ([`halfmq::DeliveredLease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseData {
    /// Queue.
    pub queue: u32,
    /// Queue offset.
    pub offset: u64,
    /// Which delivery it is.
    pub attempt: u32,
    /// When the lease runs out, ms since the Unix epoch (the leader's clock).
    pub due_ms: u64,
    /// How long it was given for, ms.
    pub lease_ms: u64,
}

impl From<&DeliveredLease> for LeaseData {
    fn from(l: &DeliveredLease) -> LeaseData {
        LeaseData {
            queue: l.queue,
            offset: l.offset,
            attempt: l.attempt,
            due_ms: l.due_ms,
            lease_ms: l.lease_ms,
        }
    }
}

impl From<&LeaseData> for DeliveredLease {
    fn from(l: &LeaseData) -> DeliveredLease {
        DeliveredLease {
            queue: l.queue,
            offset: l.offset,
            attempt: l.attempt,
            due_ms: l.due_ms,
            lease_ms: l.lease_ms,
        }
    }
}

/// What one check-back found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckResult {
    /// The checker answered commit: the transaction is committed.
    Commit,
    /// The checker answered rollback: the transaction is rolled back.
    Rollback,
    /// No outcome: the checker answered unknown, did not answer in time, or no checker of
    /// the group was registered. Counted as a failed check, with this reason.
    Failed(String),
}

impl Command {
    /// The [`Command::Retry`] or [`Command::DeadLetter`] that records `d`.
    pub fn settle(d: &Decided) -> Command {
        let (group, topic, queue, offset) = (d.group.clone(), d.topic.clone(), d.queue, d.offset);
        match &d.settlement {
            Settlement::Retry {
                failures,
                due_ms,
                reason,
            } => Command::Retry {
                group,
                topic,
                queue,
                offset,
                failures: *failures,
                due_ms: *due_ms,
                reason: reason.clone(),
            },
            Settlement::DeadLetter { failures, reason } => Command::DeadLetter {
                group,
                topic,
                queue,
                offset,
                failures: *failures,
                reason: reason.clone(),
            },
        }
    }

    /// [`Command::SendHalf`] of `message` with `opts`.
    pub fn send_half(
        topic: &str,
        message: &Message,
        producer_group: String,
        opts: HalfOptions,
    ) -> Command {
        Command::SendHalf {
            topic: topic.to_owned(),
            message: MessageData::from(message),
            producer_group,
            check_immunity_ms: Some(opts.check_immunity_ms()).filter(|&ms| ms > 0),
        }
    }
}

/// A raft entry's data: commands applied in order, at the leader's time.
///
/// The commands are shared (`Arc`): openraft asks the log for an entry once to apply it and
/// once per follower to send it, and the log serves recent entries from memory
/// ([`crate::log_store`]), so a clone must not copy the messages. The encoding is the
/// `Vec`'s, so logs and journals written before read the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The leader's clock when it proposed the batch, ms since the Unix epoch.
    pub time_ms: u64,
    /// The commands.
    #[serde(with = "shared_commands")]
    pub commands: Arc<Vec<Command>>,
}

impl Batch {
    /// `commands` at `time_ms`.
    pub fn new(time_ms: u64, commands: Vec<Command>) -> Batch {
        Batch {
            time_ms,
            commands: Arc::new(commands),
        }
    }
}

/// (De)serializes `Arc<Vec<Command>>` as the `Vec` itself.
mod shared_commands {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Command;

    pub fn serialize<S: Serializer>(v: &Arc<Vec<Command>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<Command>>, D::Error> {
        Vec::<Command>::deserialize(d).map(Arc::new)
    }
}

/// An error as it crosses raft: [`Error::code`] and its text, turned back into the
/// broker's variant by [`Error::from_wire`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// [`Error::code`].
    pub code: u16,
    /// The error's text.
    pub message: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> WireError {
        WireError {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        Error::from_wire(e.code, e.message)
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The topic exists with this many queues.
    TopicCreated {
        /// Queues.
        queues: u32,
    },
    /// Per message of a `Send`, its receipt or why it was refused.
    Sent(Vec<std::result::Result<SendReceipt, WireError>>),
    /// The half's transaction, and whether it was an idempotent duplicate.
    Half {
        /// The transaction.
        txn: TxnId,
        /// True when nothing was written (the idempotency key was stored already).
        duplicate: bool,
    },
    /// A commit, rollback, ack or group setting took effect.
    Done,
    /// A delayed message was stored.
    Delayed(DelayedReceipt),
    /// How many of a `Fire`'s messages were delivered by it.
    Fired(u64),
    /// Whether a `Retry` was recorded (false: the message was acked).
    Retried(bool),
    /// Where a `DeadLetter`'s dead letter is (`None`: the message was acked, moved before).
    DeadLettered(Option<SendReceipt>),
    /// What a `Replay` sent.
    Replayed(Vec<Replayed>),
    /// How many of a `Delivered`'s leases this node recorded.
    Recorded(u64),
    /// What a `DeleteGroup` removed.
    GroupDeleted(GroupDeleted),
}

/// One command's answer.
pub type Applied = std::result::Result<Outcome, WireError>;

/// Apply one command to `broker`, waiting by blocking (the caller runs it off the async
/// executor).
pub fn apply(broker: &Broker, command: &Command) -> Result<Outcome> {
    match command {
        Command::CreateTopic { topic, queues } => broker
            .create_topic(topic, *queues)
            .map(|t| Outcome::TopicCreated { queues: t.queues }),
        Command::Send { topic, messages } => {
            let msgs: Vec<Message> = messages.iter().map(MessageData::to_message).collect();
            sent(broker.send_batch(topic, &msgs))
        }
        Command::SendHalf {
            topic,
            message,
            producer_group,
            check_immunity_ms,
        } => {
            let opts = HalfOptions::from_check_immunity_ms(check_immunity_ms.unwrap_or(0));
            let r = broker.send_half_receipt(topic, &message.to_message(), producer_group, opts)?;
            Ok(Outcome::Half {
                txn: r.txn,
                duplicate: r.duplicate,
            })
        }
        Command::Commit(txn) => broker.commit(*txn).map(|()| Outcome::Done),
        Command::Rollback(txn) => broker.rollback(*txn).map(|()| Outcome::Done),
        Command::Ack { group, topic, acks } => {
            broker.ack_many(group, topic, acks).map(|()| Outcome::Done)
        }
        Command::GroupSettings { group, settings } => broker
            .set_group_settings(group, settings)
            .map(|_| Outcome::Done),
        Command::Check { txn, result } => match result {
            CheckResult::Commit => broker.record_check_answer(*txn, TxnOutcome::Committed),
            CheckResult::Rollback => broker.record_check_answer(*txn, TxnOutcome::RolledBack),
            CheckResult::Failed(why) => broker.record_check_failed(*txn, why),
        }
        .map(|()| Outcome::Done),
        Command::Rearm(txn) => broker.rearm(*txn).map(|()| Outcome::Done),
        Command::SetGroup {
            group,
            settings,
            fifo,
        } => {
            let settings = GroupSettings {
                fifo: *fifo,
                ..settings.clone()
            };
            broker
                .set_group_settings(group, &settings)
                .map(|_| Outcome::Done)
        }
        Command::SendDelayed {
            topic,
            message,
            deliver_at_ms,
        } => broker
            .send_delayed(topic, &message.to_message(), *deliver_at_ms)
            .map(Outcome::Delayed),
        Command::Fire(ids) => {
            let mut fired = 0;
            for &id in ids {
                fired += u64::from(broker.fire_delayed(id)?);
            }
            Ok(Outcome::Fired(fired))
        }
        Command::Retry {
            group,
            topic,
            queue,
            offset,
            failures,
            due_ms,
            reason,
        } => broker
            .settle_retry(
                group,
                topic,
                (*queue, *offset),
                (*failures, *due_ms),
                reason,
            )
            .map(Outcome::Retried),
        Command::DeadLetter {
            group,
            topic,
            queue,
            offset,
            failures,
            reason,
        } => broker
            .settle_dead_letter(group, topic, (*queue, *offset), *failures, reason)
            .map(Outcome::DeadLettered),
        Command::Replay { group, max } => broker
            .replay_dead_letters(group, (*max as usize).clamp(1, 10_000))
            .map(Outcome::Replayed),
        Command::Delivered {
            group,
            topic,
            leases,
        } => {
            let leases: Vec<DeliveredLease> = leases.iter().map(DeliveredLease::from).collect();
            broker
                .settle_delivered(group, topic, &leases)
                .map(Outcome::Recorded)
        }
        Command::DeleteGroup(group) => broker
            .delete_group_settled(group)
            .map(Outcome::GroupDeleted),
    }
}

/// Apply every command of `batch` in order. A command that fails the same way on every
/// node (bad input, an unknown topic, a conflicting outcome) answers with its error and the
/// rest go on; a failure of this node alone (its disk, its metadata database) is returned
/// instead, because answering it would make this node's broker differ from the others'.
pub fn apply_batch(broker: &Broker, batch: &Batch) -> Result<Vec<Applied>> {
    batch
        .commands
        .iter()
        .map(|c| answer(apply(broker, c)))
        .collect()
}

/// What a command's result answers: its outcome, or its error when every node fails the
/// same way; `Err` for a failure of this node alone (see [`apply_batch`]).
pub fn answer(r: Result<Outcome>) -> Result<Applied> {
    match r {
        Ok(Outcome::Sent(each)) => {
            if let Some(e) = each.iter().find_map(|r| r.as_ref().err()) {
                let e = Error::from(e.clone());
                if is_local_failure(&e) {
                    return Err(e);
                }
            }
            Ok(Ok(Outcome::Sent(each)))
        }
        Ok(o) => Ok(Ok(o)),
        Err(e) if is_local_failure(&e) => Err(e),
        Err(e) => Ok(Err(WireError::from(&e))),
    }
}

/// A `Send` answer from the broker's receipts.
pub fn sent(r: Result<Vec<Result<SendReceipt>>>) -> Result<Outcome> {
    r.map(|v| {
        Outcome::Sent(
            v.into_iter()
                .map(|r| r.map_err(|e| WireError::from(&e)))
                .collect(),
        )
    })
}

/// True for an error of this node's own storage rather than of the command.
pub fn is_local_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Io { .. }
            | Error::DiskFull { .. }
            | Error::Poisoned(_)
            | Error::Corrupt { .. }
            | Error::Damaged { .. }
            | Error::Lost { .. }
            | Error::Meta(_)
            | Error::Closed
            | Error::Locked { .. }
    )
}

/// The receipts of a `Send` answer, as the broker's types.
pub fn receipts(applied: Applied) -> Result<Vec<Result<SendReceipt>>> {
    match applied.map_err(Error::from)? {
        Outcome::Sent(v) => Ok(v.into_iter().map(|r| r.map_err(Error::from)).collect()),
        other => Err(Error::Invalid {
            what: "replicated answer",
            reason: format!("a send was answered with {other:?}"),
        }),
    }
}
