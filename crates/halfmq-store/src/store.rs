//! [`Store`]: opening (recovery, then the flusher thread), the consume queues, and closing.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::batch::Batch;
use crate::config::StoreConfig;
use crate::consume_queue::{queue_in, ConsumeQueue};
use crate::flush;
use crate::hooks::StoreHooks;
use crate::io::Storage;
use crate::prepare;
use crate::record::RecordView;
use crate::recovery::{self, RecoveryReport};
use crate::state::{Progress, Shared, Writer};
use halfmq_types::error::{Error, Result};

/// The storage engine. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    pub(crate) shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    _lock: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt_handle("Store", f)
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
        if let Some(p) = preparer.as_ref().filter(|_| config.fsync) {
            // Nothing is known yet of the group commits' size: prepare one (zero-filling
            // only saves fsync time, so not without fsync).
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
                rolled_at: std::time::Instant::now(),
                flushing: false,
                wake_owed: false,
                checkpoint_due: false,
                spare: Batch::default(),
            }),
            flush: Mutex::new(crate::state::FlusherState::new(end, rec.checkpoint_seq)),
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
            .spawn(move || flush::run(s))
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

    /// The file abstraction the store writes through (for derived files kept next to it,
    /// such as the key index).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.shared.storage
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
