//! Delayed delivery: messages stored now and made visible at their time.
//!
//! A delayed send appends a `Delayed` record (durable, invisible). At its time the timer
//! thread appends a `Message` record with [`crate::record::FLAG_DELAYED_FIRE`] and the
//! property `halfmq.delayed` = the `Delayed` record's log offset, which puts it in its queue.
//! Both are ordinary log records, so a crash at any point is recovered from the log: a
//! `Delayed` record without its fire record is pending, one with it is done. The index of
//! pending ones (this module) is ordered by due time, so a timer tick costs in proportion to
//! the messages due, and is persisted in sled before every checkpoint like the transaction
//! index (only what changed since the last one).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Weak;
use std::time::Duration;

use parking_lot::Mutex;

use crate::broker::{now_ms, Broker};
use crate::error::{Error, Result};
use crate::meta::Meta;
use crate::worker::Worker;

/// Property of a fire record: the log offset of the `Delayed` record it delivers.
pub const PROP_DELAYED: &str = "halfmq.delayed";

/// A delayed message not delivered yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayedInfo {
    /// Its id: the log offset of its `Delayed` record.
    pub id: u64,
    /// Size of that record, to read it back.
    pub size: u32,
    /// Topic.
    pub topic: String,
    /// Queue.
    pub queue: u32,
    /// Key.
    pub key: String,
    /// When to deliver it, ms since the Unix epoch.
    pub deliver_at_ms: u64,
}

#[derive(Default)]
struct Inner {
    live: HashMap<u64, DelayedInfo>,
    /// (deliver_at_ms, id) of live ones not being delivered right now.
    due: BTreeSet<(u64, u64)>,
    /// Changed since the last persist.
    dirty: BTreeSet<u64>,
    /// Ids that are in sled.
    in_sled: HashSet<u64>,
    /// Delivered since the start (a replayed `Delayed` record after its fire is ignored).
    fired: HashSet<u64>,
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
            g.in_sled.insert(d.id);
            g.due.insert((d.deliver_at_ms, d.id));
            g.live.insert(d.id, d);
        }
        Ok(())
    }

    /// A durable `Delayed` record (sent now, or replayed by recovery).
    pub(crate) fn insert(&self, d: DelayedInfo) {
        let mut g = self.inner.lock();
        if g.fired.contains(&d.id) || g.live.contains_key(&d.id) {
            return;
        }
        g.dirty.insert(d.id);
        g.due.insert((d.deliver_at_ms, d.id));
        g.live.insert(d.id, d);
    }

    /// Its fire record is durable: delivered.
    pub(crate) fn fired(&self, id: u64) {
        let mut g = self.inner.lock();
        if let Some(d) = g.live.remove(&id) {
            g.due.remove(&(d.deliver_at_ms, id));
        }
        g.fired.insert(id);
        g.dirty.insert(id);
    }

    /// The oldest pending delayed message (its id is its record's log offset): retention
    /// must keep its record until it fired.
    pub(crate) fn oldest_pending(&self) -> Option<u64> {
        self.inner.lock().live.keys().min().copied()
    }

    /// Persisted ones that recovery found past the end of the log (lost before they were
    /// durable) are dropped.
    pub(crate) fn forget_beyond(&self, log_end: u64) {
        let mut g = self.inner.lock();
        let gone: Vec<u64> = g.live.keys().copied().filter(|&id| id >= log_end).collect();
        for id in gone {
            if let Some(d) = g.live.remove(&id) {
                g.due.remove(&(d.deliver_at_ms, id));
                g.dirty.insert(id);
            }
        }
    }

    /// Take up to `max` messages due at `now_ms`, soonest first. They stay pending until
    /// [`DelayedIndex::fired`]; one that could not be delivered goes back with
    /// [`DelayedIndex::retry`].
    pub(crate) fn take_due(&self, now_ms: u64, max: usize) -> Vec<DelayedInfo> {
        let mut g = self.inner.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&(at, id)) = g.due.first() else {
                break;
            };
            if at > now_ms {
                break;
            }
            g.due.remove(&(at, id));
            if let Some(d) = g.live.get(&id) {
                out.push(d.clone());
            }
        }
        out
    }

    /// Deliver `d` again later (its delivery failed).
    pub(crate) fn retry(&self, d: &DelayedInfo, at_ms: u64) {
        let mut g = self.inner.lock();
        if g.live.contains_key(&d.id) {
            g.due.insert((at_ms, d.id));
        }
    }

    /// When the next one is due.
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.inner.lock().due.first().map(|&(at, _)| at)
    }

    /// Delayed messages not delivered yet.
    pub(crate) fn pending(&self) -> u64 {
        self.inner.lock().live.len() as u64
    }

    /// Write what changed since the last call to sled (before a checkpoint).
    pub(crate) fn persist(&self, meta: &Meta) -> Result<()> {
        let mut g = self.inner.lock();
        if g.dirty.is_empty() {
            return Ok(());
        }
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        for id in &g.dirty {
            match g.live.get(id) {
                Some(d) => puts.push(d.clone()),
                None if g.in_sled.contains(id) => removes.push(*id),
                None => {}
            }
        }
        meta.apply_delayed_changes(&puts, &removes)?;
        for d in &puts {
            g.in_sled.insert(d.id);
        }
        for id in &removes {
            g.in_sled.remove(id);
        }
        g.dirty.clear();
        Ok(())
    }
}

/// Messages to the timer thread.
pub(crate) enum Msg {
    /// Something may be due earlier than planned.
    Wake,
    /// Shut down.
    Stop,
}

/// The running timer thread.
pub(crate) type DelayThread = Worker<Msg>;

/// The longest the timer sleeps, so that it notices a dropped broker promptly.
const IDLE_MAX: Duration = Duration::from_millis(500);
/// Wait before retrying a delivery that failed (say, on a full disk).
const RETRY_AFTER_MS: u64 = 1000;
/// Deliveries per round, so that a stop request is noticed between rounds.
const ROUND_MAX: usize = 1024;

/// Start the timer thread of `broker`.
pub(crate) fn spawn(broker: Weak<Broker>) -> Result<DelayThread> {
    Worker::spawn("halfmq-delayed", || Msg::Stop, move |rx, _| run(broker, rx))
}

fn run(broker: Weak<Broker>, rx: Receiver<Msg>) {
    loop {
        let sleep = {
            let Some(b) = broker.upgrade() else {
                return;
            };
            let now = now_ms();
            let due = b.delayed_index().take_due(now, ROUND_MAX);
            let full = due.len() == ROUND_MAX;
            for d in due {
                if let Err(e) = b.deliver_delayed(&d) {
                    tracing::error!(id = d.id, topic = %d.topic, error = %e, "could not deliver a delayed message; will retry");
                    b.delayed_index().retry(&d, now + RETRY_AFTER_MS);
                    if matches!(e, Error::Closed | Error::Poisoned(_)) {
                        // The store will not take writes again: stop trying.
                        return;
                    }
                }
            }
            if full {
                Duration::ZERO
            } else {
                match b.delayed_index().next_due_ms() {
                    Some(at) => Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE_MAX),
                    None => IDLE_MAX,
                }
            }
        };
        match rx.recv_timeout(sleep) {
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
        }
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
