//! Failed deliveries decided by one node and settled by every node: the consumer side of a
//! replicated cluster (`halfmq-raft`).
//!
//! Leases are each node's own (only the leader hands messages out), but what a failure
//! comes to must be the same on every node: a message nacked or timed out on the leader is
//! redelivered by a new leader with the failure count the old one reached, and a dead letter
//! is appended once, at the same place, everywhere. So the leader *decides*
//! ([`Broker::decide_nack`], [`Broker::decide_dead_letter`], [`Broker::poll_deciding`]):
//! it checks the lease, holds it (never due, so nothing hands the message out meanwhile) and
//! returns the [`Settlement`] without recording anything. The cluster carries the
//! settlement through its log and every node records it ([`Broker::settle_retry`],
//! [`Broker::settle_dead_letter`]), which ends the held lease on the leader. A settlement
//! that could not be carried gives the lease back ([`Broker::give_back`]).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{ms, GroupTopic, Nack};
use crate::broker::wait::{block_on, Blocking};
use crate::broker::{validate_group_name, Broker, Topic};
use crate::config::DeliveryConfig;
use crate::delivery::{Lease, HELD};
use crate::meta::RetryState;
use halfmq_types::error::Result;
use halfmq_types::props::PROP_MESSAGE_GROUP;
use halfmq_types::trace::Event;
use halfmq_types::{Delivery, PollOptions, Receipt, SendReceipt};

/// What a failed delivery comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Deliver it again from `due_ms` (ms since the Unix epoch, by the deciding node's
    /// lease clock), as its `failures + 1`th attempt.
    Retry {
        /// Failed deliveries so far, this one included.
        failures: u32,
        /// When it may be delivered again.
        due_ms: u64,
        /// Why this delivery failed.
        reason: String,
    },
    /// Move it to the group's dead-letter queue.
    DeadLetter {
        /// Failed deliveries, this one included.
        failures: u32,
        /// Why.
        reason: String,
    },
}

/// A failed delivery this node decided, whose lease it holds until the settlement is
/// recorded ([`Broker::settle_retry`], [`Broker::settle_dead_letter`]) or given back
/// ([`Broker::give_back`]).
#[derive(Debug, Clone)]
pub struct Decided {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Queue.
    pub queue: u32,
    /// Queue offset.
    pub offset: u64,
    /// What it comes to.
    pub settlement: Settlement,
    /// The lease it had, put back by [`Broker::give_back`].
    pub(super) back: Lease,
}

/// What a deciding poll found ([`Broker::poll_deciding`]).
#[derive(Debug, Default)]
pub struct Polled {
    /// The messages handed out.
    pub deliveries: Vec<Delivery>,
    /// Failures found (visibility time-outs, messages due to be dead-lettered), held.
    pub decided: Vec<Decided>,
    /// (queue, offset) of the messages its tag filter skipped, acked here (to be acked on
    /// the other nodes too).
    pub filter_acks: Vec<(u32, u64)>,
    /// The leases of [`Polled::deliveries`], for the other nodes to record
    /// ([`Broker::settle_delivered`]).
    pub leases: Vec<DeliveredLease>,
}

/// A delivery's lease as another node records it ([`Broker::settle_delivered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveredLease {
    /// Queue.
    pub queue: u32,
    /// Queue offset.
    pub offset: u64,
    /// Which delivery it is (its failures so far + 1).
    pub attempt: u32,
    /// When its lease runs out, ms since the Unix epoch (the delivering node's lease clock).
    pub due_ms: u64,
    /// How long the lease was given for, ms.
    pub lease_ms: u64,
}

/// A failure a deciding poll found in one queue (the poll knows the queue by index).
pub(super) struct Found {
    qi: usize,
    offset: u64,
    settlement: Settlement,
    pub(super) back: Lease,
}

impl Found {
    /// The failure of `lease` (taken from the cursor because it fell due at `now`): a
    /// delivered lease ran out (one failure more), or a waiting one has more failures than
    /// allowed already.
    pub(super) fn new(
        qi: usize,
        offset: u64,
        lease: &Lease,
        now: u64,
        d: &DeliveryConfig,
    ) -> Found {
        let (failures, reason) = if lease.delivered {
            let why = format!(
                "not acked within the visibility time-out ({} ms)",
                lease.lease_ms
            );
            (lease.failures + 1, why)
        } else {
            (lease.failures, lease.reason.clone())
        };
        let settlement = if failures > d.max_retries {
            Settlement::DeadLetter { failures, reason }
        } else {
            Settlement::Retry {
                failures,
                due_ms: now,
                reason,
            }
        };
        Found {
            qi,
            offset,
            settlement,
            back: lease.clone(),
        }
    }
}

impl Broker {
    /// Decide a nack of a delivered message ([`Broker::nack`]; by `receipt`, which must
    /// name its lease now, when given): a retry after `delay` (the group's backoff for its
    /// failure count when `None`), or a dead letter past the group's `max_retries`. Nothing
    /// is recorded; the lease is held until the settlement is recorded or given back.
    pub fn decide_nack(
        &self,
        group: &str,
        topic: &str,
        (queue, offset): (u32, u64),
        delay: Option<Duration>,
        receipt: Option<&Receipt>,
    ) -> Result<Decided> {
        let how = Nack::After(delay);
        Ok(self.decide(group, topic, (queue, offset), how, receipt)?.0)
    }

    /// Decide the move of a delivered message to the dead-letter queue now, by its receipt
    /// ([`Broker::dead_letter_receipt`]), as [`Broker::decide_nack`] does.
    pub fn decide_dead_letter(
        &self,
        group: &str,
        topic: &str,
        receipt: &Receipt,
        reason: &str,
    ) -> Result<Decided> {
        let at = (receipt.queue, receipt.offset);
        let how = Nack::DeadLetter(reason);
        Ok(self.decide(group, topic, at, how, Some(receipt))?.0)
    }

    /// The first half of every nack, embedded ([`Broker::nack`]) or decided for the cluster
    /// ([`Broker::decide_nack`]): the delivered message at `at` is held
    /// ([`Broker::hold_delivered`]) and what the nack comes to is decided; with the topic and
    /// the group's state of it, for the embedded nack to record it.
    pub(super) fn decide(
        &self,
        group: &str,
        topic: &str,
        at: (u32, u64),
        how: Nack<'_>,
        receipt: Option<&Receipt>,
    ) -> Result<(Decided, Arc<Topic>, Arc<Mutex<GroupTopic>>)> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        let reason = how.reason();
        let (back, d) = self.hold_delivered(group, &t, &gt, at, &reason, receipt)?;
        let failures = back.failures + 1;
        let settlement = if how.dead_letters(failures, d.max_retries) {
            Settlement::DeadLetter { failures, reason }
        } else {
            let wait = how.delay().unwrap_or_else(|| d.backoff(failures));
            Settlement::Retry {
                failures,
                due_ms: self.lease_now().saturating_add(ms(wait)),
                reason,
            }
        };
        let decided = Decided {
            group: group.to_owned(),
            topic: t.name.clone(),
            queue: at.0,
            offset: at.1,
            settlement,
            back,
        };
        Ok((decided, t, gt))
    }

    /// Give back the lease of a decision that was not recorded (its message is with its
    /// consumer again, or due again, as before), unless something ended it meanwhile.
    pub fn give_back(&self, d: &Decided) -> Result<()> {
        let t = self.topic_to_read(&d.topic)?;
        let gt = self.group_topic(&d.group, &t)?;
        let mut g = gt.lock();
        if let Some(c) = g.cursors.get_mut(d.queue as usize) {
            c.release_held(d.offset, d.back.clone());
        }
        g.wake_pollers();
        Ok(())
    }

    /// [`Broker::poll_limited_with`] that decides instead of recording: the visibility
    /// time-outs it finds and the messages it would move to the dead-letter queue are held
    /// and returned ([`Polled::decided`]) for the caller to settle, not redelivered or
    /// moved; once a retry is recorded the message is due and the next poll hands it out.
    pub fn poll_deciding(
        &self,
        group: &str,
        topic: &str,
        (max, max_bytes): (usize, usize),
        opts: &PollOptions,
    ) -> Result<Polled> {
        validate_group_name(group)?;
        opts.validate()?;
        let t = self.topic_to_read(topic)?;
        let (deliveries, found, filter_acks) =
            self.poll_group(group, &t, (max, max_bytes), opts, Some(Vec::new()))?;
        let leases = {
            let gt = self.group_topic(group, &t)?;
            let g = gt.lock();
            deliveries
                .iter()
                .filter_map(|d| {
                    let l = g.cursors.get(d.queue as usize)?.lease(d.offset)?;
                    l.delivered.then_some(DeliveredLease {
                        queue: d.queue,
                        offset: d.offset,
                        attempt: d.attempt,
                        due_ms: l.due_ms,
                        lease_ms: l.lease_ms,
                    })
                })
                .collect()
        };
        let decided = found
            .into_iter()
            .map(|f| Decided {
                group: group.to_owned(),
                topic: t.name.clone(),
                queue: t.queues[f.qi].queue_id(),
                offset: f.offset,
                settlement: f.settlement,
                back: f.back,
            })
            .collect();
        Ok(Polled {
            deliveries,
            decided,
            filter_acks,
            leases,
        })
    }

    /// The (queue, offset) of messages named by `receipts`, each checked as
    /// [`Broker::ack_receipts`] checks it ([`Error::BadReceipt`](halfmq_types::Error),
    /// `StaleReceipt`), without acking anything.
    pub fn receipt_acks(
        &self,
        group: &str,
        topic: &str,
        receipts: &[Receipt],
    ) -> Result<Vec<(u32, u64)>> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        let g = gt.lock();
        let mut acks = Vec::with_capacity(receipts.len());
        for r in receipts {
            self.check_receipt(group, &t, &g, r, super::LeaseUse::Ack)?;
            acks.push((r.queue, r.offset));
        }
        Ok(acks)
    }

    /// Record a retry decided by a node ([`Settlement::Retry`]): the message waits for
    /// redelivery until `due_ms` with `failures` counted, whether or not this node delivered
    /// it (a lease it holds is replaced). False, and nothing changes, when it is acked
    /// (settled before). Not flushed: a replicated node's broker is rebuilt from the log.
    pub fn settle_retry(
        &self,
        group: &str,
        topic: &str,
        (queue, offset): (u32, u64),
        (failures, due_ms): (u32, u64),
        reason: &str,
    ) -> Result<bool> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        let mut g = gt.lock();
        let q = self.stored_queue(group, &t, queue, offset)?;
        let fifo = g.delivery.fifo;
        let c = &mut g.cursors[queue as usize];
        let Some(old) = c.unacked_lease(offset) else {
            return Ok(false);
        };
        let state = RetryState {
            failures,
            due_ms,
            reason: reason.to_owned(),
        };
        self.meta
            .store_retries(group, &t.name, queue, &[(offset, Some(state))], false)?;
        let restore = old.group.is_none() && fifo;
        c.insert(
            offset,
            Lease {
                due_ms,
                failures,
                delivered: false,
                reason: reason.to_owned(),
                ..old
            },
        );
        // FIFO, on a node that did not deliver it: it holds its message group, as after a
        // restart.
        let rec = self.store.read_message(q, offset)?;
        if restore {
            let mg = rec
                .as_ref()
                .and_then(|r| r.properties.get(PROP_MESSAGE_GROUP));
            if let Some(mg) = mg {
                c.restore(offset, Arc::from(mg.as_str()));
            }
        }
        if let Some(r) = rec.filter(|r| !r.key.is_empty()) {
            let event = Event::Retried {
                group: group.to_owned(),
                attempt: failures,
                reason: reason.to_owned(),
                next_at_ms: due_ms,
            };
            self.trace_events(vec![(r.header.log_offset, event)]);
        }
        g.wake_pollers();
        Ok(true)
    }

    /// Record deliveries another node (the leader) made: each message is with a consumer
    /// until its lease runs out, as if this node had delivered it, so that, should this
    /// node lead next, it delivers the message again only after that time-out, with the
    /// attempt counted. A message acked, or whose failure count is no longer the one it was
    /// delivered with (settled since: the records of one leader may interleave), or that
    /// this node holds under a lease of its own, is left alone. Returns how many were
    /// recorded.
    pub fn settle_delivered(
        &self,
        group: &str,
        topic: &str,
        leases: &[DeliveredLease],
    ) -> Result<u64> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        let mut g = gt.lock();
        let fifo = g.delivery.fifo;
        let mut recorded = 0;
        for l in leases {
            let q = self.stored_queue(group, &t, l.queue, l.offset)?;
            let c = &mut g.cursors[l.queue as usize];
            let old = c.lease(l.offset).cloned();
            let failures = old.as_ref().map_or(0, |o| o.failures);
            let busy = old
                .as_ref()
                .is_some_and(|o| o.delivered || o.due_ms == HELD);
            if c.is_acked(l.offset) || busy || failures.saturating_add(1) != l.attempt {
                continue;
            }
            let old = old.unwrap_or_default();
            let restore = fifo && old.group.is_none();
            c.insert(
                l.offset,
                Lease {
                    due_ms: l.due_ms,
                    delivered: true,
                    lease_ms: l.lease_ms,
                    ..old
                },
            );
            if restore {
                let rec = self.store.read_message(q, l.offset)?;
                let mg = rec
                    .as_ref()
                    .and_then(|r| r.properties.get(PROP_MESSAGE_GROUP));
                if let Some(mg) = mg {
                    c.restore(l.offset, Arc::from(mg.as_str()));
                }
            }
            recorded += 1;
        }
        Ok(recorded)
    }

    /// Record a move to the dead-letter queue decided by a node
    /// ([`Settlement::DeadLetter`]): the dead letter is appended (at this broker's clock)
    /// and the message acked. `None`, and nothing changes, when it is acked (moved before):
    /// each message is moved once.
    pub fn settle_dead_letter(
        &self,
        group: &str,
        topic: &str,
        (queue, offset): (u32, u64),
        failures: u32,
        reason: &str,
    ) -> Result<Option<SendReceipt>> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        let lease = {
            let mut g = gt.lock();
            self.stored_queue(group, &t, queue, offset)?;
            let c = &mut g.cursors[queue as usize];
            let Some(old) = c.unacked_lease(offset) else {
                return Ok(None);
            };
            let lease = Lease {
                failures,
                reason: reason.to_owned(),
                due_ms: HELD,
                delivered: false,
                ..old
            };
            // Held while it moves (its ack ends it).
            c.insert(offset, lease.clone());
            lease
        };
        let qi = queue as usize;
        let moved = self.move_to_dead_letters(&Blocking, group, &t, &gt, qi, offset, lease);
        block_on(moved).map(Some)
    }
}
