//! Small mutable state that must survive restarts, kept in sled: topic configuration and
//! consumer-group offsets. Everything sled holds refers only to durable log data, so a crash
//! can never leave it ahead of the log.
//!
//! Keys in the `consumers` tree (big-endian numbers, so keys sort by position):
//! - `c` group `\0` topic `\0` queue:u32 → committed offset u64: every message before it is
//!   acked;
//! - `a` group `\0` topic `\0` queue:u32 offset:u64 → (empty): acked although an earlier
//!   message is not yet.
//!
//! One ack writes both kinds in one atomic batch and is flushed (fsync) before it returns.

use std::collections::BTreeSet;
use std::path::Path;

use crate::codec;
use crate::error::{Error, Result};
use crate::txn::{Outcome, TxnInfo};

/// Configuration of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicConfig {
    /// Number of queues.
    pub queues: u32,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// The sled database.
pub struct Meta {
    db: sled::Db,
    topics: sled::Tree,
    consumers: sled::Tree,
    /// txn id (u64 BE) → bincode TxnInfo of unfinished transactions.
    txn_halves: sled::Tree,
    /// txn id (u64 BE) → bincode (Outcome, at_ms) of finished ones, for the retention time.
    txn_outcomes: sled::Tree,
    /// at_ms (u64 BE) txn id (u64 BE) → (): the same, in time order, for pruning.
    txn_outcomes_by_time: sled::Tree,
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

fn time_key(at_ms: u64, txn: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&at_ms.to_be_bytes());
    k[8..].copy_from_slice(&txn.to_be_bytes());
    k
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
        let started = std::time::Instant::now();
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .open()
            {
                Ok(db) => break db,
                // sled reports its lock as an I/O error whose text says so.
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock"))
                        && started.elapsed() < std::time::Duration::from_secs(5) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(Error::Meta(format!("opening {}: {e}", dir.display()))),
            }
        };
        let topics = db.open_tree("topics")?;
        let consumers = db.open_tree("consumers")?;
        let txn_halves = db.open_tree("txn_halves")?;
        let txn_outcomes = db.open_tree("txn_outcomes")?;
        let txn_outcomes_by_time = db.open_tree("txn_outcomes_by_time")?;
        Ok(Meta {
            db,
            topics,
            consumers,
            txn_halves,
            txn_outcomes,
            txn_outcomes_by_time,
        })
    }

    /// The configuration of a topic, if it exists.
    pub fn topic(&self, name: &str) -> Result<Option<TopicConfig>> {
        match self.topics.get(name.as_bytes())? {
            Some(v) => Ok(Some(codec::decode(&v, "topic config")?)),
            None => Ok(None),
        }
    }

    /// Every topic.
    pub fn topics(&self) -> Result<Vec<(String, TopicConfig)>> {
        let mut out = Vec::new();
        for kv in self.topics.iter() {
            let (k, v) = kv?;
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
            .compare_and_swap(name.as_bytes(), None as Option<&[u8]>, Some(value))?
        {
            Ok(()) => {
                self.db.flush()?;
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
        let committed = match self.consumers.get(prefix(b'c', group, topic, queue))? {
            Some(v) => u64_be(&v).ok_or_else(|| Error::Meta("bad committed offset".into()))?,
            None => 0,
        };
        let p = prefix(b'a', group, topic, queue);
        let mut acked_above = BTreeSet::new();
        for kv in self.consumers.scan_prefix(&p) {
            let (k, _) = kv?;
            let off = u64_be(&k[p.len()..]).ok_or_else(|| Error::Meta("bad ack key".into()))?;
            acked_above.insert(off);
        }
        Ok(QueueAcks {
            committed,
            acked_above,
        })
    }

    /// Durably record a change of ack state: the new committed offset, acks above it that
    /// were added, and ones that are now below it and can go.
    pub fn store_acks(
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
        self.consumers.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Every (group, topic, queue) with stored offsets.
    pub fn consumer_queues(&self) -> Result<Vec<(String, String, u32)>> {
        let mut out = Vec::new();
        for kv in self.consumers.scan_prefix([b'c']) {
            let (k, _) = kv?;
            let rest = &k[1..];
            let mut parts = rest.splitn(3, |&b| b == 0);
            let (Some(g), Some(t), Some(q)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(Error::Meta("bad consumer key".into()));
            };
            let q: [u8; 4] = q
                .try_into()
                .map_err(|_| Error::Meta("bad consumer key".into()))?;
            out.push((
                String::from_utf8_lossy(g).into_owned(),
                String::from_utf8_lossy(t).into_owned(),
                u32::from_be_bytes(q),
            ));
        }
        Ok(out)
    }

    /// Every persisted unfinished transaction.
    pub fn txn_halves(&self) -> Result<Vec<TxnInfo>> {
        let mut out = Vec::new();
        for kv in self.txn_halves.iter() {
            let (_, v) = kv?;
            out.push(codec::decode(&v, "transaction state")?);
        }
        Ok(out)
    }

    /// The remembered outcome of a finished transaction and when it finished.
    pub fn txn_outcome(&self, txn: u64) -> Result<Option<(Outcome, u64)>> {
        match self.txn_outcomes.get(txn.to_be_bytes())? {
            Some(v) => Ok(Some(codec::decode(&v, "transaction outcome")?)),
            None => Ok(None),
        }
    }

    /// Durably apply changes to transaction state: unfinished ones to write or remove,
    /// outcomes to remember, and outcomes older than `prune_before_ms` to forget.
    pub fn apply_txn_changes(
        &self,
        puts: &[TxnInfo],
        removes: &[u64],
        outcomes: &[(u64, Outcome, u64)],
        prune_before_ms: u64,
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
        let mut by_id = sled::Batch::default();
        let mut by_time = sled::Batch::default();
        for &(txn, outcome, at) in outcomes {
            by_id.insert(
                &txn.to_be_bytes(),
                codec::encode(&(outcome, at), "transaction outcome")?,
            );
            by_time.insert(&time_key(at, txn), &[]);
        }
        if prune_before_ms > 0 {
            for kv in self
                .txn_outcomes_by_time
                .range(..time_key(prune_before_ms, 0))
            {
                let (k, _) = kv?;
                if let Some(txn) = k.get(8..16).and_then(u64_be) {
                    by_id.remove(&txn.to_be_bytes());
                }
                by_time.remove(k);
            }
        }
        // Outcomes first: a crash in between leaves a finished transaction also listed as
        // unfinished, which loading resolves; never an unfinished one that is forgotten.
        self.txn_outcomes.apply_batch(by_id)?;
        self.txn_outcomes_by_time.apply_batch(by_time)?;
        self.txn_halves.apply_batch(halves)?;
        self.db.flush()?;
        Ok(())
    }

    /// Flush everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}
