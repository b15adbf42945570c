//! Retention: deleting whole segments from the front of the log, and the log start it moves.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::hooks::LogStartListener;
use crate::log_start;
use crate::record::{self, HEADER_BYTES};
use crate::segment::{Segment, SEGMENT_HEADER_BYTES};
use crate::Store;
use halfmq_types::error::Result;

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

impl Store {
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
            let first = self.first_at_or_after(q, new_base)?.max(q.start());
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
}
