//! Group commit: one writer of the log at a time writes and syncs it.
//!
//! That writer is the flusher thread, or, for a lone producer, the producer's own thread
//! ([`lead`]): whoever takes the batch under the writer lock (`Writer::flushing`) writes
//! the round, and nobody else takes one until it is over.
//!
//! Each round takes the whole pending batch, writes it (syncing a segment before anything is
//! written to the next one, so that every segment but the newest is complete on disk), syncs
//! the newest segment, appends the consume-queue entries of the batch's messages, and only
//! then advances the acknowledged offset and wakes the writers: a message is never visible to
//! a consumer before it is acknowledged to its producer.
//!
//! Consume-queue entries are appended only for durable records. Under async flush a round
//! that writes without syncing keeps its entries back (`FlusherState::dispatch`) until the
//! round that syncs them, which also wakes the waiting readers: a consumer never sees, and
//! so never acks, a message that a power loss could still take back.
//!
//! An I/O error is never retried: after a failed write or fsync the kernel may have dropped
//! the dirty pages, so nothing unsynced can be trusted. The store is poisoned, every waiting
//! writer gets the error, and only reopening (recovery) makes it writable again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::batch::{Batch, RoundSignal};
use crate::checkpoint::{self, Checkpoint};
use crate::config::FlushPolicy;
use crate::consume_queue::ConsumeQueue;
use crate::state::{FlusherState, Shared, Writer};
use halfmq_types::error::Result;

/// Take the writers' batch for a round: from now on, until [`finish_round`], nobody else
/// writes one.
fn take_batch(shared: &Shared, w: &mut Writer) -> Batch {
    let spare = std::mem::take(&mut w.spare);
    let batch = std::mem::replace(&mut w.batch, spare);
    w.batch.end = batch.end;
    // The spare batch's signal belonged to an earlier round and has fired.
    w.batch.signal = Arc::new(RoundSignal::default());
    w.flushing = true;
    w.wake_owed = false;
    shared.space.notify_all();
    shared.async_space.notify_waiters();
    batch
}

/// A round is over: its (cleared) batch is kept for reuse, the group-commit target set from
/// it, and the flusher told if work waits (unless `flusher`: it is the flusher), such as a
/// checkpoint a leading writer found due (`checkpoint_due`).
fn finish_round(
    shared: &Shared,
    batch: Batch,
    records: u64,
    sync_time: std::time::Duration,
    flusher: bool,
    checkpoint_due: bool,
) {
    let mut w = shared.writer.lock();
    w.checkpoint_due |= checkpoint_due;
    w.spare = batch;
    w.flushing = false;
    if matches!(shared.config.flush, FlushPolicy::Sync) {
        // As many as this round released, since those writers are likely to come back at
        // once, waiting at most half an fsync for them.
        w.gather_target = records.max(1);
        w.gather_wait = sync_time / 2;
    }
    if !flusher && (!w.batch.is_empty() || w.closed || w.sync_requested || w.checkpoint_due) {
        w.wake_owed = false;
        shared.work.notify_one();
    }
}

/// Write the round of `batch` (taken with [`take_batch`]), and then a checkpoint if one is
/// due and this is the flusher (`checkpoint`; a leading writer leaves it to the flusher,
/// so that its answer does not wait for it), poisoning the store if either fails. Returns
/// the round's record count, the sync time to gather by, and whether a checkpoint is due.
fn write_round(
    shared: &Shared,
    batch: &mut Batch,
    force_sync: bool,
    checkpoint: bool,
) -> std::result::Result<(u64, std::time::Duration, bool), String> {
    let records = batch.records;
    let mut st = shared.flush.lock();
    let mut done = round(shared, &mut st, batch, force_sync);
    if done.is_ok() && checkpoint {
        done = checkpoint_if_due(shared, &mut st);
    }
    match done {
        Ok(()) => Ok((records, st.last_sync_time, checkpoint_due(shared, &st))),
        Err(e) => {
            let msg = e.to_string();
            poison(shared, &msg);
            batch.clear();
            // Its writers learn of the failure from the progress.
            batch.signal.fire();
            Err(msg)
        }
    }
}

/// A writer waiting for its own record writes the round itself, on its own thread, when
/// nobody else is writing one: the flusher thread is not woken, and the writer not woken
/// back by it (two thread wake-ups fewer: what a lone producer pays most for on a virtual
/// machine). Only under [`FlushPolicy::Sync`], and only for a batch the writer started
/// while the last round had one record (see `Shared::append_to_batch`): at any higher load
/// the flusher gathers the batch as before. Returns whether it led; if not, the flusher
/// has been told of the batch.
pub(crate) fn lead(shared: &Shared) -> bool {
    let mut batch = {
        let mut w = shared.writer.lock();
        let can_lead = !w.flushing
            && !w.batch.is_empty()
            && w.poisoned.is_none()
            && !w.closed
            && !w.sync_requested;
        if !can_lead {
            shared.pay_owed_wake(&mut w);
            return false;
        }
        take_batch(shared, &mut w)
    };
    let done = write_round(shared, &mut batch, false, false);
    shared.progress.rounds_led.fetch_add(1, Ordering::Relaxed);
    let (records, sync_time, checkpoint) = done.unwrap_or((0, std::time::Duration::ZERO, false));
    // A due checkpoint is the flusher's to write (it wakes for `checkpoint_due`).
    finish_round(shared, batch, records, sync_time, false, checkpoint);
    true
}

/// The writer that deferred the flusher's wake-up for its batch will not lead after all
/// (its ticket was dropped, or it waits in a task that may not block): wake the flusher.
pub(crate) fn pay_wake(shared: &Shared) {
    shared.pay_owed_wake(&mut shared.writer.lock());
}

pub(crate) fn run(shared: Arc<Shared>) {
    // Under async flush only this thread writes rounds (writers lead only under sync
    // flush), so it can keep the time-driven sync's deadline itself.
    let mut async_due: Option<Instant> = None;
    loop {
        let (mut batch, closing, sync_requested) = {
            let mut w = shared.writer.lock();
            loop {
                if w.poisoned.is_some() {
                    break;
                }
                if w.flushing {
                    // A writer is leading a round; it wakes this thread if work is left.
                    shared.work.wait(&mut w);
                    continue;
                }
                if w.closed || w.sync_requested || w.checkpoint_due {
                    break;
                }
                if !w.batch.is_empty() {
                    // Gather: give the writers released by the last round a moment to come
                    // back, so that one fsync covers them all (sync flush only).
                    let deadline = w.batch.first_at.map(|t| t + w.gather_wait);
                    match deadline {
                        Some(d) if w.batch.records < w.gather_target && Instant::now() < d => {
                            shared.work.wait_until(&mut w, d);
                            continue;
                        }
                        _ => break,
                    }
                }
                match async_due {
                    Some(due) => {
                        if shared.work.wait_until(&mut w, due).timed_out() {
                            break;
                        }
                    }
                    None => shared.work.wait(&mut w),
                }
            }
            if w.poisoned.is_some() {
                break;
            }
            w.checkpoint_due = false;
            let batch = take_batch(&shared, &mut w);
            let requested = std::mem::take(&mut w.sync_requested);
            (batch, w.closed && w.batch.is_empty(), requested)
        };
        let done = write_round(&shared, &mut batch, closing || sync_requested, true);
        let (records, sync_time, _) = match done {
            Ok(r) => r,
            Err(_) => {
                finish_round(&shared, batch, 0, std::time::Duration::ZERO, true, false);
                break;
            }
        };
        finish_round(&shared, batch, records, sync_time, true, false);
        let mut st = shared.flush.lock();
        if let FlushPolicy::Async { interval } = shared.config.flush {
            async_due = (st.written > st.durable).then(|| st.last_sync + interval);
        }
        if closing {
            let done = if st.written > st.durable {
                Err(halfmq_types::Error::Closed)
            } else {
                Ok(())
            };
            let cp =
                done.and_then(|()| write_checkpoint(&shared, &mut st, true).map_err(Into::into));
            if let Err(e) = cp {
                // The log itself is durable; a missing checkpoint only makes the next
                // recovery read more of it.
                tracing::warn!(error = %e, "could not write the closing checkpoint");
            }
            break;
        }
    }
    shared.progress.stopped.store(true, Ordering::Release);
    shared.progress.epoch.advance();
    // Writers still waiting on a round learn that there is none (their progress check
    // then returns the failure or `Closed`).
    shared.writer.lock().batch.signal.fire();
    shared.async_notify.notify_waiters();
    shared.async_space.notify_waiters();
}

fn observe_fsync(shared: &Shared, took: std::time::Duration) {
    if let Some(h) = &shared.hooks {
        h.fsync_done(took);
    }
}

/// One group-commit round.
fn round(
    shared: &Shared,
    st: &mut FlusherState,
    batch: &mut Batch,
    force_sync: bool,
) -> Result<()> {
    let had_data = !batch.is_empty();
    if let Some(at) = batch.mark_at {
        // Everything below `durable` is synced before any byte of this batch is written.
        crate::record::set_mark(&mut batch.bytes[at..], st.durable);
    }
    let mut last_segment = None;
    for c in &batch.chunks {
        c.segment
            .file
            .write_all_at(&batch.bytes[c.start..c.end], c.file_pos)?;
        if c.seal {
            if shared.config.fsync {
                let t = Instant::now();
                c.segment.file.sync_data()?;
                observe_fsync(shared, t.elapsed());
            }
            last_segment = None;
        } else {
            zero_ahead(shared, st, c)?;
            last_segment = Some(c.segment.clone());
        }
    }
    let bytes = batch.bytes.len() as u64;
    let records = batch.records;
    let mut synced = false;
    if had_data {
        if let Some(h) = &shared.hooks {
            h.group_committed(records, bytes);
        }
        st.written = batch.end;
        st.unsynced_bytes += bytes;
        st.since_checkpoint += bytes;
    }
    // Records with sync-forcing hooks (transaction records) are always synced before their
    // hooks run, under any flush policy: derived state must never learn of a record a power
    // loss could still take back. (Observing hooks, see `Store::append_observed`, follow the
    // policy like their writers.)
    let must_sync = match shared.config.flush {
        FlushPolicy::Sync => true,
        FlushPolicy::Async { .. } if batch.sync_hooks => true,
        FlushPolicy::Async { interval } => {
            force_sync
                || st.unsynced_bytes >= shared.config.pending_bytes_max
                || st.last_sync.elapsed() >= interval
        }
    };
    // Without fsync (`StoreConfig::fsync`) every round's write counts as durable at once.
    if (must_sync || !shared.config.fsync) && st.written > st.durable {
        if shared.config.fsync {
            let seg = match last_segment {
                Some(s) => s,
                None => shared.writer.lock().active.clone(),
            };
            let t = Instant::now();
            seg.file.sync_data()?;
            observe_fsync(shared, t.elapsed());
            st.last_sync_time = t.elapsed().min(std::time::Duration::from_millis(1));
            synced = true;
        }
        st.durable = st.written;
        st.unsynced_bytes = 0;
        st.last_sync = Instant::now();
    }
    // Index the batch's messages before anyone is told they are stored, and only once they
    // are durable: consumers read through the consume queues, so under async flush a
    // message written but not yet synced stays invisible (its entry waits in `st.dispatch`)
    // until the round that syncs it. A power loss can then never take back a message a
    // consumer saw or acked.
    for d in &batch.dispatch {
        st.dispatch.push(d);
    }
    if st.durable == st.written {
        st.dispatch.apply()?;
    }
    for (hook, offset) in batch.hooks.drain(..) {
        // A panicking hook must not kill the flusher silently and leave writers waiting.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(offset))).map_err(|_| {
            halfmq_types::Error::Poisoned(format!(
                "a durable-hook panicked for the record at {offset}"
            ))
        })?;
    }
    batch.clear();
    let p = &shared.progress;
    p.records.fetch_add(records, Ordering::Relaxed);
    p.syncs.fetch_add(u64::from(synced), Ordering::Relaxed);
    p.written.store(st.written, Ordering::Release);
    p.durable.store(st.durable, Ordering::Release);
    p.epoch.advance();
    batch.signal.fire();
    shared.async_notify.notify_waiters();
    Ok(())
}

/// How far ahead of a round's data [`zero_ahead`] writes zeros into the active segment.
const ZERO_AHEAD_BYTES: u64 = 1 << 20;

/// After a small round's data, write zeros over the next [`ZERO_AHEAD_BYTES`] of the active
/// segment, in the same round and so under the same `fdatasync`, whenever the rounds have
/// caught up with the zeros written before. Segments are `fallocate`d: their blocks are
/// unwritten extents, and an `fdatasync` after a write into a block not written before must
/// also write the converted extent (on ext4 without a journal, a synchronous write of the
/// inode between the data and the cache flush): one more device round trip, which a lone
/// producer's 1 KiB records paid in about a third of their rounds (a record enters a new
/// 4 KiB block every 3.6 records). With the zeros ahead, one round in ~`ZERO_AHEAD_BYTES`
/// of log pays that conversion, for all the rounds after it up to the zeros' end. The
/// zeros add neither `fdatasync`s nor cache flushes (unlike `crate::prepare`, which syncs
/// its zeros itself), only their bytes, once. Only under sync flush with fsync on, on
/// storage whose blocks have extents
/// ([`Storage::zero_fill_ahead`](crate::io::Storage::zero_fill_ahead)), not into a prepared
/// segment (already all written), and only after a round of less than
/// `prepare::PREPARE_BELOW_BYTES_PER_SYNC` (32 KiB), where a round's time is the device's
/// round trips rather than its bytes: larger rounds do exactly what they did (zeros ahead of
/// them were tried and gained nothing at 16 × 16 on a quiet machine, ARCHITECTURE.md).
/// What recovery sees is unchanged: past the end of the log a segment reads as zeros
/// whether they were written or not.
fn zero_ahead(shared: &Shared, st: &mut FlusherState, c: &crate::batch::Chunk) -> Result<()> {
    if c.segment.zeroed
        || !shared.config.fsync
        || !matches!(shared.config.flush, FlushPolicy::Sync)
        || !shared.storage.zero_fill_ahead()
    {
        return Ok(());
    }
    let len = (c.end - c.start) as u64;
    let end = c.file_pos + len;
    let (base, zeroed) = st.zeroed;
    if (base == c.segment.base && zeroed >= end)
        || len >= crate::prepare::PREPARE_BELOW_BYTES_PER_SYNC
    {
        return Ok(());
    }
    let to = (end + ZERO_AHEAD_BYTES).min(c.segment.size);
    if to > end {
        static ZEROS: [u8; ZERO_AHEAD_BYTES as usize] = [0; ZERO_AHEAD_BYTES as usize];
        let mut at = end;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            c.segment.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
    }
    st.zeroed = (c.segment.base, to);
    Ok(())
}

/// Whether enough of the log has been made durable since the last checkpoint for the next.
fn checkpoint_due(shared: &Shared, st: &FlusherState) -> bool {
    st.since_checkpoint >= shared.config.checkpoint_bytes && st.durable == st.written
}

/// Write a checkpoint if one is due. Fails only if syncing an index failed.
fn checkpoint_if_due(shared: &Shared, st: &mut FlusherState) -> Result<()> {
    if checkpoint_due(shared, st) {
        if let Err(e) = write_checkpoint(shared, st, false) {
            if matches!(e, CheckpointError::Index(_)) {
                return Err(e.into());
            }
            // Only the checkpoint is missing: the log and indexes are fine, the next
            // recovery reads a little more of the log. Try again after as many bytes.
            tracing::warn!(error = %e, "could not write a checkpoint; will retry");
            st.since_checkpoint = 0;
        }
    }
    Ok(())
}

/// Wait until no checkpoint is due or being written (tests: checkpoints are written by the
/// flusher after the rounds that make them due, in the background of a lone writer).
#[cfg(test)]
pub(crate) fn settle_checkpoints(shared: &Shared) {
    loop {
        let flagged = shared.writer.lock().checkpoint_due;
        // Checkpoints are written under this lock: holding it, none is in progress.
        if !flagged && !checkpoint_due(shared, &shared.flush.lock()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Sync every consume queue, then record their lengths at the (durable) end of the log.
/// Why a checkpoint was not written.
#[derive(Debug)]
enum CheckpointError {
    /// Syncing an index failed: its unsynced entries may be gone, which only a reopen can
    /// repair (the store is poisoned).
    Index(halfmq_types::Error),
    /// The layer above, or writing the checkpoint file, failed: nothing is lost.
    Other(halfmq_types::Error),
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointError::Index(e) | CheckpointError::Other(e) => e.fmt(f),
        }
    }
}

impl From<CheckpointError> for halfmq_types::Error {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::Index(e) | CheckpointError::Other(e) => e,
        }
    }
}

fn write_checkpoint(
    shared: &Shared,
    st: &mut FlusherState,
    clean: bool,
) -> std::result::Result<(), CheckpointError> {
    if let Some(h) = &shared.hooks {
        h.before_checkpoint(st.durable)
            .map_err(CheckpointError::Other)?;
    }
    let queues: Vec<Arc<ConsumeQueue>> = shared
        .queues
        .read()
        .values()
        .flat_map(|m| m.values().cloned())
        .collect();
    let mut lens = Vec::with_capacity(queues.len());
    for q in &queues {
        q.sync_if_dirty().map_err(CheckpointError::Index)?;
        lens.push((q.topic().to_owned(), q.queue_id(), q.len()));
    }
    st.checkpoint_seq += 1;
    let cp = Checkpoint {
        seq: st.checkpoint_seq,
        log_offset: st.durable,
        queues: lens,
        clean,
    };
    checkpoint::store(&*shared.storage, &shared.dir, &cp).map_err(CheckpointError::Other)?;
    shared
        .checkpoint_offset
        .store(cp.log_offset, Ordering::Release);
    st.since_checkpoint = 0;
    Ok(())
}

pub(crate) fn poison(shared: &Shared, msg: &str) {
    tracing::error!(error = %msg, "storage failure: the store stops accepting writes");
    {
        let mut w = shared.writer.lock();
        w.poisoned = Some(msg.to_owned());
        w.batch.clear();
        shared.space.notify_all();
    }
    shared.progress.fail(msg);
    shared.async_notify.notify_waiters();
    shared.async_space.notify_waiters();
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::sim::{open_store, CrashMode, Faults, SimStorage};
    use crate::{Append, Store, StoreConfig};

    use super::*;

    fn open(disk: &SimStorage) -> Store {
        let config = StoreConfig::default()
            .with_segment_bytes(1 << 20)
            .with_record_bytes_max(16 * 1024)
            .with_pending_bytes_max(64 * 1024)
            .with_checkpoint_bytes(4096);
        open_store(disk, config)
    }

    fn send(store: &Store, q: &Arc<crate::consume_queue::ConsumeQueue>) -> Result<()> {
        store
            .append(Append::message(q, "", &[7u8; 1024], 1))
            .map(|_| ())
    }

    fn newest_checkpoint(disk: &SimStorage) -> u64 {
        checkpoint::load(disk, Path::new("/s"))
            .unwrap()
            .map_or(0, |c| c.seq)
    }

    #[test]
    fn checkpoints_refused_by_a_full_disk_resume_once_space_is_back_without_a_reopen() {
        let disk = SimStorage::new();
        let store = open(&disk);
        let q = store.queue("t", 0).unwrap();
        for _ in 0..10 {
            send(&store, &q).unwrap();
        }
        settle_checkpoints(&store.shared);
        let before = newest_checkpoint(&disk);
        assert!(
            before > 0,
            "10 KiB written past a 4 KiB checkpoint interval"
        );

        // The disk is full: the preallocated segment and index still take records, every
        // checkpoint (a new file) is refused, and the store is not poisoned by that.
        disk.set_faults(Faults {
            disk_full: true,
            ..Faults::default()
        });
        for _ in 0..20 {
            send(&store, &q).unwrap();
        }
        settle_checkpoints(&store.shared);
        assert_eq!(newest_checkpoint(&disk), before, "no checkpoint fits");

        // Space is back: the next checkpoint is written, by the same store.
        disk.set_faults(Faults::default());
        for _ in 0..10 {
            send(&store, &q).unwrap();
        }
        settle_checkpoints(&store.shared);
        let after = newest_checkpoint(&disk);
        assert!(
            after > before,
            "checkpoints did not resume ({before} -> {after})"
        );
        let cp = checkpoint::load(&disk, Path::new("/s")).unwrap().unwrap();
        assert!(cp.queues.iter().any(|(t, _, n)| t == "t" && *n >= 30));

        // Nothing acknowledged was lost on the way.
        let lost = disk.crash(CrashMode::DropUnsynced);
        drop(store);
        let again = open(&lost);
        assert_eq!(again.queue("t", 0).unwrap().len(), 40);
    }

    /// Rounds of 1 to 31 KiB on a disk where zeros ahead pay: the store writes zeros past
    /// each round that passes the ones written before (`zero_ahead`), across segment rolls
    /// and up to segment ends. None of them may cover a record: after a crash that drops
    /// whatever was not synced, every acknowledged record reads back intact.
    #[test]
    fn zeros_written_ahead_of_small_rounds_never_cover_a_record() {
        let disk = SimStorage::new();
        disk.set_zero_fill_ahead(true);
        let config = StoreConfig::default()
            .with_segment_bytes(1 << 20)
            .with_record_bytes_max(16 * 1024)
            .with_pending_bytes_max(1 << 20);
        let store = open_store(&disk, config.clone());
        let q = store.queue("t", 0).unwrap();
        let body = |n: usize| format!("{n:08}").repeat(128).into_bytes();
        let mut bodies = Vec::new();
        for round in 0..160usize {
            let k = 1 + (round * 7) % 31;
            let run: Vec<Vec<u8>> = (bodies.len()..bodies.len() + k).map(body).collect();
            let appends = run
                .iter()
                .map(|b| (Append::message(&q, "", b, 1), crate::Hook::None))
                .collect();
            for t in store.submit_many(appends) {
                t.unwrap().wait().unwrap();
            }
            bodies.extend(run);
        }
        assert!(
            store.log_stats().segments >= 3,
            "the rounds crossed segment ends"
        );
        let lost = disk.crash(CrashMode::DropUnsynced);
        drop(store);
        let again = open_store(&lost, config);
        let q = again.queue("t", 0).unwrap();
        let read = again.read_messages(&q, 0, bodies.len() + 1).unwrap();
        assert_eq!(
            read.len(),
            bodies.len(),
            "every acknowledged record is there"
        );
        for ((offset, rec), want) in read.iter().zip(&bodies) {
            assert_eq!(&rec.body, want, "record at queue offset {offset}");
        }
    }

    #[test]
    fn fail_stop_refuses_every_later_write_and_writes_no_closing_checkpoint() {
        let disk = SimStorage::new();
        let store = open(&disk);
        let q = store.queue("t", 0).unwrap();
        send(&store, &q).unwrap();
        settle_checkpoints(&store.shared);
        let before = newest_checkpoint(&disk);
        store.fail_stop("power lost");
        for _ in 0..2 {
            let r = send(&store, &q);
            assert!(
                matches!(&r, Err(halfmq_types::Error::Poisoned(m)) if m == "power lost"),
                "{r:?}"
            );
        }
        assert!(matches!(
            store.sync(),
            Err(halfmq_types::Error::Poisoned(_))
        ));
        assert!(store.close().is_err());
        assert_eq!(
            newest_checkpoint(&disk),
            before,
            "a stopped store closed cleanly"
        );
        drop(store);
        assert_eq!(open(&disk).queue("t", 0).unwrap().len(), 1);
    }
}
