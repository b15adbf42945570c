//! [`Checkers`]: the transaction checkers registered per producer group, each check asking
//! one of a group's checkers in turn. The broker keeps one for its own check-back thread; a
//! replicated cluster's node keeps one for its leader's check-back loop (it outlives the
//! node's broker, which a snapshot install replaces).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use halfmq_types::TransactionChecker;

/// A registered checker: (registration id, checker).
type Registered = (u64, Arc<dyn TransactionChecker>);

/// Checkers by producer group.
pub struct Checkers {
    by_group: RwLock<HashMap<String, Vec<Registered>>>,
    next_id: AtomicU64,
    turn: AtomicUsize,
}

impl Default for Checkers {
    fn default() -> Checkers {
        Checkers {
            by_group: RwLock::new(HashMap::new()),
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
        id
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
