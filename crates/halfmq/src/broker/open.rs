//! Opening a broker (recovery replays the log after the checkpoint into the transaction,
//! delayed-message and idempotency-key indexes, then the broker's threads start) and closing
//! it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::checker::{self, CheckPool};
use super::delayed;
use super::derived::{self, Derived};
use super::{idem, retention, trace, Broker};
use crate::config::BrokerConfig;
use crate::meta::Meta;
use halfmq_store::io::{FsStorage, Storage};
use halfmq_store::record::RecordView;
use halfmq_store::{Store, StoreHooks};
use halfmq_types::clock::SharedClock;
use halfmq_types::error::{Error, Result};

/// Persists the transaction, delayed-message and idempotency-key indexes before every
/// checkpoint, stamped with the checkpoint's log offset, and fsyncs sled (see
/// `crate::meta`): sled is then at least as new as every checkpoint.
struct TxnHooks {
    clock: SharedClock,
    derived: Arc<Derived>,
    meta: Arc<Meta>,
    retention: Duration,
}

impl halfmq_store::StoreObserver for TxnHooks {
    fn fsync_done(&self, took: Duration) {
        crate::metrics::fsync(took);
    }

    fn group_committed(&self, records: u64, bytes: u64) {
        crate::metrics::group_commit(records, bytes);
    }
}

impl StoreHooks for TxnHooks {
    fn before_checkpoint(&self, log_offset: u64) -> Result<()> {
        if !self.derived.trusted.load(Ordering::Acquire) {
            // Being rebuilt (open does it after recovery): sled keeps its old stamp, so the
            // next open rebuilds again if this one stops before it is done.
            return Ok(());
        }
        let now = self.clock.now_ms();
        self.derived
            .persist(&self.meta, self.retention, now, log_offset)
    }
}

impl Broker {
    /// Open (or create) a broker on the real file system.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>> {
        Broker::open_with(Arc::new(FsStorage), config)
    }

    /// Open a broker whose log and indexes go through `storage` (in tests, the store's
    /// simulated disk, `SimStorage`, with feature `sim`). The metadata database and the key
    /// index of `trace` always live on the real file system under `config.data_dir/meta` and
    /// `config.data_dir/index`.
    pub fn open_with(storage: Arc<dyn Storage>, config: BrokerConfig) -> Result<Arc<Broker>> {
        config.validate()?;
        let dir = &config.data_dir;
        storage.create_dir_all(dir)?;
        let lock = storage.lock_dir(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
        let clock = config.clock.shared();
        let opened_ms = clock.now_ms();
        // sled is checked first: its derived state is used only when it is as new as the
        // checkpoint recovery starts from; otherwise it is rebuilt after recovery.
        let mut opened = derived::open_meta(&*storage, dir, opened_ms)?;
        let derived = Arc::new(Derived::new(&config, &clock));
        if opened.distrust.is_none() {
            derived.load(&opened.meta, opened_ms)?;
            derived.trusted.store(true, Ordering::Release);
        }
        let trusted = opened.distrust.is_none();
        // Replay the records after the checkpoint over the persisted indexes (when they are
        // rebuilt instead, after recovery, this replay is not needed).
        let mut replay_error = None;
        let mut on_record = |view: &RecordView<'_>| {
            if !trusted {
                return;
            }
            if let Err(e) = derived.apply(view, &config.txn, opened_ms) {
                replay_error.get_or_insert(e);
            }
        };
        // Like sled, the key index lives on the real file system: it is derived data, and a
        // simulated disk's injected faults (a failing fsync) must hit the log they are aimed
        // at, not an index write that happens to run at the same moment.
        let (key_index, index_report) = halfmq_store::key_index::KeyIndex::open(
            Arc::new(FsStorage),
            &dir.join("index"),
            config.store.key_index_slots,
            config.store.key_index_entries,
        )?;
        let hooks = Arc::new(TxnHooks {
            clock: clock.clone(),
            derived: derived.clone(),
            meta: opened.meta.clone(),
            retention: config.txn.outcome_retention,
        });
        let (store, recovery) = Store::open_locked(
            storage,
            dir,
            config.store.clone(),
            lock,
            &mut on_record,
            Some(hooks as Arc<dyn StoreHooks>),
        )?;
        if let Some(e) = replay_error {
            return Err(e);
        }
        derived::settle(
            &mut opened,
            &derived,
            &store,
            &config,
            recovery.log_end,
            opened_ms,
        )?;
        let meta_report = std::mem::take(&mut opened.report);
        let meta = opened.meta.clone();
        let journal = Arc::new(crate::journal::Journal::open(meta.clone(), clock.clone())?);
        journal.start_writer()?;
        let (txns, delayed, dedup) = (
            derived.txns.clone(),
            derived.delayed.clone(),
            derived.dedup.clone(),
        );
        if index_report.indexed_upto > recovery.log_end {
            // An index of a longer (other) log: useless here.
            tracing::warn!(
                indexed_upto = index_report.indexed_upto,
                log_end = recovery.log_end,
                "the key index is ahead of the log; rebuilding it"
            );
            key_index.rebuild_from(0)?;
        }
        let config_checks_max = config.txn.checks_in_flight_max as usize;
        let key_index = Arc::new(key_index);
        let indexer = Arc::new(trace::Indexer::new(key_index.clone(), store.log_reader()));
        {
            // Retention deleted segments: index files and journal events wholly below the new
            // log start go too (entries left below it are reported as expired).
            let (ki, j) = (key_index.clone(), journal.clone());
            store.on_log_start(Box::new(move |start| {
                if let Err(e) = ki.drop_below(start) {
                    tracing::warn!(error = %e, "cannot delete key index files below the log start");
                }
                if let Err(e) = j.drop_below(start) {
                    tracing::warn!(error = %e, "cannot delete trace events below the log start");
                }
            }));
        }
        let lease_clock = match &config.lease_clock {
            Some(c) => c.shared(),
            None => clock.clone(),
        };
        let broker = Arc::new(Broker {
            config,
            clock,
            lease_clock,
            store,
            meta,
            topics: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            recovery,
            txns,
            checkers: Default::default(),
            check_thread: Mutex::new(None),
            delayed,
            delay_thread: Mutex::new(None),
            dedup_thread: Mutex::new(None),
            check_pool: CheckPool::new(config_checks_max),
            dedup,
            key_index,
            journal,
            indexer: indexer.clone(),
            index_thread: Mutex::new(Some(trace::IndexerThread::spawn(indexer)?)),
            retention_pass: Mutex::new(()),
            last_retention: Mutex::new(None),
            retention_thread: Mutex::new(None),
            expired_skipped: AtomicU64::new(0),
            meta_recovery: meta_report,
            leases: super::consume::LeaseKeys::new(),
        });
        broker.load_topics()?;
        if broker.config.txn.check_back {
            *broker.check_thread.lock() = Some(checker::spawn(Arc::downgrade(&broker))?);
        }
        if broker.config.delayed_timer {
            *broker.delay_thread.lock() = Some(delayed::spawn(Arc::downgrade(&broker))?);
        }
        *broker.dedup_thread.lock() = Some(idem::spawn_persister(Arc::downgrade(&broker))?);
        if broker.config.retention.enabled() {
            *broker.retention_thread.lock() = Some(retention::spawn(
                Arc::downgrade(&broker),
                broker.config.retention.interval,
            )?);
        }
        Ok(broker)
    }

    /// Flush and stop. Later calls fail with [`Error::Closed`]. Dropping the broker does the
    /// same, but can only log errors.
    pub fn close(&self) -> Result<()> {
        self.stop_threads();
        self.store.close()?;
        // Index what the close flushed, and make the index durable, so that the next open
        // has nothing to re-index.
        self.index_catch_up()?;
        self.key_index.persist()?;
        // Check-back events handed to the journal's writer are written before the flush.
        self.journal.write_later()?;
        self.meta.flush()
    }
}
