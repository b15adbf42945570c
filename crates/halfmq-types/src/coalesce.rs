//! The queue of one topic's concurrent sends that leave together, as the network client's
//! automatic batching (`halfmq-client`) and the RocketMQ endpoint (`halfmq-rocketmq`) both
//! keep it, like Nagle's algorithm: a send with no other send of its topic under way and
//! none queued leaves at once, alone, so a lone producer waits for nothing; a send that
//! arrives while another is under way is queued, and the queue leaves as one batch when it
//! reaches its limits, or when a flusher takes it.
//!
//! [`SendLane`] is the bookkeeping only: who sends a batch, who waits for each message's
//! answer (`W`, a channel's sending half) and when the flusher runs are the caller's.

use crate::message::Message;

/// One topic's sends: how many are under way, and the queue waiting to leave together.
#[derive(Debug)]
pub struct SendLane<W> {
    /// Sends of the topic under way (a lone message or a batch) and not yet answered.
    under_way: usize,
    queued: Batch<W>,
    /// Bytes of the queued messages, as their senders count them.
    bytes: usize,
    /// A flusher will take the queue ([`SendLane::flush`]).
    flusher: bool,
    /// A batch was answered since the queue last left ([`SendLane::answered_batch`]): the
    /// sends its callers make next queue together, even with nothing under way.
    after_batch: bool,
}

impl<W> Default for SendLane<W> {
    fn default() -> Self {
        SendLane {
            under_way: 0,
            queued: Batch::default(),
            bytes: 0,
            flusher: false,
            after_batch: false,
        }
    }
}

/// Messages that leave together, and who waits for each one's answer (in the same order).
#[derive(Debug)]
pub struct Batch<W> {
    /// The messages.
    pub msgs: Vec<Message>,
    /// Who waits for each one's answer.
    pub waiting: Vec<W>,
}

impl<W> Default for Batch<W> {
    fn default() -> Self {
        Batch {
            msgs: Vec::new(),
            waiting: Vec::new(),
        }
    }
}

/// What queueing a send ([`SendLane::queue`]) calls for.
#[derive(Debug)]
#[must_use = "the batches must be sent, and the flusher started"]
pub struct Queued<W> {
    /// Batches to send now, already counted under way: the queue the send would have
    /// overflowed, and the queue it filled.
    pub leave_now: Vec<Batch<W>>,
    /// Start a flusher, which calls [`SendLane::flush`] once the sends ready now have
    /// joined the queue.
    pub start_flusher: bool,
}

impl<W> Default for Queued<W> {
    /// Nothing to send, no flusher to start.
    fn default() -> Self {
        Queued {
            leave_now: Vec::new(),
            start_flusher: false,
        }
    }
}

impl<W> SendLane<W> {
    /// Whether a send may leave at once, alone: nothing of the topic is under way, nothing
    /// queued, and no batch answered since the queue last left
    /// ([`SendLane::answered_batch`]). It is then counted under way until
    /// [`SendLane::answered`].
    pub fn leave_alone(&mut self) -> bool {
        let alone = self.under_way == 0 && self.queued.msgs.is_empty() && !self.after_batch;
        if alone {
            self.under_way += 1;
        }
        alone
    }

    /// Queue `msg` (`cost` bytes), answered through `waiting`. The queue leaves at once
    /// before it would pass `max_bytes` with `msg`, and once it holds `max_messages`
    /// messages or `max_bytes` bytes; otherwise a flusher takes it.
    pub fn queue(
        &mut self,
        msg: Message,
        waiting: W,
        cost: usize,
        (max_messages, max_bytes): (usize, usize),
    ) -> Queued<W> {
        let mut leave_now = Vec::new();
        let mut start_flusher = false;
        if !self.queued.msgs.is_empty() && self.bytes + cost > max_bytes {
            leave_now.push(self.take());
        }
        self.queued.msgs.push(msg);
        self.queued.waiting.push(waiting);
        self.bytes += cost;
        if self.queued.msgs.len() >= max_messages || self.bytes >= max_bytes {
            leave_now.push(self.take());
        } else if !self.flusher {
            self.flusher = true;
            start_flusher = true;
        }
        Queued {
            leave_now,
            start_flusher,
        }
    }

    /// The flusher's turn: the queue, counted under way, unless it is empty (it left at its
    /// limits meanwhile). A later queued send starts a flusher again.
    pub fn flush(&mut self) -> Option<Batch<W>> {
        self.flusher = false;
        (!self.queued.msgs.is_empty()).then(|| self.take())
    }

    /// A send under way was answered (or given up).
    pub fn answered(&mut self) {
        self.under_way -= 1;
    }

    /// A batch under way is being answered (call before [`SendLane::answered`]): its
    /// callers are woken together, and what they send next should leave together too. So
    /// until the queue next leaves, a send queues even with nothing under way, and the
    /// flusher takes it with the others woken at the same moment. Otherwise the first of
    /// them found nothing under way and left alone: at 16 producers x 16 in flight, every
    /// answered batch was followed by a one-message request and then a batch of the rest.
    /// A lone producer's sends are answered alone and never set this.
    pub fn answered_batch(&mut self) {
        self.after_batch = true;
    }

    /// Whether a send is under way while others wait in the queue.
    pub fn queued_behind(&self) -> bool {
        self.under_way > 0 && !self.queued.msgs.is_empty()
    }

    /// How many messages are queued.
    pub fn queued(&self) -> usize {
        self.queued.msgs.len()
    }

    /// Nothing under way, queued or about to be flushed: the lane may be forgotten.
    pub fn is_idle(&self) -> bool {
        self.under_way == 0 && self.queued.msgs.is_empty() && !self.flusher
    }

    /// The queue, now under way.
    fn take(&mut self) -> Batch<W> {
        self.bytes = 0;
        self.after_batch = false;
        self.under_way += 1;
        std::mem::take(&mut self.queued)
    }
}

/// One topic's [`SendLane`] as the tasks sending to it share it (feature `lane`), with the
/// wake-up of a flusher that waits for a send under way to be answered.
#[cfg(feature = "lane")]
#[derive(Debug)]
pub struct Lane<W> {
    /// The bookkeeping; locked briefly, never across an `.await`.
    pub state: parking_lot::Mutex<SendLane<W>>,
    /// Notified whenever a send of the lane under way is answered (or given up).
    answered: tokio::sync::Notify,
}

#[cfg(feature = "lane")]
impl<W> Default for Lane<W> {
    fn default() -> Self {
        Lane {
            state: parking_lot::Mutex::new(SendLane::default()),
            answered: tokio::sync::Notify::new(),
        }
    }
}

#[cfg(feature = "lane")]
impl<W> Lane<W> {
    /// Wake the flushers waiting in [`Lane::wait_behind`]: a send under way was answered
    /// (or given up), after [`SendLane::answered`] counted it.
    pub fn notify_answered(&self) {
        self.answered.notify_waiters();
    }

    /// If the queue waits behind a send under way ([`SendLane::queued_behind`]), wait until
    /// a send under way is answered ([`Lane::notify_answered`]), or at most `limit`. The
    /// wake-up is registered before the check, so an answer between the two is not missed.
    pub async fn wait_behind(&self, limit: Option<std::time::Duration>) {
        let mut answered = std::pin::pin!(self.answered.notified());
        answered.as_mut().enable();
        if !self.state.lock().queued_behind() {
            return;
        }
        match limit {
            Some(limit) => {
                let _ = tokio::time::timeout(limit, answered).await;
            }
            None => answered.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes<W>(batches: &[Batch<W>]) -> Vec<usize> {
        batches.iter().map(|b| b.msgs.len()).collect()
    }

    #[test]
    fn a_lone_send_leaves_alone_and_the_others_queue_behind_it() {
        let mut lane = SendLane::<u32>::default();
        assert!(lane.leave_alone());
        assert!(!lane.leave_alone(), "one is under way");
        let q = lane.queue(Message::new("a"), 1, 10, (3, 100));
        assert!(q.leave_now.is_empty() && q.start_flusher);
        let q = lane.queue(Message::new("b"), 2, 10, (3, 100));
        assert!(q.leave_now.is_empty() && !q.start_flusher, "one flusher");
        assert!(lane.queued_behind());
        let b = lane.flush().expect("the queue");
        assert_eq!((b.msgs.len(), b.waiting), (2, vec![1, 2]));
        assert!(lane.flush().is_none());
        lane.answered();
        assert!(!lane.is_idle(), "the batch is under way");
        lane.answered();
        assert!(lane.is_idle());
        assert!(lane.leave_alone());
    }

    #[test]
    fn after_a_batch_is_answered_the_next_sends_queue_together() {
        let mut lane = SendLane::<u32>::default();
        assert!(lane.leave_alone());
        for (waiter, body) in [(1, "a"), (2, "b")] {
            let _ = lane.queue(Message::new(body), waiter, 10, (9, 100));
        }
        let batch = lane.flush().expect("the queue");
        assert_eq!(batch.msgs.len(), 2);
        lane.answered();
        lane.answered_batch();
        lane.answered();
        // Nothing under way, but the batch's callers send next: they queue, and one
        // flusher takes them all.
        assert!(!lane.leave_alone());
        let q = lane.queue(Message::new("c"), 3, 10, (9, 100));
        assert!(q.start_flusher);
        let q = lane.queue(Message::new("d"), 4, 10, (9, 100));
        assert!(!q.start_flusher);
        assert_eq!(lane.flush().map(|b| b.waiting), Some(vec![3, 4]));
        lane.answered();
        // Answered alone: the next send leaves at once again.
        assert!(lane.leave_alone());
        lane.answered();
        assert!(lane.is_idle());
    }

    #[test]
    fn the_queue_leaves_at_its_limits() {
        let mut lane = SendLane::<u32>::default();
        assert!(lane.leave_alone());
        let _ = lane.queue(Message::new("a"), 1, 10, (2, 25));
        let q = lane.queue(Message::new("b"), 2, 10, (2, 25));
        assert_eq!(sizes(&q.leave_now), vec![2], "full at two messages");
        let _ = lane.queue(Message::new("c"), 3, 10, (5, 25));
        let _ = lane.queue(Message::new("d"), 4, 10, (5, 25));
        let q = lane.queue(Message::new("e"), 5, 10, (5, 25));
        assert_eq!(
            sizes(&q.leave_now),
            vec![2],
            "e would pass 25 bytes: c and d leave"
        );
        let q = lane.queue(Message::new("f"), 6, 15, (5, 25));
        assert_eq!(
            sizes(&q.leave_now),
            vec![2],
            "e and f reach 25 bytes together"
        );
        // The flusher started by c finds nothing left.
        assert!(lane.flush().is_none());
        for _ in 0..4 {
            lane.answered();
        }
        assert!(lane.is_idle());
    }

    /// A flusher waits only when its queue is behind a send under way, and then until that
    /// send is answered or its limit has passed.
    #[cfg(feature = "lane")]
    #[tokio::test(flavor = "current_thread")]
    async fn a_flusher_waits_behind_a_send_until_it_is_answered() {
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        let lane = Arc::new(Lane::<u32>::default());
        // Nothing under way: no wait, even without a limit.
        lane.wait_behind(None).await;
        assert!(lane.state.lock().leave_alone());
        let q = lane.state.lock().queue(Message::new("a"), 1, 10, (3, 100));
        assert!(q.start_flusher);
        let start = Instant::now();
        lane.wait_behind(Some(Duration::from_millis(20))).await;
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "waited the limit"
        );
        // The answering task runs only once the wait below has registered and yielded
        // (one thread), so it is the notification that ends the wait.
        let answering = {
            let lane = lane.clone();
            tokio::spawn(async move {
                lane.state.lock().answered();
                lane.notify_answered();
            })
        };
        lane.wait_behind(None).await;
        answering.await.expect("joins");
        assert!(!lane.state.lock().queued_behind());
    }
}
