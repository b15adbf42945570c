//! The read side: messages through their consume queue, records by log offset, scans of
//! the log, waiting for new messages, and log statistics.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::consume_queue::{self, ConsumeQueue, Entry};
use crate::record::{self, Record, RecordKind, RecordView};
use crate::segment::{Segment, SEGMENT_HEADER_BYTES};
use crate::state::{notified_until, Shared};
use crate::Store;
use halfmq_types::error::{Error, Result};
use halfmq_types::LogStats;

/// Largest read of [`Store::scan_records`] (a bigger record is read whole).
pub const SCAN_CHUNK_BYTES: u64 = 1024 * 1024;

/// What [`Store::scan_records`] calls with every record it reads, and the record's encoded
/// size; an error stops the scan.
pub type RecordVisitor<'a> = dyn FnMut(&RecordView<'_>, u32) -> Result<()> + 'a;

/// Whether one of `queues` has more entries than `from` (one position per queue) says.
fn has_more(queues: &[Arc<ConsumeQueue>], from: &[u64]) -> bool {
    queues.iter().zip(from).any(|(q, &f)| q.len() > f)
}

/// The answer of a wait for messages: `true` once there are more, `false` on the last look
/// (deadline passed, store stopped) without any, `None` to wait on.
fn ready(queues: &[Arc<ConsumeQueue>], from: &[u64], last_look: bool) -> Option<bool> {
    if has_more(queues, from) {
        Some(true)
    } else if last_look {
        Some(false)
    } else {
        None
    }
}

impl Store {
    /// Read the message at `queue_offset` of `queue`, checking that the log holds what the
    /// index says. `Ok(None)` past the end of the queue.
    pub fn read_message(&self, queue: &ConsumeQueue, queue_offset: u64) -> Result<Option<Record>> {
        let Some(entry) = queue.read(queue_offset, 1)?.into_iter().next() else {
            return Ok(None);
        };
        self.read_indexed(queue, queue_offset, &entry).map(Some)
    }

    /// Read up to `max` messages of `queue` from `from`, in order. Messages lost to damage
    /// (`Error::Lost`) are left out, so the queue offsets returned may have gaps.
    pub fn read_messages(
        &self,
        queue: &ConsumeQueue,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Record)>> {
        let mut out = Vec::with_capacity(max.min(1024));
        let mut from = from;
        // Messages lost to damage (quarantined by repair) are skipped; read on past them so
        // that a lost message never hides the ones after it.
        while out.is_empty() {
            let entries = queue.read(from, max)?;
            if entries.is_empty() {
                break;
            }
            for (i, entry) in entries.iter().enumerate() {
                let qo = from + i as u64;
                match self.read_indexed(queue, qo, entry) {
                    Ok(rec) => out.push((qo, rec)),
                    Err(Error::Lost { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            from += entries.len() as u64;
        }
        Ok(out)
    }

    /// The message at `queue_offset` of `queue` through its index entry. An entry that does
    /// not lead to that message (a damaged index file) is rebuilt from the log
    /// (`crate::reindex`), so a damaged entry costs a scan, never a wrong message or a failed
    /// poll; a damaged record is `Error::Damaged` naming its segment file and offset.
    pub(crate) fn read_indexed(
        &self,
        queue: &ConsumeQueue,
        queue_offset: u64,
        entry: &Entry,
    ) -> Result<Record> {
        match self.check_indexed(queue, queue_offset, entry) {
            Err(Error::Corrupt { .. }) => self.reindex_and_read(queue, queue_offset, entry),
            other => other,
        }
    }

    /// The record `entry` points at, if it is the message at `queue_offset` of `queue`;
    /// `Error::Corrupt` if it is not (or cannot be read as a record), `Error::Expired` below
    /// the queue's start, `Error::Lost` for a message quarantined by repair.
    pub(crate) fn check_indexed(
        &self,
        queue: &ConsumeQueue,
        queue_offset: u64,
        entry: &Entry,
    ) -> Result<Record> {
        let expired = || Error::Expired {
            topic: queue.topic().to_owned(),
            queue: queue.queue_id(),
            offset: queue_offset,
            first: queue.start(),
        };
        let entry_at =
            consume_queue::CQ_HEADER_BYTES + queue_offset * consume_queue::ENTRY_BYTES as u64;
        let wrong = |reason: String| Error::Corrupt {
            path: queue.path().to_path_buf(),
            offset: entry_at,
            reason: format!("index entry {queue_offset}: {reason}"),
        };
        if queue_offset < queue.start() {
            return Err(expired());
        }
        if entry.log_offset < self.log_start() {
            // Retention raises a queue's start before the log's: a raced read is expired,
            // anything else is an entry that points below the log.
            if queue_offset < queue.start() {
                return Err(expired());
            }
            return Err(wrong(format!(
                "log offset {} is below the start of the log",
                entry.log_offset
            )));
        }
        let rec = match self.read_at(entry.log_offset, entry.size) {
            Ok(rec) => rec,
            // Retention deleted it between the check above and the read.
            Err(_) if queue_offset < queue.start() => return Err(expired()),
            Err(e) => return Err(e),
        };
        let h = &rec.header;
        let placed = h.queue_offset == queue_offset
            && h.queue_id == queue.queue_id()
            && rec.topic == queue.topic();
        // Repair writes a quarantine record without a topic when it could not tell what the
        // damaged bytes held; recovery points the missing offsets at it.
        if h.kind == RecordKind::Quarantined && (placed || rec.topic.is_empty()) {
            return Err(Error::Lost {
                topic: queue.topic().to_owned(),
                queue: queue.queue_id(),
                offset: queue_offset,
            });
        }
        if h.kind != RecordKind::Message || !placed {
            return Err(wrong(format!(
                "points at log offset {} which holds {:?} {}/{}@{}",
                entry.log_offset, h.kind, rec.topic, h.queue_id, h.queue_offset
            )));
        }
        if entry.key_hash != consume_queue::key_hash(&rec.key) {
            return Err(wrong(format!(
                "key hash {:#x} does not match the key of the record at log offset {}",
                entry.key_hash, entry.log_offset
            )));
        }
        Ok(rec)
    }

    /// Read the record at `log_offset` whose encoded size is `size`, verifying its CRC and
    /// that it is where it says it is.
    pub fn read_at(&self, log_offset: u64, size: u32) -> Result<Record> {
        let seg = self.shared.segment_for(log_offset)?;
        let pos = log_offset - seg.base;
        let corrupt = |reason: String| Error::Corrupt {
            path: seg.path().to_path_buf(),
            offset: pos,
            reason,
        };
        if pos < SEGMENT_HEADER_BYTES || pos + u64::from(size) > seg.size {
            return Err(corrupt(format!(
                "record of {size} bytes does not fit the segment"
            )));
        }
        let mut buf = vec![0u8; size as usize];
        seg.file.read_exact_at(&mut buf, pos)?;
        let (view, len) = record::decode(&buf).map_err(|e| corrupt(e.to_string()))?;
        if len != size as usize || view.header.log_offset != log_offset {
            return Err(corrupt(format!(
                "expected a record of {size} bytes at log offset {log_offset}, found {len} bytes claiming offset {}",
                view.header.log_offset
            )));
        }
        view.to_record()
    }

    /// Call `f` with every record (and its encoded size) from `from` up to `to` (exclusive),
    /// in log order, reading the log in chunks of at most [`SCAN_CHUNK_BYTES`] (so memory
    /// stays bounded whatever the range). `from` must be a record boundary or a segment
    /// start, `to` a record boundary the log has written (the durable or written end); a
    /// `from` inside a deleted segment starts at the first segment after it. Returns the
    /// offset reached (`to`, or the end of the log's data when that comes first). A damaged
    /// record inside the range is an error: the range was validated by recovery or written
    /// by this process, so damage there is real.
    pub fn scan_records(&self, from: u64, to: u64, f: &mut RecordVisitor<'_>) -> Result<u64> {
        self.shared.scan_records(from, to, f)
    }

    /// A handle that reads the log ([`LogReader::scan_records`], [`LogReader::log_stats`])
    /// without keeping the [`Store`] (or whoever owns it) alive: for background threads.
    pub fn log_reader(&self) -> LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    /// Wait until `queue` has more than `from` entries or `timeout` passes. Returns whether
    /// there is something to read.
    pub fn wait_for_messages(
        &self,
        queues: &[Arc<ConsumeQueue>],
        from: &[u64],
        timeout: std::time::Duration,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let p = &self.shared.progress;
        p.epoch.wait_for(Some(deadline), || {
            let last_look =
                p.stopped.load(Ordering::Acquire) || std::time::Instant::now() >= deadline;
            ready(queues, from, last_look)
        })
    }

    /// [`Store::wait_for_messages`] for async code.
    pub async fn wait_for_messages_async(
        &self,
        queues: &[Arc<ConsumeQueue>],
        from: &[u64],
        deadline: tokio::time::Instant,
    ) -> bool {
        let p = &self.shared.progress;
        let woken = notified_until(&self.shared.async_notify, || {
            ready(queues, from, p.stopped.load(Ordering::Acquire))
        });
        tokio::time::timeout_at(deadline, woken)
            .await
            .unwrap_or_else(|_| has_more(queues, from))
    }

    /// Log statistics.
    pub fn log_stats(&self) -> LogStats {
        self.shared.log_stats()
    }

    /// Bytes of all segment files.
    pub fn log_bytes(&self) -> u64 {
        self.shared.segments.read().values().map(|s| s.size).sum()
    }
}

/// Reads the log of a [`Store`] without owning it ([`Store::log_reader`]).
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt_handle("LogReader", f)
    }
}

impl LogReader {
    /// [`Store::scan_records`].
    pub fn scan_records(&self, from: u64, to: u64, f: &mut RecordVisitor<'_>) -> Result<u64> {
        self.shared.scan_records(from, to, f)
    }

    /// Log offset just past the newest record appended with a key since open (the end of
    /// the recovered log right after open, since what recovery found is not looked at).
    /// Read after [`LogReader::log_stats`], every record with a key below its
    /// `durable_offset` is below this: the key index skips the rest of the log unread.
    pub fn keyed_end(&self) -> u64 {
        self.shared.keyed_end.load(Ordering::Acquire)
    }

    /// [`Store::log_stats`].
    pub fn log_stats(&self) -> LogStats {
        self.shared.log_stats()
    }
}

impl Shared {
    fn log_stats(&self) -> LogStats {
        let segs = self.segments.read();
        let p = &self.progress;
        LogStats {
            segments: segs.len(),
            first_offset: segs
                .values()
                .next()
                .map(|s| s.base + SEGMENT_HEADER_BYTES)
                .unwrap_or(0),
            log_start: self.log_start.load(Ordering::Acquire),
            log_bytes: segs.values().map(|s| s.size).sum(),
            durable_offset: p.durable.load(Ordering::Acquire),
            written_offset: p.written.load(Ordering::Acquire),
            syncs: p.syncs.load(Ordering::Relaxed),
            records: p.records.load(Ordering::Relaxed),
            index_entries_rebuilt: p.entries_rebuilt.load(Ordering::Relaxed),
            rounds_led: p.rounds_led.load(Ordering::Relaxed),
        }
    }

    fn scan_records(&self, from: u64, to: u64, f: &mut RecordVisitor<'_>) -> Result<u64> {
        let mut off = from;
        let mut buf: Vec<u8> = Vec::new();
        while off < to {
            let Some(seg) = self.segment_at_or_after(off) else {
                return Ok(off);
            };
            let seg_end = seg.base + seg.size;
            let mut pos = off.max(seg.base + SEGMENT_HEADER_BYTES);
            let stop = to.min(seg_end);
            let mut segment_done = false;
            while pos < stop && !segment_done {
                let want = (stop - pos).min(SCAN_CHUNK_BYTES) as usize;
                buf.resize(want, 0);
                seg.file.read_exact_at(&mut buf, pos - seg.base)?;
                let mut i = 0usize;
                loop {
                    match record::decode(&buf[i..]) {
                        Ok((view, len)) => {
                            if view.header.kind == RecordKind::SegmentEnd {
                                segment_done = true;
                                break;
                            }
                            // `len` is at most RECORD_BYTES_MAX, which fits a u32.
                            f(&view, len as u32)?;
                            i += len;
                        }
                        Err(record::DecodeError::Incomplete { needed }) => {
                            if i > 0 {
                                break; // read again from this record's start
                            }
                            if pos + needed as u64 > stop {
                                // The range ends inside a record: not a boundary.
                                return Ok(pos);
                            }
                            buf.resize(needed, 0);
                            seg.file.read_exact_at(&mut buf, pos - seg.base)?;
                        }
                        Err(record::DecodeError::Empty) => {
                            segment_done = true;
                            break;
                        }
                        Err(record::DecodeError::Invalid(reason)) => {
                            return Err(Error::Corrupt {
                                path: seg.path().to_path_buf(),
                                offset: pos - seg.base + i as u64,
                                reason,
                            })
                        }
                    }
                    if i == buf.len() {
                        break;
                    }
                }
                pos += i as u64;
            }
            if pos < stop && !segment_done {
                return Ok(pos);
            }
            off = if segment_done || stop == seg_end {
                seg_end
            } else {
                stop
            };
        }
        Ok(to.max(from))
    }

    /// The segment holding `log_offset`, or else the first one after it.
    fn segment_at_or_after(&self, log_offset: u64) -> Option<Arc<Segment>> {
        let segs = self.segments.read();
        if let Some((_, s)) = segs.range(..=log_offset).next_back() {
            if log_offset < s.base + s.size {
                return Some(s.clone());
            }
        }
        segs.range(log_offset..).next().map(|(_, s)| s.clone())
    }

    pub(crate) fn segment_for(&self, log_offset: u64) -> Result<Arc<Segment>> {
        let segs = self.segments.read();
        match segs.range(..=log_offset).next_back() {
            Some((_, s)) if log_offset < s.base + s.size => Ok(s.clone()),
            _ => Err(Error::Corrupt {
                path: self.log_dir.clone(),
                offset: log_offset,
                reason: "no segment holds this log offset".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::sim::{open_store, CrashMode, SimStorage};
    use crate::{Append, FlushPolicy, Hook, Store, StoreConfig};

    use super::*;

    /// Async flush that syncs only when asked (or forced by a record): what a reader sees
    /// between a write and its sync is then fixed, not a race with the interval.
    fn async_store(disk: &SimStorage) -> Arc<Store> {
        let config = StoreConfig::default().with_flush(FlushPolicy::Async {
            interval: Duration::from_secs(60),
        });
        Arc::new(open_store(disk, config))
    }

    /// Longer than any wake-up takes; a missing wake-up shows as a wait this long.
    const WAKE_BOUND: Duration = Duration::from_secs(50);

    #[test]
    fn async_flush_readers_see_only_durable_messages_and_are_woken_by_the_sync() {
        let disk = SimStorage::new();
        let store = async_store(&disk);
        let q = store.queue("t", 0).unwrap();

        // Acknowledged under async flush (written), not durable: invisible.
        let a = store.append(Append::message(&q, "", b"one", 1)).unwrap();
        let stats = store.log_stats();
        assert!(stats.written_offset >= a.log_offset + u64::from(a.size));
        assert!(
            stats.durable_offset <= a.log_offset,
            "nothing forced a sync"
        );
        assert_eq!(
            q.len(),
            0,
            "a consumer would see a message that is not durable"
        );
        assert!(store.read_message(&q, 0).unwrap().is_none());
        assert!(!store.wait_for_messages(std::slice::from_ref(&q), &[0], Duration::ZERO));

        // A power loss now takes the message back; nobody could have seen or acked it.
        let lost = disk.crash(CrashMode::DropUnsynced);
        let again = async_store(&lost);
        let q2 = again.queue("t", 0).unwrap();
        assert_eq!(q2.len(), 0);
        drop(again);

        // On the live disk: a waiting reader is woken by the sync, thread and task alike.
        let disk = SimStorage::new();
        let store = async_store(&disk);
        let q = store.queue("t", 0).unwrap();
        store.append(Append::message(&q, "", b"two", 1)).unwrap();
        let (s, qq) = (store.clone(), q.clone());
        let thread_waiter = std::thread::spawn(move || {
            let t = Instant::now();
            let more = s.wait_for_messages(&[qq], &[0], WAKE_BOUND);
            (more, t.elapsed())
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (s, qq) = (store.clone(), q.clone());
        let task_waiter = rt.spawn(async move {
            let t = Instant::now();
            let deadline = tokio::time::Instant::now() + WAKE_BOUND;
            let more = s.wait_for_messages_async(&[qq], &[0], deadline).await;
            (more, t.elapsed())
        });
        let sync = {
            let s = store.clone();
            std::thread::spawn(move || s.sync())
        };
        let (more, took) = rt.block_on(task_waiter).unwrap();
        assert!(more && took < WAKE_BOUND / 2, "task not woken: {took:?}");
        let (more, took) = thread_waiter.join().unwrap();
        assert!(more && took < WAKE_BOUND / 2, "thread not woken: {took:?}");
        sync.join().unwrap().unwrap();
        assert_eq!(store.read_message(&q, 0).unwrap().unwrap().body, b"two");
    }

    #[test]
    fn a_sync_forcing_record_makes_what_was_written_before_it_visible_too() {
        let disk = SimStorage::new();
        let store = async_store(&disk);
        let q = store.queue("t", 0).unwrap();
        store
            .append(Append::message(&q, "", b"written", 1))
            .unwrap();
        assert_eq!(q.len(), 0);
        let b = store
            .submit(Append::message(&q, "", b"synced", 1), Hook::Sync)
            .unwrap()
            .wait()
            .unwrap();
        // Acknowledged means durable for a `Hook::Sync` record, under async flush too.
        assert!(store.log_stats().durable_offset >= b.log_offset + u64::from(b.size));
        let read = store.read_messages(&q, 0, 10).unwrap();
        let bodies: Vec<&[u8]> = read.iter().map(|(_, r)| r.body.as_slice()).collect();
        assert_eq!(bodies, [&b"written"[..], &b"synced"[..]]);
        // And it survives a power loss, with everything before it.
        let after = disk.crash(CrashMode::DropUnsynced);
        let again = async_store(&after);
        assert_eq!(again.queue("t", 0).unwrap().len(), 2);
    }

    /// Without fsync (`StoreConfig::fsync`: a directory rebuilt at every open), a round's
    /// write counts as durable at once: readers see a record when its append returns, under
    /// either policy, and no round syncs.
    #[test]
    fn without_fsync_a_written_record_is_visible_at_once_and_no_round_syncs() {
        let async_60s = FlushPolicy::Async {
            interval: Duration::from_secs(60),
        };
        for flush in [FlushPolicy::Sync, async_60s] {
            let disk = SimStorage::new();
            let config = StoreConfig::default().with_flush(flush).with_fsync(false);
            let store = open_store(&disk, config);
            let q = store.queue("t", 0).unwrap();
            let syncs = disk.sync_count();
            for i in 0..10u8 {
                store.append(Append::message(&q, "", &[i; 100], 1)).unwrap();
            }
            assert_eq!(disk.sync_count(), syncs, "{flush:?}: a round synced");
            let stats = store.log_stats();
            assert_eq!(stats.durable_offset, stats.written_offset, "{flush:?}");
            assert_eq!(q.len(), 10, "{flush:?}: written records are not visible");
        }
        // With fsync the same append syncs, so the count above can tell.
        let disk = SimStorage::new();
        let store = open_store(&disk, StoreConfig::default());
        let q = store.queue("t", 0).unwrap();
        let syncs = disk.sync_count();
        store.append(Append::message(&q, "", b"x", 1)).unwrap();
        assert!(disk.sync_count() > syncs);
    }
}
