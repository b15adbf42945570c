//! Plain sends: one path (claim the idempotency key if there is one, append, count) that
//! `send` waits for by blocking and `send_async` by awaiting.

use std::sync::Arc;

use super::wait::{block_on, Async, Blocking, Hook, Wait};
use super::{validate_user_topic_name, Broker, Topic};
use halfmq_store::record::{self, Record, RecordKind};
use halfmq_store::Appended;
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
    /// key already stored answers with the original's receipt and stores nothing.
    async fn send_with<W: Wait>(&self, w: &W, topic: &str, msg: &Message) -> Result<SendReceipt> {
        let (t, qi, props) = self.prepare_send(topic, msg)?;
        let reservation = match self
            .claim_or_original(
                w,
                RecordKind::Message,
                (&t.name, &msg.properties),
                sent_before,
            )
            .await?
        {
            Ok(reservation) => reservation,
            Err(original) => return Ok(original),
        };
        // Built after the claim, which may have waited: the record's time is when it is
        // appended.
        let a = t.append(
            qi,
            RecordKind::Message,
            (&msg.key, &props, &msg.body),
            self.now(),
        );
        let hook = match reservation {
            None => Hook::None,
            // The key is remembered once the record is acknowledged under the flush policy,
            // like the send itself: no extra sync.
            Some(r) => Hook::Acknowledged(r.into_hook(Self::size_of(&a), a.timestamp_ms)),
        };
        let appended = w.append(&self.store, a, hook).await?;
        t.counters.message_in(msg.body.len());
        Ok(Self::receipt(&t, qi, appended))
    }

    pub(super) fn prepare_send(
        &self,
        topic: &str,
        msg: &Message,
    ) -> Result<(Arc<Topic>, usize, Vec<u8>)> {
        Self::check_user_properties(&msg.properties)?;
        validate_user_topic_name(topic)?;
        let t = self.topic(topic)?;
        let qi = Self::pick_queue(&t, &msg.key);
        let props = record::encode_properties(&msg.properties)?;
        Ok((t, qi, props))
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
