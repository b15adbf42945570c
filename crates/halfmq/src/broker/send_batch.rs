//! Batch sends: many messages to one topic in one call, stored as one run of records under
//! one hold of the store's writer lock, so that one group commit acknowledges them all. Each
//! message goes through the steps of a plain send (`send.rs`): its checks, its queue, its
//! idempotency claim, its append and its receipt; only the append is shared.
//!
//! Idempotency keys: a message whose key an earlier message of the same batch carries is a
//! duplicate of that one and answers its receipt (marked `duplicate`); a key stored before
//! answers the original's receipt, as a plain send does. The keys of a batch are claimed in
//! key order, so two batches (or a batch and plain sends) that share keys cannot wait for
//! each other in a circle.
//!
//! Transactions are not batched: a half message is sent on its own (`send_half`), and
//! commits and rollbacks are unaffected.

use std::collections::HashMap;

use std::sync::Arc;

use super::wait::{block_on, Async, Blocking, Wait};
use super::{Broker, Topic};
use crate::idem::{key_of, Reservation, ENTRY_OVERHEAD_BYTES};
use halfmq_store::Ticket;
use halfmq_types::error::{Error, Result};
use halfmq_types::trace::Event;
use halfmq_types::{Message, SendReceipt, SEND_BATCH_BYTES_MAX, SEND_BATCH_MESSAGES_MAX};

/// Where one message of a batch is on its way.
enum Slot {
    /// Answered: stored (or its key's original), or refused.
    Done(Result<SendReceipt>),
    /// Checked and placed, its key (if any) claimed: to be appended.
    Ready {
        qi: usize,
        props: Vec<u8>,
        reservation: Option<Reservation>,
    },
    /// Its idempotency key is that of the earlier message at this index of the batch.
    SameKeyAs(usize),
}

/// A batch send whose records are in the store's pending batch, not yet acknowledged
/// ([`Broker::stage_send_batch`]). Dropped unfinished, its records are still written; only
/// the answers are lost.
pub struct StagedSend<'a> {
    broker: &'a Broker,
    topic: Arc<Topic>,
    msgs: &'a [Message],
    slots: Vec<Slot>,
    /// The slot of each submitted record, and its ticket (or why it was refused).
    tickets: Vec<(usize, Result<Ticket<'a>>)>,
}

impl StagedSend<'_> {
    /// Wait until the staged records are acknowledged: each message's answer, in order, as
    /// [`Broker::send_batch`] gives them. Blocks the calling thread.
    pub fn finish(self) -> Vec<Result<SendReceipt>> {
        block_on(self.finish_with(&Blocking))
    }

    async fn finish_with<W: Wait>(mut self, w: &W) -> Vec<Result<SendReceipt>> {
        for (i, ticket) in std::mem::take(&mut self.tickets) {
            let a = match ticket {
                Ok(t) => w.wait(t).await,
                Err(e) => Err(e),
            };
            if let Slot::Ready { qi, .. } = self.slots[i] {
                self.slots[i] =
                    Slot::Done(a.map(|a| Broker::sent(&self.topic, qi, &self.msgs[i], a)));
            }
        }
        self.broker.answers(self.slots, self.msgs)
    }
}

impl Broker {
    /// Store many messages to one topic at once: one run of records in the log, acknowledged
    /// by one group commit, each message with its own answer, in order. Blocks the calling
    /// thread; async code uses [`Broker::send_batch_async`].
    ///
    /// Each message is checked, placed on a queue and deduplicated exactly as by
    /// [`Broker::send`], and a message that fails (a bad property, a record too large) fails
    /// alone. A message whose idempotency key an earlier message of the batch carries
    /// answers that one's receipt, marked `duplicate` (or its error). The whole call fails
    /// only when the batch itself cannot be taken: an unknown or invalid topic, more than
    /// [`SEND_BATCH_MESSAGES_MAX`] messages or [`SEND_BATCH_BYTES_MAX`] bytes
    /// ([`Error::Invalid`]). Half messages are not batched.
    pub fn send_batch(&self, topic: &str, msgs: &[Message]) -> Result<Vec<Result<SendReceipt>>> {
        block_on(self.send_batch_with(&Blocking, topic, msgs))
    }

    /// [`Broker::send_batch`] without blocking the executor while the fsync happens.
    pub async fn send_batch_async(
        &self,
        topic: &str,
        msgs: &[Message],
    ) -> Result<Vec<Result<SendReceipt>>> {
        self.send_batch_with(&Async, topic, msgs).await
    }

    /// [`Broker::send_batch`] in two steps, for a caller that makes many batches one group
    /// commit: this one does everything up to putting the records in the store's pending
    /// batch (checks, queues, idempotency claims), so their log and queue offsets are fixed
    /// when it returns; [`StagedSend::finish`] waits until they are acknowledged and
    /// answers. Stages made one after another, each finished later, store the same records
    /// in the same order as the same `send_batch` calls would. A stage whose message carries
    /// an idempotency key that an earlier, unfinished stage holds waits (blocking) until
    /// that stage's records are acknowledged, which the flusher does by itself. Blocks the
    /// calling thread.
    pub fn stage_send_batch<'a>(
        &'a self,
        topic: &str,
        msgs: &'a [Message],
    ) -> Result<StagedSend<'a>> {
        block_on(self.stage_with(&Blocking, topic, msgs))
    }

    /// Room left in the idempotency index before it forgets keys for room rather than age:
    /// (keys, bytes, counted as [`Broker::idempotency_cost`] does). Whether a key is still
    /// remembered then depends only on the sends made and their times, not on when their
    /// stores were acknowledged; so a caller that stages sends ([`Broker::stage_send_batch`])
    /// and must answer exactly as one send at a time would keeps the keys it stages between
    /// two waits within this room.
    pub fn idempotency_room(&self) -> (u64, u64) {
        self.dedup.room()
    }

    /// What a batch send of `msgs` may add to the idempotency index at most: (keys, bytes),
    /// each message with an idempotency key counting one key of its length plus a fixed
    /// overhead per entry.
    pub fn idempotency_cost(msgs: &[Message]) -> (u64, u64) {
        msgs.iter()
            .filter_map(|m| key_of(&m.properties).ok().flatten())
            .fold((0, 0), |(k, b), key| {
                (k + 1, b + key.len() as u64 + ENTRY_OVERHEAD_BYTES)
            })
    }

    /// The one path of a batch send (see the module docs): staged, then finished.
    async fn send_batch_with<W: Wait>(
        &self,
        w: &W,
        topic: &str,
        msgs: &[Message],
    ) -> Result<Vec<Result<SendReceipt>>> {
        let staged = self.stage_with(w, topic, msgs).await?;
        Ok(staged.finish_with(w).await)
    }

    /// Everything of a batch send up to the records' submission (see
    /// [`Broker::stage_send_batch`]).
    async fn stage_with<'a, W: Wait>(
        &'a self,
        w: &W,
        topic: &str,
        msgs: &'a [Message],
    ) -> Result<StagedSend<'a>> {
        check_batch(msgs)?;
        let t = self.send_topic(topic)?;
        // Each message checked and placed, as a plain send does.
        let mut slots: Vec<Slot> = msgs
            .iter()
            .map(
                |msg| match Self::check_user_message(msg).and_then(|()| Self::place(&t, msg)) {
                    Ok((qi, props)) => Slot::Ready {
                        qi,
                        props,
                        reservation: None,
                    },
                    Err(e) => Slot::Done(Err(e)),
                },
            )
            .collect();
        // The keys claimed in key order (then batch order); a key met again in the batch
        // is a duplicate of its first message.
        let mut keyed: Vec<(&str, usize)> = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            if matches!(slots[i], Slot::Ready { .. }) {
                // The properties were checked, so the key is valid.
                if let Ok(Some(k)) = key_of(&msg.properties) {
                    keyed.push((k, i));
                }
            }
        }
        keyed.sort_unstable();
        let mut first_of: HashMap<&str, usize> = HashMap::new();
        for &(k, i) in &keyed {
            if let Some(&first) = first_of.get(k) {
                slots[i] = Slot::SameKeyAs(first);
                continue;
            }
            first_of.insert(k, i);
            match self.claim_for(w, &t, &msgs[i]).await {
                Ok(Ok(r)) => {
                    if let Slot::Ready { reservation, .. } = &mut slots[i] {
                        *reservation = r;
                    }
                }
                Ok(Err(original)) => slots[i] = Slot::Done(Ok(original)),
                Err(e) => slots[i] = Slot::Done(Err(e)),
            }
        }
        // One run of records, built after the claims (which may have waited).
        let now = self.now();
        let mut run = Vec::new();
        let mut at = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Slot::Ready {
                qi,
                props,
                reservation,
            } = slot
            {
                let a = self.staged_append(&t, *qi, (&msgs[i], props), reservation.take(), now);
                run.push((a.0, a.1.into_store()));
                at.push(i);
            }
        }
        let tickets = w.submit_many(&self.store, run).await;
        Ok(StagedSend {
            broker: self,
            topic: t,
            msgs,
            slots,
            tickets: at.into_iter().zip(tickets).collect(),
        })
    }

    /// Every slot's answer; a message with the key of an earlier one answers that one's.
    fn answers(&self, slots: Vec<Slot>, msgs: &[Message]) -> Vec<Result<SendReceipt>> {
        let mut out: Vec<Result<SendReceipt>> = Vec::with_capacity(slots.len());
        let mut events = Vec::new();
        for (i, slot) in slots.into_iter().enumerate() {
            out.push(match slot {
                Slot::Done(r) => r,
                // The first of a key comes earlier in the batch, so it is answered already.
                Slot::SameKeyAs(first) => match out.get(first) {
                    Some(Ok(r)) => {
                        if !msgs[i].key.is_empty() {
                            if let Ok(Some(k)) = key_of(&msgs[i].properties) {
                                let event = Event::Duplicate {
                                    idempotency_key: k.to_owned(),
                                };
                                events.push((r.log_offset, event));
                            }
                        }
                        Ok(SendReceipt {
                            duplicate: true,
                            ..r.clone()
                        })
                    }
                    Some(Err(e)) => Err(Error::from_wire(e.code(), e.to_string())),
                    None => Err(Error::Poisoned("a batch duplicate before its first".into())),
                },
                // Every ready slot was appended above.
                Slot::Ready { .. } => Err(Error::Poisoned("a batch message left unsent".into())),
            });
        }
        if !events.is_empty() {
            self.trace_events(events);
        }
        out
    }
}

/// A batch within [`SEND_BATCH_MESSAGES_MAX`] and [`SEND_BATCH_BYTES_MAX`], or the
/// [`Error::Invalid`] [`Broker::send_batch`] fails with (for a caller that cuts a batch up
/// before it reaches the broker, such as a replicated node).
pub fn check_batch(msgs: &[Message]) -> Result<()> {
    let invalid = |reason: String| {
        Err(Error::Invalid {
            what: "batch",
            reason,
        })
    };
    if msgs.len() > SEND_BATCH_MESSAGES_MAX {
        return invalid(format!(
            "{} messages is over the {SEND_BATCH_MESSAGES_MAX} a batch may carry",
            msgs.len()
        ));
    }
    let bytes: usize = msgs.iter().map(Message::payload_bytes).sum();
    if bytes > SEND_BATCH_BYTES_MAX {
        return invalid(format!(
            "{bytes} bytes of messages is over the {SEND_BATCH_BYTES_MAX} a batch may carry"
        ));
    }
    Ok(())
}
