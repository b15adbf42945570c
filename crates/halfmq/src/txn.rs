//! Transactional (half) messages.
//!
//! ```text
//!                  send_half
//!                      │
//!                      ▼
//!   ┌───────────► PENDING ──── commit ────► COMMITTED (one Message record: outcome and
//!   │  re-arm         │ │                              visible message at once)
//!   │                 │ └───── rollback ──► ROLLED BACK (one TxnEnd record)
//!   │     check-back: unknown / no answer /
//!   │     no live producer, check_max times
//!   │                 ▼
//!   └────────── UNRESOLVED ── commit / rollback by hand ──► as above
//! ```
//!
//! - The transaction id is the log offset of the half record.
//! - Everything durable about a transaction is a record in the log; the index of pending
//!   halves here is derived from it, updated by the flusher in log order, persisted to sled
//!   before every checkpoint, and rebuilt on open from sled plus the log after the checkpoint.
//! - Check bookkeeping (checks so far, next check, last answer) is written to sled after
//!   every check, so a restart resumes with the right counts and deadlines.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::meta::Meta;
use crate::schedule::{Due, Pending};
use halfmq_types::error::{Error, Result};
use halfmq_types::{Outcome, TxnInfo, TxnState};

struct Entry {
    info: TxnInfo,
    /// A check is running.
    in_flight: bool,
    /// A commit or rollback is being written.
    resolving: Option<Outcome>,
}

impl Entry {
    fn new(info: TxnInfo) -> Entry {
        Entry {
            info,
            in_flight: false,
            resolving: None,
        }
    }
}

/// The maps are keyed by log offsets (chosen by the broker, not by clients), so they use
/// foldhash, several times faster than the default SipHash; `live` is updated on the flusher.
type Fast = foldhash::fast::RandomState;

#[derive(Default)]
struct Inner {
    /// The unfinished transactions; due at `next_check_ms` while pending and neither being
    /// checked nor resolved.
    pending: Pending<Entry, Fast>,
    /// Outcomes not yet persisted to sled.
    outcomes: HashMap<u64, (Outcome, u64), Fast>,
}

impl Due for Entry {
    fn due_ms(&self) -> u64 {
        self.info.next_check_ms
    }
}

/// What `begin_resolve` decided.
pub(crate) enum Begin {
    /// Write the outcome record for this half.
    Write(TxnInfo),
    /// The same outcome is already recorded: nothing to do.
    Done,
}

/// The index of unfinished transactions. See the module docs.
pub(crate) struct TxnIndex {
    inner: Mutex<Inner>,
    resolved: Condvar,
}

impl TxnIndex {
    pub(crate) fn new() -> TxnIndex {
        TxnIndex {
            inner: Mutex::new(Inner::default()),
            resolved: Condvar::new(),
        }
    }

    /// Load the persisted unfinished transactions (before recovery replays the log). Whether
    /// one of them has an outcome in sled is decided by [`TxnIndex::settle_loaded`], once
    /// the end of the log is known: an outcome at or past it belongs to a log that was lost,
    /// and must not finish a new half that got its id.
    pub(crate) fn load(&self, meta: &Meta) -> Result<()> {
        let mut g = self.inner.lock();
        for info in meta.txn_halves()? {
            g.pending.in_sled.insert(info.txn_id);
            if info.state == TxnState::Pending {
                g.pending.due.insert(info.next_check_ms, info.txn_id);
            }
            g.pending.live.insert(info.txn_id, Entry::new(info));
        }
        Ok(())
    }

    /// Forget everything (before a rebuild from the log replaces what was loaded).
    pub(crate) fn clear(&self) {
        *self.inner.lock() = Inner::default();
    }

    /// The oldest unfinished transaction (its id is its half's log offset): retention must
    /// keep its half.
    pub(crate) fn oldest_pending(&self) -> Option<u64> {
        self.inner.lock().pending.oldest()
    }

    /// Forget persisted transactions at or past `log_end`: the log does not have them.
    pub(crate) fn forget_beyond(&self, log_end: u64) {
        for txn in self.inner.lock().pending.forget_at_or_past(log_end) {
            tracing::warn!(
                txn,
                "persisted transaction is not in the log (lost before it was durable); dropped"
            );
        }
    }

    /// After recovery: forget outcomes in sled at or past `log_end` (ids are log offsets, so
    /// after a loss of the log's end they would be handed out again: see
    /// [`Meta::fence_outcomes_from`]), then finish the unfinished transactions that have an
    /// outcome in sled (resolved, but the cleanup did not reach sled before a stop). Returns
    /// how many outcomes were forgotten.
    pub(crate) fn settle_loaded(&self, meta: &Meta, log_end: u64) -> Result<u64> {
        let fenced = meta.fence_outcomes_from(log_end)?;
        let mut g = self.inner.lock();
        // Only halves loaded from sled can have an outcome there (replayed ones are newer
        // than every outcome sled holds for this log).
        let ids: Vec<u64> = g
            .pending
            .live
            .keys()
            .filter(|id| g.pending.in_sled.contains(id))
            .copied()
            .collect();
        for txn in ids {
            if g.outcomes.contains_key(&txn) || meta.txn_outcome(txn)?.is_none() {
                continue;
            }
            g.pending.remove(txn);
        }
        Ok(fenced)
    }

    /// A half record is durable (live path or recovery replay).
    pub(crate) fn insert_half(&self, info: TxnInfo) {
        let mut g = self.inner.lock();
        if g.outcomes.contains_key(&info.txn_id) {
            return; // replayed, and finished later in the replay
        }
        if let Some(e) = g.pending.live.get(&info.txn_id) {
            let same = (
                &e.info.topic,
                &e.info.key,
                &e.info.producer_group,
                e.info.size,
            ) == (&info.topic, &info.key, &info.producer_group, info.size);
            if same {
                return; // replayed over persisted state that already has it (with its checks)
            }
            // The log is the truth: persisted state for this id describes another record.
            tracing::warn!(
                txn = info.txn_id,
                "persisted transaction state did not match the log; replaced"
            );
            let old = e.info.next_check_ms;
            g.pending.due.remove(old, info.txn_id);
        }
        g.pending.due.insert(info.next_check_ms, info.txn_id);
        g.pending.dirty.insert(info.txn_id);
        g.pending.live.insert(info.txn_id, Entry::new(info));
    }

    /// An outcome record is durable (live path or recovery replay).
    pub(crate) fn resolve(&self, txn: u64, outcome: Outcome, at_ms: u64) {
        let mut g = self.inner.lock();
        g.pending.remove(txn);
        g.outcomes.insert(txn, (outcome, at_ms));
        drop(g);
        self.resolved.notify_all();
    }

    /// Claim the right to write `outcome` for `txn`, or learn that it is not needed or not
    /// allowed.
    pub(crate) fn begin_resolve(&self, txn: u64, outcome: Outcome, meta: &Meta) -> Result<Begin> {
        let mut g = self.inner.lock();
        loop {
            if let Some(e) = g.pending.live.get_mut(&txn) {
                match e.resolving {
                    None => {
                        e.resolving = Some(outcome);
                        let info = e.info.clone();
                        g.pending.due.remove(info.next_check_ms, txn);
                        return Ok(Begin::Write(info));
                    }
                    Some(o) if o != outcome => {
                        return Err(Error::TxnConflict {
                            txn,
                            stands: o.as_str(),
                        });
                    }
                    // The same outcome is being written by someone else: wait for it.
                    Some(_) => self.resolved.wait(&mut g),
                }
                continue;
            }
            let known = match g.outcomes.get(&txn) {
                Some(&(o, _)) => Some(o),
                None => meta.txn_outcome(txn)?.map(|(o, _)| o),
            };
            return match known {
                Some(o) if o == outcome => Ok(Begin::Done),
                Some(o) => Err(Error::TxnConflict {
                    txn,
                    stands: o.as_str(),
                }),
                None => Err(Error::UnknownTxn(txn)),
            };
        }
    }

    /// Writing the outcome failed: the transaction is unfinished again.
    pub(crate) fn abort_resolve(&self, txn: u64) {
        let mut g = self.inner.lock();
        if let Some(e) = g.pending.live.get_mut(&txn) {
            e.resolving = None;
            if e.info.state == TxnState::Pending && !e.in_flight {
                let at = e.info.next_check_ms;
                g.pending.due.insert(at, txn);
            }
        }
        drop(g);
        self.resolved.notify_all();
    }

    /// Up to `max` pending transactions whose check is due at `now_ms`, marked in flight.
    /// Costs in proportion to the number returned, not to the number pending.
    pub(crate) fn take_due(&self, now_ms: u64, max: usize) -> Vec<TxnInfo> {
        let mut g = self.inner.lock();
        g.pending.take_due(now_ms, max, |e| {
            e.in_flight = true;
            e.info.clone()
        })
    }

    /// Up to `max` pending transactions whose check is due at `now_ms`, soonest first,
    /// leaving out those `skip` names, and *not* marked in flight: for a check-back driven
    /// from outside the broker, which keeps its own checks in flight (a replicated cluster's
    /// leader, whose marks would otherwise outlive its leadership). Costs in proportion to
    /// the number due.
    pub(crate) fn due_unmarked(
        &self,
        now_ms: u64,
        max: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Vec<TxnInfo> {
        let g = self.inner.lock();
        g.pending
            .due
            .due(now_ms)
            .filter(|&id| !skip(id))
            .filter_map(|id| g.pending.live.get(&id).map(|e| e.info.clone()))
            .take(max)
            .collect()
    }

    /// Up to `max` pending transactions of `group` whose last check found no checker of the
    /// group ([`NO_LIVE_PRODUCER`](crate::NO_LIVE_PRODUCER)), oldest first, neither being
    /// checked nor resolved, leaving out those `skip` names: to be asked at once, now that a
    /// checker of the group registered, rather than at their next check, which the backoff
    /// may have put minutes away. With `mark`, each is taken off the schedule and marked in
    /// flight, as [`TxnIndex::take_due`] does; without, left as it is (a check-back driven
    /// from outside, as in [`TxnIndex::due_unmarked`]). Costs in proportion to the number
    /// pending; it runs once per registration, not per round.
    pub(crate) fn waiting_for_producer(
        &self,
        group: &str,
        max: usize,
        skip: impl Fn(u64) -> bool,
        mark: bool,
    ) -> Vec<TxnInfo> {
        let mut g = self.inner.lock();
        let mut ids: Vec<u64> = g
            .pending
            .live
            .iter()
            .filter(|(&id, e)| {
                e.info.state == TxnState::Pending
                    && !e.in_flight
                    && e.resolving.is_none()
                    && e.info.producer_group == group
                    && e.info.last_answer.as_deref() == Some(crate::NO_LIVE_PRODUCER)
                    && !skip(id)
            })
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids.truncate(max);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(e) = g.pending.live.get_mut(&id) else {
                continue; // listed just above, under the same lock
            };
            let at = e.info.next_check_ms;
            if mark {
                e.in_flight = true;
            }
            out.push(e.info.clone());
            if mark {
                g.pending.due.remove(at, id);
            }
        }
        out
    }

    /// When the earliest pending check is due.
    pub(crate) fn next_due_ms(&self) -> Option<u64> {
        self.inner.lock().pending.due.next_due_ms()
    }

    /// A check ended without resolving the transaction (unknown, no answer, no producer).
    /// Counts it, schedules the next one or marks the transaction unresolved, and returns
    /// the new state to persist (None if the transaction finished meanwhile).
    pub(crate) fn check_failed(
        &self,
        txn: u64,
        answer: &str,
        now_ms: u64,
        cfg: &crate::config::TxnConfig,
    ) -> Option<TxnInfo> {
        let mut g = self.inner.lock();
        let e = g.pending.live.get_mut(&txn)?;
        e.in_flight = false;
        if e.resolving.is_some() {
            return None;
        }
        let info = &mut e.info;
        // Off the schedule at its old time: a check taken by `take_due` is already, but one
        // made from outside (`due_unmarked`, or recorded on a node that did not ask) is not.
        let old = info.next_check_ms;
        info.checks += 1;
        info.last_check_ms = now_ms;
        info.last_answer = Some(answer.to_owned());
        if info.checks >= cfg.check_max {
            info.state = TxnState::Unresolved;
            tracing::warn!(
                txn, topic = %info.topic, key = %info.key, group = %info.producer_group,
                checks = info.checks, last_answer = answer,
                "transaction is UNRESOLVED after the maximum number of check-backs; \
                 it stays stored and listed: commit, roll back or re-arm it by hand"
            );
        } else {
            info.next_check_ms = now_ms + backoff_ms(cfg, info.checks);
        }
        let info = info.clone();
        g.pending.due.remove(old, txn);
        if info.state == TxnState::Pending {
            g.pending.due.insert(info.next_check_ms, txn);
        }
        Some(info)
    }

    /// A check ended in commit or rollback (being written by the caller).
    pub(crate) fn check_answered(&self, txn: u64) {
        if let Some(e) = self.inner.lock().pending.live.get_mut(&txn) {
            e.in_flight = false;
        }
    }

    /// Make an unresolved (or pending) transaction due for checking now, with its count
    /// reset. Returns its new state to persist.
    pub(crate) fn rearm(&self, txn: u64, now_ms: u64) -> Option<TxnInfo> {
        let mut g = self.inner.lock();
        let e = g.pending.live.get_mut(&txn)?;
        let old = e.info.next_check_ms;
        e.info.state = TxnState::Pending;
        e.info.checks = 0;
        e.info.next_check_ms = now_ms;
        let info = e.info.clone();
        let free = e.resolving.is_none() && !e.in_flight;
        g.pending.due.remove(old, txn);
        if free {
            g.pending.due.insert(now_ms, txn);
        }
        Some(info)
    }

    /// The outcome of a finished transaction, if still remembered.
    pub(crate) fn finished(&self, txn: u64, meta: &Meta) -> Result<Option<Outcome>> {
        if let Some(&(o, _)) = self.inner.lock().outcomes.get(&txn) {
            return Ok(Some(o));
        }
        Ok(meta.txn_outcome(txn)?.map(|(o, _)| o))
    }

    /// An unfinished transaction.
    pub(crate) fn get(&self, txn: u64) -> Option<TxnInfo> {
        self.inner
            .lock()
            .pending
            .live
            .get(&txn)
            .map(|e| e.info.clone())
    }

    /// The unfinished transactions in `state` (all if None), oldest first.
    pub(crate) fn list(&self, state: Option<TxnState>) -> Vec<TxnInfo> {
        let g = self.inner.lock();
        let mut out: Vec<TxnInfo> = g
            .pending
            .live
            .values()
            .filter(|e| state.is_none_or(|s| e.info.state == s))
            .map(|e| e.info.clone())
            .collect();
        out.sort_by_key(|i| i.txn_id);
        out
    }

    /// (pending, unresolved) counts.
    pub(crate) fn counts(&self) -> (u64, u64) {
        let g = self.inner.lock();
        let unresolved = g
            .pending
            .live
            .values()
            .filter(|e| e.info.state == TxnState::Unresolved)
            .count() as u64;
        (g.pending.live.len() as u64 - unresolved, unresolved)
    }

    /// Write everything changed since the last call to sled, and forget outcomes older than
    /// the retention. Runs before every checkpoint, with the checkpoint's log offset as the
    /// `stamp` written with it (see [`Meta::apply_txn_changes`]).
    pub(crate) fn persist(
        &self,
        meta: &Meta,
        retention: Duration,
        now_ms: u64,
        stamp: Option<u64>,
    ) -> Result<()> {
        let mut g = self.inner.lock();
        if g.pending.dirty.is_empty() && g.outcomes.is_empty() && stamp.is_none() {
            return Ok(());
        }
        let (puts, removes) = g.pending.changes(|e| e.info.clone());
        let outcomes: Vec<(u64, Outcome, u64)> =
            g.outcomes.iter().map(|(&t, &(o, at))| (t, o, at)).collect();
        let prune_before = now_ms.saturating_sub(retention.as_millis() as u64);
        meta.apply_txn_changes(&puts, &removes, &outcomes, prune_before, stamp)?;
        g.pending.persisted(puts.iter().map(|p| p.txn_id), &removes);
        g.outcomes.clear();
        Ok(())
    }

    /// Persist one transaction's check bookkeeping right away, unless it finished meanwhile
    /// (checked under the same lock that `resolve` takes, so a finished transaction is
    /// never written back).
    pub(crate) fn persist_checks(&self, meta: &Meta, infos: &[TxnInfo]) -> Result<()> {
        let mut g = self.inner.lock();
        let still: Vec<TxnInfo> = infos
            .iter()
            .filter(|i| g.pending.live.contains_key(&i.txn_id))
            .cloned()
            .collect();
        if still.is_empty() {
            return Ok(());
        }
        meta.apply_txn_changes(&still, &[], &[], 0, None)?;
        for i in &still {
            g.pending.in_sled.insert(i.txn_id);
        }
        Ok(())
    }
}

/// Wait before check number `checks + 1`, after `checks` failed ones.
pub(crate) fn backoff_ms(cfg: &crate::config::TxnConfig, checks: u32) -> u64 {
    let base = cfg.check_interval.as_millis() as u64;
    let max = cfg.check_backoff_max.as_millis() as u64;
    let shift = checks.saturating_sub(1).min(20);
    base.saturating_mul(1u64 << shift).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = crate::config::TxnConfig {
            check_interval: Duration::from_millis(100),
            check_backoff_max: Duration::from_millis(1000),
            ..Default::default()
        };
        let waits: Vec<u64> = (1..7).map(|c| backoff_ms(&cfg, c)).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
    }
}
