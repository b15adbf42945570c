//! [`Checkers`]: the transaction checkers registered per producer group, each check asking
//! one of a group's checkers in turn. The broker keeps one for its own check-back thread; a
//! replicated cluster's node keeps one for its leader's check-back loop (it outlives the
//! node's broker, which a snapshot install replaces).
//!
//! It also remembers the groups a checker registered for since the check-back loop last
//! looked ([`Checkers::take_arrived`]): the loop asks such a group at once about its halves
//! whose last check found no producer of the group ([`NO_LIVE_PRODUCER`]), instead of
//! leaving them to their next scheduled check, which the backoff may have put minutes away.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use halfmq_types::TransactionChecker;

/// The answer recorded for a check that found no checker registered for the half's group.
pub const NO_LIVE_PRODUCER: &str = "no live producer of the group";

/// A registered checker: (registration id, checker).
type Registered = (u64, Arc<dyn TransactionChecker>);

/// Checkers by producer group.
pub struct Checkers {
    by_group: RwLock<HashMap<String, Vec<Registered>>>,
    /// Groups a checker registered for since the last [`Checkers::take_arrived`] (a set:
    /// bounded by the number of groups, however often producers reconnect).
    arrived: Mutex<HashSet<String>>,
    next_id: AtomicU64,
    turn: AtomicUsize,
}

impl Default for Checkers {
    fn default() -> Checkers {
        Checkers {
            by_group: RwLock::new(HashMap::new()),
            arrived: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            turn: AtomicUsize::new(0),
        }
    }
}

impl Checkers {
    /// Add `checker` for `producer_group`: its id for [`Checkers::unregister`]. The group's
    /// name is not checked here (the broker checks it before).
    pub fn register(&self, producer_group: &str, checker: Arc<dyn TransactionChecker>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.by_group
            .write()
            .entry(producer_group.to_owned())
            .or_default()
            .push((id, checker));
        self.arrived.lock().insert(producer_group.to_owned());
        id
    }

    /// The groups a checker registered for since the last call, each once.
    pub fn take_arrived(&self) -> Vec<String> {
        let mut arrived = self.arrived.lock();
        if arrived.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut *arrived).into_iter().collect()
    }

    /// Remove the checker registered as `id` (nothing if there is none).
    pub fn unregister(&self, producer_group: &str, id: u64) {
        let mut all = self.by_group.write();
        if let Some(v) = all.get_mut(producer_group) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                all.remove(producer_group);
            }
        }
    }

    /// One of `producer_group`'s checkers, in turn; `None` without one.
    pub fn get(&self, producer_group: &str) -> Option<Arc<dyn TransactionChecker>> {
        let all = self.by_group.read();
        let v = all.get(producer_group)?;
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % v.len();
        Some(v[i].1.clone())
    }
}
