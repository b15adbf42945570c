//! Every operation of the [`Client`], with the name, parameters and result types of the
//! embedded `Broker`'s method of the same name, made `async`. Where the two differ, the
//! method says so.
//!
//! The connection, pipelining and reconnects are in `connection.rs`; the role views
//! ([`Producer`](crate::Producer), [`Consumer`](crate::Consumer), ...) in `roles.rs`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use crate::connection::message_len_hint;
use crate::protocol::convert::{millis, topic_infos};
use crate::protocol::{
    AckRef, MessageRef, MessagesRef, Request, Response, SendBatchRef, SendDelayedRef, SendHalfRef,
    SendRef,
};
use halfmq_types::error::{Error, Result};
use halfmq_types::{
    DeadLetter, DelayedReceipt, Delivery, DeliveryConfig, GroupDeleted, GroupSettings, HalfOptions,
    HalfReceipt, Message, NackOutcome, PollOptions, Replayed, RetentionReport, SendReceipt, Stats,
    TopicInfo, Trace, TransactionChecker, TxnId, TxnInfo, TxnState,
};

pub use crate::config::ClientConfig;
pub use crate::connection::Client;

/// The answer `$resp` if it matches `$pat`, as `$out`; otherwise the error that the broker
/// answered something else.
macro_rules! answer {
    ($resp:expr, $pat:pat => $out:expr) => {
        match $resp {
            $pat => Ok($out),
            other => Err(unexpected(other)),
        }
    };
}

// After `answer!`, which it uses.
mod leases;

fn unexpected(r: Response) -> Error {
    Error::Decode {
        what: "response",
        reason: format!("unexpected answer {r:?}"),
    }
}

/// A JSON document the broker sends as text (stats, a retention report, a trace).
fn json<T: serde::de::DeserializeOwned>(text: &str, what: &'static str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Decode {
        what,
        reason: e.to_string(),
    })
}

/// The settings of a `GroupSettings` answer.
fn group_answer(r: Response) -> Result<(DeliveryConfig, GroupSettings)> {
    r.into_group_settings().map_err(unexpected)
}

/// A count as the wire carries it (saturating).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Client {
    /// Send `req`, one of the requests that carry `msg` for `topic`, with room for them.
    async fn request_carrying<T: serde::Serialize>(
        &self,
        req: &T,
        topic: &str,
        msg: &Message,
    ) -> Result<Response> {
        let hint = message_len_hint(topic, &msg.key, &msg.body, &msg.properties);
        let resend = msg.idempotency_key().is_some();
        self.request(req, hint, Duration::ZERO, resend).await
    }

    /// Store a message durably; the receipt says where ([`SendReceipt::duplicate`]: its
    /// idempotency key was stored already, and this is the original's receipt).
    ///
    /// With [`ClientConfig::auto_batch`] (the default), sends to one topic made while another
    /// of its sends is on the wire are queued and leave together as one batch request
    /// (`batcher.rs`); a send with nothing on the wire before it leaves at once, alone. A
    /// send cancelled after it was queued is still sent.
    ///
    /// With several addresses, a message without an idempotency key gets one
    /// ([`Client::keyed`]); so do those of every other send.
    pub async fn send(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let msg = &*self.keyed(msg);
        if self.config().auto_batch {
            return crate::batcher::send(self, topic, msg).await;
        }
        self.send_one(topic, msg).await
    }

    /// Store many messages to one topic in one `SendBatch` request: one run of records and
    /// one group commit on the broker. Each message gets its own receipt or error, in order
    /// (see the embedded `Broker::send_batch`); the call fails as a whole only when the batch
    /// is refused (unknown topic, over `SEND_BATCH_MESSAGES_MAX` messages or
    /// `SEND_BATCH_BYTES_MAX` bytes) or the request fails. An empty batch sends nothing.
    pub async fn send_batch(
        &self,
        topic: &str,
        msgs: &[Message],
    ) -> Result<Vec<Result<SendReceipt>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let keyed: Vec<Message>;
        let msgs = if msgs
            .iter()
            .all(|m| matches!(self.keyed(m), Cow::Borrowed(_)))
        {
            msgs
        } else {
            keyed = msgs.iter().map(|m| self.keyed(m).into_owned()).collect();
            &keyed
        };
        let req = SendBatchRef {
            topic,
            messages: MessagesRef(msgs),
        };
        let hint = msgs.iter().map(|m| m.payload_bytes() + 16).sum::<usize>() + 64;
        let resend = msgs.iter().all(|m| m.idempotency_key().is_some());
        match self.request(&req, hint, Duration::ZERO, resend).await? {
            Response::SentBatch { topic, results } if results.len() == msgs.len() => Ok(results
                .into_iter()
                .map(|r| r.into_outcome(&topic))
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    /// One `Send` request for one message.
    pub(crate) async fn send_one(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let req = SendRef {
            topic,
            message: MessageRef(msg),
        };
        answer!(self.request_carrying(&req, topic, msg).await?,
            Response::Sent { topic, queue, offset, log_offset, duplicate } =>
                SendReceipt { topic, queue, offset, log_offset, duplicate })
    }

    /// Store a message durably now, to be delivered to its topic at `deliver_at_ms` (ms
    /// since the Unix epoch).
    pub async fn send_delayed(
        &self,
        topic: &str,
        msg: &Message,
        deliver_at_ms: u64,
    ) -> Result<DelayedReceipt> {
        let msg = &*self.keyed(msg);
        let req = SendDelayedRef {
            topic,
            message: MessageRef(msg),
            deliver_at_ms,
        };
        answer!(self.request_carrying(&req, topic, msg).await?, Response::Delayed(r) => r)
    }

    /// Write a half message (a transaction): invisible to consumers until committed.
    pub async fn send_half(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<TxnId> {
        self.send_half_receipt(topic, msg, producer_group, opts)
            .await
            .map(|r| r.txn)
    }

    /// [`Client::send_half`] whose receipt also says whether its idempotency key was already
    /// stored (then `txn` is the original transaction and nothing was written).
    pub async fn send_half_receipt(
        &self,
        topic: &str,
        msg: &Message,
        producer_group: &str,
        opts: HalfOptions,
    ) -> Result<HalfReceipt> {
        let msg = &*self.keyed(msg);
        let req = SendHalfRef {
            topic,
            message: MessageRef(msg),
            producer_group,
            check_immunity_ms: opts.check_immunity_ms(),
        };
        answer!(self.request_carrying(&req, topic, msg).await?,
            Response::HalfSent { txn, duplicate } => HalfReceipt { txn: TxnId(txn), duplicate })
    }

    /// Commit a transaction: its message becomes visible, exactly once.
    pub async fn commit(&self, txn: TxnId) -> Result<()> {
        answer!(self.call(Request::Commit { txn: txn.0 }).await?, Response::Ok => ())
    }

    /// Roll back a transaction: its message is discarded.
    pub async fn rollback(&self, txn: TxnId) -> Result<()> {
        answer!(self.call(Request::Rollback { txn: txn.0 }).await?, Response::Ok => ())
    }

    /// Hand out up to `max` messages of `topic` to `group`, without waiting. Each is leased
    /// to the group for its visibility time-out: ack it (or nack it) before then.
    pub async fn poll(&self, group: &str, topic: &str, max: usize) -> Result<Vec<Delivery>> {
        self.poll_wait(group, topic, max, Duration::ZERO).await
    }

    /// Like [`Client::poll`], but waits up to `timeout` (the broker caps it at 60 s) for a
    /// message when there is none. The request may take `timeout` longer than the client's
    /// request time-out. The broker also stops a batch before it would overflow a frame.
    pub async fn poll_wait(
        &self,
        group: &str,
        topic: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Delivery>> {
        let opts = PollOptions::default();
        self.poll_wait_with(group, topic, max, timeout, &opts).await
    }

    /// Up to `max` messages of `queue` of `topic` from queue offset `from` on, read without
    /// delivering them ([`Request::Browse`]): no group, no lease. On a replicated cluster,
    /// what the node asked holds.
    pub async fn browse(
        &self,
        topic: &str,
        queue: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let req = Request::Browse {
            topic: topic.into(),
            queue,
            from,
            max: count(max),
        };
        let got = answer!(self.call(req).await?, Response::Messages(m) => m)?;
        Ok(got.into_iter().map(Delivery::from).collect())
    }

    /// Acknowledge one message; durable when this returns.
    pub async fn ack(&self, group: &str, topic: &str, queue: u32, offset: u64) -> Result<()> {
        self.ack_many(group, topic, &[(queue, offset)]).await
    }

    /// Acknowledge several messages of one topic, `(queue, offset)` pairs, with one durable
    /// write.
    pub async fn ack_many(&self, group: &str, topic: &str, acks: &[(u32, u64)]) -> Result<()> {
        let req = AckRef { group, topic, acks };
        let hint = 64 + group.len() + topic.len() + acks.len() * 14;
        // Not made again after its fate was lost: an ack may have been carried out, and
        // the caller decides (an unacked message is delivered again in any case).
        answer!(self.request(&req, hint, Duration::ZERO, false).await?, Response::Ok => ())
    }

    /// Give back a delivered message: it is delivered again after `delay` (or the group's
    /// retry backoff when `None`), or moves to the dead-letter queue past the group's
    /// maximum. Durable when this returns.
    pub async fn nack(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        delay: Option<Duration>,
    ) -> Result<NackOutcome> {
        let req = Request::Nack {
            group: group.into(),
            topic: topic.into(),
            queue,
            offset,
            delay_ms: delay.map(millis),
        };
        answer!(self.call(req).await?, Response::Nacked(o) => o)
    }

    /// Up to `max` (the broker caps it at 10,000) dead letters of `group` from dead-letter
    /// offset `from`.
    pub async fn dead_letters(
        &self,
        group: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<DeadLetter>> {
        let group = group.into();
        let req = Request::DeadLetters {
            group,
            from,
            max: count(max),
        };
        answer!(self.call(req).await?, Response::DeadLetters(d) => d)
    }

    /// Send up to `max` not yet replayed dead letters of `group` back to their topics.
    pub async fn replay_dead_letters(&self, group: &str, max: usize) -> Result<Vec<Replayed>> {
        let group = group.into();
        let req = Request::ReplayDeadLetters {
            group,
            max: count(max),
        };
        answer!(self.call(req).await?, Response::Replayed(r) => r)
    }

    /// Override the delivery settings of `group` (durably; `None` fields keep the broker
    /// default). Returns the settings now in force (durations in whole milliseconds).
    pub async fn set_group_settings(
        &self,
        group: &str,
        settings: &GroupSettings,
    ) -> Result<DeliveryConfig> {
        let req = Request::SetGroupSettings {
            group: group.into(),
            settings: settings.clone(),
            fifo: settings.fifo,
        };
        group_answer(self.call(req).await?).map(|(d, _)| d)
    }

    /// The delivery settings in force for `group`, and its overrides.
    pub async fn group_settings(&self, group: &str) -> Result<(DeliveryConfig, GroupSettings)> {
        let req = Request::GetGroupSettings {
            group: group.into(),
        };
        group_answer(self.call(req).await?)
    }

    /// Forget a consumer group that is no longer used: its offsets, acks, retry states and
    /// settings (its dead-letter queue is kept).
    pub async fn delete_group(&self, group: &str) -> Result<GroupDeleted> {
        let req = Request::DeleteGroup {
            group: group.into(),
        };
        answer!(self.call(req).await?, Response::GroupDeleted(d) => d)
    }

    /// Create a topic with `queues` queues; an existing topic with as many is no error.
    pub async fn create_topic(&self, name: &str, queues: u32) -> Result<TopicInfo> {
        let req = Request::CreateTopic {
            name: name.into(),
            queues,
        };
        // The broker answers `Ok` only when the topic has exactly `queues` queues now.
        answer!(self.call(req).await?,
            Response::Ok => TopicInfo { name: name.to_owned(), queues })
    }

    /// Every topic, by name.
    pub async fn topics(&self) -> Result<Vec<TopicInfo>> {
        answer!(self.call(Request::ListTopics).await?, Response::Topics(t) => topic_infos(t))
    }

    /// Figures for people and monitoring. The broker sends them as JSON; fields an older
    /// broker does not send have their defaults.
    pub async fn stats(&self) -> Result<Stats> {
        answer!(self.call(Request::Stats).await?, Response::Stats(s) => json(&s, "stats")?)
    }

    /// Run one retention pass on the broker now; its report.
    pub async fn enforce_retention(&self) -> Result<RetentionReport> {
        answer!(self.call(Request::Retention).await?,
            Response::Retention(s) => json(&s, "retention report")?)
    }

    /// Every event of every message with exactly this key, and where each is now. A trace
    /// too large for one frame is an [`Error::Invalid`]; read it from the stopped broker's
    /// data directory then.
    pub async fn trace(&self, key: &str) -> Result<Trace> {
        let req = Request::Trace {
            key: key.to_owned(),
        };
        answer!(self.call(req).await?, Response::Trace(text) => json(&text, "trace")?)
    }

    /// Unfinished transactions, oldest first: all, or those in `state`. (Fetched in pages
    /// that each fit a frame.)
    pub async fn transactions(&self, state: Option<TxnState>) -> Result<Vec<TxnInfo>> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let req = Request::ListTxns {
                state,
                after,
                max: 1000,
            };
            let page = answer!(self.call(req).await?, Response::Txns(page) => page)?;
            let Some(last) = page.last() else {
                return Ok(all);
            };
            after = last.txn_id.saturating_add(1);
            all.extend(page);
        }
    }

    /// Transactions that were checked the most times without an answer.
    pub async fn unresolved_transactions(&self) -> Result<Vec<TxnInfo>> {
        self.transactions(Some(TxnState::Unresolved)).await
    }

    /// Where a transaction is.
    pub async fn transaction_state(&self, txn: TxnId) -> Result<TxnState> {
        answer!(self.call(Request::TxnState { txn: txn.0 }).await?, Response::TxnState(s) => s)
    }

    /// Check an unfinished transaction again now, with its check count reset.
    pub async fn rearm(&self, txn: TxnId) -> Result<()> {
        answer!(self.call(Request::Rearm { txn: txn.0 }).await?, Response::Ok => ())
    }

    /// Answer the check-backs of `producer_group` with `checker`, from now on and after every
    /// reconnect. Unlike the embedded broker's, it returns no id: a registration ends with
    /// the client (the protocol has no request to end it sooner).
    pub async fn register_checker(
        &self,
        producer_group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<()> {
        self.keep_checker(producer_group, checker);
        let req = Request::RegisterChecker {
            producer_group: producer_group.into(),
        };
        answer!(self.call(req).await?, Response::Ok => ())
    }
}
