//! Concurrent one-message sends joined into broker batches. RocketMQ producers send one
//! message per SendMessage request; with many producers (or one producer's many tasks)
//! sending at once, the endpoint stores the plain messages of one topic that arrive
//! together as one [`Broker::send_batch_async`]: one run of records, one durable write,
//! each request still answered with its own message's receipt or error once it is durable.
//!
//! Per topic, like Nagle's algorithm: a send with no other store of its topic under way and
//! none queued goes to the broker at once, alone, so a lone producer waits for nothing. A
//! send that arrives while another store of its topic is under way is queued; the queue
//! leaves as one batch once a store of the topic under way is answered (durable or
//! refused), or at once when it holds [`SEND_BATCH_MESSAGES_MAX`] messages or
//! [`SEND_BATCH_BYTES_MAX`] bytes. A queued message would wait for that durable write
//! anyway: the store's group commit syncs what arrives during a sync with the next one. So
//! with many senders, one topic's sends reach the broker as few large batches rather than
//! many small ones, each store call costing what a batch of one costs. A queued send
//! whose request is cancelled is still stored (as a send whose request is cancelled during
//! its durable write may be); the client's retry carries the same message id, which the
//! broker deduplicates.
//!
//! The queue's bookkeeping ([`SendLane`]) and its flusher's wait ([`coalesce::Lane`]) are
//! the ones the network client's automatic batching keeps too.
//!
//! The order of concurrent requests is not defined by the protocol; a FIFO producer waits
//! for each send's answer before the next, so its order is kept.

use std::collections::HashMap;
use std::sync::Arc;

use halfmq::{Broker, Message, SendReceipt, SEND_BATCH_BYTES_MAX, SEND_BATCH_MESSAGES_MAX};
use halfmq_types::coalesce::{self, Batch, Queued, SendLane};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::pb::{self, Code};
use crate::status::{of_error, status};

/// A stored message's receipt, or the status refusing it.
type Answer = Result<SendReceipt, pb::Status>;

/// The sends of the endpoint, per topic. A topic's lane exists while a store of it is under
/// way or queued, and is removed when idle, so that names sent to once cost nothing after.
#[derive(Default)]
pub(crate) struct Coalescer {
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
    /// The size of each batch stored, in order.
    #[cfg(test)]
    batches: Mutex<Vec<usize>>,
}

/// One topic's sends. Stores under way are a lone send or a batch; bytes are
/// [`Message::payload_bytes`].
type Lane = coalesce::Lane<Waiting>;

/// Who waits for a queued message's answer.
type Waiting = oneshot::Sender<Answer>;

/// One topic's lane, as a store of it holds it.
#[derive(Clone)]
struct LaneRef {
    coalescer: Arc<Coalescer>,
    topic: String,
    lane: Arc<Lane>,
}

impl LaneRef {
    /// Change the lane's state with `f`, and forget the lane if it is idle after.
    fn update<T>(&self, f: impl FnOnce(&mut SendLane<Waiting>) -> T) -> T {
        // Lock order: the map, then a lane.
        let mut lanes = self.coalescer.lanes.lock();
        let mut st = self.lane.state.lock();
        let t = f(&mut st);
        if st.is_idle()
            && lanes
                .get(&self.topic)
                .is_some_and(|l| Arc::ptr_eq(l, &self.lane))
        {
            lanes.remove(&self.topic);
        }
        t
    }
}

/// A store of a lane under way; done (or abandoned) when dropped.
struct UnderWay(LaneRef);

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.0.update(|st| st.answered());
        self.0.lane.notify_answered();
    }
}

impl Coalescer {
    fn lane(self: &Arc<Self>, topic: &str) -> LaneRef {
        let mut lanes = self.lanes.lock();
        let lane = match lanes.get(topic) {
            Some(l) => l.clone(),
            None => {
                let l = Arc::new(Lane::default());
                lanes.insert(topic.to_owned(), l.clone());
                l
            }
        };
        LaneRef {
            coalescer: self.clone(),
            topic: topic.to_owned(),
            lane,
        }
    }
}

/// Store the plain message `msg` to `topic` with `broker`, alone or in a batch with the
/// sends of the topic arriving at the same time (see the module docs). Answers once it is
/// durable, with its own receipt or the status refusing it.
pub(crate) async fn send(
    coalescer: &Arc<Coalescer>,
    broker: &Arc<Broker>,
    topic: &str,
    msg: Message,
) -> Answer {
    let lane = coalescer.lane(topic);
    let cost = msg.payload_bytes();
    let mut queued = Queued::default();
    let rx = {
        let mut st = lane.lane.state.lock();
        if st.leave_alone() {
            Err(msg)
        } else {
            let (tx, rx) = oneshot::channel();
            let limits = (SEND_BATCH_MESSAGES_MAX, SEND_BATCH_BYTES_MAX);
            queued = st.queue(msg, tx, cost, limits);
            Ok(rx)
        }
    };
    for batch in queued.leave_now {
        tokio::spawn(deliver(broker.clone(), UnderWay(lane.clone()), batch));
    }
    if queued.start_flusher {
        tokio::spawn(flusher(broker.clone(), lane.clone()));
    }
    match rx {
        Err(msg) => {
            let _under_way = UnderWay(lane);
            broker
                .send_async(topic, &msg)
                .await
                .map_err(|e| of_error(&e))
        }
        // The sender is dropped unanswered only if the task storing the batch panicked.
        Ok(rx) => rx.await.unwrap_or_else(|_| {
            Err(status(
                Code::InternalServerError,
                "halfmq: the batch carrying this message was lost; send it again",
            ))
        }),
    }
}

/// Take the lane's queue once no store of the lane is under way any more, or one under way
/// is answered, and store it. Every store under way is answered, or dropped (a cancelled
/// lone send), and either notifies: the wait ends.
async fn flusher(broker: Arc<Broker>, lane: LaneRef) {
    lane.lane.wait_behind(None).await;
    let taken = lane.update(|st| st.flush());
    if let Some(batch) = taken {
        deliver(broker, UnderWay(lane), batch).await;
    }
}

/// Store a batch (a lone message as a plain send) and hand each waiting request its answer.
async fn deliver(broker: Arc<Broker>, under_way: UnderWay, batch: Batch<Waiting>) {
    let Batch { msgs, waiting } = batch;
    let topic = under_way.0.topic.as_str();
    #[cfg(test)]
    under_way.0.coalescer.batches.lock().push(msgs.len());
    let answers: Vec<Answer> = match msgs.as_slice() {
        [msg] => vec![broker
            .send_async(topic, msg)
            .await
            .map_err(|e| of_error(&e))],
        _ => match broker.send_batch_async(topic, &msgs).await {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(|e| of_error(&e)))
                .collect(),
            Err(e) => vec![Err(of_error(&e)); msgs.len()],
        },
    };
    drop(under_way);
    for (tx, a) in waiting.into_iter().zip(answers) {
        let _ = tx.send(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halfmq::BrokerConfig;

    /// Sends made while another store of their topic is under way wait for it, then leave
    /// together, as one batch; each gets its own receipt, a repeated message id is stored
    /// once, and the topic's lane is gone once nothing is under way. Deterministic: the test
    /// itself holds the store under way, and lets it go once every send is queued.
    #[tokio::test(flavor = "current_thread")]
    async fn sends_arriving_during_a_store_leave_as_one_batch() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = BrokerConfig::new(dir.path());
        config.auto_create_topics = false;
        let broker = Broker::open(config).expect("broker");
        broker.create_topic("t", 2).expect("topic");
        let coalescer = Arc::new(Coalescer::default());
        let held = coalescer.lane("t");
        assert!(held.update(|st| st.leave_alone()), "a fresh lane is idle");
        let held = UnderWay(held);
        let ids = ["a", "b", "c", "d", "c", "e"];
        let sends: Vec<_> = ids
            .iter()
            .map(|id| {
                let (c, b) = (coalescer.clone(), broker.clone());
                let msg = Message::new(*id).with_idempotency_key(*id);
                tokio::spawn(async move { send(&c, &b, "t", msg).await })
            })
            .collect();
        let queued = || held.0.lane.state.lock().queued();
        // The spawned sends run on this one thread whenever this test yields; no clock.
        for _ in 0..1000 {
            if queued() == ids.len() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queued(),
            ids.len(),
            "every send queued behind the held store"
        );
        // However often the flusher runs meanwhile, nothing leaves while the store is held.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(coalescer.batches.lock().is_empty());
        assert!(sends.iter().all(|s| !s.is_finished()));
        drop(held);
        let mut receipts = Vec::new();
        for s in sends {
            receipts.push(s.await.expect("joins").expect("stored"));
        }
        assert_eq!(*coalescer.batches.lock(), vec![ids.len()]);
        // The repeated id answers the first's receipt; the others are stored apart.
        assert_eq!(receipts[2].log_offset, receipts[4].log_offset);
        let mut at: Vec<_> = receipts.iter().map(|r| r.log_offset).collect();
        at.sort_unstable();
        at.dedup();
        assert_eq!(at.len(), ids.len() - 1);
        assert!(coalescer.lanes.lock().is_empty());
        // A lone send goes alone again.
        let r = send(&coalescer, &broker, "t", Message::new("f")).await;
        assert!(r.is_ok());
        assert_eq!(coalescer.batches.lock().len(), 1);
        // An unknown topic fails each send with its own answer, and leaves no lane.
        let e = send(&coalescer, &broker, "nope", Message::new("x")).await;
        assert_eq!(
            e.expect_err("unknown topic").code,
            Code::TopicNotFound as i32
        );
        assert!(coalescer.lanes.lock().is_empty());
        broker.close().expect("close");
    }
}
