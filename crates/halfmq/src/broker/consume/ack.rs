//! Ack and nack: each one path, waited for by blocking (`ack`, `nack`) or by awaiting
//! (`ack_async`, `nack_async`).
//!
//! The group's lock is held while the state changes (in memory, and the sled batch that
//! records them), never while waiting for sled's flush: the flush waits outside it, so an
//! async ack or nack never holds a lock across an await, and other consumers of the group
//! are not held up by it. A call returns only after its own flush, so what it reports is
//! durable.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

use super::{GroupTopic, LeaseUse, Nack, Settlement};
use crate::broker::wait::{block_on, blocking_and_async, Async, Blocking, Wait};
use crate::broker::{validate_group_name, Broker, Topic};
use crate::delivery::{Lease, HELD};
use crate::meta::RetryState;
use halfmq_store::consume_queue::ConsumeQueue;
use halfmq_types::error::Result;
use halfmq_types::trace::Event;
use halfmq_types::{NackOutcome, Receipt};

impl Broker {
    /// Acknowledge one message; durable when this returns.
    pub fn ack(&self, group: &str, topic: &str, queue: u32, offset: u64) -> Result<()> {
        self.ack_many(group, topic, &[(queue, offset)])
    }

    /// Acknowledge several messages of one topic with one durable write.
    pub fn ack_many(&self, group: &str, topic: &str, acks: &[(u32, u64)]) -> Result<()> {
        block_on(self.ack_with(&Blocking, group, topic, acks))
    }

    /// [`Broker::ack`] for async code: waiting for the durable write does not block the
    /// executor's thread.
    pub async fn ack_async(&self, group: &str, topic: &str, queue: u32, offset: u64) -> Result<()> {
        self.ack_many_async(group, topic, &[(queue, offset)]).await
    }

    /// [`Broker::ack_many`] for async code.
    pub async fn ack_many_async(
        &self,
        group: &str,
        topic: &str,
        acks: &[(u32, u64)],
    ) -> Result<()> {
        self.ack_with(&Async, group, topic, acks).await
    }

    /// The one path of an ack.
    async fn ack_with<W: Wait>(
        &self,
        w: &W,
        group: &str,
        topic: &str,
        acks: &[(u32, u64)],
    ) -> Result<()> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let g = self.group_topic(group, &t)?;
        self.ack_apply(group, &t, &mut g.lock(), acks, true)?;
        // Also when every message was acked before: that earlier ack may still be waiting
        // for its own flush, and this one must not return before the acks are durable.
        w.flush(&self.meta).await?;
        crate::metrics::acked(group, &t.name, acks.len());
        Ok(())
    }

    /// [`Broker::ack_apply`] made durable before the group's lock is released (for the
    /// replay of dead letters, which holds the lock of the broker's own replay group).
    pub(super) fn ack_locked(
        &self,
        group: &str,
        t: &Topic,
        g: &mut GroupTopic,
        acks: &[(u32, u64)],
    ) -> Result<()> {
        self.ack_apply(group, t, g, acks, false)?;
        self.meta.flush()
    }

    /// Record acks under the group's lock: in sled (one atomic batch, not flushed: the
    /// caller waits for the flush) and in memory. `trace`: record an `acked` trace event for
    /// each keyed message (not for the acks that end a dead-letter move or a replay).
    pub(super) fn ack_apply(
        &self,
        group: &str,
        t: &Topic,
        g: &mut GroupTopic,
        acks: &[(u32, u64)],
        trace: bool,
    ) -> Result<()> {
        let mut by_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for &(queue, offset) in acks {
            self.stored_queue(group, t, queue, offset)?;
            by_queue.entry(queue).or_default().push(offset);
        }
        for (queue, offsets) in by_queue {
            let c = &mut g.cursors[queue as usize];
            let mut added = Vec::new();
            let mut acked = c.acked_above.clone();
            for off in offsets {
                if off >= c.committed && acked.insert(off) {
                    added.push(off);
                }
            }
            if added.is_empty() {
                continue; // all acked before: acks are idempotent
            }
            let mut committed = c.committed;
            let mut removed = Vec::new();
            while acked.remove(&committed) {
                removed.push(committed);
                committed += 1;
            }
            let newly: Vec<u64> = added.clone();
            added.retain(|o| *o >= committed);
            removed.retain(|o| c.acked_above.contains(o));
            if trace {
                // Inserted before the ack's sled write, so a durable ack always keeps its
                // event (sled writes its log in order).
                self.trace_events(Self::ack_events(group, &t.queues[queue as usize], &newly)?);
            }
            self.meta
                .put_acks(group, &t.name, queue, committed, &added, &removed)?;
            // In memory at once, under the lock, so that the next ack of this queue builds on
            // it (sled applies batches in order: the later one's flush covers this one).
            c.committed = committed;
            c.acked_above = acked;
            c.next = c.next.max(committed);
            // Now forget the leases and failure counts. A crash before this removal is
            // durable leaves retry states that the next load drops (they are acked).
            let mut cleared = Vec::new();
            for off in newly {
                if let Some(l) = c.remove(off) {
                    if l.failures > 0 {
                        cleared.push((off, None));
                    }
                }
            }
            self.meta
                .store_retries(group, &t.name, queue, &cleared, false)?;
        }
        Ok(())
    }

    /// The `acked` trace events of the keyed messages at these offsets of `q`.
    fn ack_events(group: &str, q: &ConsumeQueue, offsets: &[u64]) -> Result<Vec<(u64, Event)>> {
        let mut out = Vec::new();
        for &off in offsets {
            for e in q.read(off, 1)? {
                // key_hash 0 means "no key" (a key whose CRC is 0 is not traced as acked).
                if e.key_hash != 0 {
                    let event = Event::Acked {
                        group: group.to_owned(),
                    };
                    out.push((e.log_offset, event));
                }
            }
        }
        Ok(out)
    }

    blocking_and_async! {
        /// Give back a delivered message un-processed: it is delivered again after `delay`,
        /// or after the group's retry backoff for its failure count when `None`. The nack
        /// counts as a failed delivery; past the group's `max_retries` the message moves to
        /// the group's dead-letter queue instead. Durable when this returns.
        fn nack;
        /// [`Broker::nack`] for async code: waiting for the durable writes does not block the
        /// executor's thread. Cancelled before it returns, the message stays with the consumer
        /// as it was (unless its dead-letter move got as far as its ack).
        async fn nack_async;
        (&self, group: &str, topic: &str, queue: u32, offset: u64, delay: Option<Duration>) -> Result<NackOutcome>;
        nack_with(group, topic, queue, offset, Nack::After(delay), None)
    }

    /// The one path of a nack (by queue offset, or by `receipt`, which must name the lease
    /// the message is held under now). The message's lease is held (never due, so no poll
    /// hands it out) from the check to the end, and ends as a wait for redelivery once its
    /// failure count is durable, or with the ack of its dead-letter move.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn nack_with<W: Wait>(
        &self,
        w: &W,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        how: Nack<'_>,
        receipt: Option<&Receipt>,
    ) -> Result<NackOutcome> {
        let (decided, t, gt) = self.decide(group, topic, (queue, offset), how, receipt)?;
        let lease = decided.back;
        let mut held = HeldLease {
            group: &gt,
            queue,
            offset,
            back: Some(lease.clone()),
        };
        let (failures, at_ms, reason) = match decided.settlement {
            Settlement::DeadLetter { failures, reason } => {
                let dead = Lease {
                    failures,
                    reason,
                    ..lease
                };
                let dead_letter = self
                    .move_to_dead_letters(w, group, &t, &gt, queue as usize, offset, dead)
                    .await?;
                // Its ack ended the lease.
                held.back = None;
                return Ok(NackOutcome::DeadLettered { dead_letter });
            }
            Settlement::Retry {
                failures,
                due_ms,
                reason,
            } => (failures, due_ms, reason),
        };
        let state = RetryState {
            failures,
            due_ms: at_ms,
            reason: reason.clone(),
        };
        self.meta
            .store_retries(group, &t.name, queue, &[(offset, Some(state))], false)?;
        w.flush(&self.meta).await?;
        let q = &t.queues[queue as usize];
        if let Some(e) = q.read(offset, 1)?.into_iter().find(|e| e.key_hash != 0) {
            let event = Event::Retried {
                group: group.to_owned(),
                attempt: failures,
                reason: reason.clone(),
                next_at_ms: at_ms,
            };
            self.trace_events(vec![(e.log_offset, event)]);
        }
        held.end(Lease {
            due_ms: at_ms,
            failures,
            delivered: false,
            reason,
            ..lease
        });
        Ok(NackOutcome::Redeliver {
            attempt: failures + 1,
            at_ms,
        })
    }

    /// Take the lease of a delivered message for a nack (by `receipt`, which must name it,
    /// when given): it is held (never due, not delivered, its failures one more, `reason`
    /// its reason) and the lease it had is returned, with the group's delivery settings.
    /// Refused when the message is acked, waiting for redelivery, or not delivered.
    pub(super) fn hold_delivered(
        &self,
        group: &str,
        t: &Topic,
        gt: &Mutex<GroupTopic>,
        (queue, offset): (u32, u64),
        reason: &str,
        receipt: Option<&Receipt>,
    ) -> Result<(Lease, std::sync::Arc<crate::config::DeliveryConfig>)> {
        let mut g = gt.lock();
        if let Some(r) = receipt {
            self.check_receipt(group, t, &g, r, LeaseUse::Settle)?;
        }
        let q = self.acked_queue(group, t, queue, offset)?;
        let past_end = offset >= q.len();
        let c = &mut g.cursors[queue as usize];
        let not_now = |why: &str| Self::bad_ack(group, t, queue, offset, why.to_owned());
        if c.is_acked(offset) {
            return Err(not_now("it is acked"));
        }
        let lease = match c.lease(offset) {
            Some(l) if l.delivered => l.clone(),
            Some(_) => return Err(not_now("it is waiting for redelivery, not with a consumer")),
            None if past_end => {
                return Err(not_now(
                    "it was not delivered to this group (past the end of the queue)",
                ))
            }
            None => return Err(not_now("it was not delivered to this group")),
        };
        c.insert(
            offset,
            Lease {
                due_ms: HELD,
                delivered: false,
                failures: lease.failures + 1,
                reason: reason.to_owned(),
                ..lease.clone()
            },
        );
        Ok((lease, g.delivery.clone()))
    }
}

/// A lease held by a nack in progress. Ended by [`HeldLease::end`]; dropped before that (an
/// error, or an async nack cancelled), it gives the message back to its consumer as it was.
struct HeldLease<'a> {
    group: &'a Mutex<GroupTopic>,
    queue: u32,
    offset: u64,
    /// The lease to put back on drop.
    back: Option<Lease>,
}

impl HeldLease<'_> {
    fn end(mut self, lease: Lease) {
        self.back = Some(lease);
    }
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.back.take() {
            let mut g = self.group.lock();
            g.cursors[self.queue as usize].release_held(self.offset, lease);
            // Its redelivery wait may end before a waiting long poll planned to look again.
            g.wake_pollers();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Broker, BrokerConfig, GroupSettings, Message, NackOutcome};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_ack_and_nack_take_the_same_path_as_the_blocking_ones() {
        let dir = tempfile::tempdir().unwrap();
        let b = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        b.create_topic("t", 1).unwrap();
        for body in ["a", "b", "c"] {
            b.send_async("t", &Message::new(body)).await.unwrap();
        }
        let got = b.poll("g", "t", 10).unwrap();
        assert_eq!(got.len(), 3);
        b.ack_async("g", "t", 0, got[0].offset).await.unwrap();
        // Acking again is fine; nacking an acked message is not.
        b.ack_many_async("g", "t", &[(0, got[0].offset)])
            .await
            .unwrap();
        assert!(b
            .nack_async("g", "t", 0, got[0].offset, None)
            .await
            .is_err());
        let r = b
            .nack_async("g", "t", 0, got[1].offset, Some(Duration::ZERO))
            .await
            .unwrap();
        assert!(
            matches!(r, NackOutcome::Redeliver { attempt: 2, .. }),
            "{r:?}"
        );
        // Waiting for redelivery, not with a consumer: a second nack is refused.
        assert!(b
            .nack_async("g", "t", 0, got[1].offset, None)
            .await
            .is_err());
        let again = b.poll("g", "t", 10).unwrap();
        assert_eq!((again.len(), again[0].attempt), (1, 2));

        // Past max_retries a nack moves the message to the dead-letter queue.
        let none = GroupSettings {
            max_retries: Some(0),
            ..GroupSettings::default()
        };
        b.set_group_settings("g", &none).unwrap();
        let r = b
            .nack_async("g", "t", 0, got[2].offset, None)
            .await
            .unwrap();
        assert!(matches!(r, NackOutcome::DeadLettered { .. }), "{r:?}");
        assert_eq!(b.dead_letters("g", 0, 10).unwrap().len(), 1);
        assert!(b.poll("g", "t", 10).unwrap().is_empty());
        b.close().unwrap();
        drop(b);

        // All of it is durable.
        let b = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        b.set_group_settings("g", &GroupSettings::default())
            .unwrap();
        let left = b.poll("g", "t", 10).unwrap();
        assert_eq!(left.len(), 1, "only the redelivered one is not acked");
        assert_eq!((left[0].offset, left[0].attempt), (got[1].offset, 2));
        assert_eq!(b.dead_letters("g", 0, 10).unwrap().len(), 1);
    }

    /// Sixteen consumers acking at once with `ack_many_async`: when the flush awaited sled
    /// 0.34's `flush_async`, this hung for good now and then (spacejam/sled#1308). The
    /// watchdog only turns a hang into a failure; it measures nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_async_acks_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let b = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        b.create_topic("t", 8).unwrap();
        for i in 0..4000u32 {
            b.send_async("t", &Message::new(i.to_le_bytes().to_vec()))
                .await
                .unwrap();
        }
        let consumers = (0..16).map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut acked = 0;
                loop {
                    let got = b.poll("g", "t", 2).unwrap();
                    if got.is_empty() {
                        return acked;
                    }
                    let acks: Vec<(u32, u64)> = got.iter().map(|d| (d.queue, d.offset)).collect();
                    b.ack_many_async("g", "t", &acks).await.unwrap();
                    acked += acks.len();
                }
            })
        });
        let all = futures_join(consumers.collect());
        let acked = tokio::time::timeout(Duration::from_secs(120), all)
            .await
            .expect("async acks hung");
        assert_eq!(acked, 4000);
    }

    async fn futures_join(tasks: Vec<tokio::task::JoinHandle<usize>>) -> usize {
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    }
}
