//! Small mutable state that must survive restarts, kept in sled: topic configuration and
//! consumer-group offsets. Everything sled holds refers only to durable log data, so a crash
//! can never leave it ahead of the log.
//!
//! Keys in the `consumers` tree (big-endian numbers, so keys sort by position):
//! - `c` group `\0` topic `\0` queue:u32 → committed offset u64: every message before it is
//!   acked;
//! - `a` group `\0` topic `\0` queue:u32 offset:u64 → (empty): acked although an earlier
//!   message is not yet;
//! - `r` group `\0` topic `\0` queue:u32 offset:u64 → bincode [`RetryState`]: a message whose
//!   delivery failed (time-out or nack), with its failure count and when it may be delivered
//!   again. Removed after the ack; one left behind by a crash in between is ignored (the
//!   message is acked) and removed on the next load.
//!
//! The `groups` tree holds per-group overrides of the delivery settings
//! (group → bincode [`GroupSettings`], without its `fifo`), and `group_fifo` the FIFO
//! override (group → one byte, 1 or 0; no entry: the broker default).
//!
//! One ack writes both kinds in one atomic batch, and waits for sled's flush (fsync) before
//! it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

mod derived;

mod durable;
mod live;

pub(crate) use live::LiveTree;
use live::{open_db, LiveDb};

use halfmq_types::codec;
use halfmq_types::error::{Error, Result};
use halfmq_types::{GroupSettings, Outcome, TxnInfo};

/// sled's errors, as the metadata-store error every caller sees.
pub(crate) fn sled_err(e: sled::Error) -> Error {
    Error::Meta(e.to_string())
}

/// fsync the directory `dir`, so that the entries created, renamed or removed in it stay so.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync directory", e))
}

/// Configuration of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicConfig {
    /// Number of queues.
    pub queues: u32,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// Why and how often the delivery of one message to one group failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetryState {
    /// Failed deliveries so far (time-outs and nacks).
    pub failures: u32,
    /// Not to be delivered again before this, ms since the Unix epoch.
    pub due_ms: u64,
    /// Why the last delivery failed.
    pub reason: String,
}

/// A delayed message not delivered yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DelayedInfo {
    /// Its id: the log offset of its `Delayed` record.
    pub id: u64,
    /// Size of that record, to read it back.
    pub size: u32,
    /// Topic.
    pub topic: String,
    /// Queue.
    pub queue: u32,
    /// Key.
    pub key: String,
    /// When to deliver it, ms since the Unix epoch.
    pub deliver_at_ms: u64,
}

/// The sled database, reopened in place after an I/O error (a full disk, EIO: see
/// `meta/live.rs`), so that acks and checkpoints work again once the disk does.
pub struct Meta {
    db: LiveDb,
    topics: LiveTree,
    consumers: LiveTree,
    groups: LiveTree,
    /// group → one byte, 1 or 0: the group's FIFO override (kept apart from `groups`, whose
    /// values keep their older layout).
    group_fifo: LiveTree,
    /// delayed message id (u64 BE) → bincode DelayedInfo of ones not delivered yet.
    delayed: LiveTree,
    /// txn id (u64 BE) → bincode TxnInfo of unfinished transactions.
    txn_halves: LiveTree,
    /// (txn id >> 16) (u64 BE) → bincode sorted Vec<(txn id, Outcome, at_ms)> of finished
    /// ones, for at least the retention time.
    txn_outcomes: LiveTree,
    /// chunk id (u64 BE) → idempotency-key entries (see `crate::idem`).
    idem: LiveTree,
    /// The database's directory (its files are fsynced before every checkpoint).
    dir: PathBuf,
    /// sled created the database now (nothing was recovered from an earlier run).
    fresh: bool,
    /// Makes a flush durable (see `meta/durable.rs`).
    sync: durable::DbSync,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta").finish_non_exhaustive()
    }
}

/// The durable consumer state of one (group, topic, queue).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueAcks {
    /// Every message before this queue offset is acked.
    pub committed: u64,
    /// Messages at or after `committed` that are acked too.
    pub acked_above: BTreeSet<u64>,
}

fn prefix(kind: u8, group: &str, topic: &str, queue: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 16);
    k.push(kind);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue.to_be_bytes());
    k
}

/// (group, topic, queue) of a committed-offset key (`c group \0 topic \0 queue`).
fn parse_committed_key(k: &[u8]) -> Result<(String, String, u32)> {
    let bad = || Error::Meta("bad consumer key".into());
    let rest = k.get(1..).ok_or_else(bad)?;
    let mut parts = rest.splitn(3, |&b| b == 0);
    let (Some(g), Some(t), Some(q)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let q: [u8; 4] = q.try_into().map_err(|_| bad())?;
    Ok((
        String::from_utf8_lossy(g).into_owned(),
        String::from_utf8_lossy(t).into_owned(),
        u32::from_be_bytes(q),
    ))
}

/// Transactions whose ids (log offsets) share the bits above this share an outcome bucket.
const OUTCOME_BUCKET_SHIFT: u32 = 16;

/// A group's FIFO override as `group_fifo` keeps it: one byte, 1 (on) or 0 (off).
pub(crate) fn fifo_flag(v: &[u8]) -> Result<bool> {
    match v {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(Error::Decode {
            what: "group fifo flag",
            reason: format!("{} bytes, not one byte 0 or 1", v.len()),
        }),
    }
}

fn u64_be(bytes: &[u8]) -> Option<u64> {
    let a: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_be_bytes(a))
}

impl Meta {
    /// Open (or create) the database in `dir`.
    ///
    /// The caller holds the data directory's lock, so a sled lock held by someone else can
    /// only be an earlier handle of this process that sled has not released yet (it does so
    /// lazily, from a background thread): that is waited out for up to 5 s.
    pub fn open(dir: &Path) -> Result<Meta> {
        let db =
            open_db(dir).map_err(|e| Error::Meta(format!("opening {}: {e}", dir.display())))?;
        Meta::with_db(db, dir)
    }

    /// A new database in a temporary directory (which must outlive it), for unit tests.
    #[cfg(test)]
    pub(crate) fn temporary() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::open(dir.path()).unwrap();
        (dir, meta)
    }

    fn with_db(db: sled::Db, dir: &Path) -> Result<Meta> {
        let fresh = !db.was_recovered();
        let db = LiveDb::from_db(dir, db);
        let topics = db.open_tree("topics").map_err(sled_err)?;
        let consumers = db.open_tree("consumers").map_err(sled_err)?;
        let groups = db.open_tree("groups").map_err(sled_err)?;
        let group_fifo = db.open_tree("group_fifo").map_err(sled_err)?;
        let delayed = db.open_tree("delayed").map_err(sled_err)?;
        let txn_halves = db.open_tree("txn_halves").map_err(sled_err)?;
        let txn_outcomes = db.open_tree("txn_outcome_buckets").map_err(sled_err)?;
        let idem = db.open_tree("idem_chunks").map_err(sled_err)?;
        let flusher = db.handle();
        let flush: durable::Flush = Box::new(move || {
            flusher
                .flush()
                .map(drop)
                .map_err(|e| format!("flush of the metadata store: {}", sled_err(e)))
        });
        let meta = Meta {
            db,
            topics,
            consumers,
            groups,
            group_fifo,
            delayed,
            txn_halves,
            txn_outcomes,
            idem,
            dir: dir.to_path_buf(),
            fresh,
            sync: durable::DbSync::start(dir, flush)?,
        };
        // sled's files and `meta/` itself are durable entries from here on (later flushes
        // fsync only sled's file; new files are synced before every checkpoint).
        meta.sync_files()?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(meta)
    }

    /// The configuration of a topic, if it exists.
    pub fn topic(&self, name: &str) -> Result<Option<TopicConfig>> {
        match self.topics.get(name.as_bytes()).map_err(sled_err)? {
            Some(v) => Ok(Some(codec::decode(&v, "topic config")?)),
            None => Ok(None),
        }
    }

    /// Every topic.
    pub fn topics(&self) -> Result<Vec<(String, TopicConfig)>> {
        let mut out = Vec::new();
        for kv in self.topics.iter() {
            let (k, v) = kv.map_err(sled_err)?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| Error::Meta("topic name in metadata is not UTF-8".into()))?;
            out.push((name, codec::decode(&v, "topic config")?));
        }
        Ok(out)
    }

    /// Durably create a topic, unless it exists; returns the configuration in force.
    pub fn create_topic(&self, name: &str, cfg: TopicConfig) -> Result<TopicConfig> {
        let value = codec::encode(&cfg, "topic config")?;
        match self
            .topics
            .compare_and_swap(name.as_bytes(), None as Option<&[u8]>, Some(value))
            .map_err(sled_err)?
        {
            Ok(()) => {
                self.db.flush().map_err(sled_err)?;
                Ok(cfg)
            }
            Err(cas) => match cas.current {
                Some(v) => codec::decode(&v, "topic config"),
                None => Err(Error::Meta(format!(
                    "topic {name} vanished while being created"
                ))),
            },
        }
    }

    /// The durable ack state of (group, topic, queue).
    pub fn queue_acks(&self, group: &str, topic: &str, queue: u32) -> Result<QueueAcks> {
        let committed = match self
            .consumers
            .get(prefix(b'c', group, topic, queue))
            .map_err(sled_err)?
        {
            Some(v) => u64_be(&v).ok_or_else(|| Error::Meta("bad committed offset".into()))?,
            None => 0,
        };
        let p = prefix(b'a', group, topic, queue);
        let mut acked_above = BTreeSet::new();
        for kv in self.consumers.scan_prefix(&p) {
            let (k, _) = kv.map_err(sled_err)?;
            let off = u64_be(&k[p.len()..]).ok_or_else(|| Error::Meta("bad ack key".into()))?;
            acked_above.insert(off);
        }
        Ok(QueueAcks {
            committed,
            acked_above,
        })
    }

    /// The committed offset of (group, topic, queue): every message before it is acked (0
    /// when the group never acked there).
    pub fn committed(&self, group: &str, topic: &str, queue: u32) -> Result<u64> {
        match self
            .consumers
            .get(prefix(b'c', group, topic, queue))
            .map_err(sled_err)?
        {
            Some(v) => u64_be(&v).ok_or_else(|| Error::Meta("bad committed offset".into())),
            None => Ok(0),
        }
    }

    /// Remember that `group` consumes (topic, queue), with committed offset 0, unless it
    /// has a committed offset already. Retention then keeps what the group has not acked
    /// even across a restart before its first ack. Not flushed: lost in a crash only if the
    /// group never acked, which leaves it as unknown as before.
    pub fn note_consumer(&self, group: &str, topic: &str, queue: u32) -> Result<()> {
        let _ = self
            .consumers
            .compare_and_swap(
                prefix(b'c', group, topic, queue),
                None as Option<&[u8]>,
                Some(&0u64.to_be_bytes()[..]),
            )
            .map_err(sled_err)?;
        Ok(())
    }

    /// Record a change of ack state in one atomic batch: the new committed offset, acks
    /// above it that were added, and ones that are now below it and can go. Not flushed: the
    /// ack waits for [`Meta::flush`] (or [`Meta::flush_async`]) before it returns.
    pub fn put_acks(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        committed: u64,
        added: &[u64],
        removed: &[u64],
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(prefix(b'c', group, topic, queue), &committed.to_be_bytes());
        let p = prefix(b'a', group, topic, queue);
        let key = |off: u64| {
            let mut k = p.clone();
            k.extend_from_slice(&off.to_be_bytes());
            k
        };
        for &off in removed {
            batch.remove(key(off));
        }
        for &off in added {
            batch.insert(key(off), &[]);
        }
        self.consumers.apply_batch(batch).map_err(sled_err)?;
        Ok(())
    }

    /// The failed deliveries of (group, topic, queue), by queue offset.
    pub fn retry_states(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
    ) -> Result<BTreeMap<u64, RetryState>> {
        let p = prefix(b'r', group, topic, queue);
        let mut out = BTreeMap::new();
        for kv in self.consumers.scan_prefix(&p) {
            let (k, v) = kv.map_err(sled_err)?;
            let off = u64_be(&k[p.len()..]).ok_or_else(|| Error::Meta("bad retry key".into()))?;
            out.insert(off, codec::decode(&v, "retry state")?);
        }
        Ok(out)
    }

    /// Write (`Some`) or remove (`None`) retry states of (group, topic, queue) in one batch;
    /// flushed to disk before returning when `durable`.
    pub fn store_retries(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        changes: &[(u64, Option<RetryState>)],
        durable: bool,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let p = prefix(b'r', group, topic, queue);
        let mut batch = sled::Batch::default();
        for (off, state) in changes {
            let mut k = p.clone();
            k.extend_from_slice(&off.to_be_bytes());
            match state {
                Some(st) => batch.insert(k, codec::encode(st, "retry state")?),
                None => batch.remove(k),
            }
        }
        self.consumers.apply_batch(batch).map_err(sled_err)?;
        if durable {
            self.db.flush().map_err(sled_err)?;
        }
        Ok(())
    }

    /// The delivery overrides of a group (default: none).
    pub fn group_settings(&self, group: &str) -> Result<GroupSettings> {
        let mut s: GroupSettings = match self.groups.get(group.as_bytes()).map_err(sled_err)? {
            Some(v) => codec::decode(&v, "group settings")?,
            None => GroupSettings::default(),
        };
        s.fifo = match self.group_fifo.get(group.as_bytes()).map_err(sled_err)? {
            Some(v) => Some(fifo_flag(&v)?),
            None => None,
        };
        Ok(s)
    }

    /// Durably store the delivery overrides of a group.
    pub fn set_group_settings(&self, group: &str, settings: &GroupSettings) -> Result<()> {
        self.groups
            .insert(group.as_bytes(), codec::encode(settings, "group settings")?)
            .map_err(sled_err)?;
        match settings.fifo {
            Some(on) => self
                .group_fifo
                .insert(group.as_bytes(), &[u8::from(on)])
                .map(drop),
            None => self.group_fifo.remove(group.as_bytes()).map(drop),
        }
        .map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    /// Every (group, topic, queue) with stored offsets.
    pub fn consumer_queues(&self) -> Result<Vec<(String, String, u32)>> {
        let mut out = Vec::new();
        for kv in self.consumers.scan_prefix([b'c']) {
            let (k, _) = kv.map_err(sled_err)?;
            out.push(parse_committed_key(&k)?);
        }
        Ok(out)
    }

    /// Remove everything stored for `group`: committed offsets, acks above them, retry
    /// states and its settings, in one flushed batch. Returns the (topic, queue) pairs it
    /// had offsets for, and whether it had anything at all.
    pub fn delete_group(&self, group: &str) -> Result<(Vec<(String, u32)>, bool)> {
        let mut batch = sled::Batch::default();
        let mut queues = Vec::new();
        let mut any = false;
        for kind in [b'c', b'a', b'r'] {
            let mut p = Vec::with_capacity(group.len() + 2);
            p.push(kind);
            p.extend_from_slice(group.as_bytes());
            p.push(0);
            for kv in self.consumers.scan_prefix(&p) {
                let (k, _) = kv.map_err(sled_err)?;
                if kind == b'c' {
                    let (_, topic, queue) = parse_committed_key(&k)?;
                    queues.push((topic, queue));
                }
                batch.remove(k);
                any = true;
            }
        }
        any |= self
            .groups
            .contains_key(group.as_bytes())
            .map_err(sled_err)?;
        self.consumers.apply_batch(batch).map_err(sled_err)?;
        self.groups.remove(group.as_bytes()).map_err(sled_err)?;
        self.group_fifo.remove(group.as_bytes()).map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        Ok((queues, any))
    }

    /// Every persisted unfinished transaction.
    pub fn txn_halves(&self) -> Result<Vec<TxnInfo>> {
        derived::decode_all(&self.txn_halves, "transaction state")
    }

    /// The remembered outcome of a finished transaction and when it finished.
    pub fn txn_outcome(&self, txn: u64) -> Result<Option<(Outcome, u64)>> {
        let bucket = self.outcome_bucket(txn >> OUTCOME_BUCKET_SHIFT)?;
        Ok(bucket
            .binary_search_by_key(&txn, |e| e.0)
            .ok()
            .map(|i| (bucket[i].1, bucket[i].2)))
    }

    fn outcome_bucket(&self, bucket: u64) -> Result<Vec<(u64, Outcome, u64)>> {
        match self
            .txn_outcomes
            .get(bucket.to_be_bytes())
            .map_err(sled_err)?
        {
            Some(v) => codec::decode(&v, "transaction outcomes"),
            None => Ok(Vec::new()),
        }
    }

    /// Durably apply changes to transaction state: unfinished ones to write or remove,
    /// outcomes to remember, and outcomes older than `prune_before_ms` to forget. With a
    /// `stamp` (before a checkpoint at that log offset), each tree's batch carries it: the
    /// tree then holds everything derived from the log before it.
    ///
    /// Outcomes are kept in buckets of transaction ids (ids are log offsets, so a bucket holds
    /// the transactions of 64 KiB of log, written at about the same time): one
    /// read-modify-write per bucket instead of a sled insert per transaction. Pruning drops
    /// whole buckets from the oldest while all their outcomes are older than the cut, so an
    /// outcome is kept at least as long as promised.
    pub fn apply_txn_changes(
        &self,
        puts: &[TxnInfo],
        removes: &[u64],
        outcomes: &[(u64, Outcome, u64)],
        prune_before_ms: u64,
        stamp: Option<u64>,
    ) -> Result<()> {
        let mut halves = sled::Batch::default();
        for info in puts {
            halves.insert(
                &info.txn_id.to_be_bytes(),
                codec::encode(info, "transaction state")?,
            );
        }
        for txn in removes {
            halves.remove(&txn.to_be_bytes());
        }
        let mut by_bucket: BTreeMap<u64, Vec<(u64, Outcome, u64)>> = BTreeMap::new();
        for &o in outcomes {
            by_bucket
                .entry(o.0 >> OUTCOME_BUCKET_SHIFT)
                .or_default()
                .push(o);
        }
        let mut buckets = sled::Batch::default();
        for (bucket, new) in by_bucket {
            let mut all = self.outcome_bucket(bucket)?;
            all.extend(new);
            all.sort_by_key(|e| e.0);
            all.dedup_by_key(|e| e.0);
            buckets.insert(
                &bucket.to_be_bytes(),
                codec::encode(&all, "transaction outcomes")?,
            );
        }
        if prune_before_ms > 0 {
            for kv in derived::entries(&self.txn_outcomes) {
                let (k, v) = kv?;
                let bucket: Vec<(u64, Outcome, u64)> = codec::decode(&v, "transaction outcomes")?;
                if bucket.iter().any(|e| e.2 >= prune_before_ms) {
                    break;
                }
                buckets.remove(k);
            }
        }
        if let Some(at) = stamp {
            halves.insert(derived::STAMP_KEY, &at.to_be_bytes());
            buckets.insert(derived::STAMP_KEY, &at.to_be_bytes());
        }
        // Outcomes first: a crash in between leaves a finished transaction also listed as
        // unfinished, which loading resolves; never an unfinished one that is forgotten.
        self.txn_outcomes.apply_batch(buckets).map_err(sled_err)?;
        self.txn_halves.apply_batch(halves).map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    /// Every persisted delayed message not delivered yet.
    pub fn delayed(&self) -> Result<Vec<DelayedInfo>> {
        derived::decode_all(&self.delayed, "delayed message")
    }

    /// Durably write and remove delayed messages (with the `stamp` of the checkpoint they are
    /// written for in the same batch, see [`Meta::apply_txn_changes`]).
    pub fn apply_delayed_changes(
        &self,
        puts: &[DelayedInfo],
        removes: &[u64],
        stamp: Option<u64>,
    ) -> Result<()> {
        let mut batch = sled::Batch::default();
        if let Some(at) = stamp {
            batch.insert(derived::STAMP_KEY, &at.to_be_bytes());
        }
        for d in puts {
            batch.insert(&d.id.to_be_bytes(), codec::encode(d, "delayed message")?);
        }
        for id in removes {
            batch.remove(&id.to_be_bytes());
        }
        self.delayed.apply_batch(batch).map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    /// Open (or create) a tree of the database (for modules that own their own trees).
    pub(crate) fn tree(&self, name: &str) -> Result<LiveTree> {
        self.db.open_tree(name).map_err(sled_err)
    }

    /// Flush everything to disk, durably: sled's flush, then an fsync of its file shared
    /// with every other caller waiting at the time (see `meta/durable.rs`).
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map_err(sled_err)?;
        self.sync.sync()
    }

    /// [`Meta::flush`] for async code: sled's flush and the fsync run on the metadata fsync
    /// thread, so the executor's thread is not blocked (see `meta/durable.rs` for why not
    /// sled's own `flush_async`).
    pub async fn flush_async(&self) -> Result<()> {
        self.sync.flush_and_sync_async().await
    }

    /// Every persisted chunk of idempotency-key entries, by id (oldest first).
    pub fn idem_chunks(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        derived::entries(&self.idem)
            .map(|kv| {
                let (k, v) = kv?;
                let id = u64_be(&k).ok_or_else(|| Error::Decode {
                    what: "idempotency chunk id",
                    reason: format!("{} bytes, not 8", k.len()),
                })?;
                Ok((id, v.to_vec()))
            })
            .collect()
    }

    /// Durably write new chunks of idempotency-key entries and remove forgotten ones, in one
    /// atomic batch (with the `stamp` of the checkpoint they are written for, see
    /// [`Meta::apply_txn_changes`]), flushed before this returns.
    pub fn apply_idem_changes(
        &self,
        puts: &[(u64, Vec<u8>)],
        removes: &[u64],
        stamp: Option<u64>,
    ) -> Result<()> {
        if puts.is_empty() && removes.is_empty() && stamp.is_none() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        if let Some(at) = stamp {
            batch.insert(derived::STAMP_KEY, &at.to_be_bytes());
        }
        for (id, v) in puts {
            batch.insert(&id.to_be_bytes(), v.as_slice());
        }
        for id in removes {
            batch.remove(&id.to_be_bytes());
        }
        self.idem.apply_batch(batch).map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_found_after_merges_and_pruned_by_whole_old_buckets() {
        let (_dir, meta) = Meta::temporary();
        let b = 1u64 << OUTCOME_BUCKET_SHIFT;
        // Two in bucket 0, one in bucket 1, one in bucket 5; the second batch merges.
        meta.apply_txn_changes(
            &[],
            &[],
            &[
                (40, Outcome::Committed, 100),
                (b + 1, Outcome::RolledBack, 100),
            ],
            0,
            None,
        )
        .unwrap();
        meta.apply_txn_changes(
            &[],
            &[],
            &[
                (90, Outcome::RolledBack, 200),
                (5 * b, Outcome::Committed, 900),
            ],
            0,
            None,
        )
        .unwrap();
        assert_eq!(
            meta.txn_outcome(40).unwrap(),
            Some((Outcome::Committed, 100))
        );
        assert_eq!(
            meta.txn_outcome(90).unwrap(),
            Some((Outcome::RolledBack, 200))
        );
        assert_eq!(
            meta.txn_outcome(b + 1).unwrap(),
            Some((Outcome::RolledBack, 100))
        );
        assert_eq!(meta.txn_outcome(41).unwrap(), None);
        // Bucket 0 holds an outcome at 200: pruning before 150 keeps it (and all after it).
        meta.apply_txn_changes(&[], &[], &[], 150, None).unwrap();
        assert_eq!(
            meta.txn_outcome(40).unwrap(),
            Some((Outcome::Committed, 100))
        );
        // Before 300: buckets 0 and 1 go, bucket 5 (at 900) stays.
        meta.apply_txn_changes(&[], &[], &[], 300, None).unwrap();
        assert_eq!(meta.txn_outcome(40).unwrap(), None);
        assert_eq!(meta.txn_outcome(b + 1).unwrap(), None);
        assert_eq!(
            meta.txn_outcome(5 * b).unwrap(),
            Some((Outcome::Committed, 900))
        );
    }
}
