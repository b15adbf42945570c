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
//!
//! Every handout (and every lease change) gives the lease a new number, which receipts name
//! (`broker/consume/receipt.rs`). For a FIFO consumer group the cursor also keeps, per
//! message group, the message that holds it (its *head*) and the messages waiting behind it
//! (leases due [`BLOCKED`], never); ending the head's lease (ack, dead letter) makes the next
//! one due at once. Blocked messages live in memory only: after a restart the scan finds them
//! again, behind the heads restored from the retry states.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::meta::RetryState;
use crate::schedule::Schedule;

/// The due time of a lease held by a nack or a dead-letter move in progress: never due, so
/// no poll hands the message out meanwhile. The operation replaces it when it ends
/// ([`Cursor::release_held`]), or its ack removes it.
pub(crate) const HELD: u64 = u64::MAX;

/// The due time of a message of a FIFO message group waiting behind an earlier one of its
/// message group: never due; the end of the one before it makes it due
/// ([`Cursor::remove`]).
pub(crate) const BLOCKED: u64 = u64::MAX - 1;

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
    /// Its message group, when the consumer group is FIFO and the message has one.
    pub group: Option<Arc<str>>,
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
    /// FIFO: per message group, the message that holds it (with a consumer, waiting for
    /// redelivery, or due to be handed out next).
    heads: HashMap<Arc<str>, u64>,
    /// FIFO: per message group, the messages waiting behind its head (their leases are
    /// [`BLOCKED`]), in queue order.
    blocked: HashMap<Arc<str>, BTreeSet<u64>>,
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

    /// What a decision about a message starts from: `None` when the group acked it (it was
    /// settled before), otherwise a copy of its lease (the default one if it has none).
    pub fn unacked_lease(&self, offset: u64) -> Option<Lease> {
        if self.is_acked(offset) {
            return None;
        }
        Some(self.lease(offset).cloned().unwrap_or_default())
    }

    /// Put (or replace) the lease of a message.
    pub fn insert(&mut self, offset: u64, lease: Lease) {
        if let Some(old) = self.leases.insert(offset, lease.clone()) {
            self.due.remove(old.due_ms, offset);
        }
        self.due.insert(lease.due_ms, offset);
    }

    /// End the lease of a message (acked or dead-lettered); returns it. The next message
    /// of its FIFO message group, if one waits, is due at once.
    pub fn remove(&mut self, offset: u64) -> Option<Lease> {
        let old = self.leases.remove(&offset)?;
        self.due.remove(old.due_ms, offset);
        if let Some(g) = &old.group {
            self.release(g, offset);
        }
        Some(old)
    }

    /// `offset` of message group `g` no longer holds it, or waits in it: the next waiting
    /// one, if any, becomes its head and is due at once.
    fn release(&mut self, g: &Arc<str>, offset: u64) {
        if let Some(waiting) = self.blocked.get_mut(g) {
            if waiting.remove(&offset) {
                if waiting.is_empty() {
                    self.blocked.remove(g);
                }
                return;
            }
        }
        if self.heads.get(g) != Some(&offset) {
            return;
        }
        let next = self.blocked.get_mut(g).and_then(BTreeSet::pop_first);
        if self.blocked.get(g).is_some_and(BTreeSet::is_empty) {
            self.blocked.remove(g);
        }
        match next {
            Some(n) => {
                self.heads.insert(g.clone(), n);
                if let Some(l) = self.leases.get(&n).cloned() {
                    self.insert(n, Lease { due_ms: 0, ..l });
                }
            }
            None => {
                self.heads.remove(g);
            }
        }
    }

    /// FIFO: whether message `offset` of message group `g`, never handed out before, may be
    /// handed out now (it becomes its group's head). If not, it waits ([`BLOCKED`]) behind
    /// the head, and the scan goes past it.
    pub fn admit(&mut self, offset: u64, g: &Arc<str>) -> bool {
        match self.heads.get(g) {
            Some(&head) if head != offset => {
                self.block(offset, g.clone(), Lease::default());
                false
            }
            _ => {
                self.heads.insert(g.clone(), offset);
                true
            }
        }
    }

    fn block(&mut self, offset: u64, g: Arc<str>, lease: Lease) {
        self.blocked.entry(g.clone()).or_default().insert(offset);
        let lease = Lease {
            due_ms: BLOCKED,
            delivered: false,
            group: Some(g),
            ..lease
        };
        self.insert(offset, lease);
    }

    /// FIFO, after a (re)start: message `offset`, waiting for redelivery, is of message group
    /// `g`. Called in queue order: the first of each group holds it, later ones wait.
    pub fn restore(&mut self, offset: u64, g: Arc<str>) {
        let Some(lease) = self.leases.get(&offset).cloned() else {
            return;
        };
        if self.heads.contains_key(&g) {
            self.block(offset, g, lease);
        } else {
            self.heads.insert(g.clone(), offset);
            self.insert(
                offset,
                Lease {
                    group: Some(g),
                    ..lease
                },
            );
        }
    }

    /// FIFO turned off: every waiting message is due at once, and no group is held.
    pub fn unblock_all(&mut self) {
        let waiting: Vec<u64> = self.blocked.values().flatten().copied().collect();
        self.blocked.clear();
        self.heads.clear();
        for offset in waiting {
            if let Some(l) = self.leases.get(&offset).cloned() {
                self.insert(offset, Lease { due_ms: 0, ..l });
            }
        }
    }

    /// The offsets of messages waiting for redelivery, in queue order.
    pub fn waiting_offsets(&self) -> Vec<u64> {
        self.leases
            .iter()
            .filter(|(_, l)| !l.delivered)
            .map(|(&o, _)| o)
            .collect()
    }

    /// Whether messages wait behind the head of their FIFO message group.
    pub fn has_blocked(&self) -> bool {
        !self.blocked.is_empty()
    }

    /// Replace the held lease of a message (see [`HELD`]) with `lease`, unless something
    /// ended it meanwhile (an ack).
    pub fn release_held(&mut self, offset: u64, lease: Lease) {
        if self.leases.get(&offset).is_some_and(|l| l.due_ms == HELD) {
            self.insert(offset, lease);
        }
    }

    /// A lease taken by [`Cursor::pop_due`] that is not put back (its message is gone): its
    /// FIFO message group moves on.
    pub fn forget(&mut self, offset: u64, lease: &Lease) {
        if let Some(g) = &lease.group {
            self.release(g, offset);
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

    /// Messages waiting for redelivery (not those waiting behind their FIFO group's head).
    pub fn waiting(&self) -> usize {
        self.leases
            .values()
            .filter(|l| !l.delivered && l.due_ms != BLOCKED)
            .count()
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
    fn a_fifo_group_hands_out_its_next_message_only_when_the_head_ends() {
        let mut c = Cursor::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        assert!(c.admit(0, &a));
        c.insert(
            0,
            Lease {
                group: Some(a.clone()),
                delivered: true,
                due_ms: 100,
                ..Lease::default()
            },
        );
        assert!(c.admit(1, &b), "another group is not held up");
        assert!(!c.admit(2, &a) && !c.admit(3, &a));
        assert!(c.has_blocked() && c.is_leased(2));
        assert_eq!(
            c.waiting(),
            0,
            "waiting behind a head is not waiting for redelivery"
        );
        // The head times out and is taken for redelivery: the group stays held.
        let (o, l) = c.pop_due(100).unwrap();
        assert_eq!(o, 0);
        c.insert(
            0,
            Lease {
                delivered: true,
                due_ms: 300,
                ..l
            },
        );
        assert_eq!(c.pop_due(200), None);
        // Acked: the next one is due at once, the one after it still waits.
        c.remove(0);
        assert_eq!(c.pop_due(200).map(|(o, _)| o), Some(2));
        assert_eq!(c.pop_due(200), None);
        // A waiting message acked directly leaves the queue behind the head.
        c.remove(3);
        assert!(!c.has_blocked());
        // Restored after a restart: the first waiting one of a group holds it.
        let mut r = Cursor::default();
        r.insert(5, lease(50, false));
        r.insert(7, lease(60, false));
        r.restore(5, a.clone());
        r.restore(7, a.clone());
        assert_eq!(r.pop_due(1_000).map(|(o, _)| o), Some(5));
        assert_eq!(r.pop_due(1_000), None, "7 waits behind 5");
        r.unblock_all();
        assert_eq!(r.pop_due(1_000).map(|(o, _)| o), Some(7));
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
