//! Delayed delivery: messages stored now and made visible at their time.
//!
//! A delayed send appends a `Delayed` record (durable, invisible). At its time the timer
//! thread appends a `Message` record with [`halfmq_store::record::FLAG_DELAYED_FIRE`] and the
//! property `halfmq.delayed` = the `Delayed` record's log offset, which puts it in its queue.
//! Both are ordinary log records, so a crash at any point is recovered from the log: a
//! `Delayed` record without its fire record is pending, one with it is done. The index of
//! pending ones (this module) is ordered by due time, so a timer tick costs in proportion to
//! the messages due, and is persisted in sled before every checkpoint like the transaction
//! index (only what changed since the last one).

use std::collections::HashSet;

use parking_lot::Mutex;

use crate::meta::{DelayedInfo, Meta};
use crate::schedule::{Due, Pending};
use halfmq_types::error::Result;

#[derive(Default)]
struct Inner {
    /// Due at `deliver_at_ms`; not on the schedule while being delivered.
    pending: Pending<DelayedInfo>,
    /// Delivered since the start (a replayed `Delayed` record after its fire is ignored).
    fired: HashSet<u64>,
}

impl Due for DelayedInfo {
    fn due_ms(&self) -> u64 {
        self.deliver_at_ms
    }
}

/// The pending delayed messages.
#[derive(Default)]
pub(crate) struct DelayedIndex {
    inner: Mutex<Inner>,
}

impl DelayedIndex {
    /// Load what was persisted.
    pub(crate) fn load(&self, meta: &Meta) -> Result<()> {
        let mut g = self.inner.lock();
        for d in meta.delayed()? {
            g.pending.in_sled.insert(d.id);
            g.pending.due.insert(d.deliver_at_ms, d.id);
            g.pending.live.insert(d.id, d);
        }
        Ok(())
    }

    /// Forget everything (before a rebuild from the log replaces what was loaded).
    pub(crate) fn clear(&self) {
        *self.inner.lock() = Inner::default();
    }

    /// A durable `Delayed` record (sent now, or replayed by recovery).
    pub(crate) fn insert(&self, d: DelayedInfo) {
        let mut g = self.inner.lock();
        if g.fired.contains(&d.id) || g.pending.live.contains_key(&d.id) {
            return;
        }
        g.pending.dirty.insert(d.id);
        g.pending.due.insert(d.deliver_at_ms, d.id);
        g.pending.live.insert(d.id, d);
    }

    /// Its fire record is durable: delivered.
    pub(crate) fn fired(&self, id: u64) {
        let mut g = self.inner.lock();
        g.pending.remove(id);
        g.fired.insert(id);
    }

    /// The oldest pending delayed message (its id is its record's log offset): retention
    /// must keep its record until it fired.
    pub(crate) fn oldest_pending(&self) -> Option<u64> {
        self.inner.lock().pending.oldest()
    }

    /// Persisted ones that recovery found past the end of the log (lost before they were
    /// durable) are dropped.
    pub(crate) fn forget_beyond(&self, log_end: u64) {
        self.inner.lock().pending.forget_at_or_past(log_end);
    }

    /// Take up to `max` messages due at `now_ms`, soonest first. They stay pending until
    /// [`DelayedIndex::fired`]; one that could not be delivered goes back with
    /// [`DelayedIndex::retry`].
    pub(crate) fn take_due(&self, now_ms: u64, max: usize) -> Vec<DelayedInfo> {
        let mut g = self.inner.lock();
        g.pending.take_due(now_ms, max, |d| d.clone())
    }

    /// The ids of up to `max` messages due at `now_ms`, soonest first, left on the schedule
    /// (for a timer outside the broker, see [`DelayedIndex::take`]).
    pub(crate) fn due_ids(&self, now_ms: u64, max: usize) -> Vec<u64> {
        self.inner
            .lock()
            .pending
            .due
            .due(now_ms)
            .take(max)
            .collect()
    }

    /// Take message `id` off the schedule to deliver it, if it is still on it (not taken
    /// before, not fired): it stays pending until [`DelayedIndex::fired`].
    pub(crate) fn take(&self, id: u64) -> Option<DelayedInfo> {
        let mut g = self.inner.lock();
        let d = g.pending.live.get(&id)?.clone();
        if !g.pending.due.contains(d.deliver_at_ms, id) {
            return None;
        }
        g.pending.due.remove(d.deliver_at_ms, id);
        Some(d)
    }

    /// Deliver `d` again later (its delivery failed).
    pub(crate) fn retry(&self, d: &DelayedInfo, at_ms: u64) {
        let mut g = self.inner.lock();
        if g.pending.live.contains_key(&d.id) {
            g.pending.due.insert(at_ms, d.id);
        }
    }

    /// When the next one is due.
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.inner.lock().pending.due.next_due_ms()
    }

    /// Delayed messages not delivered yet.
    pub(crate) fn pending(&self) -> u64 {
        self.inner.lock().pending.live.len() as u64
    }

    /// Write what changed since the last call to sled (before a checkpoint, with its log
    /// offset as the `stamp`, see [`Meta::apply_delayed_changes`]).
    pub(crate) fn persist(&self, meta: &Meta, stamp: Option<u64>) -> Result<()> {
        let mut g = self.inner.lock();
        if g.pending.dirty.is_empty() && stamp.is_none() {
            return Ok(());
        }
        let (puts, removes) = g.pending.changes(DelayedInfo::clone);
        meta.apply_delayed_changes(&puts, &removes, stamp)?;
        g.pending.persisted(puts.iter().map(|d| d.id), &removes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64, at: u64) -> DelayedInfo {
        DelayedInfo {
            id,
            size: 60,
            topic: "t".into(),
            queue: 0,
            key: String::new(),
            deliver_at_ms: at,
        }
    }

    #[test]
    fn only_due_ones_are_taken_in_time_order_until_fired() {
        let ix = DelayedIndex::default();
        for (id, at) in [(10, 300), (20, 100), (30, 200), (40, 1_000_000)] {
            ix.insert(info(id, at));
        }
        assert_eq!(ix.next_due_ms(), Some(100));
        let got: Vec<u64> = ix.take_due(250, 10).iter().map(|d| d.id).collect();
        assert_eq!(got, vec![20, 30]);
        assert_eq!(ix.pending(), 4, "pending until fired");
        ix.fired(20);
        ix.retry(&info(30, 200), 400);
        assert_eq!(ix.pending(), 3);
        let got: Vec<u64> = ix.take_due(500, 10).iter().map(|d| d.id).collect();
        assert_eq!(got, vec![10, 30]);
        // A replayed Delayed record of a fired message stays fired.
        ix.insert(info(20, 100));
        assert_eq!(ix.pending(), 3);
        ix.forget_beyond(41);
        assert_eq!(ix.pending(), 3, "everything is before offset 41");
        ix.forget_beyond(40);
        assert_eq!(ix.pending(), 2);
    }
}
