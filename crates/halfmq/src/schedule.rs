//! What is due when: the ids of pending things ordered by the time they are due, kept by the
//! transaction index (next check), the delayed-message index (delivery time) and a consumer
//! group's leases (redelivery), so that a round costs in proportion to what is due, not to
//! what is pending. [`Pending`] is what the two indexes persisted to sled keep alike.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;

/// Ids by due time (ms since the Unix epoch); an id is in it at most once per time.
#[derive(Debug, Default)]
pub(crate) struct Schedule(BTreeSet<(u64, u64)>);

impl Schedule {
    /// `id` falls due at `at_ms`.
    pub(crate) fn insert(&mut self, at_ms: u64, id: u64) {
        self.0.insert((at_ms, id));
    }

    /// Whether `id` is scheduled at `at_ms`.
    pub(crate) fn contains(&self, at_ms: u64, id: u64) -> bool {
        self.0.contains(&(at_ms, id))
    }

    /// `id`, due at `at_ms`, is not scheduled any more.
    pub(crate) fn remove(&mut self, at_ms: u64, id: u64) {
        self.0.remove(&(at_ms, id));
    }

    /// When the soonest one falls due.
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.0.first().map(|&(at, _)| at)
    }

    /// The ids due at `now_ms`, soonest first, left on the schedule.
    pub(crate) fn due(&self, now_ms: u64) -> impl Iterator<Item = u64> + '_ {
        self.0
            .iter()
            .take_while(move |&&(at, _)| at <= now_ms)
            .map(|&(_, id)| id)
    }

    /// Take the soonest id that is due at `now_ms` off the schedule, with its due time.
    pub(crate) fn pop_due(&mut self, now_ms: u64) -> Option<(u64, u64)> {
        let &(at, id) = self.0.first()?;
        if at > now_ms {
            return None;
        }
        self.0.pop_first();
        Some((at, id))
    }
}

/// The ids in `map` at or past log offset `end`: state persisted for records that recovery
/// did not find in the log (lost before they were durable).
fn at_or_past<V, S>(map: &HashMap<u64, V, S>, end: u64) -> Vec<u64> {
    map.keys().copied().filter(|&id| id >= end).collect()
}

/// A pending thing's time in its index's [`Schedule`].
pub(crate) trait Due {
    /// When it is (or was, while taken off the schedule) due.
    fn due_ms(&self) -> u64;
}

/// The pending things of an index persisted to sled (the transactions, the delayed
/// messages), by id (their record's log offset): when each is due, and what the next
/// persist must write.
pub(crate) struct Pending<V, S = RandomState> {
    pub(crate) live: HashMap<u64, V, S>,
    /// (due time, id) of live ones that wait for their time (not those being worked on).
    pub(crate) due: Schedule,
    /// Ids changed since the last persist: rewritten, or removed from sled, by the next.
    pub(crate) dirty: BTreeSet<u64>,
    /// Ids that have an entry in sled (so that finishing them must remove it).
    pub(crate) in_sled: HashSet<u64, S>,
}

impl<V, S: Default> Default for Pending<V, S> {
    fn default() -> Self {
        Pending {
            live: HashMap::default(),
            due: Schedule::default(),
            dirty: BTreeSet::new(),
            in_sled: HashSet::default(),
        }
    }
}

impl<V: Due, S: BuildHasher> Pending<V, S> {
    /// The oldest one's id: retention must keep its record.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.live.keys().min().copied()
    }

    /// `id` is not pending any more (finished, or forgotten): take it out, off the schedule
    /// too, and mark it changed.
    pub(crate) fn remove(&mut self, id: u64) -> Option<V> {
        let v = self.live.remove(&id);
        if let Some(v) = &v {
            self.due.remove(v.due_ms(), id);
        }
        self.dirty.insert(id);
        v
    }

    /// Forget those at or past log offset `end` (see [`at_or_past`]); their ids.
    pub(crate) fn forget_at_or_past(&mut self, end: u64) -> Vec<u64> {
        let ids = at_or_past(&self.live, end);
        for &id in &ids {
            self.remove(id);
        }
        ids
    }

    /// Up to `max` live ones due at `now_ms`, soonest first, as `take` makes them (which
    /// may mark them being worked on); each is off the schedule until put back. Costs in
    /// proportion to the number returned, not to the number pending.
    pub(crate) fn take_due<T>(
        &mut self,
        now_ms: u64,
        max: usize,
        mut take: impl FnMut(&mut V) -> T,
    ) -> Vec<T> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some((_, id)) = self.due.pop_due(now_ms) else {
                break;
            };
            out.extend(self.live.get_mut(&id).map(&mut take));
        }
        out
    }

    /// What the next persist writes: each changed one still pending (as `put` makes its
    /// sled entry), and each changed one gone that has an entry in sled. Most finish
    /// between two persists and never get there.
    pub(crate) fn changes<P>(&self, put: impl Fn(&V) -> P) -> (Vec<P>, Vec<u64>) {
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        for id in &self.dirty {
            match self.live.get(id) {
                Some(v) => puts.push(put(v)),
                None if self.in_sled.contains(id) => removes.push(*id),
                None => {}
            }
        }
        (puts, removes)
    }

    /// The [`Pending::changes`] were written: sled has the ids `put` and not `removed`;
    /// nothing is changed since.
    pub(crate) fn persisted(&mut self, put: impl IntoIterator<Item = u64>, removed: &[u64]) {
        self.in_sled.extend(put);
        for id in removed {
            self.in_sled.remove(id);
        }
        self.dirty.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_only_what_is_due_soonest_first() {
        let mut s = Schedule::default();
        s.insert(300, 1);
        s.insert(100, 2);
        s.insert(200, 3);
        s.remove(200, 3);
        assert_eq!(s.next_due_ms(), Some(100));
        assert_eq!(s.pop_due(99), None);
        assert_eq!(s.due(250).collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.due(300).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(s.pop_due(300), Some((100, 2)));
        assert_eq!(s.pop_due(300), Some((300, 1)));
        assert_eq!(s.pop_due(u64::MAX), None);
        let m: HashMap<u64, ()> = [(5, ()), (10, ()), (20, ())].into();
        let mut ids = at_or_past(&m, 10);
        ids.sort();
        assert_eq!(ids, vec![10, 20]);
    }

    /// A pending thing that is due at its value.
    impl Due for u64 {
        fn due_ms(&self) -> u64 {
            *self
        }
    }

    fn pending(items: &[(u64, u64)]) -> Pending<u64> {
        let mut p = Pending::default();
        for &(id, at) in items {
            p.live.insert(id, at);
            p.due.insert(at, id);
            p.dirty.insert(id);
        }
        p
    }

    #[test]
    fn pending_ones_leave_the_schedule_with_their_entry_and_sled_follows_the_changes() {
        let mut p = pending(&[(10, 300), (20, 100), (30, 200)]);
        assert_eq!(p.oldest(), Some(10));
        let (puts, removes) = p.changes(|&at| at);
        assert_eq!((puts, removes), (vec![300, 100, 200], vec![]));
        p.persisted([10, 20, 30], &[]);
        assert!(p.dirty.is_empty());

        // Taken ones are off the schedule (a removal finds nothing there) but still live.
        assert_eq!(p.take_due(250, 10, |at| *at), vec![100, 200]);
        assert_eq!(p.remove(20), Some(100));
        assert_eq!(p.remove(20), None, "removed twice");
        assert_eq!(p.forget_at_or_past(30), vec![30]);
        assert_eq!(p.oldest(), Some(10));
        assert_eq!(p.due.next_due_ms(), Some(300));
        assert_eq!(p.take_due(u64::MAX, 10, |at| *at), vec![300]);

        // Gone ones that sled has are removed there; one sled never had is not.
        p.live.insert(40, 400);
        p.dirty.insert(40);
        p.remove(40);
        let (puts, removes) = p.changes(|&at| at);
        assert_eq!((puts, removes), (vec![], vec![20, 30]));
        p.persisted([], &[20, 30]);
        assert_eq!(p.in_sled, HashSet::from([10]));
    }
}
