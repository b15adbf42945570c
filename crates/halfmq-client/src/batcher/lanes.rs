//! The state of automatic batching (`batcher.rs`), kept by each client: per topic, the
//! requests on the wire and the queue of sends waiting to leave together
//! ([`halfmq_types::coalesce::Lane`], kept by the RocketMQ endpoint's coalescing too).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use halfmq_types::error::Result;
use halfmq_types::SendReceipt;

/// Bytes counted per message on top of its payload: its share of the frame (lengths, the
/// property map's envelope), so that a full batch still fits the frame.
pub(super) const PER_MESSAGE_BYTES: usize = 32;

/// Lanes kept before the first sweep of idle ones (see [`Batcher::lane`]).
const SWEEP_FROM_LANES: usize = 64;

/// The queues of one client, one per topic sent to.
#[derive(Default)]
pub(crate) struct Batcher {
    lanes: Mutex<Lanes>,
}

#[derive(Default)]
struct Lanes {
    by_topic: HashMap<String, Arc<Lane>>,
    /// Sweep idle lanes when a new one would make this many.
    sweep_at: usize,
    /// The lane asked for last, with its topic: most sends go to the topic of the send
    /// before, and are found here without hashing the name. Kept by the sweep (it holds
    /// the lane), so at most one idle lane more is kept.
    last: Option<(String, Arc<Lane>)>,
}

impl Batcher {
    /// The lane of `topic`, made if there is none. Making one first forgets the idle lanes
    /// once the map has doubled since the last sweep (at least [`SWEEP_FROM_LANES`]), so a
    /// client that sends to ever new topics keeps a lane only for those in use: one that
    /// only the map holds has no sender between [`Batcher::lane`] and its answer, no
    /// request on the wire ([`OnWire`]) and no flusher (each holds the lane), and nobody
    /// can take it but through this lock.
    pub(super) fn lane(&self, topic: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock();
        if let Some((t, l)) = &lanes.last {
            if t == topic {
                return l.clone();
            }
        }
        let l = match lanes.by_topic.get(topic) {
            Some(l) => l.clone(),
            None => {
                if lanes.by_topic.len() >= lanes.sweep_at.max(SWEEP_FROM_LANES) {
                    lanes
                        .by_topic
                        .retain(|_, l| Arc::strong_count(l) > 1 || !l.state.lock().is_idle());
                    lanes.sweep_at = lanes.by_topic.len() * 2;
                }
                let l = Arc::new(Lane::default());
                lanes.by_topic.insert(topic.to_owned(), l.clone());
                l
            }
        };
        match &mut lanes.last {
            Some((t, last)) => {
                t.clear();
                t.push_str(topic);
                *last = l.clone();
            }
            None => lanes.last = Some((topic.to_owned(), l.clone())),
        }
        l
    }

    /// How many lanes are kept now.
    #[cfg(test)]
    pub(super) fn lanes_kept(&self) -> usize {
        self.lanes.lock().by_topic.len()
    }
}

/// The sends of one topic: how many requests are on the wire, and the queue. Requests
/// under way are those on the wire; bytes are counted with [`PER_MESSAGE_BYTES`] per
/// message.
pub(super) type Lane = halfmq_types::coalesce::Lane<Waiting>;

/// Who waits for a queued send's answer.
pub(super) type Waiting = oneshot::Sender<Result<SendReceipt>>;

/// A request of a lane on the wire; answered (or abandoned) when dropped.
pub(super) struct OnWire(pub(super) Arc<Lane>);

impl OnWire {
    /// Answered, carrying several messages: the sends their callers make next leave
    /// together ([`halfmq_types::coalesce::SendLane::answered_batch`]).
    pub(super) fn answered_batch(self) {
        self.0.state.lock().answered_batch();
    }
}

impl Drop for OnWire {
    fn drop(&mut self) {
        self.0.state.lock().answered();
        self.0.notify_answered();
    }
}
