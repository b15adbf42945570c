//! What a store shares between its handles, its writers and its flusher thread: the writer
//! state under its lock, the flush progress watched without a lock, and the ways to wait for
//! that progress.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::batch::{Batch, DispatchBuf};
use crate::config::{FlushPolicy, StoreConfig};
use crate::consume_queue::QueueMap;
use crate::epoch;
use crate::hooks::{LogStartListener, StoreHooks};
use crate::io::Storage;
use crate::prepare;
use crate::segment::Segment;
use halfmq_types::error::{Error, Result};

/// The writers' side, under [`Shared::writer`]: where the next record goes, the batch being
/// gathered, and whether records are still taken.
pub(crate) struct Writer {
    pub(crate) active: Arc<Segment>,
    /// Next write position in `active`.
    pub(crate) pos: u64,
    pub(crate) batch: Batch,
    pub(crate) poisoned: Option<String>,
    pub(crate) closed: bool,
    /// Someone (close, `flush`) wants the flusher to sync now, even under async flush.
    pub(crate) sync_requested: bool,
    /// Group-commit gathering (sync flush only): how many records the flusher waits for
    /// before it syncs — as many as the last round released, since those writers are likely
    /// to come back at once — and for how long at most (half the last fsync's time).
    pub(crate) gather_target: u64,
    pub(crate) gather_wait: std::time::Duration,
    /// Log fsyncs counted at the last roll (or at open): how many syncs filled the active
    /// segment decides whether the next one is zero-filled ahead (see `crate::prepare`).
    pub(crate) syncs_at_roll: u64,
    /// When the active segment became active (the last roll, or the open): how long it took
    /// to fill decides too (see `crate::prepare::worth_it`).
    pub(crate) rolled_at: std::time::Instant,
    /// A round is being written, by the flusher or by a writer leading it
    /// (`flush::lead`): nobody else takes the batch until it is over.
    pub(crate) flushing: bool,
    /// The flusher was not woken for the batch's first record, whose writer may write the
    /// round itself; whoever waits on the flusher for this batch wakes it first.
    pub(crate) wake_owed: bool,
    /// A writer leading its round found a checkpoint due and left it to the flusher.
    pub(crate) checkpoint_due: bool,
    /// The last round's batch, cleared, for the next one to reuse its buffers.
    pub(crate) spare: Batch,
}

/// What the one writer of the log at a time (the flusher thread, or a writer leading its own
/// round, see `flush::lead`) keeps between rounds. Under [`Shared::flush`]; who may write a
/// round is decided under the writer lock ([`Writer::flushing`]), so this lock is never
/// contended and is never taken while the writer lock is held.
pub(crate) struct FlusherState {
    /// Consume-queue entries of records written but not yet durable (async flush), appended
    /// by the round that syncs them.
    pub(crate) dispatch: DispatchBuf,
    pub(crate) last_sync: Instant,
    /// How long the last fsync of the log took.
    pub(crate) last_sync_time: std::time::Duration,
    /// Log bytes written but not yet synced (async flush).
    pub(crate) unsynced_bytes: u64,
    /// Log bytes since the last checkpoint.
    pub(crate) since_checkpoint: u64,
    pub(crate) checkpoint_seq: u64,
    pub(crate) written: u64,
    pub(crate) durable: u64,
    /// The segment (its base) and the file position up to which `flush::zero_ahead` has
    /// written it, data or zeros.
    pub(crate) zeroed: (u64, u64),
}

impl FlusherState {
    /// The state of a store whose log is durable up to `end`, with checkpoint `checkpoint_seq`
    /// the newest written.
    pub(crate) fn new(end: u64, checkpoint_seq: u64) -> FlusherState {
        FlusherState {
            dispatch: DispatchBuf::default(),
            last_sync: Instant::now(),
            last_sync_time: std::time::Duration::ZERO,
            unsynced_bytes: 0,
            since_checkpoint: 0,
            checkpoint_seq,
            written: end,
            durable: end,
            zeroed: (u64::MAX, 0),
        }
    }
}

/// Flush progress, watched by waiting writers and pollers without a lock.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Everything before this log offset is written to the OS.
    pub(crate) written: AtomicU64,
    /// Everything before this log offset is durable.
    pub(crate) durable: AtomicU64,
    /// Group commits (log fsyncs) so far.
    pub(crate) syncs: AtomicU64,
    /// Records appended so far (SegmentEnd markers included).
    pub(crate) records: AtomicU64,
    /// Consume-queue entries found damaged by a read and rebuilt from the log since open
    /// (`crate::reindex`).
    pub(crate) entries_rebuilt: AtomicU64,
    /// Rounds written by a writer leading its own round (`flush::lead`).
    pub(crate) rounds_led: AtomicU64,
    /// The flusher has exited.
    pub(crate) stopped: AtomicBool,
    /// Set once when the flusher failed; every later wait returns it.
    pub(crate) failed: AtomicBool,
    pub(crate) error: Mutex<Option<String>>,
    /// Advanced after every change above.
    pub(crate) epoch: epoch::Epoch,
}

impl Progress {
    pub(crate) fn error(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire) {
            self.error.lock().clone()
        } else {
            None
        }
    }

    pub(crate) fn fail(&self, msg: &str) {
        *self.error.lock() = Some(msg.to_owned());
        self.failed.store(true, Ordering::Release);
        self.epoch.advance();
    }
}

/// Everything of one store that its handles ([`Store`](crate::Store), `LogReader`), its
/// writers and its flusher thread share.
pub(crate) struct Shared {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) dir: PathBuf,
    pub(crate) log_dir: PathBuf,
    pub(crate) cq_dir: PathBuf,
    pub(crate) config: StoreConfig,
    pub(crate) segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    pub(crate) queues: RwLock<QueueMap>,
    pub(crate) writer: Mutex<Writer>,
    /// What the writer of rounds keeps between them (see the `flush` module).
    pub(crate) flush: Mutex<FlusherState>,
    /// The flusher waits here for work (on `writer`).
    pub(crate) work: Condvar,
    /// Writers wait here for room in the batch (on `writer`).
    pub(crate) space: Condvar,
    pub(crate) progress: Progress,
    pub(crate) hooks: Option<Arc<dyn StoreHooks>>,
    /// Wakes async writers and pollers on every change of `progress`.
    pub(crate) async_notify: tokio::sync::Notify,
    /// Wakes async writers waiting for room in the batch.
    pub(crate) async_space: tokio::sync::Notify,
    /// Base offset of the first segment: everything below was deleted by retention.
    pub(crate) log_start: AtomicU64,
    /// Log offset of the newest checkpoint: recovery reads the log from there, so
    /// retention keeps it.
    pub(crate) checkpoint_offset: AtomicU64,
    /// Sequence number of the newest log-start file; held during a retention pass, so
    /// passes never overlap.
    pub(crate) log_start_seq: Mutex<u64>,
    /// Called with the new log start after retention deleted segments.
    pub(crate) log_start_listeners: Mutex<Vec<LogStartListener>>,
    /// Log offset just past the newest record with a key (set under the writer lock, before
    /// the record can become durable); at open, the end of the recovered log.
    pub(crate) keyed_end: AtomicU64,
    /// Zero-fills the next segment in the background (`None` on the simulated disk).
    pub(crate) preparer: Option<prepare::Preparer>,
}

impl Shared {
    /// `Debug` of a handle named `name` on this store: its directory.
    pub(crate) fn fmt_handle(
        &self,
        name: &str,
        f: &mut std::fmt::Formatter<'_>,
    ) -> std::fmt::Result {
        f.debug_struct(name).field("dir", &self.dir).finish()
    }

    /// Whether writes are acknowledged only once durable.
    pub(crate) fn sync_policy(&self) -> bool {
        matches!(self.config.flush, FlushPolicy::Sync)
    }

    /// Whether the record ending at `end` is settled: `Some(Ok(()))` once it is written (or
    /// durable, if `durable`), `Some(Err(..))` if it never will be (the flusher failed or
    /// stopped), `None` while it waits for a round.
    pub(crate) fn settled(&self, end: u64, durable: bool) -> Option<Result<()>> {
        let p = &self.progress;
        let mark = if durable { &p.durable } else { &p.written };
        if mark.load(Ordering::Acquire) >= end {
            return Some(Ok(()));
        }
        if let Some(e) = p.error() {
            return Some(Err(Error::Poisoned(e)));
        }
        if p.stopped.load(Ordering::Acquire) {
            return Some(Err(Error::Closed));
        }
        None
    }

    /// Block the calling thread until the record ending at `end` is settled (see
    /// [`Shared::settled`]).
    pub(crate) fn wait_progress(&self, end: u64, durable: bool) -> Result<()> {
        self.progress
            .epoch
            .wait_for(None, || self.settled(end, durable))
    }
}

/// Wait on `notify` until `check` has an answer. The next notification is registered for
/// before every check, so a `notify_waiters` between the check and the await is not lost.
/// The async twin of `Epoch::wait_for`.
///
/// An answer there already is taken without registering: a batch send waits on its
/// tickets one after the other, and once the first is acknowledged so are the rest (the
/// same round), so registering for each (the `Notify`'s lock, shared by the round's
/// writers on every worker, twice: in and out of its waiter list) was work for nothing.
pub(crate) async fn notified_until<T>(
    notify: &tokio::sync::Notify,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    if let Some(answer) = check() {
        return answer;
    }
    loop {
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Some(answer) = check() {
            return answer;
        }
        changed.await;
    }
}
