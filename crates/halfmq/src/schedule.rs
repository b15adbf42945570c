//! What is due when: the ids of pending things ordered by the time they are due, kept by the
//! transaction index (next check), the delayed-message index (delivery time) and a consumer
//! group's leases (redelivery), so that a round costs in proportion to what is due, not to
//! what is pending.

use std::collections::{BTreeSet, HashMap};

/// Ids by due time (ms since the Unix epoch); an id is in it at most once per time.
#[derive(Debug, Default)]
pub(crate) struct Schedule(BTreeSet<(u64, u64)>);

impl Schedule {
    /// `id` falls due at `at_ms`.
    pub(crate) fn insert(&mut self, at_ms: u64, id: u64) {
        self.0.insert((at_ms, id));
    }

    /// `id`, due at `at_ms`, is not scheduled any more.
    pub(crate) fn remove(&mut self, at_ms: u64, id: u64) {
        self.0.remove(&(at_ms, id));
    }

    /// When the soonest one falls due.
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.0.first().map(|&(at, _)| at)
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
pub(crate) fn at_or_past<V, S>(map: &HashMap<u64, V, S>, end: u64) -> Vec<u64> {
    map.keys().copied().filter(|&id| id >= end).collect()
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
        assert_eq!(s.pop_due(300), Some((100, 2)));
        assert_eq!(s.pop_due(300), Some((300, 1)));
        assert_eq!(s.pop_due(u64::MAX), None);
        let m: HashMap<u64, ()> = [(5, ()), (10, ()), (20, ())].into();
        let mut ids = at_or_past(&m, 10);
        ids.sort();
        assert_eq!(ids, vec![10, 20]);
    }
}
