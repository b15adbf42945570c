//! Plain sends: one path (claim the idempotency key if there is one, append, count) that
//! `send` waits for by blocking and `send_async` by awaiting.

use std::sync::Arc;

use super::wait::{block_on, Async, Blocking, Hook, Wait};
use super::{validate_user_topic_name, Broker, Topic};
use crate::idem::Reservation;
use halfmq_store::record::{self, Record, RecordKind};
use halfmq_store::{Append, Appended};
use halfmq_types::error::Result;
use halfmq_types::{Message, SendReceipt};

impl Broker {
    /// Store a message. Returns once it is acknowledged under the flush policy (by default:
    /// durable on disk). Blocks the calling thread; async code uses [`Broker::send_async`].
    pub fn send(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        block_on(self.send_with(&Blocking, topic, msg))
    }

    /// [`Broker::send`] without blocking the executor while the fsync happens.
    pub async fn send_async(&self, topic: &str, msg: &Message) -> Result<SendReceipt> {
        self.send_with(&Async, topic, msg).await
    }

    /// The one path of a send. A message with an idempotency key first claims the key: a
    /// key already stored answers with the original's receipt and stores nothing. A batch
    /// (`send_batch.rs`) takes each message through the same steps: [`Broker::place`],
    /// [`Broker::claim_for`], [`Broker::staged_append`] and [`Broker::sent`].
    async fn send_with<W: Wait>(&self, w: &W, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let (t, qi, props) = self.prepare_send(topic, msg)?;
        let reservation = match self.claim_for(w, &t, msg).await? {
            Ok(reservation) => reservation,
            Err(original) => return Ok(original),
        };
        // Built after the claim, which may have waited: the record's time is when it is
        // appended.
        let (a, hook) = self.staged_append(&t, qi, (msg, &props), reservation, self.now());
        let appended = w.append(&self.store, a, hook).await?;
        Ok(Self::sent(&t, qi, msg, appended))
    }

    /// Claim the idempotency key of `msg` (if it has one) for a plain send to `t`:
    /// `Ok(reservation)` to store it with, or `Err(receipt)`, the original's (nothing is
    /// stored again).
    pub(super) async fn claim_for<W: Wait>(
        &self,
        w: &W,
        t: &Topic,
        msg: &Message,
    ) -> Result<std::result::Result<Option<Reservation>, SendReceipt>> {
        self.claim_or_original(
            w,
            RecordKind::Message,
            (&t.name, &msg.properties),
            sent_before,
        )
        .await
    }

    /// The append of a plain message to queue `qi` of `t` (its encoded properties `props`)
    /// and what runs once it is acknowledged: the key's reservation, if any, is completed
    /// then (no extra sync).
    pub(super) fn staged_append<'a>(
        &self,
        t: &'a Topic,
        qi: usize,
        (msg, props): (&'a Message, &'a [u8]),
        reservation: Option<Reservation>,
        now: u64,
    ) -> (Append<'a>, Hook) {
        let a = t.append(qi, RecordKind::Message, (&msg.key, props, &msg.body), now);
        let hook = match reservation {
            None => Hook::None,
            Some(r) => Hook::Acknowledged(r.into_hook(Self::size_of(&a), a.timestamp_ms)),
        };
        (a, hook)
    }

    /// Count a stored message and make its receipt.
    pub(super) fn sent(t: &Topic, qi: usize, msg: &Message, a: Appended) -> SendReceipt {
        t.counters.message_in(msg.body.len());
        Self::receipt(t, qi, a)
    }

    pub(super) fn prepare_send(
        &self,
        topic: &str,
        msg: &Message,
    ) -> Result<(Arc<Topic>, usize, Vec<u8>)> {
        Self::check_user_message(msg)?;
        let t = self.send_topic(topic)?;
        let (qi, props) = Self::place(&t, msg)?;
        Ok((t, qi, props))
    }

    /// The topic a producer sends to: a user topic's name, and one that exists.
    pub(super) fn send_topic(&self, topic: &str) -> Result<Arc<Topic>> {
        validate_user_topic_name(topic)?;
        self.topic(topic)
    }

    /// Where in `t` a message goes (its key picks the queue) and its encoded properties.
    /// The caller has checked the message ([`Broker::check_user_message`]).
    pub(super) fn place(t: &Topic, msg: &Message) -> Result<(usize, Vec<u8>)> {
        let qi = Self::pick_queue(t, msg);
        let props = record::encode_properties(&msg.properties)?;
        Ok((qi, props))
    }

    pub(super) fn receipt(t: &Topic, qi: usize, a: Appended) -> SendReceipt {
        SendReceipt {
            topic: t.name.clone(),
            queue: t.queues[qi].queue_id(),
            // The store hands out a queue offset for every dispatched append.
            offset: a.queue_offset.unwrap_or_default(),
            log_offset: a.log_offset,
            duplicate: false,
        }
    }
}

/// The receipt of a send whose idempotency key was stored already: the original's.
fn sent_before(rec: Record) -> SendReceipt {
    SendReceipt {
        topic: rec.topic,
        queue: rec.header.queue_id,
        offset: rec.header.queue_offset,
        log_offset: rec.header.log_offset,
        duplicate: true,
    }
}
