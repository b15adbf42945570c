//! Opening a broker (recovery replays the log after the checkpoint into the transaction,
//! delayed-message and idempotency-key indexes, then the broker's threads start) and closing
//! it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use super::checker::{self, CheckPool};
use super::delayed::{self, delayed_info_of, delayed_of};
use super::txn::{txn_info_of, txn_of};
use super::{idem, retention, trace, Broker};
use crate::config::BrokerConfig;
use crate::delayed::DelayedIndex;
use crate::idem::DedupIndex;
use crate::meta::Meta;
use crate::txn::TxnIndex;
use halfmq_store::io::{FsStorage, Storage};
use halfmq_store::record::{RecordKind, RecordView, FLAG_DELAYED_FIRE, FLAG_TXN_COMMIT};
use halfmq_store::{Store, StoreHooks};
use halfmq_types::clock::SharedClock;
use halfmq_types::error::{Error, Result};
use halfmq_types::Outcome;

/// Persists the transaction and delayed-message indexes before every checkpoint.
struct TxnHooks {
    clock: SharedClock,
    txns: Arc<TxnIndex>,
    delayed: Arc<DelayedIndex>,
    meta: Arc<Meta>,
    retention: Duration,
    dedup: Arc<DedupIndex>,
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
    fn before_checkpoint(&self) -> Result<()> {
        let now = self.clock.now_ms();
        self.txns.persist(&self.meta, self.retention, now)?;
        self.delayed.persist(&self.meta)?;
        self.dedup.persist(&self.meta, now)
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
        let meta = Arc::new(Meta::open(&dir.join("meta"))?);
        let txns = Arc::new(TxnIndex::new());
        txns.load(&meta)?;
        let delayed = Arc::new(DelayedIndex::default());
        delayed.load(&meta)?;
        let clock = config.clock.shared();
        let dedup = Arc::new(DedupIndex::new(
            crate::idem::Limits::of(&config),
            clock.clone(),
        ));
        dedup.load(&meta, clock.now_ms())?;
        let hooks = Arc::new(TxnHooks {
            clock: clock.clone(),
            txns: txns.clone(),
            delayed: delayed.clone(),
            meta: meta.clone(),
            retention: config.txn.outcome_retention,
            dedup: dedup.clone(),
        });
        let opened_ms = clock.now_ms();
        // Replay the transaction records after the checkpoint over the persisted index.
        let mut replay_error = None;
        let mut on_record = |view: &RecordView<'_>| {
            let r = match view.header.kind {
                RecordKind::Half => {
                    txn_info_of(view, &config.txn).map(|info| txns.insert_half(info))
                }
                RecordKind::Message if view.header.flags & FLAG_TXN_COMMIT != 0 => txn_of(view)
                    .map(|txn| txns.resolve(txn, Outcome::Committed, view.header.timestamp_ms)),
                RecordKind::Message if view.header.flags & FLAG_DELAYED_FIRE != 0 => {
                    delayed_of(view).map(|id| delayed.fired(id))
                }
                RecordKind::Delayed => delayed_info_of(view).map(|d| delayed.insert(d)),
                RecordKind::TxnEnd => txn_of(view)
                    .map(|txn| txns.resolve(txn, Outcome::RolledBack, view.header.timestamp_ms)),
                _ => Ok(()),
            };
            let r = r.and_then(|()| dedup.replay(view, opened_ms));
            if let Err(e) = r {
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
        let journal = Arc::new(crate::journal::Journal::open(meta.clone(), clock.clone())?);
        journal.start_writer()?;
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
        txns.forget_beyond(recovery.log_end);
        delayed.forget_beyond(recovery.log_end);
        dedup.forget_beyond(recovery.log_end);
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
        let broker = Arc::new(Broker {
            config,
            clock,
            store,
            meta,
            topics: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            recovery,
            txns,
            checkers: RwLock::new(HashMap::new()),
            checker_ids: AtomicU64::new(1),
            checker_rr: AtomicUsize::new(0),
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
        });
        broker.load_topics()?;
        if broker.config.txn.check_back {
            *broker.check_thread.lock() = Some(checker::spawn(Arc::downgrade(&broker))?);
        }
        *broker.delay_thread.lock() = Some(delayed::spawn(Arc::downgrade(&broker))?);
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
