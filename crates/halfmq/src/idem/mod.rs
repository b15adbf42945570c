//! Idempotency keys: a producer names a send, and a retried send with the same name is not
//! stored again.
//!
//! A message (or half message) carries its key as the reserved property
//! [`PROP_IDEMPOTENCY_KEY`], so the key is in its log record and travels over the wire inside
//! the ordinary message encoding. Keys are scoped to a topic, and plain sends and half
//! messages have separate scopes.
//!
//! The index here maps each remembered key to the record that was stored for it (log offset
//! and size); the receipt a duplicate gets is read back from that record.
//!
//! - **One store per key.** A sender *reserves* the key before it appends. A second sender
//!   with the same key waits for the first one's outcome: once the first record is
//!   acknowledged it gets the original; if the first append fails (or an async send is
//!   cancelled before its record reached the log), the reservation is released and the
//!   waiter tries as the new owner. The reservation lives inside the store's hook for the
//!   record, so it ends exactly when the record's fate is known: the hook runs (stored) or is
//!   dropped unrun (never acknowledged).
//! - **In step with the log, off the flusher.** The hook runs on the flusher, in log order,
//!   before the sender is released; it only hands the record over (a push onto a list), and
//!   whoever locks the index next applies the list in order (the flusher is the group-commit
//!   thread every writer waits for, so it does no hashing or bookkeeping here). A sender
//!   waiting for another's key counts itself before its last look, so a hand-over it missed
//!   wakes it. A background thread writes the entries of durable records to sled every
//!   200 ms (`idem_chunks`), and before every checkpoint the rest is written, so
//!   the checkpoint (which stalls writers) has little left to do. On open, the chunks are
//!   loaded and the log after the checkpoint is replayed (an entry found in both is one
//!   entry). A checkpoint is only written once everything before it is acknowledged and its
//!   hooks have run, so every acknowledged keyed record is either before the checkpoint
//!   (then its entry is in sled) or after it (then replay finds it).
//! - **Bounded.** An entry is forgotten `window` after it was stored, or earlier when more
//!   than `keys_max` keys or `bytes_max` bytes are remembered (oldest first). A chunk is
//!   removed from sled once every entry in it is forgotten.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use halfmq_types::clock::SharedClock;
use halfmq_types::counted::Counted;
use parking_lot::{Condvar, Mutex};
use tokio::sync::Notify;

mod persist;

use halfmq_store::record::Properties;
use halfmq_types::error::{Error, Result};
use halfmq_types::message::IDEMPOTENCY_KEY_BYTES_MAX;
use halfmq_types::props::PROP_IDEMPOTENCY_KEY;

/// What one remembered key costs beyond its bytes, for `dedup_bytes_max`.
pub const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// The idempotency key a message carries, checked; `None` when it has none.
pub fn key_of(props: &Properties) -> Result<Option<&str>> {
    let Some(k) = props.get(PROP_IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    if k.is_empty() || k.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(Error::Invalid {
            what: "idempotency key",
            reason: format!(
                "{} bytes: use 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes",
                k.len()
            ),
        });
    }
    Ok(Some(k))
}

/// Which scope a key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Space {
    /// Plain sends.
    Message,
    /// Half messages.
    Half,
    /// Delayed messages (their `Delayed` record; the message delivered later has no key).
    Delayed,
}

/// The index's name for `key` in `topic` and `space`.
pub(crate) fn index_key(space: Space, topic: &str, key: &str) -> Arc<str> {
    let tag = match space {
        Space::Message => 'm',
        Space::Half => 'h',
        Space::Delayed => 'd',
    };
    let mut s = String::with_capacity(2 + topic.len() + key.len());
    s.push(tag);
    s.push_str(topic);
    s.push('\0');
    s.push_str(key);
    Arc::from(s)
}

/// The record stored for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Stored {
    /// Log offset of the record (for a half: its transaction id).
    pub log_offset: u64,
    /// Encoded size of the record.
    pub size: u32,
    /// When it was stored (the record's timestamp), ms since the Unix epoch.
    pub stored_ms: u64,
}

enum Slot {
    /// A sender is appending a record for this key.
    Reserved {
        owner: u64,
        /// Someone waits for the outcome.
        waiters: bool,
    },
    /// Remembered: `seq` is its place in the eviction order.
    Stored { at: Stored, seq: u64 },
}

/// One entry in the eviction order. Entries whose key now maps to something else are stale
/// and skipped.
struct Item {
    seq: u64,
    key: Arc<str>,
}

#[derive(Default)]
struct Inner {
    /// foldhash: several times faster than the default SipHash for short keys, and seeded
    /// per process, so keys chosen by clients cannot be aimed at one bucket in advance.
    map: HashMap<Arc<str>, Slot, foldhash::fast::RandomState>,
    /// Stored entries, oldest first (by `seq`).
    order: VecDeque<Item>,
    next_seq: u64,
    /// Stored entries and their accounted bytes.
    live: u64,
    bytes: u64,
    /// The buffer [`DedupIndex::settle`] swaps with `completed` (kept for its allocation).
    settling: Vec<(Arc<str>, Stored)>,
    /// Stored since the last persist: (seq, key, record).
    unpersisted: Vec<(u64, Arc<str>, Stored)>,
    /// Chunks in sled, oldest first: (id, seq just past their last entry).
    chunks: VecDeque<(u64, u64)>,
    next_chunk: u64,
    next_owner: u64,
}

/// Window and bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// ms an entry is remembered.
    pub window_ms: u64,
    /// Most entries.
    pub keys_max: u64,
    /// Most accounted bytes.
    pub bytes_max: u64,
}

impl Limits {
    pub(crate) fn of(cfg: &crate::config::BrokerConfig) -> Limits {
        Limits {
            window_ms: u64::try_from(cfg.dedup_window.as_millis()).unwrap_or(u64::MAX),
            keys_max: cfg.dedup_keys_max,
            bytes_max: cfg.dedup_bytes_max,
        }
    }
}

fn cost(key: &str) -> u64 {
    key.len() as u64 + ENTRY_OVERHEAD_BYTES
}

/// What a claim found.
pub(crate) enum Claim {
    /// The key is remembered: this record was stored for it.
    Duplicate(Stored),
    /// The caller owns the key until the reservation is completed or dropped.
    Owner(Reservation),
}

enum Step {
    Duplicate(Stored),
    Owner(u64),
    Wait,
}

/// The index of remembered idempotency keys. See the module docs.
pub(crate) struct DedupIndex {
    inner: Mutex<Inner>,
    /// Records acknowledged by the flusher and not yet applied to `inner`, in log order.
    /// The flusher (which every writer waits for) only pushes here; whoever locks the index
    /// next applies them ([`DedupIndex::settle`]).
    completed: Mutex<Vec<(Arc<str>, Stored)>>,
    /// Senders asleep (or about to sleep) until another sender's outcome is known.
    waiting: AtomicUsize,
    /// Held by the one [`DedupIndex::persist_below`] running.
    persisting: Mutex<()>,
    /// Sync senders waiting for another sender's outcome.
    changed: Condvar,
    /// Async senders waiting for the same.
    changed_async: Notify,
    limits: Limits,
    /// Decides the window (the broker's clock).
    clock: SharedClock,
}

impl DedupIndex {
    pub(crate) fn new(limits: Limits, clock: SharedClock) -> DedupIndex {
        DedupIndex {
            inner: Mutex::new(Inner::default()),
            completed: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            persisting: Mutex::new(()),
            changed: Condvar::new(),
            changed_async: Notify::new(),
            limits,
            clock,
        }
    }

    fn expired(&self, at: &Stored, now_ms: u64) -> bool {
        now_ms.saturating_sub(at.stored_ms) >= self.limits.window_ms
    }

    fn step(&self, g: &mut Inner, key: &Arc<str>, now_ms: u64) -> Step {
        match g.map.get_mut(key) {
            Some(Slot::Stored { at, .. }) if !self.expired(at, now_ms) => {
                return Step::Duplicate(*at)
            }
            Some(Slot::Reserved { waiters, .. }) => {
                *waiters = true;
                return Step::Wait;
            }
            Some(Slot::Stored { .. }) => {
                // Expired: forget it now (its place in the order becomes stale).
                if let Some(Slot::Stored { .. }) = g.map.remove(key) {
                    g.live -= 1;
                    g.bytes -= cost(key);
                }
            }
            None => {}
        }
        g.next_owner += 1;
        let owner = g.next_owner;
        g.map.insert(
            key.clone(),
            Slot::Reserved {
                owner,
                waiters: false,
            },
        );
        Step::Owner(owner)
    }

    /// Apply the completions the flusher handed over, in log order.
    fn settle(&self, g: &mut Inner) {
        std::mem::swap(&mut g.settling, &mut *self.completed.lock());
        if g.settling.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut g.settling);
        for (key, at) in done.drain(..) {
            self.insert_stored(g, key, at, true);
        }
        // Keep the (now empty) buffer's allocation for the next swap.
        g.settling = done;
        self.evict(g, self.clock.now_ms());
    }

    /// The index, locked, with every acknowledged record applied.
    fn locked(&self) -> parking_lot::MutexGuard<'_, Inner> {
        let mut g = self.inner.lock();
        self.settle(&mut g);
        g
    }

    /// Find `key`, or reserve it; waits (blocking) while another sender holds it.
    pub(crate) fn claim(self: &Arc<Self>, key: &Arc<str>) -> Claim {
        let mut g = self.inner.lock();
        let mut asleep = None;
        loop {
            self.settle(&mut g);
            let now = self.clock.now_ms();
            match self.step(&mut g, key, now) {
                Step::Duplicate(at) => return Claim::Duplicate(at),
                Step::Owner(owner) => return Claim::Owner(self.reservation(key, owner)),
                // Counted as waiting before the last look, so a completion pushed after that
                // look wakes us (see `complete`): look once more, then sleep.
                Step::Wait if asleep.is_none() => asleep = Some(Counted::new(&self.waiting)),
                Step::Wait => self.changed.wait(&mut g),
            }
        }
    }

    /// [`DedupIndex::claim`] for async code.
    pub(crate) async fn claim_async(self: &Arc<Self>, key: &Arc<str>) -> Claim {
        let mut asleep = None;
        loop {
            let changed = self.changed_async.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = self.clock.now_ms();
            let step = self.step(&mut self.locked(), key, now);
            match step {
                Step::Duplicate(at) => return Claim::Duplicate(at),
                Step::Owner(owner) => return Claim::Owner(self.reservation(key, owner)),
                // As in `claim`: counted before the last look. The count ends when this
                // future does, also when it is dropped while waiting.
                Step::Wait if asleep.is_none() => asleep = Some(Counted::new(&self.waiting)),
                Step::Wait => changed.await,
            }
        }
    }

    fn reservation(self: &Arc<Self>, key: &Arc<str>, owner: u64) -> Reservation {
        Reservation {
            index: self.clone(),
            key: key.clone(),
            owner,
            done: false,
        }
    }

    fn wake(&self) {
        self.changed.notify_all();
        self.changed_async.notify_waiters();
    }

    /// The owner's record is acknowledged: runs on the flusher, so it only hands the record
    /// over (the next lock of the index applies it).
    fn complete(&self, key: Arc<str>, at: Stored) {
        self.completed.lock().push((key, at));
        // A waiter counts itself, then looks (locking `completed`), then sleeps, all under
        // the index lock. So either its look saw this push, or its count is visible here
        // (the `completed` lock orders the two). Taking the index lock before waking means a
        // sync waiter that counted is already asleep on the condvar.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            drop(self.inner.lock());
            self.wake();
        }
    }

    /// The owner's record will not be acknowledged: free the key.
    fn release(&self, key: &Arc<str>, owner: u64) {
        let mut g = self.inner.lock();
        let waiters = match g.map.get(key) {
            Some(Slot::Reserved { owner: o, waiters }) if *o == owner => {
                let w = *waiters;
                g.map.remove(key);
                w
            }
            _ => false,
        };
        drop(g);
        if waiters {
            self.wake();
        }
    }

    /// Remember `at` for `key` (replacing whatever was there).
    fn insert_stored(&self, g: &mut Inner, key: Arc<str>, at: Stored, persist: bool) {
        let c = cost(&key);
        match g.map.get(&key) {
            Some(Slot::Stored { at: old, .. }) if old.log_offset == at.log_offset => return,
            Some(Slot::Stored { .. }) => {
                g.live -= 1;
                g.bytes -= c;
            }
            _ => {}
        }
        let seq = g.next_seq;
        g.next_seq += 1;
        g.live += 1;
        g.bytes += c;
        g.order.push_back(Item {
            seq,
            key: key.clone(),
        });
        if persist {
            g.unpersisted.push((seq, key.clone(), at));
        }
        g.map.insert(key, Slot::Stored { at, seq });
    }

    /// Forget entries from the oldest while over a bound or expired.
    fn evict(&self, g: &mut Inner, now_ms: u64) {
        while let Some(front) = g.order.front() {
            let live = match g.map.get(&front.key) {
                Some(Slot::Stored { at, seq }) if *seq == front.seq => Some(*at),
                _ => None,
            };
            if let Some(at) = live {
                let over = g.live > self.limits.keys_max || g.bytes > self.limits.bytes_max;
                if !over && !self.expired(&at, now_ms) {
                    break;
                }
                let key = front.key.clone();
                g.map.remove(&key);
                g.live -= 1;
                g.bytes -= cost(&key);
            }
            g.order.pop_front();
        }
    }

    /// How many more keys, and bytes of them (each key's length plus
    /// [`ENTRY_OVERHEAD_BYTES`]), the index takes before it forgets keys for room rather than
    /// age. Keys held by senders still count as stored.
    pub(crate) fn room(&self) -> (u64, u64) {
        let g = self.locked();
        let held = g.map.len() as u64;
        (
            self.limits.keys_max.saturating_sub(held.max(g.live)),
            self.limits.bytes_max.saturating_sub(g.bytes),
        )
    }

    /// What is remembered for `key` (ignoring the window), for tests and tools.
    pub(crate) fn lookup(&self, key: &str) -> Option<Stored> {
        match self.locked().map.get(key) {
            Some(Slot::Stored { at, .. }) => Some(*at),
            _ => None,
        }
    }

    /// Log offset of the oldest remembered key's record, skipping keys past the window:
    /// retention keeps that record, because a duplicate send reads it back to answer with
    /// the original's receipt. Keys are stored in log order, so this walks only the
    /// forgotten or replaced entries at the front of the eviction order.
    pub(crate) fn oldest_log_offset(&self, now_ms: u64) -> Option<u64> {
        // Settled first: a key whose record became durable is applied before it is looked
        // for, so one handed over but not applied yet is never missed.
        let g = self.locked();
        for item in &g.order {
            if let Some(Slot::Stored { at, seq }) = g.map.get(&item.key) {
                if *seq == item.seq && !self.expired(at, now_ms) {
                    return Some(at.log_offset);
                }
            }
        }
        None
    }

    /// Remembered keys.
    pub(crate) fn len(&self) -> u64 {
        self.locked().live
    }

    /// Forget `key` if it still maps to the record at `log_offset` (that record turned out
    /// not to be the key's).
    pub(crate) fn forget(&self, key: &str, log_offset: u64) {
        let mut g = self.locked();
        if let Some(Slot::Stored { at, .. }) = g.map.get(key) {
            if at.log_offset == log_offset {
                g.map.remove(key);
                g.live -= 1;
                g.bytes -= cost(key);
            }
        }
    }
}

/// The right to store the one record of a key. Completing it remembers the record; dropping
/// it uncompleted frees the key for the next sender.
pub(crate) struct Reservation {
    index: Arc<DedupIndex>,
    key: Arc<str>,
    owner: u64,
    done: bool,
}

impl Reservation {
    /// A store hook that completes the reservation when the record is acknowledged, and
    /// releases it if the hook is dropped unrun.
    pub(crate) fn into_hook(self, size: u32, stored_ms: u64) -> halfmq_store::DurableHook {
        Box::new(move |log_offset| self.complete(log_offset, size, stored_ms))
    }

    /// The record is acknowledged at `log_offset`.
    pub(crate) fn complete(mut self, log_offset: u64, size: u32, stored_ms: u64) {
        self.done = true;
        self.index.complete(
            self.key.clone(),
            Stored {
                log_offset,
                size,
                stored_ms,
            },
        );
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.index.release(&self.key, self.owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halfmq_types::clock::{Clock, ManualClock};

    /// An index whose window is decided by `clock`.
    pub(super) fn index(l: Limits, clock: &ManualClock) -> Arc<DedupIndex> {
        Arc::new(DedupIndex::new(l, Arc::new(clock.clone())))
    }

    pub(super) fn limits(window_ms: u64, keys_max: u64) -> Limits {
        Limits {
            window_ms,
            keys_max,
            bytes_max: u64::MAX,
        }
    }

    pub(super) fn at(log_offset: u64, stored_ms: u64) -> Stored {
        Stored {
            log_offset,
            size: 100,
            stored_ms,
        }
    }

    pub(super) fn store(ix: &Arc<DedupIndex>, key: &Arc<str>, log_offset: u64, now: u64) {
        match ix.claim(key) {
            Claim::Owner(r) => r.complete(log_offset, 100, now),
            Claim::Duplicate(s) => panic!("{key} already stored at {}", s.log_offset),
        }
    }

    #[test]
    fn count_bound_forgets_the_oldest_first() {
        let clock = ManualClock::new(1_000_000);
        let ix = index(limits(u64::MAX, 2), &clock);
        let now = clock.now_ms();
        let keys: Vec<Arc<str>> = (0..3)
            .map(|i| index_key(Space::Message, "t", &format!("k{i}")))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            store(&ix, k, i as u64 * 100, now);
        }
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.lookup(&keys[0]), None);
        assert_eq!(ix.lookup(&keys[2]), Some(at(200, now)));
        assert!(matches!(ix.claim(&keys[1]), Claim::Duplicate(s) if s.log_offset == 100));
    }

    #[test]
    fn a_dropped_reservation_frees_the_key_and_expiry_ends_a_duplicate() {
        let clock = ManualClock::new(1_000_000);
        let ix = index(limits(60_000, 10), &clock);
        let t0 = clock.now_ms();
        let k = index_key(Space::Half, "t", "k");
        match ix.claim(&k) {
            Claim::Owner(r) => drop(r.into_hook(10, t0)),
            Claim::Duplicate(_) => panic!("empty index"),
        }
        store(&ix, &k, 64, t0);
        clock.set_ms(t0 + 59_999);
        assert!(matches!(ix.claim(&k), Claim::Duplicate(_)));
        // A window after it was stored, the key is free again.
        clock.set_ms(t0 + 60_000);
        assert!(matches!(ix.claim(&k), Claim::Owner(_)));
        assert_eq!(ix.len(), 0);
    }

    #[test]
    fn waiters_for_a_key_all_see_the_owner_completed_on_another_thread() {
        // Many rounds, to hit the window between a waiter's last look and its sleep.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        for round in 0..200u64 {
            let clock = ManualClock::new(1_000_000);
            let ix = index(limits(3_600_000, 1_000), &clock);
            let k = index_key(Space::Message, "t", &format!("k{round}"));
            let t0 = clock.now_ms();
            let Claim::Owner(owner) = ix.claim(&k) else {
                panic!("empty index");
            };
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..3 {
                let (ix1, k1, tx1) = (ix.clone(), k.clone(), tx.clone());
                std::thread::spawn(move || {
                    let _ = tx1.send(matches!(ix1.claim(&k1), Claim::Duplicate(_)));
                });
                let (ix, k, tx) = (ix.clone(), k.clone(), tx.clone());
                rt.spawn(async move {
                    let dup = matches!(ix.claim_async(&k).await, Claim::Duplicate(_));
                    let _ = tx.send(dup);
                });
            }
            // The "flusher": completes from yet another thread, at a random-ish moment.
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_micros(round % 7 * 50));
                owner.complete(round + 1, 100, t0);
            });
            for _ in 0..6 {
                let dup = rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("a waiter was never woken");
                assert!(dup, "round {round}: a waiter became owner of a stored key");
            }
            assert_eq!(ix.len(), 1);
            assert_eq!(ix.waiting.load(Ordering::SeqCst), 0);
        }
    }

    #[test]
    fn keys_are_scoped_by_topic_and_kind() {
        assert_ne!(
            index_key(Space::Message, "a", "k"),
            index_key(Space::Half, "a", "k")
        );
        assert_ne!(
            index_key(Space::Message, "a", "bk"),
            index_key(Space::Message, "ab", "k")
        );
    }
}
