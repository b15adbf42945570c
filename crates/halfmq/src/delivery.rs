//! What a consumer group has been given and not yet acked, in memory: the leases behind
//! redelivery.
//!
//! A message handed to a consumer is *leased* until `now + visibility_timeout`. An ack ends
//! the lease. A nack, or a lease that runs out, is a failed delivery: the message waits
//! (for the nack's delay or the retry backoff) and is delivered again, until the group's
//! `max_retries` failures, after which it moves to the group's dead-letter queue.
//!
//! Leases live only in memory; what must survive a restart is in sled (`Meta`): the acks, and
//! for every message whose delivery failed, a [`RetryState`] with its failure count and due
//! time. After a restart every un-acked message is delivered again (at once, or when its
//! retry state says), so a crash never loses a message and never resets a failure count; a
//! delivery that was in flight at the crash does not count as failed.

use std::collections::{BTreeMap, BTreeSet};

use crate::meta::RetryState;
use crate::schedule::Schedule;

/// The due time of a lease held by a nack or a dead-letter move in progress: never due, so
/// no poll hands the message out meanwhile. The operation replaces it when it ends
/// ([`Cursor::release_held`]), or its ack removes it.
pub(crate) const HELD: u64 = u64::MAX;

/// One delivered or waiting message of one group in one queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Lease {
    /// Delivered: the lease runs out then. Waiting: it may be delivered again then.
    pub due_ms: u64,
    /// Failed deliveries so far.
    pub failures: u32,
    /// With a consumer now (true) or waiting for redelivery (false).
    pub delivered: bool,
    /// Why the last delivery failed ("" before any failure).
    pub reason: String,
    /// The number of the lease a delivered message is held under (new at every handout and
    /// every change; receipts name it), 0 before the first handout.
    pub number: u64,
    /// How long the current lease was given for, in ms (for the reason of a time-out).
    pub lease_ms: u64,
}

/// In-memory state of one group in one queue.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    /// Durable: every message before this is acked.
    pub committed: u64,
    /// Durable: acked messages at or after `committed`.
    pub acked_above: BTreeSet<u64>,
    /// Next message never handed out yet (in memory only: after a restart, delivery resumes
    /// at `committed`, so un-acked messages are delivered again).
    pub next: u64,
    /// Leased or waiting messages, by queue offset.
    leases: BTreeMap<u64, Lease>,
    /// `(due_ms, offset)` of every lease, soonest first.
    due: Schedule,
}

impl Cursor {
    /// The state after a (re)start: durable acks, and the failed deliveries not acked since
    /// (they wait for their due time). Returns the retry states that belong to acked
    /// messages (left by a crash between an ack and their removal), for the caller to remove.
    pub fn load(
        committed: u64,
        acked_above: BTreeSet<u64>,
        retries: BTreeMap<u64, RetryState>,
    ) -> (Cursor, Vec<u64>) {
        let mut c = Cursor {
            committed,
            next: committed,
            acked_above,
            ..Cursor::default()
        };
        let mut stale = Vec::new();
        for (offset, st) in retries {
            if c.is_acked(offset) {
                stale.push(offset);
                continue;
            }
            c.insert(
                offset,
                Lease {
                    due_ms: st.due_ms,
                    failures: st.failures,
                    delivered: false,
                    reason: st.reason,
                    ..Lease::default()
                },
            );
        }
        (c, stale)
    }

    /// Whether the group acked this message.
    pub fn is_acked(&self, offset: u64) -> bool {
        offset < self.committed || self.acked_above.contains(&offset)
    }

    /// Whether the message is leased or waiting for redelivery (so the scan for new messages
    /// skips it).
    pub fn is_leased(&self, offset: u64) -> bool {
        self.leases.contains_key(&offset)
    }

    /// The lease of a message, if any.
    pub fn lease(&self, offset: u64) -> Option<&Lease> {
        self.leases.get(&offset)
    }

    /// Put (or replace) the lease of a message.
    pub fn insert(&mut self, offset: u64, lease: Lease) {
        if let Some(old) = self.leases.insert(offset, lease.clone()) {
            self.due.remove(old.due_ms, offset);
        }
        self.due.insert(lease.due_ms, offset);
    }

    /// End the lease of a message (acked or dead-lettered); returns it.
    pub fn remove(&mut self, offset: u64) -> Option<Lease> {
        let old = self.leases.remove(&offset)?;
        self.due.remove(old.due_ms, offset);
        Some(old)
    }

    /// Replace the held lease of a message (see [`HELD`]) with `lease`, unless something
    /// ended it meanwhile (an ack).
    pub fn release_held(&mut self, offset: u64, lease: Lease) {
        if self.leases.get(&offset).is_some_and(|l| l.due_ms == HELD) {
            self.insert(offset, lease);
        }
    }

    /// Take the soonest lease that is due at `now_ms`, if any.
    pub fn pop_due(&mut self, now_ms: u64) -> Option<(u64, Lease)> {
        let (_, offset) = self.due.pop_due(now_ms)?;
        let lease = self.leases.remove(&offset)?;
        Some((offset, lease))
    }

    /// When the next lease falls due, if any.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due.next_due_ms()
    }

    /// Messages with a consumer now.
    pub fn in_flight(&self) -> usize {
        self.leases.values().filter(|l| l.delivered).count()
    }

    /// Messages with a consumer whose lease has not run out at `now_ms` (a consumer is, or
    /// may still be, working on them), and messages held by a nack or a dead-letter move in
    /// progress.
    pub fn held(&self, now_ms: u64) -> usize {
        self.leases
            .values()
            .filter(|l| (l.delivered && l.due_ms > now_ms) || l.due_ms == HELD)
            .count()
    }

    /// Messages waiting for redelivery.
    pub fn waiting(&self) -> usize {
        self.leases.values().filter(|l| !l.delivered).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(due_ms: u64, delivered: bool) -> Lease {
        Lease {
            due_ms,
            delivered,
            ..Lease::default()
        }
    }

    #[test]
    fn leases_fall_due_in_time_order_and_replacing_one_moves_it() {
        let mut c = Cursor::default();
        c.insert(5, lease(300, true));
        c.insert(2, lease(100, true));
        c.insert(9, lease(200, false));
        assert_eq!(c.next_due_ms(), Some(100));
        assert_eq!(c.pop_due(99), None);
        assert_eq!(c.pop_due(250).map(|(o, _)| o), Some(2));
        // Offset 9 is pushed back: it is no longer due at 250.
        c.insert(9, lease(1000, false));
        assert_eq!(c.pop_due(250), None);
        assert_eq!(c.in_flight(), 1);
        assert_eq!(c.waiting(), 1);
        assert_eq!(c.remove(5).map(|l| l.due_ms), Some(300));
        assert_eq!(c.pop_due(10_000).map(|(o, _)| o), Some(9));
        assert_eq!(c.pop_due(10_000), None);
        assert!(!c.is_leased(9));
    }

    #[test]
    fn load_keeps_failures_of_unacked_messages_and_reports_stale_ones() {
        let st = |failures| RetryState {
            failures,
            due_ms: 50,
            reason: "nack".into(),
        };
        let retries = BTreeMap::from([(1, st(1)), (4, st(2)), (6, st(3)), (7, st(4))]);
        let (c, stale) = Cursor::load(5, BTreeSet::from([7]), retries);
        assert_eq!(stale, vec![1, 4, 7], "acked below committed or above it");
        let l = c.lease(6).unwrap();
        assert_eq!((l.failures, l.delivered, l.due_ms), (3, false, 50));
        assert_eq!(c.next, 5);
        assert!(c.is_acked(4) && c.is_acked(7) && !c.is_acked(5) && !c.is_acked(6));
    }
}
