//! Automatic batching of [`Client::send`] ([`ClientConfig::auto_batch`]), like Nagle's
//! algorithm: per topic, a send with no other send of its topic on the wire and none queued
//! leaves at once, alone, as a `Send` request, so an idle producer pays no added latency
//! (unless a batch of the topic was just answered: the sends its callers make next queue
//! together, see [`SendLane::answered_batch`]).
//! A send made while another of its topic is on the wire is queued instead, and the queue
//! leaves as one `SendBatch` request (a lone queued send as a `Send`):
//! - at once, when it holds [`ClientConfig::batch_messages_max`] messages or
//!   [`ClientConfig::batch_bytes_max`] bytes;
//! - otherwise from a flusher task, after one pass of the executor (the sends of tasks woken
//!   at the same moment, by one read of answers, join it) and, with a non-zero
//!   [`ClientConfig::batch_linger`], once a send of the topic on the wire is answered or the
//!   linger has passed, whichever comes first.
//!
//! Each caller waits for its own message's answer: its receipt or its error, taken from the
//! batch's answer; a failed request fails every message it carried with the same error.
//! A send whose caller stops waiting after it was queued is still sent.
//!
//! [`ClientConfig::auto_batch`]: crate::ClientConfig::auto_batch
//! [`ClientConfig::batch_messages_max`]: crate::ClientConfig::batch_messages_max
//! [`ClientConfig::batch_bytes_max`]: crate::ClientConfig::batch_bytes_max
//! [`ClientConfig::batch_linger`]: crate::ClientConfig::batch_linger
//! [`SendLane::answered_batch`]: halfmq_types::coalesce::SendLane::answered_batch

pub(crate) mod lanes;

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::config::ClientConfig;
use crate::connection::Client;
use halfmq_types::coalesce::{Batch, Queued};
use halfmq_types::error::{Error, Result};
use halfmq_types::{Message, SendReceipt, SEND_BATCH_BYTES_MAX, SEND_BATCH_MESSAGES_MAX};
use lanes::{Lane, OnWire, Waiting, PER_MESSAGE_BYTES};

/// (messages, bytes) at which a queue leaves at once.
fn limits(cfg: &ClientConfig) -> (usize, usize) {
    let messages = cfg.batch_messages_max.clamp(1, SEND_BATCH_MESSAGES_MAX);
    let bytes = cfg
        .batch_bytes_max
        .min(SEND_BATCH_BYTES_MAX)
        .min(cfg.frame_bytes_max as usize / 4)
        .max(1);
    (messages, bytes)
}

/// [`Client::send`] with automatic batching (see the module docs).
pub(crate) async fn send(client: &Client, topic: &str, msg: &Message) -> Result<SendReceipt> {
    let lane = client.batcher().lane(topic);
    let (max_messages, max_bytes) = limits(client.config());
    let cost = msg.payload_bytes() + PER_MESSAGE_BYTES;
    let mut queued = Queued::default();
    let rx = {
        let mut st = lane.state.lock();
        if st.leave_alone() {
            // Nothing ahead of it: it leaves now, alone.
            None
        } else {
            let (tx, rx) = oneshot::channel();
            queued = st.queue(msg.clone(), tx, cost, (max_messages, max_bytes));
            Some(rx)
        }
    };
    for batch in queued.leave_now {
        tokio::spawn(deliver(
            client.clone(),
            OnWire(lane.clone()),
            topic.to_owned(),
            batch,
        ));
    }
    if queued.start_flusher {
        tokio::spawn(flusher(client.clone(), lane.clone(), topic.to_owned()));
    }
    match rx {
        None => {
            let _on_wire = OnWire(lane);
            client.send_one(topic, msg).await
        }
        Some(rx) => rx.await.unwrap_or_else(|_| {
            Err(Error::Disconnected {
                addr: client.config().addr.clone(),
                reason: "the batch carrying this send was lost".into(),
            })
        }),
    }
}

/// Send the queue of `lane` once the sends ready now have joined it (and, with a linger,
/// once a request of the topic is answered or the linger has passed).
async fn flusher(client: Client, lane: Arc<Lane>, topic: String) {
    tokio::task::yield_now().await;
    let linger = client.config().batch_linger;
    if !linger.is_zero() {
        lane.wait_behind(Some(linger)).await;
    }
    let Some(batch) = lane.state.lock().flush() else {
        return;
    };
    deliver(client, OnWire(lane), topic, batch).await;
}

/// Send `batch` (on the wire as `on_wire`) and hand each waiting caller its answer.
async fn deliver(client: Client, on_wire: OnWire, topic: String, batch: Batch<Waiting>) {
    let Batch { msgs, waiting } = batch;
    if let ([msg], [_]) = (msgs.as_slice(), waiting.as_slice()) {
        let r = client.send_one(&topic, msg).await;
        drop(on_wire);
        if let Some(tx) = waiting.into_iter().next() {
            let _ = tx.send(r);
        }
        return;
    }
    let r = client.send_batch(&topic, &msgs).await;
    on_wire.answered_batch();
    match r {
        Ok(results) => {
            for (tx, r) in waiting.into_iter().zip(results) {
                let _ = tx.send(r);
            }
        }
        Err(e) => {
            for tx in waiting {
                let _ = tx.send(Err(Error::from_wire(e.code(), e.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests;
