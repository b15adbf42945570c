//! The state of automatic batching (`batcher.rs`), kept by each client: per topic, the
//! requests on the wire and the queue of sends waiting to leave together
//! ([`SendLane`], kept by the RocketMQ endpoint's coalescing too).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use halfmq_types::coalesce::SendLane;
use halfmq_types::error::Result;
use halfmq_types::SendReceipt;

/// Bytes counted per message on top of its payload: its share of the frame (lengths, the
/// property map's envelope), so that a full batch still fits the frame.
pub(super) const PER_MESSAGE_BYTES: usize = 32;

/// The queues of one client, one per topic sent to.
#[derive(Default)]
pub(crate) struct Batcher {
    lanes: Mutex<HashMap<String, Arc<Lane>>>,
}

impl Batcher {
    pub(super) fn lane(&self, topic: &str) -> Arc<Lane> {
        let mut lanes = self.lanes.lock();
        if let Some(l) = lanes.get(topic) {
            return l.clone();
        }
        let l = Arc::new(Lane::default());
        lanes.insert(topic.to_owned(), l.clone());
        l
    }
}

/// The sends of one topic: how many requests are on the wire, and the queue.
#[derive(Default)]
pub(super) struct Lane {
    /// Requests under way are those on the wire; bytes are counted with
    /// [`PER_MESSAGE_BYTES`] per message.
    pub(super) state: Mutex<SendLane<Waiting>>,
    /// Notified whenever a request of the topic is answered (or given up).
    pub(super) answered: Notify,
}

/// Who waits for a queued send's answer.
pub(super) type Waiting = oneshot::Sender<Result<SendReceipt>>;

/// A request of a lane on the wire; answered (or abandoned) when dropped.
pub(super) struct OnWire(pub(super) Arc<Lane>);

impl Drop for OnWire {
    fn drop(&mut self) {
        self.0.state.lock().answered();
        self.0.answered.notify_waiters();
    }
}
