//! Consume queues: per (topic, queue) index of the messages in the commit log.
//!
//! ```text
//! cq/<topic>/<queue as 4 digits>.cq
//!   0   8  magic "HALFMQCQ"
//!   8   4  format version u32 LE = 1
//!  12   4  reserved (0)
//!  16      entries, ENTRY_BYTES each; entry i describes queue offset i:
//!            log_offset u64 LE | size u32 LE | key_hash u32 LE
//! ```
//!
//! The index is derived data: the flusher appends entries after their records are durable,
//! syncs the files before each checkpoint, and recovery truncates every index to its
//! checkpointed length and re-derives the rest from the log. So the newest entries of a
//! queue need not be in its file yet: they gather in memory (the queue's tail, readable like
//! the file) and are written in runs of [`TAIL_BYTES_MAX`], and before every sync. A group
//! commit then costs the flusher a copy per queue instead of a `pwrite` per queue, ahead of
//! the producers' answers. Readers still check each record
//! they fetch against the entry (log offset, queue offset, topic), so a damaged entry is an
//! error, never a wrong message.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::io::{Storage, StorageFile};
use halfmq_types::error::{Error, Result};

/// Bytes per index entry.
pub const ENTRY_BYTES: usize = 16;
/// Bytes of the file header.
pub const CQ_HEADER_BYTES: u64 = 16;
const MAGIC: &[u8; 8] = b"HALFMQCQ";
/// Entries reserved at a time (1 MiB of index).
const ALLOC_ENTRIES: u64 = 65_536;
const FORMAT_VERSION: u32 = 1;
/// Bytes of entries a queue keeps in memory before it writes them to its file (256 entries).
pub const TAIL_BYTES_MAX: usize = 4096;

const _: () = assert!(ENTRY_BYTES == 8 + 4 + 4);

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Where the record starts in the log.
    pub log_offset: u64,
    /// Its encoded size.
    pub size: u32,
    /// CRC-32 of the message key (0 for no key), for filtering without reading the log.
    pub key_hash: u32,
}

impl Entry {
    /// Encode to the fixed-width form.
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.log_offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[12..16].copy_from_slice(&self.key_hash.to_le_bytes());
        b
    }

    /// Decode from the fixed-width form; `b` must hold at least `ENTRY_BYTES`.
    pub fn decode(b: &[u8]) -> Entry {
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&b[0..8]);
        Entry {
            log_offset: u64::from_le_bytes(b8),
            size: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            key_hash: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// The hash of a key stored in index entries and used to pick a key's queue.
pub fn key_hash(key: &str) -> u32 {
    if key.is_empty() {
        0
    } else {
        crc32fast::hash(key.as_bytes())
    }
}

/// Consume queues by topic and queue id.
pub(crate) type QueueMap = HashMap<String, BTreeMap<u32, Arc<ConsumeQueue>>>;

/// The index of (topic, queue) in `queues`, opened (created empty) if it is not there yet.
pub(crate) fn queue_in(
    queues: &mut QueueMap,
    storage: &dyn Storage,
    cq_dir: &Path,
    topic: &str,
    queue_id: u32,
) -> Result<Arc<ConsumeQueue>> {
    if let Some(q) = queues.get(topic).and_then(|m| m.get(&queue_id)) {
        return Ok(q.clone());
    }
    validate_topic_name(topic)?;
    let (cq, _) = ConsumeQueue::open(storage, cq_dir, topic, queue_id, 0, 0)?;
    let cq = Arc::new(cq);
    queues
        .entry(topic.to_owned())
        .or_default()
        .insert(queue_id, cq.clone());
    Ok(cq)
}

/// Check a topic name: 1 to 127 bytes of `[A-Za-z0-9._-]`, not starting with a dot, so
/// that it is safe as a directory name.
pub fn validate_topic_name(topic: &str) -> Result<()> {
    let ok = !topic.is_empty()
        && topic.len() <= crate::record::TOPIC_BYTES_MAX
        && !topic.starts_with('.')
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid {
            what: "topic name",
            reason: format!(
                "{topic:?}: use 1 to {} characters of A-Z a-z 0-9 . _ - % not starting with '.'",
                crate::record::TOPIC_BYTES_MAX
            ),
        })
    }
}

/// The index file of one (topic, queue).
pub struct ConsumeQueue {
    topic: Arc<str>,
    queue_id: u32,
    file: Arc<dyn StorageFile>,
    /// Next queue offset to hand out; changed only under the commit log's writer lock.
    pub(crate) assigned: AtomicU64,
    /// Entries the file has space reserved for; grown only under the writer lock.
    capacity: AtomicU64,
    /// Entries that are written and readable: their records are durable, under every flush
    /// policy (the flusher appends an entry only once its record is synced).
    visible: AtomicU64,
    /// Appended to since the last checkpoint sync.
    dirty: AtomicBool,
    /// First queue offset whose message is still in the log; entries below it are expired
    /// (retention deleted their records, or a rebuild never had them: then they are zeros).
    start: AtomicU64,
    /// Visible entries not yet written to the file (see the module docs).
    tail: parking_lot::Mutex<Tail>,
}

/// The entries at the end of a queue that are only in memory: those from queue offset
/// `first` on, encoded. Every entry below `first` is in the file. When `bytes` is not
/// empty, `first + bytes.len() / ENTRY_BYTES` is the queue's length.
#[derive(Default)]
struct Tail {
    first: u64,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for ConsumeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumeQueue")
            .field("topic", &self.topic)
            .field("queue", &self.queue_id)
            .field("len", &self.len())
            .finish()
    }
}

/// The path of the index file of (topic, queue).
pub fn path(cq_dir: &Path, topic: &str, queue_id: u32) -> PathBuf {
    cq_dir.join(topic).join(format!("{queue_id:04}.cq"))
}

/// Parse an index file name back to its queue id.
pub fn parse_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".cq")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl ConsumeQueue {
    /// Open (or create) the index of (topic, queue) and trim it to `len` entries: entries past
    /// `len` are not trusted and will be re-derived from the log. Returns the queue and the
    /// number of entries the file really had, which is less than `len` when the file is
    /// missing or short (then the caller must rebuild from the log). `start` is the first
    /// queue offset still in the log (see [`ConsumeQueue::start`]); entries below it may be
    /// zeros.
    pub fn open(
        storage: &dyn Storage,
        cq_dir: &Path,
        topic: &str,
        queue_id: u32,
        len: u64,
        start: u64,
    ) -> Result<(ConsumeQueue, u64)> {
        let dir = cq_dir.join(topic);
        let p = path(cq_dir, topic, queue_id);
        let existed = storage.exists(&p);
        if !existed {
            storage.create_dir_all(&dir)?;
        }
        let file = storage.open(&p, true)?;
        let mut head = [0u8; CQ_HEADER_BYTES as usize];
        let n = file.read_at(&mut head, 0)?;
        let valid_head = n == head.len()
            && &head[0..8] == MAGIC
            && u32::from_le_bytes([head[8], head[9], head[10], head[11]]) == FORMAT_VERSION;
        let have = if !valid_head {
            if n > 0 && !head.iter().all(|&b| b == 0) {
                // Derived data: a damaged header means the index is rebuilt from the log.
                tracing::warn!(file = %p.display(), "consume-queue index header damaged; rebuilding it");
            }
            let mut h = [0u8; CQ_HEADER_BYTES as usize];
            h[0..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
            file.set_len(0)?;
            file.write_all_at(&h, 0)?;
            file.sync_data()?;
            storage.sync_dir(&dir)?;
            if !existed {
                storage.sync_dir(cq_dir)?;
            }
            0
        } else {
            // The file may be preallocated past its last entry, so its length only bounds the
            // entries; the last one we are asked to keep must really be there (a log offset
            // is never 0, the segment header is).
            let slots = (file.len()?.saturating_sub(CQ_HEADER_BYTES)) / ENTRY_BYTES as u64;
            let mut have = slots.min(len);
            if have > start {
                let mut last = [0u8; ENTRY_BYTES];
                file.read_exact_at(&mut last, CQ_HEADER_BYTES + (have - 1) * ENTRY_BYTES as u64)?;
                if Entry::decode(&last).log_offset == 0 {
                    have -= 1;
                }
            }
            have
        };
        let keep = have.min(len);
        file.set_len(CQ_HEADER_BYTES + keep * ENTRY_BYTES as u64)?;
        let cq = ConsumeQueue {
            topic: Arc::from(topic),
            queue_id,
            file,
            assigned: AtomicU64::new(keep),
            capacity: AtomicU64::new(keep),
            visible: AtomicU64::new(keep),
            dirty: AtomicBool::new(true),
            start: AtomicU64::new(start.min(keep)),
            tail: parking_lot::Mutex::new(Tail::default()),
        };
        Ok((cq, have))
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The queue id within the topic.
    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// First queue offset whose message is still in the log. Offsets below it were deleted
    /// by retention.
    pub fn start(&self) -> u64 {
        self.start.load(Ordering::Acquire)
    }

    /// Raise the start (retention deleted the records below it). Never lowers it.
    pub(crate) fn raise_start(&self, start: u64) {
        self.start.fetch_max(start, Ordering::AcqRel);
    }

    /// Make an empty index start at queue offset `first` (a rebuild of a queue whose earlier
    /// messages were deleted by retention): the entries below are zeros (expired).
    pub(crate) fn start_empty_at(&self, first: u64) -> Result<()> {
        if !self.is_empty() || self.assigned.load(Ordering::Relaxed) != 0 {
            return Err(Error::Corrupt {
                path: self.file.path().to_path_buf(),
                offset: 0,
                reason: format!("cannot start a non-empty index at entry {first}"),
            });
        }
        self.file
            .set_len(CQ_HEADER_BYTES + first * ENTRY_BYTES as u64)?;
        self.assigned.store(first, Ordering::Relaxed);
        self.capacity.store(first, Ordering::Release);
        self.visible.store(first, Ordering::Release);
        self.start.store(first, Ordering::Release);
        self.dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Number of readable entries (the next queue offset a consumer can wait for).
    pub fn len(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// Whether the queue has no readable entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append encoded entries that start at queue offset `first`, which must be the current
    /// length; then make them visible to readers. They go to the queue's tail in memory, and
    /// to the file once the tail holds [`TAIL_BYTES_MAX`] bytes (or at the next sync).
    pub fn append_encoded(&self, first: u64, bytes: &[u8]) -> Result<()> {
        let len = self.len();
        if first != len || !bytes.len().is_multiple_of(ENTRY_BYTES) {
            return Err(Error::Corrupt {
                path: self.file.path().to_path_buf(),
                offset: CQ_HEADER_BYTES + len * ENTRY_BYTES as u64,
                reason: format!("index append at entry {first} but the index has {len} entries"),
            });
        }
        {
            let mut tail = self.tail.lock();
            if tail.bytes.is_empty() {
                tail.first = first;
            }
            tail.bytes.extend_from_slice(bytes);
            if tail.bytes.len() >= TAIL_BYTES_MAX {
                self.write_tail(&mut tail)?;
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
        self.visible.store(
            first + (bytes.len() / ENTRY_BYTES) as u64,
            Ordering::Release,
        );
        Ok(())
    }

    /// Reserve space for at least `entries` entries, in chunks. Called by writers before an
    /// entry is promised, so a full disk is a clear error for that writer and the flusher
    /// never has to grow the file (where a failure would stop the whole store).
    pub(crate) fn reserve(&self, entries: u64) -> Result<()> {
        if entries <= self.capacity.load(Ordering::Acquire) {
            return Ok(());
        }
        let cap = entries + ALLOC_ENTRIES;
        self.file
            .allocate(CQ_HEADER_BYTES + cap * ENTRY_BYTES as u64)?;
        self.capacity.store(cap, Ordering::Release);
        Ok(())
    }

    /// Write the tail's entries to the file and empty it. On a failure the tail keeps them
    /// (the caller's error poisons the store or fails the checkpoint).
    fn write_tail(&self, tail: &mut Tail) -> Result<()> {
        if tail.bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(
            &tail.bytes,
            CQ_HEADER_BYTES + tail.first * ENTRY_BYTES as u64,
        )?;
        tail.first += (tail.bytes.len() / ENTRY_BYTES) as u64;
        tail.bytes.clear();
        Ok(())
    }

    /// Read up to `max` entries starting at queue offset `from` (fewer at the end).
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>> {
        let len = self.len();
        if from >= len || max == 0 {
            return Ok(Vec::new());
        }
        let n = ((len - from) as usize).min(max);
        let end = from + n as u64;
        let mut buf = vec![0u8; n * ENTRY_BYTES];
        // Entries from the tail first, under its lock; every entry below the tail's first is
        // in the file by then and stays there, so the file is read without the lock.
        let in_file = {
            let tail = self.tail.lock();
            let tail_end = tail.first + (tail.bytes.len() / ENTRY_BYTES) as u64;
            if tail.bytes.is_empty() || end <= tail.first {
                n
            } else {
                let lo = from.max(tail.first);
                // `end <= len`, and the tail ends at the length the tail was last appended
                // to, which `len` (read before the lock) cannot exceed.
                let hi = end.min(tail_end);
                let at = ((lo - from) as usize) * ENTRY_BYTES;
                let src = ((lo - tail.first) as usize) * ENTRY_BYTES;
                let bytes = ((hi - lo) as usize) * ENTRY_BYTES;
                buf[at..at + bytes].copy_from_slice(&tail.bytes[src..src + bytes]);
                (lo - from) as usize
            }
        };
        if in_file > 0 {
            self.file.read_exact_at(
                &mut buf[..in_file * ENTRY_BYTES],
                CQ_HEADER_BYTES + from * ENTRY_BYTES as u64,
            )?;
        }
        Ok(buf.chunks_exact(ENTRY_BYTES).map(Entry::decode).collect())
    }

    /// Write entries below the length again, each at its queue offset, and sync them: the
    /// repair of damaged entries from the log (`crate::reindex`). The flusher only appends
    /// past the length, so this never races with it.
    pub(crate) fn rewrite(&self, entries: &[(u64, Entry)]) -> Result<()> {
        // Everything to the file first, so each entry is rewritten in one place.
        let mut tail = self.tail.lock();
        self.write_tail(&mut tail)?;
        let len = self.len();
        for (q, e) in entries {
            if *q >= len {
                return Err(Error::Corrupt {
                    path: self.file.path().to_path_buf(),
                    offset: CQ_HEADER_BYTES + q * ENTRY_BYTES as u64,
                    reason: format!("index rewrite of entry {q} but the index has {len} entries"),
                });
            }
            self.file
                .write_all_at(&e.encode(), CQ_HEADER_BYTES + q * ENTRY_BYTES as u64)?;
        }
        self.file.sync_data()
    }

    /// Make appended entries durable (the tail written, then the file synced), if there are
    /// any since the last call.
    pub fn sync_if_dirty(&self) -> Result<()> {
        self.write_tail(&mut self.tail.lock())?;
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.file.sync_data() {
                self.dirty.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The file path, for messages.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{CrashMode, SimStorage};

    fn entry(q: u64) -> Entry {
        Entry {
            log_offset: 1000 + q * 7,
            size: q as u32,
            key_hash: (q as u32).wrapping_mul(2_654_435_761),
        }
    }

    fn append(cq: &ConsumeQueue, n: u64) {
        let first = cq.len();
        cq.reserve(first + n).unwrap();
        let bytes: Vec<u8> = (first..first + n).flat_map(|q| entry(q).encode()).collect();
        cq.append_encoded(first, &bytes).unwrap();
    }

    /// Every window of `cq` reads the entries appended, across the file and the tail.
    fn check_reads(cq: &ConsumeQueue) {
        let len = cq.len();
        for from in (0..len).step_by(37) {
            for max in [1, 5, 256, 1000] {
                let got = cq.read(from, max).unwrap();
                let want: Vec<Entry> = (from..len.min(from + max as u64)).map(entry).collect();
                assert_eq!(got, want, "read({from}, {max}) of {len}");
            }
        }
    }

    #[test]
    fn entries_in_the_memory_tail_read_like_the_file_and_are_durable_after_a_sync_or_a_rewrite() {
        let disk = SimStorage::new();
        let dir = Path::new("/cq");
        let (cq, _) = ConsumeQueue::open(&disk, dir, "t", 0, 0, 0).unwrap();
        let file = path(dir, "t", 0);
        let per_run = (TAIL_BYTES_MAX / ENTRY_BYTES) as u64;
        // Group commits of 3 entries each.
        for _ in 0..300 {
            append(&cq, 3);
        }
        assert_eq!(cq.len(), 900);
        check_reads(&cq);
        cq.sync_if_dirty().unwrap();
        // The sync wrote the tail first: the file holds all 900.
        let bytes = disk.durable_bytes(&file).unwrap();
        assert!(bytes.len() as u64 >= CQ_HEADER_BYTES + 900 * ENTRY_BYTES as u64);
        let at = |q: u64| CQ_HEADER_BYTES as usize + q as usize * ENTRY_BYTES;
        assert_eq!(Entry::decode(&bytes[at(899)..at(900)]), entry(899));
        // More after the sync, a whole run and some: read back across file and tail.
        append(&cq, per_run + 10);
        check_reads(&cq);
        // A rewrite (the repair of damaged entries) lands in the file, tail included.
        let fixed = Entry {
            log_offset: 5,
            size: 1,
            key_hash: 2,
        };
        let last = cq.len() - 1;
        cq.rewrite(&[(3, fixed), (last, fixed)]).unwrap();
        // A power loss keeps what the rewrite synced: every entry, the tail's too.
        let crashed = disk.crash(CrashMode::DropUnsynced);
        let (reopened, have) = ConsumeQueue::open(&crashed, dir, "t", 0, last + 1, 0).unwrap();
        assert_eq!(have, last + 1);
        assert_eq!(reopened.read(3, 1).unwrap(), vec![fixed]);
        assert_eq!(reopened.read(last, 1).unwrap(), vec![fixed]);
        assert_eq!(reopened.read(4, 1).unwrap(), vec![entry(4)]);
    }
}
