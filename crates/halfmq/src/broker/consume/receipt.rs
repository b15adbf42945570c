//! Receipts: acks, nacks and lease changes that name one lease of a delivery
//! ([`Receipt`]), and the lease numbers and keyed checksums behind them.
//!
//! Every handout and every lease change takes a new lease number from the broker's counter,
//! and the receipt handed out carries it with a checksum: SipHash-1-3 (the standard
//! library's keyed hasher) over group, topic, queue, offset and lease number, keyed with
//! 128 random bits drawn when the broker opens. The check is the checksum first (a receipt
//! it fails was not issued by this broker since it opened: [`Error::BadReceipt`]), then that
//! the lease the receipt names is still the message's lease ([`Error::StaleReceipt`]
//! otherwise). Neither the counter nor the key is kept across a restart, and neither are
//! leases: after a restart every receipt is a `BadReceipt` and the messages it named are
//! delivered again, as every message not acked is.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{ms, GroupTopic, LeaseUse, Nack};
use crate::broker::wait::{blocking_and_async, Wait};
use crate::broker::{validate_group_name, Broker, Topic};
use crate::delivery::{Lease, HELD};
use halfmq_types::error::{Error, Result};
use halfmq_types::lease::validate_lease;
use halfmq_types::{NackOutcome, Receipt, SendReceipt};

/// Lease numbers and the key of receipts' checksums, one set per open broker.
pub(crate) struct LeaseKeys {
    /// The next lease number.
    next: AtomicU64,
    /// The checksum's key (random per broker open).
    key: RandomState,
}

impl LeaseKeys {
    pub(crate) fn new() -> LeaseKeys {
        LeaseKeys {
            next: AtomicU64::new(1),
            key: RandomState::new(),
        }
    }

    /// A new lease number.
    pub(crate) fn number(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn mac(&self, group: &str, topic: &str, queue: u32, offset: u64, number: u64) -> u64 {
        self.key.hash_one((group, topic, queue, offset, number))
    }

    /// The receipt of lease `number` of a message.
    pub(crate) fn receipt(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
        number: u64,
    ) -> Receipt {
        Receipt {
            queue,
            offset,
            lease: number,
            mac: self.mac(group, topic, queue, offset, number),
        }
    }
}

impl Broker {
    /// Check `r` against the group's state: issued by this broker for this group and topic,
    /// and (unless `what` is an ack of an acked message) naming the lease the message is
    /// held under now. Returns whether the message is acked already. Called under the
    /// group's lock.
    pub(super) fn check_receipt(
        &self,
        group: &str,
        t: &Topic,
        g: &GroupTopic,
        r: &Receipt,
        what: LeaseUse,
    ) -> Result<bool> {
        let bad = || {
            Error::BadReceipt {
            receipt: r.handle(),
            reason: format!(
                "not issued by this broker for group `{group}` and topic `{}` (modified, made up, for another group or topic, or from before the broker last opened)",
                t.name
            ),
        }
        };
        if r.mac != self.leases.mac(group, &t.name, r.queue, r.offset, r.lease) {
            return Err(bad());
        }
        // The checksum holds, so the broker made this receipt for a queue the topic has.
        let c = g.cursors.get(r.queue as usize).ok_or_else(bad)?;
        let stale = |reason: &str| Error::StaleReceipt {
            group: group.to_owned(),
            topic: t.name.clone(),
            queue: r.queue,
            offset: r.offset,
            reason: reason.to_owned(),
        };
        if c.is_acked(r.offset) {
            return match what {
                LeaseUse::Ack => Ok(true),
                LeaseUse::Settle => Err(stale("it is acked")),
            };
        }
        match c.lease(r.offset) {
            Some(l) if l.number != r.lease => Err(stale(
                "its lease ended: the message was delivered again, or the lease was changed",
            )),
            Some(l) if l.delivered => Ok(false),
            Some(l) if l.due_ms == HELD => Err(stale("it is being nacked or dead-lettered")),
            Some(_) => Err(stale("it was nacked and waits for redelivery")),
            None => Err(stale("the group holds no lease of it")),
        }
    }

    blocking_and_async! {
        /// Acknowledge messages by their receipts, with one durable write; durable when this
        /// returns. All or nothing: a receipt that is not one of this broker's is
        /// [`Error::BadReceipt`], one whose lease has ended (the message was delivered again
        /// after the lease ran out, or the lease was nacked or changed) is
        /// [`Error::StaleReceipt`], and then nothing is acked. A lease that ran out but whose
        /// message was not handed out again yet is still the message's lease. The ack of a
        /// message acked already succeeds (acks are idempotent).
        fn ack_receipts;
        /// [`Broker::ack_receipts`] for async code.
        async fn ack_receipts_async;
        (&self, group: &str, topic: &str, receipts: &[Receipt]) -> Result<()>;
        ack_receipts_with(group, topic, receipts)
    }

    blocking_and_async! {
        /// Acknowledge one message by its receipt ([`Broker::ack_receipts`]).
        fn ack_receipt;
        /// [`Broker::ack_receipt`] for async code.
        async fn ack_receipt_async;
        (&self, group: &str, topic: &str, receipt: &Receipt) -> Result<()>;
        ack_receipts_with(group, topic, std::slice::from_ref(receipt))
    }

    async fn ack_receipts_with<W: Wait>(
        &self,
        w: &W,
        group: &str,
        topic: &str,
        receipts: &[Receipt],
    ) -> Result<()> {
        validate_group_name(group)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        {
            let mut g = gt.lock();
            let mut acks = Vec::with_capacity(receipts.len());
            for r in receipts {
                self.check_receipt(group, &t, &g, r, LeaseUse::Ack)?;
                acks.push((r.queue, r.offset));
            }
            self.ack_apply(group, &t, &mut g, &acks, true)?;
        }
        // As `ack`: also when every message was acked before, whose flush may be running.
        w.flush(self.meta()).await?;
        crate::metrics::acked(group, &t.name, receipts.len());
        Ok(())
    }

    blocking_and_async! {
        /// [`Broker::nack`] by receipt: the receipt must name the lease the message is held
        /// under now ([`Error::StaleReceipt`] otherwise, also when it is acked).
        fn nack_receipt;
        /// [`Broker::nack_receipt`] for async code.
        async fn nack_receipt_async;
        (&self, group: &str, topic: &str, receipt: &Receipt, delay: Option<Duration>) -> Result<NackOutcome>;
        nack_with(group, topic, receipt.queue, receipt.offset, Nack::After(delay), Some(receipt))
    }

    blocking_and_async! {
        /// Move a delivered message to the group's dead-letter queue now, by its receipt
        /// (RocketMQ's ForwardMessageToDeadLetterQueue), whatever its failure count: the
        /// delivery counts as failed, and `reason` is kept with the dead letter. The receipt
        /// must name the message's lease now. Durable when this returns; returns where the
        /// dead letter is.
        fn dead_letter_receipt;
        /// [`Broker::dead_letter_receipt`] for async code.
        async fn dead_letter_receipt_async;
        (&self, group: &str, topic: &str, receipt: &Receipt, reason: &str) -> Result<SendReceipt>;
        nack_with(group, topic, receipt.queue, receipt.offset, Nack::DeadLetter(reason), Some(receipt))
            .and_then(dead_lettered)
    }

    /// Change the lease of a delivered message (RocketMQ's ChangeInvisibleDuration): it now
    /// runs out `lease` from now, longer or shorter than before. This is not a failed
    /// delivery: the failure count and the attempt number stay as they are (a lease that
    /// then runs out is a failure, as any). The receipt must name the message's lease now;
    /// the old receipt becomes stale and the new one is returned. `lease` must be within
    /// [`LEASE_MIN`](halfmq_types::lease::LEASE_MIN) ..=
    /// [`LEASE_MAX`](halfmq_types::lease::LEASE_MAX) ([`Error::Invalid`] otherwise). Leases
    /// live in memory: nothing is written, and a restart ends every lease.
    pub fn change_lease(
        &self,
        group: &str,
        topic: &str,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Receipt> {
        validate_group_name(group)?;
        validate_lease(lease)?;
        let t = self.topic_to_read(topic)?;
        let gt = self.group_topic(group, &t)?;
        let mut g = gt.lock();
        self.check_receipt(group, &t, &g, receipt, LeaseUse::Settle)?;
        let c = &mut g.cursors[receipt.queue as usize];
        let Some(old) = c.lease(receipt.offset).cloned() else {
            // check_receipt found the lease, under the same lock.
            return Err(Error::StaleReceipt {
                group: group.to_owned(),
                topic: t.name.clone(),
                queue: receipt.queue,
                offset: receipt.offset,
                reason: "the group holds no lease of it".into(),
            });
        };
        let number = self.leases.number();
        let lease_ms = ms(lease);
        c.insert(
            receipt.offset,
            Lease {
                due_ms: self.lease_now().saturating_add(lease_ms),
                number,
                lease_ms,
                ..old
            },
        );
        // A shorter lease: a long poll of the group may hand the message out sooner.
        g.wake_pollers();
        Ok(self
            .leases
            .receipt(group, &t.name, receipt.queue, receipt.offset, number))
    }
}

/// Where a move by [`Nack::DeadLetter`] put the dead letter.
fn dead_lettered(outcome: NackOutcome) -> Result<SendReceipt> {
    match outcome {
        NackOutcome::DeadLettered { dead_letter } => Ok(dead_letter),
        // `Nack::DeadLetter` always ends in the dead-letter queue or in an error.
        NackOutcome::Redeliver { .. } => Err(Error::Invalid {
            what: "dead-letter move",
            reason: "the message was not moved".into(),
        }),
    }
}
