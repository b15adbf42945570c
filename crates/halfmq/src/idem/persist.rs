//! What of the idempotency index survives a restart: the chunks in sled (written by the
//! broker's persister thread between checkpoints and before every checkpoint, loaded on
//! open) and the replay of the log after the checkpoint.

use std::sync::Arc;

use super::{cost, index_key, DedupIndex, Slot, Space, Stored};
use crate::meta::Meta;
use halfmq_store::record::{RecordKind, RecordView, FLAG_TXN_COMMIT};
use halfmq_types::codec;
use halfmq_types::error::{Error, Result};
use halfmq_types::props::PROP_IDEMPOTENCY_KEY;

/// Most entries in one sled value (keeps every value far below the codec's 16 MiB limit).
const CHUNK_ENTRIES_MAX: usize = 8192;

/// One persisted entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    key: String,
    at: Stored,
}

impl DedupIndex {
    /// Load the persisted chunks (before recovery replays the log).
    pub(crate) fn load(&self, meta: &Meta, now_ms: u64) -> Result<()> {
        let mut g = self.inner.lock();
        for (id, bytes) in meta.idem_chunks()? {
            let entries: Vec<Persisted> = codec::decode(&bytes, "idempotency keys")?;
            for e in entries {
                if !self.expired(&e.at, now_ms) {
                    self.insert_stored(&mut g, Arc::from(e.key), e.at, false);
                }
            }
            let end = g.next_seq;
            g.chunks.push_back((id, end));
            g.next_chunk = g.next_chunk.max(id + 1);
        }
        self.evict(&mut g, now_ms);
        Ok(())
    }

    /// Forget everything (before a rebuild from the log replaces what was loaded; nothing
    /// is reserved yet at open).
    pub(crate) fn clear(&self) {
        self.completed.lock().clear();
        *self.inner.lock() = super::Inner::default();
    }

    /// Recovery found this record after the checkpoint.
    pub(crate) fn replay(&self, view: &RecordView<'_>, now_ms: u64) -> Result<()> {
        let space = match view.header.kind {
            RecordKind::Message if view.header.flags & FLAG_TXN_COMMIT == 0 => Space::Message,
            RecordKind::Half => Space::Half,
            RecordKind::Delayed => Space::Delayed,
            _ => return Ok(()),
        };
        if view.props.is_empty() {
            return Ok(());
        }
        let props = view.properties()?;
        let Some(key) = props.get(PROP_IDEMPOTENCY_KEY) else {
            return Ok(());
        };
        let size = halfmq_store::record::encoded_len(view.topic, view.key, view.props, view.body)
            .map_err(|reason| Error::Corrupt {
            path: std::path::PathBuf::from("log"),
            offset: view.header.log_offset,
            reason,
        })?;
        let at = Stored {
            log_offset: view.header.log_offset,
            size,
            stored_ms: view.header.timestamp_ms,
        };
        if self.expired(&at, now_ms) {
            return Ok(());
        }
        let mut g = self.inner.lock();
        self.insert_stored(&mut g, index_key(space, view.topic, key), at, true);
        self.evict(&mut g, now_ms);
        Ok(())
    }

    /// Forget entries for records at or past `log_end`: the log does not have them.
    pub(crate) fn forget_beyond(&self, log_end: u64) {
        let mut g = self.locked();
        let gone: Vec<Arc<str>> = g
            .map
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Stored { at, .. } if at.log_offset >= log_end => Some(k.clone()),
                _ => None,
            })
            .collect();
        for k in gone {
            tracing::warn!(
                key = %k.escape_debug(),
                "persisted idempotency key points past the end of the log; forgotten"
            );
            g.map.remove(&k);
            g.live -= 1;
            g.bytes -= cost(&k);
        }
    }

    /// Write the entries stored since the last call to sled and remove chunks whose entries
    /// are all forgotten. Runs before every checkpoint, on the flusher thread (or during
    /// recovery), which is also the only thread that adds entries: everything remembered then
    /// is for a record before the checkpoint, and must be in sled before the checkpoint is.
    /// `stamp` is the checkpoint's log offset, written with the entries (see
    /// [`Meta::apply_idem_changes`]).
    pub(crate) fn persist(&self, meta: &Meta, now_ms: u64, stamp: Option<u64>) -> Result<()> {
        self.write_below(meta, now_ms, u64::MAX, stamp)
    }

    /// [`DedupIndex::persist`] for the entries of records before `durable_end` only: what
    /// the background persister runs between checkpoints, so that the checkpoint (which
    /// stalls every writer) has little left to write. Entries are added in log order, so
    /// these are a prefix of the unpersisted ones. Writing an entry early is always safe: its
    /// record is durable, and recovery takes an entry from sled and the same entry from the
    /// log as one.
    pub(crate) fn persist_below(&self, meta: &Meta, now_ms: u64, durable_end: u64) -> Result<()> {
        self.write_below(meta, now_ms, durable_end, None)
    }

    fn write_below(
        &self,
        meta: &Meta,
        now_ms: u64,
        durable_end: u64,
        stamp: Option<u64>,
    ) -> Result<()> {
        // One persist at a time: chunk ids and the chunk list are updated after the write.
        let _one = self.persisting.lock();
        let (taken, still, removes, first_chunk) = {
            let mut g = self.locked();
            self.evict(&mut g, now_ms);
            let n = g
                .unpersisted
                .partition_point(|(_, _, at)| at.log_offset < durable_end);
            if n == 0 && g.chunks.is_empty() && stamp.is_none() {
                return Ok(());
            }
            let taken: Vec<(u64, Arc<str>, Stored)> = g.unpersisted.drain(..n).collect();
            // Entries already forgotten again are not worth writing.
            let still: Vec<(u64, Arc<str>, Stored)> = taken
                .iter()
                .filter(|(seq, key, _)| {
                    matches!(g.map.get(key), Some(Slot::Stored { seq: s, .. }) if s == seq)
                })
                .cloned()
                .collect();
            let first_live = g.order.front().map_or(g.next_seq, |i| i.seq);
            let removes: Vec<u64> = g
                .chunks
                .iter()
                .take_while(|(_, end)| *end <= first_live)
                .map(|(id, _)| *id)
                .collect();
            (taken, still, removes, g.next_chunk)
        };
        // Encode without holding the index: senders claim keys meanwhile.
        let mut puts = Vec::new();
        let mut new_chunks = Vec::new();
        let mut encoded = Ok(());
        for (id, part) in (first_chunk..).zip(still.chunks(CHUNK_ENTRIES_MAX)) {
            let entries: Vec<Persisted> = part
                .iter()
                .map(|(_, k, at)| Persisted {
                    key: k.to_string(),
                    at: *at,
                })
                .collect();
            let end = part.last().map_or(0, |(seq, _, _)| seq + 1);
            match codec::encode(&entries, "idempotency keys") {
                Ok(v) => puts.push((id, v)),
                Err(e) => {
                    encoded = Err(e);
                    break;
                }
            }
            new_chunks.push((id, end));
        }
        let result = encoded.and_then(|()| meta.apply_idem_changes(&puts, &removes, stamp));
        if let Err(e) = result {
            // Nothing changed in sled: put them back in front, to try again next time.
            let mut g = self.inner.lock();
            let newer = std::mem::replace(&mut g.unpersisted, taken);
            g.unpersisted.extend(newer);
            return Err(e);
        }
        let mut g = self.inner.lock();
        for _ in &removes {
            g.chunks.pop_front();
        }
        for c in new_chunks {
            g.next_chunk = c.0 + 1;
            g.chunks.push_back(c);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, index, limits, store};
    use super::*;
    use halfmq_types::clock::{Clock, ManualClock};

    /// Keys of the persisted chunks, in order.
    fn persisted(meta: &Meta) -> Vec<String> {
        let mut out = Vec::new();
        for (_, bytes) in meta.idem_chunks().unwrap() {
            let entries: Vec<Persisted> = codec::decode(&bytes, "idempotency keys").unwrap();
            out.extend(entries.into_iter().map(|e| e.key));
        }
        out
    }

    #[test]
    fn background_rounds_write_only_durable_records_and_a_reload_counts_each_key_once() {
        let (_dir, meta) = Meta::temporary();
        let clock = ManualClock::new(1_000_000);
        let t0 = clock.now_ms();
        let ix = index(limits(3_600_000, 100), &clock);
        let keys: Vec<Arc<str>> = (0..4)
            .map(|i| index_key(Space::Message, "t", &format!("k{i}")))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            store(&ix, k, 100 * (i as u64 + 1), t0);
        }
        // Records at 100 and 200 are durable, 300 and 400 not yet.
        ix.persist_below(&meta, t0, 300).unwrap();
        let names = |ks: &[Arc<str>]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(persisted(&meta), names(&keys[..2]));
        // Nothing new below 300: nothing written again.
        ix.persist_below(&meta, t0, 300).unwrap();
        assert_eq!(persisted(&meta), names(&keys[..2]));
        // The checkpoint writes the rest.
        ix.persist(&meta, t0, None).unwrap();
        assert_eq!(persisted(&meta), names(&keys));

        // Reopen: the chunks load, and recovery's replay of a record that is also in sled
        // (written early by a background round) is the same entry, not a second one.
        let again = index(limits(3_600_000, 100), &clock);
        again.load(&meta, t0).unwrap();
        assert_eq!(again.len(), 4);
        let mut g = again.inner.lock();
        again.insert_stored(&mut g, keys[3].clone(), at(400, t0), true);
        drop(g);
        assert_eq!(again.len(), 4);
        assert_eq!(again.lookup(&keys[3]).map(|s| s.log_offset), Some(400));
    }
}
