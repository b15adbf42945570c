//! The state in sled that is derived from the log (pending halves and transaction outcomes,
//! pending delayed messages, idempotency keys), and what lets open verify it.
//!
//! - **Stamps.** Before every checkpoint at log offset `C`, each derived tree gets the key
//!   [`STAMP_KEY`] → `C` (u64 BE) in the same atomic sled batch as its changes: the tree then
//!   holds everything derived from the log before `C`. sled's files are then fsynced
//!   ([`Meta::sync_files`]: sled's own `flush` is `sync_file_range`, which makes neither the
//!   file's size nor the device cache durable), and only then does the store write the
//!   checkpoint. So on a disk that keeps what was fsynced, the stamp of every derived tree is
//!   at least the checkpoint's offset.
//! - **Open** reads the smallest stamp ([`Meta::derived_stamp`]). Missing (a new, emptied or
//!   replaced `meta/`, or one written before stamps existed), or below the checkpoint (an old
//!   copy put back, or writes sled lost), the derived state is rebuilt from the log (see
//!   `crate::broker`'s open).
//! - **Ids past the log.** Outcomes are kept by transaction id, which is a log offset: after
//!   a loss of the end of the log the same ids are handed out again, so outcomes at or past
//!   the recovered end are dropped on open ([`Meta::fence_outcomes_from`]). Committed consumer
//!   offsets past the end of their queue are clamped ([`Meta::clamp_consumer`]).

use std::fs::File;
use std::path::Path;

use super::{open_db, prefix, sled_err, sync_dir, u64_be, LiveTree, Meta, OUTCOME_BUCKET_SHIFT};
use halfmq_types::codec;
use halfmq_types::error::{Error, Result};
use halfmq_types::Outcome;

/// The key of a derived tree's stamp. Every other key of those trees is 8 bytes long, so it
/// can never be taken for data.
pub(crate) const STAMP_KEY: &[u8] = b"~stamp";

/// Whether a key of a derived tree is its stamp.
pub(crate) fn is_stamp(key: &[u8]) -> bool {
    key == STAMP_KEY
}

/// The entries of a derived tree, its stamp left out.
pub(crate) fn entries(tree: &LiveTree) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec)>> {
    tree.iter()
        .map(|kv| kv.map_err(sled_err))
        .filter(|kv| !matches!(kv, Ok((k, _)) if is_stamp(k)))
}

/// Every value of a derived tree (its stamp left out), decoded as `what`.
pub(crate) fn decode_all<T: serde::de::DeserializeOwned>(
    tree: &LiveTree,
    what: &'static str,
) -> Result<Vec<T>> {
    entries(tree)
        .map(|kv| codec::decode(&kv?.1, what))
        .collect()
}

/// An error of reading tree `name`, as [`Meta::verify`] reports it.
fn in_tree(name: &'static str) -> impl Fn(Error) -> (String, Error) {
    move |e| (name.to_owned(), e)
}

impl Meta {
    /// [`Meta::open`], telling a database sled cannot read (`Ok(Err(why))`: damaged files,
    /// including a panic of sled's recovery on them) from other failures (a lock, a
    /// permission, a full disk: `Err`), which must not be taken for damage.
    pub(crate) fn open_or_damaged(dir: &Path) -> Result<std::result::Result<Meta, String>> {
        // sled 0.34 can panic on files it cannot parse; that is damage too. The closure owns
        // nothing that a panic could leave half-changed (sled's own state is dropped).
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_db(dir)));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                let damage = match &e {
                    sled::Error::Corruption { .. }
                    | sled::Error::ReportableBug(_)
                    | sled::Error::Unsupported(_) => true,
                    sled::Error::Io(io) => matches!(
                        io.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                    ),
                    sled::Error::CollectionNotFound(_) => false,
                };
                if damage {
                    return Ok(Err(e.to_string()));
                }
                return Err(Error::Meta(format!("opening {}: {e}", dir.display())));
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                return Ok(Err(format!("sled could not read it: {what}")));
            }
        };
        match Meta::with_db(db, dir) {
            Ok(meta) => Ok(Ok(meta)),
            Err(e) => Ok(Err(e.to_string())),
        }
    }

    fn derived(&self) -> [&LiveTree; 4] {
        [
            &self.txn_halves,
            &self.txn_outcomes,
            &self.delayed,
            &self.idem,
        ]
    }

    /// sled created this database now: nothing was found of an earlier run.
    pub(crate) fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The log offset every derived tree is stamped with at least (the smallest stamp), or
    /// `None` when a tree has no stamp (or a damaged one).
    pub(crate) fn derived_stamp(&self) -> Result<Option<u64>> {
        let mut min: Option<u64> = None;
        for tree in self.derived() {
            let Some(v) = tree.get(STAMP_KEY).map_err(sled_err)? else {
                return Ok(None);
            };
            let Some(at) = u64_be(&v) else {
                return Ok(None);
            };
            min = Some(min.map_or(at, |m| m.min(at)));
        }
        Ok(min)
    }

    /// Read every entry of every tree (topics, consumer state, group settings, derived
    /// state), decoding what has a format, so that damage sled did not notice when it opened
    /// shows now. Returns the name of the first tree that fails and why. The trace journal
    /// is not read (it is best-effort history, and can be large).
    pub(crate) fn verify(&self) -> std::result::Result<(), (String, Error)> {
        self.topics().map_err(in_tree("topics"))?;
        for kv in self.consumers.iter() {
            kv.map_err(sled_err).map_err(in_tree("consumers"))?;
        }
        for kv in self.groups.iter() {
            let (_, v) = kv.map_err(sled_err).map_err(in_tree("groups"))?;
            codec::decode::<halfmq_types::GroupSettings>(&v, "group settings")
                .map_err(in_tree("groups"))?;
        }
        for kv in self.group_fifo.iter() {
            let (_, v) = kv.map_err(sled_err).map_err(in_tree("group_fifo"))?;
            super::fifo_flag(&v).map_err(in_tree("group_fifo"))?;
        }
        self.verify_derived()
    }

    /// [`Meta::verify`] of the derived trees only.
    pub(crate) fn verify_derived(&self) -> std::result::Result<(), (String, Error)> {
        self.txn_halves().map_err(in_tree("txn_halves"))?;
        decode_all::<Vec<(u64, Outcome, u64)>>(&self.txn_outcomes, "transaction outcomes")
            .map_err(in_tree("txn_outcome_buckets"))?;
        self.delayed().map_err(in_tree("delayed"))?;
        self.idem_chunks().map_err(in_tree("idem_chunks"))?;
        Ok(())
    }

    /// Empty every derived tree (stamps included), durably: they are about to be rebuilt
    /// from the log.
    pub(crate) fn clear_derived(&self) -> Result<()> {
        for tree in self.derived() {
            tree.clear().map_err(sled_err)?;
        }
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    /// Forget every transaction outcome whose id is at or past `log_end` (the log lost the
    /// records they were derived from, and new transactions will get those ids), durably.
    /// Returns how many were forgotten.
    pub(crate) fn fence_outcomes_from(&self, log_end: u64) -> Result<u64> {
        let mut batch = sled::Batch::default();
        let mut dropped = 0u64;
        let first = (log_end >> OUTCOME_BUCKET_SHIFT).to_be_bytes();
        for kv in self.txn_outcomes.range(first..) {
            let (k, v) = kv.map_err(sled_err)?;
            if is_stamp(&k) {
                continue;
            }
            let all: Vec<(u64, Outcome, u64)> = codec::decode(&v, "transaction outcomes")?;
            let kept: Vec<(u64, Outcome, u64)> =
                all.iter().copied().filter(|e| e.0 < log_end).collect();
            if kept.len() == all.len() {
                continue;
            }
            dropped += (all.len() - kept.len()) as u64;
            if kept.is_empty() {
                batch.remove(k);
            } else {
                batch.insert(k, codec::encode(&kept, "transaction outcomes")?);
            }
        }
        if dropped > 0 {
            self.txn_outcomes.apply_batch(batch).map_err(sled_err)?;
            self.sync()?;
        }
        Ok(dropped)
    }

    /// Make (group, topic, queue) point no further than `end`, the end of its queue: the
    /// committed offset is lowered to it, and acks and retry states at or past it are
    /// removed (they were for messages the log no longer has; new messages get those
    /// offsets). Returns the committed offset found when it was past `end`. Not flushed: the
    /// caller syncs once after all of them.
    pub(crate) fn clamp_consumer(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        end: u64,
    ) -> Result<Option<u64>> {
        let committed = self.committed(group, topic, queue)?;
        let mut batch = sled::Batch::default();
        let mut changed = false;
        if committed > end {
            batch.insert(prefix(b'c', group, topic, queue), &end.to_be_bytes());
            changed = true;
        }
        for kind in [b'a', b'r'] {
            let p = prefix(kind, group, topic, queue);
            let mut from = p.clone();
            from.extend_from_slice(&end.to_be_bytes());
            for kv in self.consumers.range(from..) {
                let (k, _) = kv.map_err(sled_err)?;
                if !k.starts_with(&p) {
                    break;
                }
                batch.remove(k);
                changed = true;
            }
        }
        if changed {
            self.consumers.apply_batch(batch).map_err(sled_err)?;
        }
        Ok((committed > end).then_some(committed))
    }

    /// sled's flush, then an fsync of every file and directory of the database: after this,
    /// everything written to sled survives a power loss (see the module docs).
    pub(crate) fn sync(&self) -> Result<()> {
        self.db.flush().map_err(sled_err)?;
        self.sync_files()
    }

    /// fsync every file under the database's directory, and the directories.
    pub(crate) fn sync_files(&self) -> Result<()> {
        sync_tree(&self.dir)
    }
}

/// fsync every regular file under `dir` (recursively), then `dir` itself.
fn sync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "list directory", e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, "stat", e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(|e| Error::io(&path, "fsync", e))?,
                // sled removed it (an old snapshot) since the listing: nothing to sync.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, "open for fsync", e)),
            }
        }
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_is_the_smallest_of_all_derived_trees_and_none_if_one_lacks_it() {
        let (_dir, meta) = Meta::temporary();
        assert!(meta.is_fresh());
        assert_eq!(meta.derived_stamp().unwrap(), None);
        meta.apply_txn_changes(&[], &[], &[], 0, Some(500)).unwrap();
        meta.apply_delayed_changes(&[], &[], Some(500)).unwrap();
        assert_eq!(meta.derived_stamp().unwrap(), None, "idem_chunks has none");
        meta.apply_idem_changes(&[], &[], Some(400)).unwrap();
        assert_eq!(meta.derived_stamp().unwrap(), Some(400));
        meta.sync().unwrap();
        // Stamps are never taken for data.
        assert!(meta.txn_halves().unwrap().is_empty());
        assert!(meta.delayed().unwrap().is_empty());
        assert!(meta.idem_chunks().unwrap().is_empty());
        meta.verify().unwrap();
        meta.clear_derived().unwrap();
        assert_eq!(meta.derived_stamp().unwrap(), None);
    }

    #[test]
    fn outcomes_at_or_past_the_log_end_are_fenced_and_the_rest_kept() {
        let (_dir, meta) = Meta::temporary();
        let b = 1u64 << OUTCOME_BUCKET_SHIFT;
        let outcomes = [
            (100, Outcome::Committed, 1),
            (b + 10, Outcome::Committed, 1),
            (b + 20, Outcome::RolledBack, 1),
            (3 * b, Outcome::Committed, 1),
        ];
        meta.apply_txn_changes(&[], &[], &outcomes, 0, Some(7))
            .unwrap();
        assert_eq!(meta.fence_outcomes_from(b + 20).unwrap(), 2);
        assert!(meta.txn_outcome(100).unwrap().is_some());
        assert!(meta.txn_outcome(b + 10).unwrap().is_some());
        assert!(meta.txn_outcome(b + 20).unwrap().is_none());
        assert!(meta.txn_outcome(3 * b).unwrap().is_none());
        assert_eq!(
            meta.derived_stamp().unwrap(),
            None,
            "only two trees stamped"
        );
        assert_eq!(meta.fence_outcomes_from(b + 20).unwrap(), 0);
    }

    #[test]
    fn a_consumer_past_the_queue_end_is_clamped_with_its_acks_and_retries() {
        let (_dir, meta) = Meta::temporary();
        meta.put_acks("g", "t", 0, 50, &[52, 60], &[]).unwrap();
        let retry = super::super::RetryState {
            failures: 1,
            due_ms: 0,
            reason: "nack".into(),
        };
        meta.store_retries("g", "t", 0, &[(55, Some(retry))], false)
            .unwrap();
        meta.put_acks("g", "t", 1, 3, &[], &[]).unwrap();
        assert_eq!(meta.clamp_consumer("g", "t", 0, 20).unwrap(), Some(50));
        let acks = meta.queue_acks("g", "t", 0).unwrap();
        assert_eq!(acks.committed, 20);
        assert!(acks.acked_above.is_empty());
        assert!(meta.retry_states("g", "t", 0).unwrap().is_empty());
        // Within its queue: untouched.
        assert_eq!(meta.clamp_consumer("g", "t", 1, 20).unwrap(), None);
        assert_eq!(meta.committed("g", "t", 1).unwrap(), 3);
    }
}
