//! Opening's side of the metadata database (sled): it is checked before anything is taken
//! from it, and the state derived from the log (pending halves and transaction outcomes,
//! pending delayed messages, idempotency keys) is rebuilt from the log when `meta/` is
//! missing, empty, damaged or older than the log's checkpoint. Consumer positions lost with
//! it are reported, and committed offsets past the end of their queue are clamped.
//!
//! sled is trusted as it is only when every derived tree carries a stamp at least as new as
//! the checkpoint recovery reads the log from (the stamps, and the fsync of sled before each
//! checkpoint, are in `crate::meta`). Otherwise the derived trees are rebuilt: from their
//! stamp when the log still holds everything after it (an old copy put back), else from the
//! start of the log, which holds every pending half, delayed message and remembered key,
//! because retention never deletes below them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::delayed::{delayed_info_of, delayed_of};
use super::txn::{txn_info_of, txn_of};
use crate::config::{BrokerConfig, TxnConfig};
use crate::delayed::DelayedIndex;
use crate::idem::DedupIndex;
use crate::meta::{sync_dir, Meta};
use crate::txn::TxnIndex;
use halfmq_store::io::Storage;
use halfmq_store::record::{RecordKind, RecordView, FLAG_DELAYED_FIRE, FLAG_TXN_COMMIT};
use halfmq_store::Store;
use halfmq_types::clock::SharedClock;
use halfmq_types::error::{Error, Result};
use halfmq_types::stats::{MetaRecovery, OffsetReport};
use halfmq_types::Outcome;

/// The indexes derived from the log.
pub(super) struct Derived {
    pub(super) txns: Arc<TxnIndex>,
    pub(super) delayed: Arc<DelayedIndex>,
    pub(super) dedup: Arc<DedupIndex>,
    /// Whether their state in sled may be written (stamped) before a checkpoint: false
    /// while they are not yet rebuilt, so a checkpoint written meanwhile (recovery's) never
    /// gets a stamp it does not deserve.
    pub(super) trusted: AtomicBool,
}

impl Derived {
    pub(super) fn new(config: &BrokerConfig, clock: &SharedClock) -> Derived {
        Derived {
            txns: Arc::new(TxnIndex::new()),
            delayed: Arc::new(DelayedIndex::default()),
            dedup: Arc::new(DedupIndex::new(
                crate::idem::Limits::of(config),
                clock.clone(),
            )),
            trusted: AtomicBool::new(false),
        }
    }

    /// Load what sled holds.
    pub(super) fn load(&self, meta: &Meta, now_ms: u64) -> Result<()> {
        self.txns.load(meta)?;
        self.delayed.load(meta)?;
        self.dedup.load(meta, now_ms)
    }

    fn clear(&self) {
        self.txns.clear();
        self.delayed.clear();
        self.dedup.clear();
    }

    /// Apply one record of the log (recovery's replay, or a rebuild).
    pub(super) fn apply(
        &self,
        view: &RecordView<'_>,
        txn: &TxnConfig,
        opened_ms: u64,
    ) -> Result<()> {
        let (txns, delayed) = (&self.txns, &self.delayed);
        match view.header.kind {
            RecordKind::Half => txn_info_of(view, txn).map(|info| txns.insert_half(info)),
            RecordKind::Message if view.header.flags & FLAG_TXN_COMMIT != 0 => txn_of(view)
                .map(|id| txns.resolve(id, Outcome::Committed, view.header.timestamp_ms)),
            RecordKind::Message if view.header.flags & FLAG_DELAYED_FIRE != 0 => {
                delayed_of(view).map(|id| delayed.fired(id))
            }
            RecordKind::Delayed => delayed_info_of(view).map(|d| delayed.insert(d)),
            RecordKind::TxnEnd => txn_of(view)
                .map(|id| txns.resolve(id, Outcome::RolledBack, view.header.timestamp_ms)),
            _ => Ok(()),
        }?;
        self.dedup.replay(view, opened_ms)
    }

    /// Write everything to sled with `stamp` (the log offset they are derived up to) and
    /// fsync sled's files: what runs before every checkpoint.
    pub(super) fn persist(
        &self,
        meta: &Meta,
        retention: std::time::Duration,
        now_ms: u64,
        stamp: u64,
    ) -> Result<()> {
        self.txns.persist(meta, retention, now_ms, Some(stamp))?;
        self.delayed.persist(meta, Some(stamp))?;
        self.dedup.persist(meta, now_ms, Some(stamp))?;
        meta.sync_files()
    }
}

/// sled as open found it, before the store is opened.
pub(super) struct OpenedMeta {
    pub(super) meta: Arc<Meta>,
    /// The smallest stamp of the derived trees.
    pub(super) stamp: Option<u64>,
    /// Why the derived trees cannot be used as they are (`None`: they can).
    pub(super) distrust: Option<String>,
    /// Everything sled held was lost (new, replaced, or found empty).
    pub(super) lost_all: bool,
    /// What is reported in `stats`.
    pub(super) report: MetaRecovery,
}

/// Open sled under `dir/meta` and decide whether its derived state can be used: a database
/// sled cannot read is moved aside (`meta.damaged.<ms>`) and a new one created; one whose
/// derived trees are damaged keeps the rest (topics, consumer offsets) and has them cleared.
pub(super) fn open_meta(storage: &dyn Storage, dir: &Path, now_ms: u64) -> Result<OpenedMeta> {
    let path = dir.join("meta");
    let existed = path.join("db").exists() || path.join("conf").exists();
    let mut report = MetaRecovery::default();
    let mut distrust = None;
    let mut lost_all = false;
    // `Err(why)`: the database cannot be used at all (and is closed again here).
    let usable = match Meta::open_or_damaged(&path)? {
        Ok(meta) => match meta.verify() {
            Ok(()) => Ok(meta),
            Err((tree, e)) if is_derived(&tree) => {
                tracing::warn!(tree, error = %e, "metadata: a tree derived from the log is damaged; rebuilding it from the log");
                meta.clear_derived()?;
                distrust = Some(format!("tree {tree} of meta/ is damaged: {e}"));
                Ok(meta)
            }
            Err((tree, e)) => Err(format!("tree {tree} of meta/ is damaged: {e}")),
        },
        Err(why) => Err(format!("meta/ cannot be read: {why}")),
    };
    let meta = match usable {
        Ok(meta) => meta,
        Err(why) => {
            let aside = move_aside(&path, now_ms, &why)?;
            report.moved_aside = Some(aside.display().to_string());
            distrust = Some(why);
            lost_all = true;
            Meta::open(&path)?
        }
    };
    let stamp = meta.derived_stamp()?;
    let checkpoint = halfmq_store::checkpoint::load(storage, dir)?.map(|c| c.log_offset);
    if distrust.is_none() {
        distrust = match (stamp, checkpoint) {
            (Some(s), Some(c)) if s < c => Some(format!(
                "meta/ is older than the log: its derived state goes up to log offset {s}, \
                 the checkpoint is at {c}"
            )),
            (Some(_), _) => None,
            (None, _) if meta.is_fresh() => {
                lost_all = true;
                Some(if existed {
                    "meta/ is empty: sled found no database in it".to_owned()
                } else {
                    "meta/ is missing".to_owned()
                })
            }
            (None, _) => Some("meta/ has no stamp of the log offset its derived state goes up to (emptied, or written by an older version)".to_owned()),
        };
    }
    Ok(OpenedMeta {
        meta: Arc::new(meta),
        stamp,
        distrust,
        lost_all,
        report,
    })
}

fn is_derived(tree: &str) -> bool {
    matches!(
        tree,
        "txn_halves" | "txn_outcome_buckets" | "delayed" | "idem_chunks"
    )
}

/// Move a database sled cannot use out of the way (it is kept for a person to look at).
fn move_aside(path: &Path, now_ms: u64, why: &str) -> Result<PathBuf> {
    let aside = path.with_file_name(format!("meta.damaged.{now_ms}"));
    std::fs::rename(path, &aside)
        .map_err(|e| Error::io(path, "move the damaged database aside", e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    tracing::warn!(
        from = %path.display(),
        to = %aside.display(),
        reason = why,
        "metadata: the database cannot be used; moved aside, starting a new one"
    );
    Ok(aside)
}

/// After recovery: rebuild the derived state from the log if sled could not be trusted,
/// forget what points past the end of the log, report consumer positions that were lost or
/// clamped, and make sled durable with a stamp at the end of the log.
pub(super) fn settle(
    opened: &mut OpenedMeta,
    derived: &Derived,
    store: &Store,
    config: &BrokerConfig,
    log_end: u64,
    opened_ms: u64,
) -> Result<()> {
    let meta = &opened.meta;
    let report = &mut opened.report;
    if let Some(why) = opened.distrust.clone() {
        let (from, records) = rebuild(
            meta,
            derived,
            store,
            config,
            opened.stamp,
            log_end,
            opened_ms,
        )?;
        // An empty log (a new data directory) has nothing to rebuild and nothing to report.
        if records > 0 || report.moved_aside.is_some() {
            tracing::warn!(
                reason = %why,
                from,
                records,
                "metadata: rebuilt pending transactions, delayed messages and idempotency keys from the log"
            );
            report.rebuilt = Some(why);
            report.rebuilt_from = from;
            report.records_replayed = records;
        }
    }
    derived.txns.forget_beyond(log_end);
    report.outcomes_fenced = derived.txns.settle_loaded(meta, log_end)?;
    if report.outcomes_fenced > 0 {
        tracing::warn!(
            outcomes = report.outcomes_fenced,
            log_end,
            "metadata: forgot transaction outcomes at or past the end of the log (their ids will be used again)"
        );
    }
    derived.delayed.forget_beyond(log_end);
    derived.dedup.forget_beyond(log_end);
    consumers(opened, store)?;
    if !derived.trusted.load(Ordering::Acquire) {
        derived.persist(
            &opened.meta,
            config.txn.outcome_retention,
            opened_ms,
            log_end,
        )?;
        derived.trusted.store(true, Ordering::Release);
    }
    opened.meta.sync()
}

/// Replace the derived state with what the log says: over sled's own state from its stamp
/// when the log still holds everything after it, else from the start of the log. Returns
/// where the log was read from and how many records.
fn rebuild(
    meta: &Meta,
    derived: &Derived,
    store: &Store,
    config: &BrokerConfig,
    stamp: Option<u64>,
    log_end: u64,
    opened_ms: u64,
) -> Result<(u64, u64)> {
    let log_start = store.log_start();
    let scan = |from: u64| -> Result<u64> {
        let mut records = 0u64;
        store.scan_records(from, log_end, &mut |view, _| {
            records += 1;
            derived.apply(view, &config.txn, opened_ms)
        })?;
        Ok(records)
    };
    if let Some(s) = stamp.filter(|&s| s >= log_start && s <= log_end) {
        derived.load(meta, opened_ms)?;
        match scan(s) {
            Ok(records) => return Ok((s, records)),
            Err(e) => {
                tracing::warn!(stamp = s, error = %e, "metadata: cannot replay the log from the stamp of meta/; rebuilding from the start of the log");
                derived.clear();
            }
        }
    }
    meta.clear_derived()?;
    let records = scan(log_start)?;
    Ok((log_start, records))
}

/// Report consumer positions lost with sled, and clamp committed offsets past the end of
/// their queue.
fn consumers(opened: &mut OpenedMeta, store: &Store) -> Result<()> {
    let meta = &opened.meta;
    let report = &mut opened.report;
    let ends: std::collections::HashMap<(String, u32), u64> = store
        .queues()
        .iter()
        .map(|q| ((q.topic().to_owned(), q.queue_id()), q.len()))
        .collect();
    // A database sled recovered only in part (it stops at the first entry it cannot read)
    // may have lost every consumer entry without looking new: that is a loss of all of them.
    let none_left = opened.distrust.is_some() && meta.consumer_queues()?.is_empty();
    if opened.lost_all || none_left {
        let mut lost: Vec<OffsetReport> = ends
            .iter()
            .filter(|(_, &end)| end > 0)
            .map(|((topic, queue), &end)| OffsetReport {
                group: None,
                topic: topic.clone(),
                queue: *queue,
                committed: 0,
                end,
            })
            .collect();
        lost.sort_by(|a, b| (&a.topic, a.queue).cmp(&(&b.topic, b.queue)));
        for l in &lost {
            tracing::warn!(
                group = "*",
                topic = %l.topic,
                queue = l.queue,
                messages = l.end,
                "metadata: the committed offsets of every consumer group were lost with meta/; \
                 groups start again at the beginning of the queue (its messages are delivered again)"
            );
        }
        report.offsets_lost = lost;
    } else if opened.distrust.is_some() {
        for (group, topic, queue) in meta.consumer_queues()? {
            let committed = meta.committed(&group, &topic, queue)?;
            let end = ends.get(&(topic.clone(), queue)).copied().unwrap_or(0);
            tracing::warn!(
                group = %group,
                topic = %topic,
                queue,
                committed,
                end,
                "metadata: meta/ is older than the log, so this committed offset may be older \
                 than the group's last acks; messages acked since are delivered again"
            );
            report.offsets_lost.push(OffsetReport {
                group: Some(group),
                topic,
                queue,
                committed,
                end,
            });
        }
    }
    for (group, topic, queue) in meta.consumer_queues()? {
        let end = ends.get(&(topic.clone(), queue)).copied().unwrap_or(0);
        if let Some(found) = meta.clamp_consumer(&group, &topic, queue, end)? {
            tracing::warn!(
                group = %group,
                topic = %topic,
                queue,
                committed = found,
                end,
                "metadata: committed offset past the end of the queue (the log lost its end); \
                 lowered to the end, so new messages are not skipped"
            );
            report.offsets_clamped.push(OffsetReport {
                group: Some(group),
                topic,
                queue,
                committed: found,
                end,
            });
        }
    }
    Ok(())
}
