//! The storage engine: a segmented commit log with group commit, and the consume-queue
//! indexes derived from it.
//!
//! Writers encode records into one shared batch under a short lock; one flusher thread writes
//! the batch, `fdatasync`s it, appends the consume-queue entries of its messages, and then
//! releases every writer whose record is covered (group commit). See `ARCHITECTURE.md` for
//! the file formats and the recovery rules.

pub mod checkpoint;
pub mod consume_queue;
mod epoch;
mod flush;
pub mod io;
pub mod log_start;
mod prepare;
mod recovery;
pub mod segment;
mod seqfile;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::config::{FlushPolicy, StoreConfig};
use crate::error::{Error, Result};
use crate::record::{self, Header, Record, RecordKind, RecordView, HEADER_BYTES};
use consume_queue::{ConsumeQueue, Entry};
use io::Storage;
use segment::{Segment, SEGMENT_HEADER_BYTES};

/// Largest read of [`Store::scan_records`] (a bigger record is read whole).
pub const SCAN_CHUNK_BYTES: u64 = 1024 * 1024;

/// Bytes of the SegmentEnd record that closes every full segment; always kept free.
const SEGMENT_END_BYTES: u64 = HEADER_BYTES as u64;

/// Run by the flusher once the record is durable (acknowledged), in log order, before any
/// writer is released; gets the record's log offset. Higher layers use it to keep derived
/// state (the pending-transaction index) exactly in step with the log. A hook whose record
/// never becomes acknowledged (the store is poisoned or closed first, or an async append is
/// cancelled before its record entered the batch) is dropped without being called.
///
/// Hooks given to [`Store::append_hooked`] force a sync under any flush policy; hooks given
/// to [`Store::append_observed`] run when the record is acknowledged under the policy (after
/// the write under [`FlushPolicy::Async`]).
pub type DurableHook = Box<dyn FnOnce(u64) + Send>;

/// Callbacks from the storage engine to the layer above it.
pub trait StoreHooks: Send + Sync {
    /// Called before every checkpoint (on the flusher thread, and at the end of recovery):
    /// persist any state derived from the log up to the current durable end, because
    /// recovery will only replay the log after the checkpoint.
    fn before_checkpoint(&self) -> Result<()>;
}

/// What to append.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    /// Record kind.
    pub kind: RecordKind,
    /// Record flags (see [`record::FLAG_TXN_COMMIT`]).
    pub flags: u16,
    /// Topic name.
    pub topic: &'a str,
    /// Queue within the topic.
    pub queue_id: u32,
    /// Key ("" for none).
    pub key: &'a str,
    /// Encoded properties ([`record::encode_properties`]).
    pub props: &'a [u8],
    /// Payload.
    pub body: &'a [u8],
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Where to index the record for consumers; `None` keeps it out of every consume queue
    /// (half messages, transaction ends).
    pub dispatch_to: Option<&'a Arc<ConsumeQueue>>,
}

/// Where an appended record went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Position in the log.
    pub log_offset: u64,
    /// Encoded size.
    pub size: u32,
    /// Index in the consume queue, if dispatched.
    pub queue_offset: Option<u64>,
}

/// A position in the batch: which bytes go to which segment at which file position.
struct Chunk {
    segment: Arc<Segment>,
    file_pos: u64,
    start: usize,
    end: usize,
    /// The segment is full after this chunk: sync it before writing anything later.
    seal: bool,
}

struct Dispatch {
    queue: Arc<ConsumeQueue>,
    queue_offset: u64,
    entry: Entry,
}

/// Records encoded but not yet written.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    chunks: Vec<Chunk>,
    dispatch: Vec<Dispatch>,
    /// Hooks to run once the batch is acknowledged, with their records' log offsets.
    hooks: Vec<(DurableHook, u64)>,
    /// A hook in the batch needs the batch synced whatever the flush policy.
    sync_hooks: bool,
    /// Records in the batch.
    records: u64,
    /// When the first record entered the (empty) batch.
    first_at: Option<std::time::Instant>,
    /// Log offset just past the last record in the batch.
    end: u64,
    /// Fired when the round that writes this batch is over (see [`RoundSignal`]).
    signal: Arc<RoundSignal>,
}

/// Wakes the async writers of one group-commit round, and only them. Waiting on the
/// store-wide `async_notify` instead woke every waiting writer after every round: with
/// pipelining producers, half the waiters belong to the batch still being gathered and went
/// straight back to sleep (10% of the CPU with 64 producers x 16 sends in flight, measured).
#[derive(Default)]
struct RoundSignal {
    notify: tokio::sync::Notify,
    over: AtomicBool,
}

impl RoundSignal {
    /// The round is over (done, failed, or the flusher stopped): wake its writers.
    fn fire(&self) {
        self.over.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.chunks.clear();
        self.dispatch.clear();
        self.hooks.clear();
        self.sync_hooks = false;
        self.records = 0;
        self.first_at = None;
    }
}

struct Writer {
    active: Arc<Segment>,
    /// Next write position in `active`.
    pos: u64,
    batch: Batch,
    poisoned: Option<String>,
    closed: bool,
    /// Someone (close, `flush`) wants the flusher to sync now, even under async flush.
    sync_requested: bool,
    /// Group-commit gathering (sync flush only): how many records the flusher waits for
    /// before it syncs — as many as the last round released, since those writers are likely
    /// to come back at once — and for how long at most (half the last fsync's time).
    gather_target: u64,
    gather_wait: std::time::Duration,
    /// Log fsyncs counted at the last roll (or at open): how many syncs filled the active
    /// segment decides whether the next one is zero-filled ahead (see `store::prepare`).
    syncs_at_roll: u64,
}

/// Flush progress, watched by waiting writers and pollers without a lock.
#[derive(Debug, Default)]
struct Progress {
    /// Everything before this log offset is written to the OS.
    written: AtomicU64,
    /// Everything before this log offset is durable.
    durable: AtomicU64,
    /// Group commits (log fsyncs) so far.
    syncs: AtomicU64,
    /// Records appended so far (SegmentEnd markers included).
    records: AtomicU64,
    /// The flusher has exited.
    stopped: AtomicBool,
    /// Set once when the flusher failed; every later wait returns it.
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// Advanced after every change above.
    epoch: epoch::Epoch,
}

impl Progress {
    fn error(&self) -> Option<String> {
        if self.failed.load(Ordering::Acquire) {
            self.error.lock().clone()
        } else {
            None
        }
    }

    fn fail(&self, msg: &str) {
        *self.error.lock() = Some(msg.to_owned());
        self.failed.store(true, Ordering::Release);
        self.epoch.advance();
    }
}

pub(crate) struct Shared {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    log_dir: PathBuf,
    cq_dir: PathBuf,
    config: StoreConfig,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    queues: RwLock<QueueMap>,
    writer: Mutex<Writer>,
    /// The flusher waits here for work (on `writer`).
    work: Condvar,
    /// Writers wait here for room in the batch (on `writer`).
    space: Condvar,
    progress: Progress,
    hooks: Option<Arc<dyn StoreHooks>>,
    /// Wakes async writers and pollers on every change of `progress`.
    async_notify: tokio::sync::Notify,
    /// Wakes async writers waiting for room in the batch.
    async_space: tokio::sync::Notify,
    /// Base offset of the first segment: everything below was deleted by retention.
    log_start: AtomicU64,
    /// Log offset of the newest checkpoint: recovery reads the log from there, so
    /// retention keeps it.
    checkpoint_offset: AtomicU64,
    /// Sequence number of the newest log-start file; held during a retention pass, so
    /// passes never overlap.
    log_start_seq: Mutex<u64>,
    /// Called with the new log start after retention deleted segments.
    log_start_listeners: Mutex<Vec<LogStartListener>>,
    /// Log offset just past the newest record with a key (set under the writer lock, before
    /// the record can become durable); at open, the end of the recovered log.
    keyed_end: AtomicU64,
    /// Zero-fills the next segment in the background (`None` on the simulated disk).
    preparer: Option<prepare::Preparer>,
}

/// Called with the new log start (see [`Store::log_start`]) after retention deleted the
/// segments below it, on the thread that ran retention. Must not call back into retention.
pub type LogStartListener = Box<dyn Fn(u64) + Send + Sync>;

/// What [`Store::truncate_front`] may delete: whole segments, oldest first, entirely below
/// `floor`, never the newest one, and only while a limit is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TruncateLimits {
    /// Delete while the log (all segment files) is larger than this many bytes.
    pub bytes_max: Option<u64>,
    /// Delete segments whose newest record is older than this many ms.
    pub age_max_ms: Option<u64>,
    /// Now, ms since the Unix epoch (for the age limit).
    pub now_ms: u64,
}

/// What [`Store::truncate_front`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Truncated {
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Their bytes.
    pub bytes_deleted: u64,
    /// The log start after the pass (base offset of the first segment).
    pub log_start: u64,
    /// Bytes of all segment files after the pass.
    pub log_bytes: u64,
    /// The oldest segment kept could not go because the floor is inside or below it (it is
    /// still needed); false when no limit was exceeded or only the newest segment is left.
    pub held_by_floor: bool,
}

/// The storage engine. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    _lock: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

/// A summary of what recovery found and did on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the log.
    pub segments: usize,
    /// Log offset where recovery started reading (the checkpoint).
    pub scanned_from: u64,
    /// Log offset of the end of the log after recovery.
    pub log_end: u64,
    /// Records read during recovery.
    pub records_scanned: u64,
    /// Bytes of torn tail cut off (zeroed) at the end of the log.
    pub torn_bytes_cut: u64,
    /// Consume queues were rebuilt from the start of the log (missing or short index).
    pub full_rebuild: bool,
    /// Where the log starts (retention deleted everything below; 0 if it never ran).
    pub log_start: u64,
    /// Segment files below the log start that an interrupted retention pass left and
    /// recovery removed.
    pub orphans_removed: usize,
}

/// Statistics of the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogStats {
    /// Segment files.
    pub segments: usize,
    /// Log offset of the first record.
    pub first_offset: u64,
    /// Everything before this offset is durable.
    pub durable_offset: u64,
    /// Everything before this offset is written to the OS.
    pub written_offset: u64,
    /// Log fsyncs (group commits) since open.
    pub syncs: u64,
    /// Records written since open.
    pub records: u64,
    /// Base offset of the first segment: everything below was deleted by retention.
    #[serde(default)]
    pub log_start: u64,
    /// Bytes of all segment files (what the log takes on disk).
    #[serde(default)]
    pub log_bytes: u64,
}

/// Consume queues by topic and queue id.
pub(crate) type QueueMap = HashMap<String, BTreeMap<u32, Arc<ConsumeQueue>>>;

/// The index of (topic, queue) in `queues`, opened (created empty) if it is not there yet.
pub(crate) fn queue_in(
    queues: &mut QueueMap,
    storage: &dyn Storage,
    cq_dir: &Path,
    topic: &str,
    queue_id: u32,
) -> Result<Arc<ConsumeQueue>> {
    if let Some(q) = queues.get(topic).and_then(|m| m.get(&queue_id)) {
        return Ok(q.clone());
    }
    validate_topic_name(topic)?;
    let (cq, _) = ConsumeQueue::open(storage, cq_dir, topic, queue_id, 0, 0)?;
    let cq = Arc::new(cq);
    queues
        .entry(topic.to_owned())
        .or_default()
        .insert(queue_id, cq.clone());
    Ok(cq)
}

/// Check a topic name: 1 to 127 bytes of `[A-Za-z0-9._-]`, not starting with a dot, so
/// that it is safe as a directory name.
pub fn validate_topic_name(topic: &str) -> Result<()> {
    let ok = !topic.is_empty()
        && topic.len() <= record::TOPIC_BYTES_MAX
        && !topic.starts_with('.')
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "topic name",
            reason: format!(
                "{topic:?}: use 1 to {} characters of A-Z a-z 0-9 . _ - % not starting with '.'",
                record::TOPIC_BYTES_MAX
            ),
        })
    }
}

impl Store {
    /// Open (or create) the store in `dir`, recovering from whatever an earlier run left:
    /// the torn tail of the log is cut, indexes are re-derived past their checkpoint.
    /// `on_record` sees every record read during recovery (in log order), so that
    /// higher layers can rebuild their own derived state.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        config: StoreConfig,
        on_record: &mut dyn FnMut(&RecordView<'_>),
    ) -> Result<(Store, RecoveryReport)> {
        config.validate()?;
        storage.create_dir_all(dir)?;
        let lock = storage.lock_dir(dir)?;
        Store::open_locked(storage, dir, config, lock, on_record, None)
    }

    /// [`Store::open`] for a caller that already holds the directory lock (from
    /// [`Storage::lock_dir`]) and wants [`StoreHooks`].
    pub fn open_locked(
        storage: Arc<dyn Storage>,
        dir: &Path,
        config: StoreConfig,
        lock: Box<dyn std::any::Any + Send + Sync>,
        on_record: &mut dyn FnMut(&RecordView<'_>),
        hooks: Option<Arc<dyn StoreHooks>>,
    ) -> Result<(Store, RecoveryReport)> {
        config.validate()?;
        let log_dir = dir.join("log");
        let cq_dir = dir.join("cq");
        let rec = recovery::recover(
            &*storage,
            &log_dir,
            &cq_dir,
            dir,
            &config,
            on_record,
            hooks.as_deref(),
        )?;
        let end = rec.active.base + rec.pos;
        let next_base = rec.active.base + rec.active.size;
        let preparer =
            prepare::Preparer::start(storage.clone(), log_dir.clone(), config.segment_bytes)?;
        if let Some(p) = &preparer {
            // Nothing is known yet of the group commits' size: prepare one.
            p.prepare(next_base);
        }
        let first_base = rec.segments.keys().next().copied().unwrap_or(0);
        let log_end = rec.report.log_end;
        let shared = Arc::new(Shared {
            storage,
            dir: dir.to_path_buf(),
            log_dir,
            cq_dir,
            config,
            segments: RwLock::new(rec.segments),
            queues: RwLock::new(rec.queues),
            writer: Mutex::new(Writer {
                active: rec.active,
                pos: rec.pos,
                batch: Batch {
                    end,
                    ..Batch::default()
                },
                poisoned: None,
                closed: false,
                sync_requested: false,
                gather_target: 1,
                gather_wait: std::time::Duration::ZERO,
                syncs_at_roll: 0,
            }),
            work: Condvar::new(),
            space: Condvar::new(),
            progress: Progress {
                written: AtomicU64::new(end),
                durable: AtomicU64::new(end),
                ..Progress::default()
            },
            hooks,
            async_notify: tokio::sync::Notify::new(),
            async_space: tokio::sync::Notify::new(),
            log_start: AtomicU64::new(first_base),
            checkpoint_offset: AtomicU64::new(log_end),
            keyed_end: AtomicU64::new(log_end),
            preparer,
            log_start_seq: Mutex::new(rec.log_start_seq),
            log_start_listeners: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("halfmq-flusher".into())
            .spawn(move || flush::run(s, rec.checkpoint_seq))
            .map_err(|e| Error::io(dir, "start flusher thread", e))?;
        let store = Store {
            shared,
            flusher: Mutex::new(Some(flusher)),
            _lock: lock,
        };
        Ok((store, rec.report))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.shared.config
    }

    /// The consume queue of (topic, queue), created if it does not exist yet.
    pub fn queue(&self, topic: &str, queue_id: u32) -> Result<Arc<ConsumeQueue>> {
        if let Some(q) = self
            .shared
            .queues
            .read()
            .get(topic)
            .and_then(|m| m.get(&queue_id))
        {
            return Ok(q.clone());
        }
        let mut queues = self.shared.queues.write();
        queue_in(
            &mut queues,
            &*self.shared.storage,
            &self.shared.cq_dir,
            topic,
            queue_id,
        )
    }

    /// Every consume queue, by topic and queue id.
    pub fn queues(&self) -> Vec<Arc<ConsumeQueue>> {
        let queues = self.shared.queues.read();
        let mut out: Vec<_> = queues.values().flat_map(|m| m.values().cloned()).collect();
        out.sort_by(|a, b| (a.topic(), a.queue_id()).cmp(&(b.topic(), b.queue_id())));
        out
    }

    /// Append one record. Returns when the record is acknowledged under the flush policy:
    /// durable (`Sync`) or written to the OS (`Async`). Blocks the calling thread; async code
    /// uses [`Store::append_async`].
    pub fn append(&self, a: Append<'_>) -> Result<Appended> {
        self.append_hooked(a, None)
    }

    /// [`Store::append`] with a hook the flusher runs once the record is durable. The record
    /// is synced in the round that writes it, whatever the flush policy.
    pub fn append_hooked(&self, a: Append<'_>, hook: Option<DurableHook>) -> Result<Appended> {
        let force_sync = hook.is_some();
        self.append_with(a, hook, force_sync)
    }

    /// [`Store::append`] with a hook the flusher runs once the record is acknowledged under
    /// the flush policy (durable under `Sync`, written under `Async`), without forcing a sync.
    pub fn append_observed(&self, a: Append<'_>, hook: DurableHook) -> Result<Appended> {
        self.append_with(a, Some(hook), false)
    }

    fn append_with(
        &self,
        a: Append<'_>,
        hook: Option<DurableHook>,
        force_sync: bool,
    ) -> Result<Appended> {
        let size = self.check_append(&a)?;
        let mut hook = hook;
        let appended = match self
            .shared
            .append_to_batch(&a, size, true, &mut hook, force_sync)?
        {
            Some((x, _)) => x,
            // With wait_for_space the writer waits for room instead of returning None.
            None => return Err(Error::Closed),
        };
        let end = appended.log_offset + u64::from(size);
        self.shared
            .wait_progress(end, force_sync || self.shared.sync_policy())?;
        Ok(appended)
    }

    /// [`Store::append`] for async code: waiting for room in the batch and for the flush
    /// happens without blocking the executor's thread.
    pub async fn append_async(&self, a: Append<'_>) -> Result<Appended> {
        self.append_async_hooked(a, None).await
    }

    /// [`Store::append_async`] with a hook the flusher runs once the record is durable (the
    /// record is synced whatever the flush policy).
    pub async fn append_async_hooked(
        &self,
        a: Append<'_>,
        hook: Option<DurableHook>,
    ) -> Result<Appended> {
        let force_sync = hook.is_some();
        self.append_async_with(a, hook, force_sync).await
    }

    /// [`Store::append_observed`] for async code.
    pub async fn append_async_observed(
        &self,
        a: Append<'_>,
        hook: DurableHook,
    ) -> Result<Appended> {
        self.append_async_with(a, Some(hook), false).await
    }

    async fn append_async_with(
        &self,
        a: Append<'_>,
        hook: Option<DurableHook>,
        force_sync: bool,
    ) -> Result<Appended> {
        let size = self.check_append(&a)?;
        let mut hook = hook;
        let (appended, round) = loop {
            let changed = self.shared.async_space.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self
                .shared
                .append_to_batch(&a, size, false, &mut hook, force_sync)?
            {
                Some(x) => break x,
                None => changed.await,
            }
        };
        let end = appended.log_offset + u64::from(size);
        let durable = force_sync || self.shared.sync_policy();
        // The round that writes the record wakes its writers alone...
        loop {
            let changed = round.notify.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.shared.check_progress(end, durable)? {
                return Ok(appended);
            }
            if round.over.load(Ordering::Acquire) {
                break;
            }
            changed.await;
        }
        // ...and should the record need a later round (not under any current policy: a
        // round acknowledges what it writes), every change of progress is watched.
        loop {
            let changed = self.shared.async_notify.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.shared.check_progress(end, durable)? {
                return Ok(appended);
            }
            changed.await;
        }
    }

    /// Validate an append and return the record's encoded size.
    fn check_append(&self, a: &Append<'_>) -> Result<u32> {
        let size = record::encoded_len(a.topic, a.key, a.props, a.body).map_err(|reason| {
            Error::Invalid {
                what: "message",
                reason,
            }
        })?;
        if size > self.shared.config.record_bytes_max {
            return Err(Error::Invalid {
                what: "message",
                reason: format!(
                    "record of {size} bytes is over record_bytes_max ({})",
                    self.shared.config.record_bytes_max
                ),
            });
        }
        if let Some(q) = a.dispatch_to {
            if q.topic() != a.topic || q.queue_id() != a.queue_id {
                return Err(Error::Invalid {
                    what: "append",
                    reason: "dispatch queue does not match topic and queue id".into(),
                });
            }
        }
        Ok(size)
    }

    /// Make everything appended so far durable (useful under async flush).
    pub fn sync(&self) -> Result<()> {
        let target = {
            let mut w = self.shared.writer.lock();
            if let Some(p) = &w.poisoned {
                return Err(Error::Poisoned(p.clone()));
            }
            w.sync_requested = true;
            self.shared.work.notify_one();
            w.batch.end
        };
        self.shared.wait_progress(target, true)
    }

    /// Read the message at `queue_offset` of `queue`, checking that the log holds what the
    /// index says. `Ok(None)` past the end of the queue.
    pub fn read_message(&self, queue: &ConsumeQueue, queue_offset: u64) -> Result<Option<Record>> {
        let Some(entry) = queue.read(queue_offset, 1)?.into_iter().next() else {
            return Ok(None);
        };
        self.read_indexed(queue, queue_offset, &entry).map(Some)
    }

    /// Read up to `max` messages of `queue` from `from`, in order.
    pub fn read_messages(
        &self,
        queue: &ConsumeQueue,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        let entries = queue.read(from, max)?;
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let qo = from + i as u64;
            out.push((qo, self.read_indexed(queue, qo, entry)?));
        }
        Ok(out)
    }

    fn read_indexed(
        &self,
        queue: &ConsumeQueue,
        queue_offset: u64,
        entry: &Entry,
    ) -> Result<Record> {
        let expired = || Error::Expired {
            topic: queue.topic().to_owned(),
            queue: queue.queue_id(),
            offset: queue_offset,
            first: queue.start(),
        };
        if queue_offset < queue.start() || entry.log_offset < self.log_start() {
            return Err(expired());
        }
        let rec = match self.read_at(entry.log_offset, entry.size) {
            Ok(rec) => rec,
            // Retention deleted it between the check above and the read.
            Err(_) if queue_offset < queue.start() => return Err(expired()),
            Err(e) => return Err(e),
        };
        let h = &rec.header;
        if h.kind != RecordKind::Message
            || h.queue_offset != queue_offset
            || h.queue_id != queue.queue_id()
            || rec.topic != queue.topic()
        {
            return Err(Error::Corrupt {
                path: queue.path().to_path_buf(),
                offset: consume_queue::CQ_HEADER_BYTES
                    + queue_offset * consume_queue::ENTRY_BYTES as u64,
                reason: format!(
                    "index entry {queue_offset} points at log offset {} which holds {:?} {}/{}@{}",
                    entry.log_offset, h.kind, rec.topic, h.queue_id, h.queue_offset
                ),
            });
        }
        Ok(rec)
    }

    /// Read the record at `log_offset` whose encoded size is `size`, verifying its CRC and
    /// that it is where it says it is.
    pub fn read_at(&self, log_offset: u64, size: u32) -> Result<Record> {
        let seg = self.shared.segment_for(log_offset)?;
        let pos = log_offset - seg.base;
        let corrupt = |reason: String| Error::Corrupt {
            path: seg.path().to_path_buf(),
            offset: pos,
            reason,
        };
        if pos < SEGMENT_HEADER_BYTES || pos + u64::from(size) > seg.size {
            return Err(corrupt(format!(
                "record of {size} bytes does not fit the segment"
            )));
        }
        let mut buf = vec![0u8; size as usize];
        seg.file.read_exact_at(&mut buf, pos)?;
        let (view, len) = record::decode(&buf).map_err(|e| corrupt(e.to_string()))?;
        if len != size as usize || view.header.log_offset != log_offset {
            return Err(corrupt(format!(
                "expected a record of {size} bytes at log offset {log_offset}, found {len} bytes claiming offset {}",
                view.header.log_offset
            )));
        }
        view.to_record()
    }

    /// The file abstraction the store writes through (for derived files kept next to it,
    /// such as the key index).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.shared.storage
    }

    /// Call `f` with every record (and its encoded size) from `from` up to `to` (exclusive),
    /// in log order, reading the log in chunks of at most [`SCAN_CHUNK_BYTES`] (so memory
    /// stays bounded whatever the range). `from` must be a record boundary or a segment
    /// start, `to` a record boundary the log has written (the durable or written end); a
    /// `from` inside a deleted segment starts at the first segment after it. Returns the
    /// offset reached (`to`, or the end of the log's data when that comes first). A damaged
    /// record inside the range is an error: the range was validated by recovery or written
    /// by this process, so damage there is real.
    pub fn scan_records(
        &self,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>,
    ) -> Result<u64> {
        self.shared.scan_records(from, to, f)
    }

    /// A handle that reads the log ([`LogReader::scan_records`], [`LogReader::log_stats`])
    /// without keeping the [`Store`] (or whoever owns it) alive: for background threads.
    pub fn log_reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// Wait until `queue` has more than `from` entries or `timeout` passes. Returns whether
    /// there is something to read.
    pub fn wait_for_messages(
        &self,
        queues: &[Arc<ConsumeQueue>],
        from: &[u64],
        timeout: std::time::Duration,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let ready = || queues.iter().zip(from).any(|(q, &f)| q.len() > f);
        let p = &self.shared.progress;
        loop {
            let seen = p.epoch.current();
            if ready() {
                return true;
            }
            if p.stopped.load(Ordering::Acquire) || std::time::Instant::now() >= deadline {
                return ready();
            }
            p.epoch.wait(seen, Some(deadline));
        }
    }

    /// [`Store::wait_for_messages`] for async code.
    pub async fn wait_for_messages_async(
        &self,
        queues: &[Arc<ConsumeQueue>],
        from: &[u64],
        deadline: tokio::time::Instant,
    ) -> bool {
        let ready = || queues.iter().zip(from).any(|(q, &f)| q.len() > f);
        loop {
            let changed = self.shared.async_notify.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if ready() {
                return true;
            }
            if self.shared.progress.stopped.load(Ordering::Acquire)
                || tokio::time::timeout_at(deadline, changed).await.is_err()
            {
                return ready();
            }
        }
    }

    /// Log statistics.
    pub fn log_stats(&self) -> LogStats {
        self.shared.log_stats()
    }

    /// The first log offset still in the log: the base offset of the first segment.
    /// Everything below was deleted by retention (0 when nothing was). Derived files kept
    /// per log range (say, a key index) can drop what lies below it; see
    /// [`Store::on_log_start`] to be told when it moves.
    pub fn log_start(&self) -> u64 {
        self.shared.log_start.load(Ordering::Acquire)
    }

    /// Log offset of the newest recovery checkpoint (recovery reads the log from there).
    pub fn checkpoint_offset(&self) -> u64 {
        self.shared.checkpoint_offset.load(Ordering::Acquire)
    }

    /// Bytes of all segment files.
    pub fn log_bytes(&self) -> u64 {
        self.shared.segments.read().values().map(|s| s.size).sum()
    }

    /// Register `f` to be called with the new log start each time retention deleted
    /// segments (after the files are gone).
    pub fn on_log_start(&self, f: LogStartListener) {
        self.shared.log_start_listeners.lock().push(f);
    }

    /// Retention: delete whole segments from the front of the log, oldest first, while a
    /// limit is exceeded, each only if it lies entirely below `floor` (the lowest log
    /// offset something still needs) and below the durable end and the newest checkpoint.
    /// The newest segment is never deleted.
    ///
    /// Crash safety: the new log start (and where every consume queue starts there) is
    /// written durably to a log-start file before any file is deleted. A crash in between
    /// leaves segments below the log start, which recovery removes; never a hole.
    pub fn truncate_front(&self, floor: u64, limits: TruncateLimits) -> Result<Truncated> {
        let mut seq = self.shared.log_start_seq.lock();
        let floor = floor
            .min(self.shared.progress.durable.load(Ordering::Acquire))
            .min(self.checkpoint_offset());
        let segs: Vec<Arc<Segment>> = self.shared.segments.read().values().cloned().collect();
        let mut total: u64 = segs.iter().map(|s| s.size).sum();
        let mut out = Truncated {
            log_start: self.log_start(),
            ..Truncated::default()
        };
        let mut doomed: Vec<Arc<Segment>> = Vec::new();
        let mut new_base = out.log_start;
        for pair in segs.windows(2) {
            let (seg, next) = (&pair[0], &pair[1]);
            let over_bytes = limits.bytes_max.is_some_and(|m| total > m);
            // Every record of `seg` was written before the first record of `next`.
            let too_old = match limits.age_max_ms {
                Some(age) => self
                    .first_timestamp_ms(next)
                    .is_some_and(|ts| ts.saturating_add(age) <= limits.now_ms),
                None => false,
            };
            if !over_bytes && !too_old {
                break;
            }
            if seg.base + seg.size > floor {
                out.held_by_floor = true;
                break;
            }
            total -= seg.size;
            new_base = next.base;
            doomed.push(seg.clone());
        }
        out.log_bytes = total;
        if doomed.is_empty() {
            return Ok(out);
        }
        let mut queues = Vec::new();
        let all = self.queues();
        let mut starts = Vec::with_capacity(all.len());
        for q in &all {
            let first = q.first_at_or_after(new_base)?.max(q.start());
            if first > 0 {
                queues.push((q.topic().to_owned(), q.queue_id(), first));
            }
            starts.push(first);
        }
        log_start::store(
            &*self.shared.storage,
            &self.shared.dir,
            &log_start::LogStart {
                seq: *seq + 1,
                base: new_base,
                queues,
            },
        )?;
        *seq += 1;
        // From here on the log starts at `new_base`, whatever happens to the files.
        for (q, first) in all.iter().zip(starts) {
            q.raise_start(first);
        }
        self.shared.log_start.store(new_base, Ordering::Release);
        self.shared
            .segments
            .write()
            .retain(|&base, _| base >= new_base);
        for seg in &doomed {
            self.shared.storage.remove_file(seg.path())?;
            out.segments_deleted += 1;
            out.bytes_deleted += seg.size;
        }
        self.shared.storage.sync_dir(&self.shared.log_dir)?;
        out.log_start = new_base;
        for f in self.shared.log_start_listeners.lock().iter() {
            f(new_base);
        }
        Ok(out)
    }

    /// Timestamp of the first record of a segment; `None` if it has none (yet) or it does
    /// not read back (then retention by age does not delete on its account).
    fn first_timestamp_ms(&self, seg: &Segment) -> Option<u64> {
        let mut head = [0u8; HEADER_BYTES];
        seg.file
            .read_exact_at(&mut head, SEGMENT_HEADER_BYTES)
            .ok()?;
        let len = record::check_len(&head).ok()?;
        let rec = self.read_at(seg.base + SEGMENT_HEADER_BYTES, len).ok()?;
        Some(rec.header.timestamp_ms)
    }

    /// Stop accepting writes, flush and sync everything, write a checkpoint, and stop the
    /// flusher. Called by `Drop` too, but then errors can only be logged.
    pub fn close(&self) -> Result<()> {
        {
            let mut w = self.shared.writer.lock();
            w.closed = true;
            self.shared.work.notify_one();
            self.shared.space.notify_all();
            self.shared.async_notify.notify_waiters();
            self.shared.async_space.notify_waiters();
        }
        if let Some(handle) = self.flusher.lock().take() {
            let joined = handle.join();
            // No roll after the flusher: the prepared segment (unused) can go.
            if let Some(p) = &self.shared.preparer {
                p.stop();
            }
            if joined.is_err() {
                return Err(Error::Poisoned("the flusher thread panicked".into()));
            }
        }
        match self.shared.progress.error() {
            Some(e) => Err(Error::Poisoned(e)),
            None => Ok(()),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(dir = %self.shared.dir.display(), error = %e, "store closed with an error");
        }
    }
}

/// Reads the log of a [`Store`] without owning it ([`Store::log_reader`]).
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl LogReader {
    /// [`Store::scan_records`].
    pub fn scan_records(
        &self,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>,
    ) -> Result<u64> {
        self.shared.scan_records(from, to, f)
    }

    /// Log offset just past the newest record appended with a key since open (the end of
    /// the recovered log right after open, since what recovery found is not looked at).
    /// Read after [`LogReader::log_stats`], every record with a key below its
    /// `durable_offset` is below this: the key index skips the rest of the log unread.
    pub fn keyed_end(&self) -> u64 {
        self.shared.keyed_end.load(Ordering::Acquire)
    }

    /// [`Store::log_stats`].
    pub fn log_stats(&self) -> LogStats {
        self.shared.log_stats()
    }
}

impl Shared {
    fn log_stats(&self) -> LogStats {
        let segs = self.segments.read();
        let p = &self.progress;
        LogStats {
            segments: segs.len(),
            first_offset: segs
                .values()
                .next()
                .map(|s| s.base + SEGMENT_HEADER_BYTES)
                .unwrap_or(0),
            log_start: self.log_start.load(Ordering::Acquire),
            log_bytes: segs.values().map(|s| s.size).sum(),
            durable_offset: p.durable.load(Ordering::Acquire),
            written_offset: p.written.load(Ordering::Acquire),
            syncs: p.syncs.load(Ordering::Relaxed),
            records: p.records.load(Ordering::Relaxed),
        }
    }

    fn scan_records(
        &self,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>,
    ) -> Result<u64> {
        let mut off = from;
        let mut buf: Vec<u8> = Vec::new();
        while off < to {
            let Some(seg) = self.segment_at_or_after(off) else {
                return Ok(off);
            };
            let seg_end = seg.base + seg.size;
            let mut pos = off.max(seg.base + SEGMENT_HEADER_BYTES);
            let stop = to.min(seg_end);
            let mut segment_done = false;
            while pos < stop && !segment_done {
                let want = (stop - pos).min(SCAN_CHUNK_BYTES) as usize;
                buf.resize(want, 0);
                seg.file.read_exact_at(&mut buf, pos - seg.base)?;
                let mut i = 0usize;
                loop {
                    match record::decode(&buf[i..]) {
                        Ok((view, len)) => {
                            if view.header.kind == RecordKind::SegmentEnd {
                                segment_done = true;
                                break;
                            }
                            // `len` is at most RECORD_BYTES_MAX, which fits a u32.
                            f(&view, len as u32)?;
                            i += len;
                        }
                        Err(record::DecodeError::Incomplete { needed }) => {
                            if i > 0 {
                                break; // read again from this record's start
                            }
                            if pos + needed as u64 > stop {
                                // The range ends inside a record: not a boundary.
                                return Ok(pos);
                            }
                            buf.resize(needed, 0);
                            seg.file.read_exact_at(&mut buf, pos - seg.base)?;
                        }
                        Err(record::DecodeError::Empty) => {
                            segment_done = true;
                            break;
                        }
                        Err(record::DecodeError::Invalid(reason)) => {
                            return Err(Error::Corrupt {
                                path: seg.path().to_path_buf(),
                                offset: pos - seg.base + i as u64,
                                reason,
                            })
                        }
                    }
                    if i == buf.len() {
                        break;
                    }
                }
                pos += i as u64;
            }
            if pos < stop && !segment_done {
                return Ok(pos);
            }
            off = if segment_done || stop == seg_end {
                seg_end
            } else {
                stop
            };
        }
        Ok(to.max(from))
    }

    /// The segment holding `log_offset`, or else the first one after it.
    fn segment_at_or_after(&self, log_offset: u64) -> Option<Arc<Segment>> {
        let segs = self.segments.read();
        if let Some((_, s)) = segs.range(..=log_offset).next_back() {
            if log_offset < s.base + s.size {
                return Some(s.clone());
            }
        }
        segs.range(log_offset..).next().map(|(_, s)| s.clone())
    }

    fn segment_for(&self, log_offset: u64) -> Result<Arc<Segment>> {
        let segs = self.segments.read();
        match segs.range(..=log_offset).next_back() {
            Some((_, s)) if log_offset < s.base + s.size => Ok(s.clone()),
            _ => Err(Error::Corrupt {
                path: self.log_dir.clone(),
                offset: log_offset,
                reason: "no segment holds this log offset".into(),
            }),
        }
    }

    /// Encode a record into the shared batch and return where it will be. When the batch is
    /// full, wait for room if `wait_for_space`, else return `None`.
    fn append_to_batch(
        &self,
        a: &Append<'_>,
        size: u32,
        wait_for_space: bool,
        hook: &mut Option<DurableHook>,
        hook_forces_sync: bool,
    ) -> Result<Option<(Appended, Arc<RoundSignal>)>> {
        let mut w = self.writer.lock();
        loop {
            if let Some(p) = &w.poisoned {
                return Err(Error::Poisoned(p.clone()));
            }
            if w.closed {
                return Err(Error::Closed);
            }
            // Back-pressure: wait while the batch is full (but never for an empty batch, so a
            // record up to record_bytes_max always gets in).
            if !w.batch.is_empty()
                && w.batch.bytes.len() as u64 + u64::from(size) > self.config.pending_bytes_max
            {
                if !wait_for_space {
                    return Ok(None);
                }
                self.space.wait(&mut w);
                continue;
            }
            break;
        }
        if w.pos + u64::from(size) + SEGMENT_END_BYTES > w.active.size {
            self.roll(&mut w)?;
        }
        if let Some(q) = a.dispatch_to {
            q.reserve(q.assigned.load(std::sync::atomic::Ordering::Relaxed) + 1)?;
        }
        let log_offset = w.active.base + w.pos;
        let queue_offset = a.dispatch_to.map(|q| {
            // Queue offsets are handed out under the writer lock, in log order.
            q.assigned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        let header = Header {
            kind: a.kind,
            flags: a.flags,
            queue_id: a.queue_id,
            log_offset,
            queue_offset: queue_offset.unwrap_or(0),
            timestamp_ms: a.timestamp_ms,
        };
        self.put(&mut w, &header, a.topic, a.key, a.props, a.body, size)?;
        if !a.key.is_empty() {
            self.keyed_end
                .fetch_max(log_offset + u64::from(size), Ordering::AcqRel);
        }
        if let (Some(q), Some(qo)) = (a.dispatch_to, queue_offset) {
            w.batch.dispatch.push(Dispatch {
                queue: q.clone(),
                queue_offset: qo,
                entry: Entry {
                    log_offset,
                    size,
                    key_hash: consume_queue::key_hash(a.key),
                },
            });
        }
        if let Some(h) = hook.take() {
            w.batch.hooks.push((h, log_offset));
            w.batch.sync_hooks |= hook_forces_sync;
        }
        // Wake the flusher for the first record, and when the batch is as large as it
        // waits for; in between it is waiting on a deadline anyway.
        if w.batch.records == 1 || w.batch.records >= w.gather_target {
            self.work.notify_one();
        }
        let appended = Appended {
            log_offset,
            size,
            queue_offset,
        };
        Ok(Some((appended, w.batch.signal.clone())))
    }

    /// Encode one record at the writer's position into the batch.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        w: &mut Writer,
        header: &Header,
        topic: &str,
        key: &str,
        props: &[u8],
        body: &[u8],
        size: u32,
    ) -> Result<()> {
        let start = w.batch.bytes.len();
        let written = record::encode_into(&mut w.batch.bytes, header, topic, key, props, body)
            .map_err(|reason| Error::Invalid {
                what: "message",
                reason,
            })?;
        debug_assert_eq!(written, size);
        let end = w.batch.bytes.len();
        let same_chunk = matches!(w.batch.chunks.last(), Some(c) if !c.seal && Arc::ptr_eq(&c.segment, &w.active));
        if same_chunk {
            if let Some(c) = w.batch.chunks.last_mut() {
                c.end = end;
            }
        } else {
            let chunk = Chunk {
                segment: w.active.clone(),
                file_pos: w.pos,
                start,
                end,
                seal: false,
            };
            w.batch.chunks.push(chunk);
        }
        w.pos += u64::from(size);
        if w.batch.records == 0 {
            w.batch.first_at = Some(std::time::Instant::now());
        }
        w.batch.records += 1;
        w.batch.end = w.active.base + w.pos;
        Ok(())
    }

    /// Close the active segment with a SegmentEnd record and start the next one. The new
    /// file is created first, so a failure (a full disk) changes nothing.
    fn roll(&self, w: &mut Writer) -> Result<()> {
        let next_base = w.active.base + w.active.size;
        let size = self.config.segment_bytes;
        let prepared = self.preparer.as_ref().and_then(|p| p.take(next_base));
        let next = Arc::new(match prepared {
            Some(file) => Segment::adopt(file, next_base, size)?,
            None => Segment::create(&*self.storage, &self.log_dir, next_base, size)?,
        });
        let header = Header {
            kind: RecordKind::SegmentEnd,
            flags: 0,
            queue_id: 0,
            log_offset: w.active.base + w.pos,
            queue_offset: 0,
            timestamp_ms: 0,
        };
        self.put(w, &header, "", "", &[], &[], SEGMENT_END_BYTES as u32)?;
        if let Some(c) = w.batch.chunks.last_mut() {
            c.seal = true;
        }
        self.segments.write().insert(next_base, next.clone());
        w.active = next;
        w.pos = SEGMENT_HEADER_BYTES;
        w.batch.end = next_base + SEGMENT_HEADER_BYTES;
        let syncs = self.progress.syncs.load(Ordering::Relaxed);
        let filled_by = syncs.saturating_sub(w.syncs_at_roll).max(1);
        w.syncs_at_roll = syncs;
        if let Some(p) = &self.preparer {
            if prepare::worth_it(size / filled_by) {
                p.prepare(next_base + size);
            }
        }
        Ok(())
    }

    /// Whether writes are acknowledged only once durable.
    fn sync_policy(&self) -> bool {
        matches!(self.config.flush, FlushPolicy::Sync)
    }

    /// Whether the record ending at `end` is written (or durable); an error if it never will be.
    fn check_progress(&self, end: u64, durable: bool) -> Result<bool> {
        let p = &self.progress;
        let mark = if durable { &p.durable } else { &p.written };
        if mark.load(Ordering::Acquire) >= end {
            return Ok(true);
        }
        if let Some(e) = p.error() {
            return Err(Error::Poisoned(e));
        }
        if p.stopped.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(false)
    }

    fn wait_progress(&self, end: u64, durable: bool) -> Result<()> {
        loop {
            let seen = self.progress.epoch.current();
            if self.check_progress(end, durable)? {
                return Ok(());
            }
            self.progress.epoch.wait(seen, None);
        }
    }
}
