//! Rebuilding damaged consume-queue entries from the log, when a read finds them.
//!
//! A consume-queue file is derived from the log and holds no checksum: a damaged entry shows
//! when a read through it does not find its message ([`Store::check_indexed`] checks the
//! record's CRC, place, kind, topic, queue, queue offset and key hash against the entry).
//! Then the nearest entries on either side that do check out bound where the message must
//! be (entries are in log order, and the end of a record is the start of the next), that
//! stretch of the log is read, and every entry between them is compared with what the log
//! says and rewritten where it differs. A record in that stretch that fails its own checks
//! is damage to acknowledged data (every entry points below the durable end):
//! `Error::Damaged`, naming its segment file and offset.
//!
//! Reading entries again is safe while the store runs: the flusher only appends entries past
//! the queue's length, and these are all below it.

use std::collections::BTreeMap;

use crate::consume_queue::{self, ConsumeQueue, Entry};
use crate::record::{Record, RecordKind};
use crate::segment::SEGMENT_HEADER_BYTES;
use crate::Store;
use halfmq_types::error::{Error, Result};

/// Entries looked at on either side of a damaged one for one that checks out (a damaged
/// 512-byte sector holds 32); past that the search falls back to the log's start or end.
const WALK_MAX: u64 = 4096;

impl Store {
    /// The entry at `queue_offset` of `queue`, checked against the record it points at and
    /// rebuilt from the log first if it is damaged; `None` past the end of the queue. Entries
    /// below the queue's start are returned as they are (zeros, or records retention
    /// deleted). For what decides on entries without reading their messages (retention's
    /// floor and new queue starts): a damaged entry there could otherwise let retention
    /// delete a message nobody acked.
    pub fn entry_checked(&self, queue: &ConsumeQueue, queue_offset: u64) -> Result<Option<Entry>> {
        let Some(e) = queue.read(queue_offset, 1)?.first().copied() else {
            return Ok(None);
        };
        if queue_offset < queue.start() {
            return Ok(Some(e));
        }
        match self.check_indexed(queue, queue_offset, &e) {
            Ok(_) | Err(Error::Lost { .. }) | Err(Error::Expired { .. }) => Ok(Some(e)),
            Err(Error::Corrupt { .. }) => match self.reindex_and_read(queue, queue_offset, &e) {
                Ok(_) | Err(Error::Lost { .. }) => {
                    Ok(queue.read(queue_offset, 1)?.first().copied())
                }
                Err(other) => Err(other),
            },
            Err(other) => Err(other),
        }
    }

    /// The number of entries of `queue` whose record starts before `log_offset` (expired
    /// entries, which are zeros or point below the log start, count too): the queue offset
    /// of the first message at or after `log_offset`. Entries are in log order, so this is
    /// a binary search, through checked entries ([`Store::entry_checked`]).
    pub fn first_at_or_after(&self, queue: &ConsumeQueue, log_offset: u64) -> Result<u64> {
        let (mut lo, mut hi) = (0u64, queue.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let below = match self.entry_checked(queue, mid)? {
                Some(e) => e.log_offset < log_offset,
                None => false,
            };
            if below {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Rebuild the entries around `queue_offset` of `queue`, whose entry `bad` does not lead
    /// to its message, from the log; then read the message through its rebuilt entry.
    pub(crate) fn reindex_and_read(
        &self,
        queue: &ConsumeQueue,
        queue_offset: u64,
        bad: &Entry,
    ) -> Result<Record> {
        // Another reader may have rebuilt it meanwhile.
        if let Some(now) = queue.read(queue_offset, 1)?.first() {
            if now != bad {
                if let Ok(rec) = self.check_indexed(queue, queue_offset, now) {
                    return Ok(rec);
                }
            }
        }
        let start = queue.start();
        let len = queue.len();
        let durable = self
            .shared
            .progress
            .durable
            .load(std::sync::atomic::Ordering::Acquire);
        // Below: the entry after the nearest good one, and where that one's record starts
        // (read again: a lost message's quarantine record may stand for the next offsets
        // too).
        let mut lo = (
            queue_offset.saturating_sub(WALK_MAX).max(start),
            self.log_start(),
        );
        for q in (lo.0..queue_offset).rev() {
            if let Some(e) = self.good_entry(queue, q)? {
                lo = (q + 1, e.log_offset);
                break;
            }
        }
        // Above: the nearest good entry and where its record starts.
        let mut hi = ((queue_offset + 1 + WALK_MAX).min(len), durable);
        for q in queue_offset + 1..hi.0 {
            if let Some(e) = self.good_entry(queue, q)? {
                hi = (q, e.log_offset);
                break;
            }
        }
        let found = self.index_from_log(queue, lo, hi)?;
        let file = queue.read(lo.0, (hi.0 - lo.0) as usize)?;
        let mut fixes = Vec::new();
        for (i, e) in file.iter().enumerate() {
            let q = lo.0 + i as u64;
            // An entry that differs but still leads to its message stays (repair keeps a
            // lost message's key hash in its entry; its quarantine record has no key).
            if let Some(right) = found.get(&q) {
                if right != e && self.good_entry(queue, q)?.is_none() {
                    fixes.push((q, *right));
                }
            }
        }
        if !fixes.is_empty() {
            queue.rewrite(&fixes)?;
            self.shared
                .progress
                .entries_rebuilt
                .fetch_add(fixes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                file = %queue.path().display(),
                first = fixes[0].0,
                last = fixes[fixes.len() - 1].0,
                entries = fixes.len(),
                "consume-queue entries did not match the log: rebuilt them from the log"
            );
        }
        let Some(entry) = found.get(&queue_offset) else {
            return Err(Error::Corrupt {
                path: queue.path().to_path_buf(),
                offset: consume_queue::CQ_HEADER_BYTES
                    + queue_offset * consume_queue::ENTRY_BYTES as u64,
                reason: format!(
                    "index entry {queue_offset} does not lead to its message, and the log between offsets {} and {} holds no message {queue_offset} of {}/{} to rebuild it from",
                    lo.1,
                    hi.1,
                    queue.topic(),
                    queue.queue_id()
                ),
            });
        };
        self.check_indexed(queue, queue_offset, entry)
    }

    /// The entry at `q` if it leads to its message (a lost message's counts too: its entry
    /// points at the record that replaced it).
    fn good_entry(&self, queue: &ConsumeQueue, q: u64) -> Result<Option<Entry>> {
        let Some(e) = queue.read(q, 1)?.first().copied() else {
            return Ok(None);
        };
        match self.check_indexed(queue, q, &e) {
            Ok(_) | Err(Error::Lost { .. }) => Ok(Some(e)),
            Err(Error::Corrupt { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// The entries of queue offsets `[lo.0, hi.0)` of `queue` as the log says they are, read
    /// from the log between offsets `lo.1` and `hi.1` (record boundaries). A record there
    /// that fails its checks is `Error::Damaged`.
    fn index_from_log(
        &self,
        queue: &ConsumeQueue,
        lo: (u64, u64),
        hi: (u64, u64),
    ) -> Result<BTreeMap<u64, Entry>> {
        let mut found = BTreeMap::new();
        // A quarantine record of unknown content stands for the queue offsets missing before
        // the next message (as recovery indexes them).
        let mut anonymous: Option<(u64, u32)> = None;
        let mut last_message = 0u64;
        let mut next = lo.0;
        let mut visit = |view: &crate::record::RecordView<'_>, size: u32| -> Result<()> {
            let h = &view.header;
            match h.kind {
                RecordKind::Quarantined if view.topic.is_empty() => {
                    anonymous = Some((h.log_offset, size));
                }
                RecordKind::Message | RecordKind::Quarantined
                    if view.topic == queue.topic() && h.queue_id == queue.queue_id() =>
                {
                    if let Some((at, size)) = anonymous.filter(|&(at, _)| at > last_message) {
                        for q in next.max(lo.0)..h.queue_offset.min(hi.0) {
                            let e = Entry {
                                log_offset: at,
                                size,
                                key_hash: 0,
                            };
                            found.insert(q, e);
                        }
                    }
                    if (lo.0..hi.0).contains(&h.queue_offset) {
                        let e = Entry {
                            log_offset: h.log_offset,
                            size,
                            key_hash: consume_queue::key_hash(view.key),
                        };
                        found.insert(h.queue_offset, e);
                    }
                    last_message = h.log_offset;
                    next = h.queue_offset + 1;
                }
                _ => {}
            }
            Ok(())
        };
        let reached = match self.scan_records(lo.1, hi.1, &mut visit) {
            Ok(r) => r,
            Err(Error::Corrupt {
                path,
                offset,
                reason,
            }) => return Err(damaged(path, offset, reason)),
            Err(e) => return Err(e),
        };
        if reached < hi.1 {
            // The scan stopped inside the stretch: a record whose length runs past it.
            let seg = self.shared.segment_for(reached)?;
            let pos = reached - seg.base;
            return Err(damaged(
                seg.path().to_path_buf(),
                pos.max(SEGMENT_HEADER_BYTES),
                "a record's length runs past the records indexed after it".into(),
            ));
        }
        Ok(found)
    }
}

/// A record below the durable end that fails its checks.
fn damaged(path: std::path::PathBuf, offset: u64, reason: String) -> Error {
    Error::Damaged {
        path,
        offset,
        reason: format!(
            "{reason}; a consume-queue entry points past it, so it was acknowledged (found by a read)"
        ),
    }
}
