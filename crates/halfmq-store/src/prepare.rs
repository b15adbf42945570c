//! The segment housekeeping thread: it zero-fills the next segment ahead of the roll when
//! group commits are small, and drops segments the log has moved past from the page cache.
//!
//! On ext4, a write into `fallocate`d blocks turns an unwritten extent into a written one,
//! and the fdatasync after it must commit that metadata change: measured here, 64 KiB write +
//! fdatasync ran 3,400/s into fallocated blocks and 5,500–6,400/s into blocks already
//! written (512 KiB: 1,800/s against 2,600–2,800/s). Writing zeros over a whole segment when
//! it is created removes that cost but stalled every writer for 100–250 ms after each roll.
//! So, as RocketMQ's allocate-mapped-file service does, the segment after the active one is
//! written with zeros (and synced, 1 MiB at a time) by this thread while the active one fills;
//! the roll adopts it by writing its header. If it is not ready at the roll, the roll cancels
//! it (the thread stops within one chunk) and creates the segment the ordinary way, over
//! whatever was written.
//!
//! **Only when group commits are small, and only when the zeros can be ready in time**
//! ([`worth_it`]). The saving is per fsync, while the zeros double the bytes written and
//! cost CPU per byte, so what decides is the log bytes per fsync. Measured 2026-12-01 with
//! the embedded bench, 64 producers, 1 KiB messages, alternating runs on a quiet machine:
//! one send in flight each (~33 records, ~36 KiB per fsync): 127k–129k msg/s without,
//! 154k–156k with (+20%); 16 sends in flight each (~500 KiB per fsync): 751k–783k msg/s
//! without, 456k–464k with, and p99 4.8 ms against 11 ms. The threshold was then put at
//! 128 KiB per fsync. Measured again 2026-12-07 over the network (`halfmq bench --addr`, 3
//! alternating pairs each, compilers paused, a broker that prepares after a roll against
//! one that never does): 16 producers × 16 in flight (~100 records, ~110 KiB per fsync,
//! under the old threshold, a 64 MiB segment filled every ~0.22 s) gained **1.19x, 1.07x,
//! 1.09x** from not preparing; 64 producers × 1 in flight (~31 KiB per fsync) 1.03x,
//! 0.98x, 1.04x: no difference; one producer on 8 MiB segments (~1 KiB per fsync, a roll
//! every ~1.3 s) lost 1.02–1.08x without it. So the store prepares the segment after the
//! active one when it opens, and after a roll only when the segment just filled took
//! fsyncs of less than 32 KiB on average,
//!
//! and only when it took longer to fill than the last preparation took to write its zeros
//! (its pace is noted, also when cancelled): a preparation not ready at the roll is
//! cancelled there, its zeros written for nothing, and the roll waits (one chunk at most)
//! for the cancel under the writer lock. The active segment of such rates gets its written
//! blocks another way: a round of less than 32 KiB that passes the zeros written before
//! writes the next 1 MiB of zeros ahead of the log within its own write
//! (`flush::zero_ahead`), which costs no `fdatasync` of its own; that covers the first
//! segment of a fresh store and the active one after a restart, which nothing prepared.
//!
//! Tried and not kept (2026-12-07): writing the zeros past the page cache (`O_DIRECT`, one
//! sync at the end), so that they cost no copy and no write-back, and preparing at every
//! rate. A 100 KiB write + `fdatasync` loop ran 5,900–7,100/s into zeroed blocks against
//! 4,100–5,000/s into fallocated ones, and 64 MiB of direct zeros took 0.04 s. But at 16
//! producers × 16 in flight the log's fsyncs slowed (2,330–2,480/s against 2,680–2,760/s)
//! and the throughput was **0.85x** (3 alternating pairs: 259k, 258k, 265k against 301k,
//! 313k, 304k msg/s): the zeros' device traffic costs the log more than the written extents
//! save it.
//!
//! A prepared file has the next segment's final name and an all-zero header: until the roll
//! writes its header it is a *blank* segment, which recovery removes (like a segment whose
//! creation never finished), and a clean close removes it. Only storage whose blocks have
//! extents prepares ([`Storage::zero_fill_ahead`]): the simulated disk does not, so that its
//! fault injection and crash tests see the same operations as before.
//!
//! **Dropping old segments from the page cache** ([`Preparer::release`]). At each roll, the
//! segment [`StoreConfig::page_cache_segments`] places before the one just sealed is dropped
//! from the page cache (`posix_fadvise(DONTNEED)`: [`StorageFile::drop_cache`]); it is long
//! durable by then, so its pages are clean. Without this the log's pages stay cached until
//! memory runs out, and every page the writer fills is a page the kernel has to find fresh.
//! On this project's machine (a VM whose free memory is handed back to the host, so that a
//! fresh page costs a fault in the host on its first write) that made the flusher's copy
//! into the page cache the bottleneck of long runs: a small program writing 1.5 GiB in
//! 512 KiB writes (fdatasync every 64 MiB) copied at 0.22–0.49 GiB/s into fresh pages and at
//! 1.9–2.8 GiB/s when each synced 64 MiB was dropped first, so that the next writes reused
//! its pages; `copy_folio_from_iter_atomic` was 86% of its time. In the bench (64 producers
//! × 16 in flight, 40 s, async flush) the copy's cost per message fell from 0.7–1.2 µs to
//! 0.16–0.23 µs. The store keeps a bounded window of the log cached (the active segment and
//! the newest sealed ones), which readers that keep up read from; readers further behind
//! read from the disk.
//!
//! [`StoreConfig::page_cache_segments`]: crate::StoreConfig::page_cache_segments

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::io::{Storage, StorageFile};
use super::segment;
use crate::worker::Worker;
use halfmq_types::error::Result;

/// Bytes of zeros written (and synced) per call; the roll's cancel is seen between calls.
const CHUNK_BYTES: usize = 1024 * 1024;

/// Below this many log bytes per fsync (on average over the segment just filled), preparing
/// the next segment pays: see the module docs.
pub(crate) const PREPARE_BELOW_BYTES_PER_SYNC: u64 = 32 * 1024;

/// Whether to prepare the next segment, given the mean bytes per fsync of the last one, how
/// long the last one took to fill, and how long zero-filling a segment took the last time
/// (`None`: not measured yet). A preparation that cannot finish before the roll is cancelled
/// there: its zeros were written for nothing, and the roll waits for the cancel.
pub(crate) fn worth_it(
    bytes_per_sync: u64,
    filled_in: Duration,
    zero_fill: Option<Duration>,
) -> bool {
    bytes_per_sync < PREPARE_BELOW_BYTES_PER_SYNC && zero_fill.is_none_or(|z| z < filled_in)
}

#[derive(Clone)]
enum State {
    /// Nothing prepared or being prepared.
    Idle,
    /// The thread was asked to prepare the segment at this base.
    Preparing(u64),
    /// The segment at this base is zero-filled, synced, and its directory entry durable.
    Ready(u64, Arc<dyn StorageFile>),
}

struct Inner {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    size: u64,
    state: Mutex<State>,
    /// Signalled whenever the thread leaves `Preparing`.
    settled: Condvar,
    cancel: AtomicBool,
    /// Nanoseconds the last preparation took per MiB it wrote (0: none has written yet).
    fill_nanos_per_mib: AtomicU64,
}

enum Msg {
    Prepare(u64),
    /// Drop this many bytes of this file from the page cache.
    Release(Arc<dyn StorageFile>, u64),
    Stop,
}

/// The background preparer of the next segment (see the module docs).
pub(crate) struct Preparer {
    inner: Arc<Inner>,
    worker: Mutex<Option<Worker<Msg>>>,
}

impl Preparer {
    /// Start the thread, or `None` when `storage` gains nothing from it.
    pub(crate) fn start(
        storage: Arc<dyn Storage>,
        dir: PathBuf,
        size: u64,
    ) -> Result<Option<Preparer>> {
        if !storage.zero_fill_ahead() {
            return Ok(None);
        }
        let inner = Arc::new(Inner {
            storage,
            dir,
            size,
            state: Mutex::new(State::Idle),
            settled: Condvar::new(),
            cancel: AtomicBool::new(false),
            fill_nanos_per_mib: AtomicU64::new(0),
        });
        let i = inner.clone();
        let worker = Worker::spawn(
            "halfmq-segprep",
            || Msg::Stop,
            move |rx, _| {
                while let Ok(msg) = rx.recv() {
                    let base = match msg {
                        Msg::Prepare(base) => base,
                        Msg::Release(file, len) => {
                            release(&*file, len);
                            continue;
                        }
                        Msg::Stop => break,
                    };
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| i.run(base)));
                    if ran.is_err() {
                        // Never leave a roll waiting for a preparation that died; the thread
                        // goes on taking requests (a later one is answered, not lost).
                        *i.state.lock() = State::Idle;
                        i.cancel.store(false, Ordering::Release);
                        i.settled.notify_all();
                    }
                }
            },
        )?;
        Ok(Some(Preparer {
            inner,
            worker: Mutex::new(Some(worker)),
        }))
    }

    /// Start preparing the segment at `base` (the one after the active segment).
    pub(crate) fn prepare(&self, base: u64) {
        let mut st = self.inner.state.lock();
        if !matches!(*st, State::Idle) {
            return;
        }
        let worker = self.worker.lock();
        if let Some(w) = worker.as_ref() {
            *st = State::Preparing(base);
            w.send(Msg::Prepare(base));
        }
    }

    /// How long zero-filling a segment of `size` bytes would take at the pace of the last
    /// preparation (finished or cancelled), or `None` before any has written.
    pub(crate) fn fill_time(&self, size: u64) -> Option<Duration> {
        let per_mib = self.inner.fill_nanos_per_mib.load(Ordering::Relaxed);
        (per_mib > 0).then(|| {
            let nanos = u128::from(per_mib) * u128::from(size) / (1 << 20);
            Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
        })
    }

    /// Drop the first `len` bytes of `file` (a segment the log has moved past) from the page
    /// cache, on the thread, after whatever it was asked to do before.
    pub(crate) fn release(&self, file: Arc<dyn StorageFile>, len: u64) {
        if let Some(w) = self.worker.lock().as_ref() {
            w.send(Msg::Release(file, len));
        }
    }

    /// The prepared file of the segment at `base`, if it is ready. If it is still being
    /// prepared, the preparation is cancelled first (waiting at most for one chunk); the
    /// caller then creates the segment itself, over whatever was written.
    pub(crate) fn take(&self, base: u64) -> Option<Arc<dyn StorageFile>> {
        let mut st = self.inner.settle();
        match std::mem::replace(&mut *st, State::Idle) {
            State::Ready(b, file) if b == base => Some(file),
            State::Ready(b, _) => {
                // Prepared for another base (the roll only ever asks for the one after
                // the active segment, so this does not happen); not a segment: remove it.
                drop(st);
                self.inner.remove(b);
                None
            }
            _ => None,
        }
    }

    /// Stop the thread and remove a prepared (or partly prepared) file that no roll took.
    /// Called once the flusher has stopped, so no roll can come after; a file the roll
    /// took or created over is a segment and is left alone (the state is `Idle` then).
    pub(crate) fn stop(&self) {
        let left = {
            let mut st = self.inner.state.lock();
            let base = match &*st {
                State::Preparing(b) | State::Ready(b, _) => Some(*b),
                State::Idle => None,
            };
            drop(st);
            st = self.inner.settle();
            *st = State::Idle;
            base
        };
        let worker = self.worker.lock().take();
        if let Some(mut w) = worker {
            w.stop();
        }
        if let Some(b) = left {
            self.inner.remove(b);
        }
    }
}

/// Drop a segment from the page cache; failing costs only the speed-up.
fn release(file: &dyn StorageFile, len: u64) {
    if let Err(e) = file.drop_cache(0, len) {
        tracing::debug!(error = %e, file = %file.path().display(), "could not drop a segment from the page cache");
    }
}

impl Inner {
    /// Lock the state once no preparation is running: one in progress is cancelled and
    /// waited for (it stops within one chunk).
    fn settle(&self) -> parking_lot::MutexGuard<'_, State> {
        let mut st = self.state.lock();
        if matches!(*st, State::Preparing(_)) {
            self.cancel.store(true, Ordering::Release);
            while matches!(*st, State::Preparing(_)) {
                self.settled.wait(&mut st);
            }
        }
        st
    }

    fn path(&self, base: u64) -> PathBuf {
        self.dir.join(segment::file_name(base))
    }

    fn run(&self, base: u64) {
        let outcome = self.fill(base);
        let mut st = self.state.lock();
        let cancelled = self.cancel.swap(false, Ordering::AcqRel);
        *st = match outcome {
            Ok(file) if !cancelled => State::Ready(base, file),
            Ok(_) => State::Idle,
            Err(e) => {
                // Only a lost speed-up: the roll creates the segment itself (and reports a
                // full disk, if that is what this was).
                tracing::debug!(error = %e, base, "could not prepare the next segment");
                drop(st);
                self.remove(base);
                st = self.state.lock();
                State::Idle
            }
        };
        self.settled.notify_all();
    }

    /// Write zeros over the whole file, sync it and its directory entry. Stops early (with
    /// `Ok`) when cancelled.
    fn fill(&self, base: u64) -> Result<Arc<dyn StorageFile>> {
        let path = self.path(base);
        let file = self.storage.open(&path, true)?;
        let zeros = vec![0u8; CHUNK_BYTES];
        let mut pos = 0u64;
        let started = Instant::now();
        while pos < self.size {
            if self.cancel.load(Ordering::Acquire) {
                self.note_pace(pos, started);
                return Ok(file);
            }
            // At most CHUNK_BYTES, so the cast cannot truncate.
            let n = (self.size - pos).min(CHUNK_BYTES as u64) as usize;
            file.write_all_at(&zeros[..n], pos)?;
            // Synced chunk by chunk: one sync of a whole segment's zeros (64 MiB) held the
            // log's own fsyncs behind it for ~30 ms (p99 of sends 31 ms against 5 ms).
            file.sync_data()?;
            pos += n as u64;
        }
        self.note_pace(pos, started);
        self.storage.sync_dir(&self.dir)?;
        Ok(file)
    }

    /// Remember the pace of a preparation that wrote `written` bytes since `started`.
    fn note_pace(&self, written: u64, started: Instant) {
        if written == 0 {
            return;
        }
        let nanos = started.elapsed().as_nanos() * (1 << 20) / u128::from(written);
        let per_mib = u64::try_from(nanos).unwrap_or(u64::MAX).max(1);
        self.fill_nanos_per_mib.store(per_mib, Ordering::Relaxed);
    }

    fn remove(&self, base: u64) {
        let path = self.path(base);
        if self.storage.exists(&path) {
            let removed = self
                .storage
                .remove_file(&path)
                .and_then(|()| self.storage.sync_dir(&self.dir));
            if let Err(e) = removed {
                // Recovery removes a blank newest segment anyway.
                tracing::debug!(error = %e, file = %path.display(), "could not remove a prepared segment");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{Faults, SimStorage};
    use std::path::Path;

    /// The simulated disk, claiming extents so that the preparer runs on it, and noting
    /// every [`StorageFile::drop_cache`] as (file, offset, len).
    struct Extents(SimStorage, Drops);

    type Drops = Arc<Mutex<Vec<(PathBuf, u64, u64)>>>;

    /// A simulated file that notes its `drop_cache` calls.
    struct Watched(Arc<dyn StorageFile>, Drops);

    impl StorageFile for Watched {
        fn path(&self) -> &Path {
            self.0.path()
        }
        fn len(&self) -> Result<u64> {
            self.0.len()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            self.0.read_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.write_all_at(buf, offset)
        }
        fn allocate(&self, len: u64) -> Result<()> {
            self.0.allocate(len)
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.0.set_len(len)
        }
        fn sync_data(&self) -> Result<()> {
            self.0.sync_data()
        }
        fn drop_cache(&self, offset: u64, len: u64) -> Result<()> {
            self.1.lock().push((self.path().to_path_buf(), offset, len));
            Ok(())
        }
    }

    impl Storage for Extents {
        fn create_dir_all(&self, dir: &Path) -> Result<()> {
            self.0.create_dir_all(dir)
        }
        fn list_dir(&self, dir: &Path) -> Result<Vec<String>> {
            self.0.list_dir(dir)
        }
        fn open(&self, path: &Path, create: bool) -> Result<Arc<dyn StorageFile>> {
            Ok(Arc::new(Watched(
                self.0.open(path, create)?,
                self.1.clone(),
            )))
        }
        fn exists(&self, path: &Path) -> bool {
            self.0.exists(path)
        }
        fn remove_file(&self, path: &Path) -> Result<()> {
            self.0.remove_file(path)
        }
        fn sync_dir(&self, dir: &Path) -> Result<()> {
            self.0.sync_dir(dir)
        }
        fn lock_dir(&self, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>> {
            self.0.lock_dir(dir)
        }
        fn zero_fill_ahead(&self) -> bool {
            true
        }
    }

    const SIZE: u64 = 3 * CHUNK_BYTES as u64 + 100;

    fn start(disk: &SimStorage) -> (Preparer, PathBuf) {
        let dir = PathBuf::from("/sim/log");
        let st: Arc<dyn Storage> = Arc::new(Extents(disk.clone(), Drops::default()));
        st.create_dir_all(&dir).unwrap();
        let p = Preparer::start(st, dir.clone(), SIZE).unwrap().unwrap();
        (p, dir)
    }

    fn wait_ready(p: &Preparer) {
        let t = std::time::Instant::now();
        while !matches!(*p.inner.state.lock(), State::Ready(..)) {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "never ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn only_a_segment_that_fills_slower_than_its_zeros_with_small_syncs_is_prepared() {
        let ms = Duration::from_millis;
        let small = PREPARE_BELOW_BYTES_PER_SYNC - 1;
        assert!(worth_it(small, ms(500), None), "not measured yet: prepare");
        assert!(worth_it(small, ms(500), Some(ms(300))));
        assert!(
            !worth_it(small, ms(220), Some(ms(300))),
            "the zeros would not be ready at the roll"
        );
        assert!(
            !worth_it(PREPARE_BELOW_BYTES_PER_SYNC, ms(500), Some(ms(1))),
            "large group commits: the zeros cost more than they save"
        );
    }

    #[test]
    fn a_prepared_segment_is_zeros_synced_and_handed_over_once() {
        let disk = SimStorage::new();
        let (p, dir) = start(&disk);
        assert!(p.fill_time(SIZE).is_none(), "nothing written yet");
        p.prepare(SIZE);
        wait_ready(&p);
        let paced = p
            .fill_time(SIZE)
            .expect("a finished preparation notes its pace");
        assert!(paced > Duration::ZERO);
        let syncs = disk.sync_count();
        assert!(syncs >= 1, "the zeros are synced before the file is ready");
        assert!(
            p.take(0).is_none(),
            "asked for another base: not handed over"
        );
        assert!(!disk.exists(&dir.join(segment::file_name(SIZE))), "removed");
        p.prepare(SIZE);
        wait_ready(&p);
        let file = p.take(SIZE).expect("ready");
        assert_eq!(file.len().unwrap(), SIZE);
        let mut buf = vec![1u8; SIZE as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(p.take(SIZE).is_none(), "handed over once");
        // The roll took it: it is a segment now, and stopping leaves it alone.
        p.stop();
        assert!(disk.exists(&dir.join(segment::file_name(SIZE))));
    }

    #[test]
    fn a_roll_during_preparation_cancels_it_and_a_stop_removes_what_nobody_took() {
        let disk = SimStorage::new();
        let (p, dir) = start(&disk);
        // A slow disk: the roll comes while the preparation is syncing.
        disk.set_faults(Faults {
            sync_delay_ms: 100,
            ..Faults::default()
        });
        p.prepare(SIZE);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            p.take(SIZE).is_none(),
            "not ready: cancelled, the roll creates it"
        );
        assert!(matches!(*p.inner.state.lock(), State::Idle));
        disk.set_faults(Faults::default());
        // The next one is prepared in full, then the store closes without a roll.
        p.prepare(2 * SIZE);
        wait_ready(&p);
        p.stop();
        assert!(!disk.exists(&dir.join(segment::file_name(2 * SIZE))));
        p.prepare(3 * SIZE);
        assert!(matches!(*p.inner.state.lock(), State::Idle), "stopped");
    }

    #[test]
    fn a_failed_preparation_leaves_nothing_and_the_roll_creates_the_segment() {
        let disk = SimStorage::new();
        let (p, dir) = start(&disk);
        disk.set_faults(Faults {
            disk_full: true,
            ..Faults::default()
        });
        p.prepare(SIZE);
        let t = std::time::Instant::now();
        while !matches!(*p.inner.state.lock(), State::Idle) {
            assert!(t.elapsed() < std::time::Duration::from_secs(20));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(p.take(SIZE).is_none());
        assert!(!disk.exists(&dir.join(segment::file_name(SIZE))));
        p.stop();
    }

    /// Fill a store of 64 KiB segments with 1 KiB records until it has rolled 4 times;
    /// returns the segments dropped from the page cache (base, offset, len), in order, the
    /// segment size and the number of rolls.
    fn drops_after_four_rolls(keep: Option<u32>) -> (Vec<(u64, u64, u64)>, u64, u64) {
        let disk = SimStorage::new();
        let drops = Drops::default();
        let storage: Arc<dyn Storage> = Arc::new(Extents(disk.clone(), drops.clone()));
        let size = 64 * 1024;
        let config = crate::StoreConfig::default()
            .with_segment_bytes(size)
            .with_record_bytes_max(4 * 1024)
            .with_pending_bytes_max(16 * 1024)
            .with_page_cache_segments(keep);
        let dir = Path::new("/s");
        let (store, _) = crate::Store::open(storage, dir, config, &mut |_| {}).unwrap();
        let body = [7u8; 1024];
        let q = store.queue("t", 0).unwrap();
        let mut sent = 0u32;
        while store.log_stats().records < 4 * 64 && sent < 1000 {
            sent += 1;
            store
                .append(crate::Append::message(&q, "", &body, 1))
                .unwrap();
        }
        // Closing stops the thread after the drops asked for before, and removes a
        // prepared segment no roll took.
        store.close().unwrap();
        let bases: Vec<u64> = segment::list(&disk, &dir.join("log"))
            .unwrap()
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        assert!(bases.len() >= 5, "rolled 4 times: {bases:?}");
        let got = drops.lock().clone();
        let got = got
            .into_iter()
            .map(|(path, off, len)| {
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                (segment::parse_file_name(&name).unwrap(), off, len)
            })
            .collect();
        (got, size, bases.len() as u64 - 1)
    }

    #[test]
    fn each_roll_drops_the_segment_that_leaves_the_cached_window() {
        // The r-th roll (r from 1) seals segment r-1 and, with k sealed segments kept
        // cached, drops segment r-1-k: after R rolls, segments 0 .. R-k are dropped, whole,
        // once each and in order.
        for k in [0u64, 1, 2] {
            let (drops, size, rolls) = drops_after_four_rolls(Some(k as u32));
            let want: Vec<(u64, u64, u64)> = (0..rolls - k).map(|i| (i * size, 0, size)).collect();
            assert_eq!(drops, want, "keeping {k}");
        }
    }

    #[test]
    fn without_a_window_nothing_is_dropped() {
        let (drops, _, _) = drops_after_four_rolls(None);
        assert!(drops.is_empty(), "{drops:?}");
    }
}
