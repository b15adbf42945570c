//! The key index behind [`crate::Broker::trace`]: an append-only on-disk hash index in the
//! style of RocketMQ's `IndexFile`, derived from the commit log.
//!
//! Files live in `<data dir>/index/`, named by the 20-digit log offset of the first record
//! they index (`00000000000000004096.idx`). Each file is fixed-size:
//!
//! ```text
//! header   64 bytes   magic "HMQKIDX\0" | version u32 | slots u32 | entries_max u32 |
//!                     count u32 | first log offset u64 | last log offset u64 |
//!                     indexed_upto u64 | slots_crc u32 | sealed u32 | reserved u32 |
//!                     crc32 of bytes 0..60 u32
//! slots    slots × u32          newest entry number of the slot (1-based; 0 = empty)
//! entries  entries_max × 40     key hash u64 | log offset u64 | timestamp ms u64 |
//!                               record size u32 | previous entry of the slot u32 |
//!                               crc32 of bytes 0..32 u32 | reserved u32
//! ```
//!
//! All integers are little-endian. A key's hash picks a slot; the slot holds the newest
//! entry with that slot, and each entry links to the previous one, so a lookup walks one
//! short chain per file, newest first. Only the hash is stored: the caller reads every
//! candidate record back from the log and compares the real key, so a hash collision (or a
//! stale entry) can never show a record that is not there.
//!
//! **Writing** happens on one indexer (a background thread, and lookups that need it to catch
//! up), never on the group-commit thread: it reads the records between the index's end and
//! the log's durable end back from the log (they are in the page cache) and appends entries.
//! Only the newest file's slot table is in memory (`slots × 4` bytes); entries are buffered
//! and written with positional writes. About once a second, [`KeyIndex::persist`] writes the
//! buffered entries and dirty slot pages, `fdatasync`s, and then writes the header with the
//! entry count, a CRC of the slot table, and `indexed_upto`: every keyed record before that
//! log offset has its entry in the files, durably.
//!
//! **Opening** checks every file: magic, version, header CRC, geometry and length. A file
//! whose slot table does not match its CRC (a crash between writing slots and the header) has
//! its slot table rebuilt from its entries (each checked by its CRC and bounds). A file that
//! fails any check is deleted together with every newer file, and the log is indexed again
//! from where the last good file ends. Entries past a header's count are ignored and
//! overwritten. The index is derived data: the commit log is the truth, and the worst a
//! damaged index costs is the time to re-read the log.
//!
//! **Retention**: [`KeyIndex::drop_below`] deletes the files whose every entry points below
//! the log's start. Entries below the start that remain are reported as expired.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::record::{RecordKind, RecordView};
use crate::store::io::{Storage, StorageFile};

/// Bytes of a file header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of one entry.
pub const ENTRY_BYTES: usize = 40;
/// Largest number of slots or entries in one file (keeps a file under 11 GiB).
pub const FILE_ITEMS_MAX: u32 = 1 << 28;
const MAGIC: &[u8; 8] = b"HMQKIDX\0";
const VERSION: u32 = 1;
/// Slot-table bytes tracked as one dirty unit.
const PAGE_BYTES: usize = 4096;
/// Buffered entry bytes that trigger a write (not a sync).
const PENDING_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(HEADER_BYTES == 64 && ENTRY_BYTES == 40);
const _: () = assert!(PAGE_BYTES.is_multiple_of(4));

/// Reads the log from `from` to `to`, calling the visitor with every record and its size;
/// returns the offset reached ([`crate::store::Store::scan_records`]).
pub type LogScan<'a> =
    dyn Fn(u64, u64, &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>) -> Result<u64> + 'a;

/// The file name of the index file whose first record is at `first`.
pub fn file_name(first: u64) -> String {
    format!("{first:020}.idx")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".idx")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The 64-bit hash of a key: FNV-1a, then a finalizer so that the low bits used for the
/// slot are well mixed. Stored in files: never change it without a new format version.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    slots: u32,
    entries_max: u32,
    count: u32,
    first: u64,
    last: u64,
    indexed_upto: u64,
    slots_crc: u32,
    sealed: bool,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.slots.to_le_bytes());
        b[16..20].copy_from_slice(&self.entries_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.first.to_le_bytes());
        b[32..40].copy_from_slice(&self.last.to_le_bytes());
        b[40..48].copy_from_slice(&self.indexed_upto.to_le_bytes());
        b[48..52].copy_from_slice(&self.slots_crc.to_le_bytes());
        b[52..56].copy_from_slice(&u32::from(self.sealed).to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_BYTES {
            return Err(format!("header of {} bytes", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        if le_u32(b, 60) != crc32fast::hash(&b[0..60]) {
            return Err("header CRC mismatch".into());
        }
        if le_u32(b, 8) != VERSION {
            return Err(format!("unknown version {}", le_u32(b, 8)));
        }
        let h = Header {
            slots: le_u32(b, 12),
            entries_max: le_u32(b, 16),
            count: le_u32(b, 20),
            first: le_u64(b, 24),
            last: le_u64(b, 32),
            indexed_upto: le_u64(b, 40),
            slots_crc: le_u32(b, 48),
            sealed: le_u32(b, 52) != 0,
        };
        if h.slots == 0 || h.slots > FILE_ITEMS_MAX || h.entries_max == 0 {
            return Err(format!("bad geometry {} slots", h.slots));
        }
        if h.entries_max > FILE_ITEMS_MAX || h.count > h.entries_max {
            return Err(format!("{} entries of {}", h.count, h.entries_max));
        }
        if h.count > 0 && (h.last < h.first || h.indexed_upto <= h.last) {
            return Err("log offsets out of order".into());
        }
        Ok(h)
    }

    fn file_len(&self) -> u64 {
        HEADER_BYTES as u64
            + u64::from(self.slots) * 4
            + u64::from(self.entries_max) * ENTRY_BYTES as u64
    }

    fn entry_pos(&self, number: u32) -> u64 {
        HEADER_BYTES as u64 + u64::from(self.slots) * 4 + u64::from(number - 1) * ENTRY_BYTES as u64
    }

    fn slot_of(&self, hash: u64) -> u32 {
        // The remainder is below `slots`, a u32.
        (hash % u64::from(self.slots)) as u32
    }
}

/// One entry: where a record with a key of this hash is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Hash of the key ([`key_hash`]).
    pub hash: u64,
    /// Position of the record in the commit log.
    pub log_offset: u64,
    /// When the record was written, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Encoded size of the record.
    pub size: u32,
    prev: u32,
}

impl Entry {
    fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.hash.to_le_bytes());
        b[8..16].copy_from_slice(&self.log_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        b[24..28].copy_from_slice(&self.size.to_le_bytes());
        b[28..32].copy_from_slice(&self.prev.to_le_bytes());
        let crc = crc32fast::hash(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode entry number `number` of a file with header `h`, checking its CRC and that it
    /// is where an entry of that file can be.
    fn decode(b: &[u8], number: u32, h: &Header) -> std::result::Result<Entry, String> {
        if b.len() < ENTRY_BYTES || le_u32(b, 32) != crc32fast::hash(&b[0..32]) {
            return Err(format!("entry {number}: CRC mismatch"));
        }
        let e = Entry {
            hash: le_u64(b, 0),
            log_offset: le_u64(b, 8),
            timestamp_ms: le_u64(b, 16),
            size: le_u32(b, 24),
            prev: le_u32(b, 28),
        };
        if e.prev >= number || e.log_offset < h.first || e.log_offset > h.last {
            return Err(format!("entry {number}: out of bounds"));
        }
        Ok(e)
    }
}

/// An index file that takes no more entries (or the active one, for reads).
struct IndexFile {
    header: Header,
    file: Arc<dyn StorageFile>,
    path: PathBuf,
}

/// The file being appended to.
struct Active {
    f: IndexFile,
    /// The slot table, as stored (little-endian u32s).
    slots: Vec<u8>,
    /// Slot pages changed since the last persist.
    dirty: Vec<bool>,
    /// Entries not yet written to the file, starting with entry `written + 1`.
    pending: Vec<u8>,
    /// Entries written to the file (not necessarily synced).
    written: u32,
}

struct Inner {
    sealed: Vec<IndexFile>,
    active: Option<Active>,
    /// Every keyed record before this log offset has its entry (in a file or buffered).
    indexed_upto: u64,
    /// `indexed_upto` as of the last persist (durable).
    persisted_upto: u64,
}

/// Why a lookup could not trust the index.
#[derive(Debug)]
pub struct Damaged {
    /// The first log offset of the damaged file: everything from there must be indexed again.
    pub first: u64,
    /// What was wrong.
    pub reason: String,
}

/// The key index. See the module docs.
pub struct KeyIndex {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    slots: u32,
    entries_max: u32,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What [`KeyIndex::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexOpenReport {
    /// Index files kept.
    pub files: usize,
    /// Files deleted because they (or an older file) failed a check.
    pub files_dropped: usize,
    /// Files whose slot table was rebuilt from their entries.
    pub slot_tables_rebuilt: usize,
    /// Every keyed record before this log offset is indexed (where indexing resumes).
    pub indexed_upto: u64,
}

impl KeyIndex {
    /// Open (or create) the index in `dir`, checking every file (see the module docs).
    /// `slots` and `entries_max` apply to new files; existing files keep their own.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        slots: u32,
        entries_max: u32,
    ) -> Result<(KeyIndex, IndexOpenReport)> {
        storage.create_dir_all(dir)?;
        let mut names: Vec<(u64, PathBuf)> = storage
            .list_dir(dir)?
            .into_iter()
            .filter_map(|n| parse_file_name(&n).map(|o| (o, dir.join(n))))
            .collect();
        names.sort();
        let mut report = IndexOpenReport::default();
        let mut files: Vec<IndexFile> = Vec::new();
        let mut bad_from = None;
        for (i, (first, path)) in names.iter().enumerate() {
            match Self::check_file(&*storage, path, *first) {
                Ok((f, rebuilt)) => {
                    report.slot_tables_rebuilt += usize::from(rebuilt);
                    // Only the newest file may be unsealed; files must follow each other.
                    let follows = files
                        .last()
                        .is_none_or(|p| p.header.sealed && p.header.indexed_upto <= f.header.first);
                    if follows {
                        files.push(f);
                        continue;
                    }
                    tracing::warn!(path = %path.display(), "key index file out of sequence; re-indexing from there");
                }
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "damaged key index file; re-indexing the log from there");
                }
            }
            bad_from = Some(i);
            break;
        }
        if let Some(i) = bad_from {
            for (_, path) in &names[i..] {
                storage.remove_file(path)?;
                report.files_dropped += 1;
            }
            storage.sync_dir(dir)?;
        }
        let indexed_upto = files.last().map_or(0, |f| f.header.indexed_upto);
        let active = match files.last() {
            Some(f) if !f.header.sealed => {
                let f = files.pop().ok_or_else(|| Error::Invalid {
                    what: "key index",
                    reason: "no newest file".into(),
                })?;
                Some(Self::activate(f)?)
            }
            _ => None,
        };
        report.files = files.len() + usize::from(active.is_some());
        report.indexed_upto = indexed_upto;
        Ok((
            KeyIndex {
                storage,
                dir: dir.to_path_buf(),
                slots,
                entries_max,
                inner: Mutex::new(Inner {
                    sealed: files,
                    active,
                    indexed_upto,
                    persisted_upto: indexed_upto,
                }),
            },
            report,
        ))
    }

    /// Check one file; rebuild its slot table from its entries when only that is stale.
    /// Returns the file and whether its slots were rebuilt, or why it cannot be used.
    fn check_file(
        storage: &dyn Storage,
        path: &Path,
        first: u64,
    ) -> std::result::Result<(IndexFile, bool), String> {
        let file = storage.open(path, false).map_err(|e| e.to_string())?;
        let mut hb = [0u8; HEADER_BYTES];
        file.read_exact_at(&mut hb, 0).map_err(|e| e.to_string())?;
        let header = Header::decode(&hb)?;
        if header.first != first {
            return Err(format!("header says first offset {}", header.first));
        }
        // Entries are appended as they are written: the file holds at least the counted ones.
        let len = file.len().map_err(|e| e.to_string())?;
        let needed = header.entry_pos(header.count + 1);
        if len < needed || len > header.file_len() {
            return Err(format!(
                "{len} bytes, expected {needed} ..= {}",
                header.file_len()
            ));
        }
        let mut f = IndexFile {
            header,
            file,
            path: path.to_path_buf(),
        };
        let mut slots = vec![0u8; header.slots as usize * 4];
        f.file
            .read_exact_at(&mut slots, HEADER_BYTES as u64)
            .map_err(|e| e.to_string())?;
        if crc32fast::hash(&slots) == header.slots_crc {
            return Ok((f, false));
        }
        // The slots were written after the last header (a crash before the next one), or
        // damaged: rebuild them from the entries the header counts.
        let slots = Self::slots_from_entries(&f)?;
        f.header.slots_crc = crc32fast::hash(&slots);
        let io = |e: Error| e.to_string();
        f.file
            .write_all_at(&slots, HEADER_BYTES as u64)
            .map_err(io)?;
        f.file.sync_data().map_err(io)?;
        f.file.write_all_at(&f.header.encode(), 0).map_err(io)?;
        f.file.sync_data().map_err(io)?;
        Ok((f, true))
    }

    fn slots_from_entries(f: &IndexFile) -> std::result::Result<Vec<u8>, String> {
        let h = &f.header;
        let mut slots = vec![0u8; h.slots as usize * 4];
        let mut buf = vec![0u8; 4096 * ENTRY_BYTES];
        let mut n = 1u32;
        while n <= h.count {
            let take = (h.count - n + 1).min(4096);
            let bytes = &mut buf[..take as usize * ENTRY_BYTES];
            f.file
                .read_exact_at(bytes, h.entry_pos(n))
                .map_err(|e| e.to_string())?;
            for (i, eb) in bytes.chunks_exact(ENTRY_BYTES).enumerate() {
                let number = n + i as u32;
                let e = Entry::decode(eb, number, h)?;
                let s = h.slot_of(e.hash) as usize * 4;
                if le_u32(&slots, s) != e.prev {
                    return Err(format!("entry {number}: broken slot chain"));
                }
                slots[s..s + 4].copy_from_slice(&number.to_le_bytes());
            }
            n += take;
        }
        Ok(slots)
    }

    fn activate(f: IndexFile) -> Result<Active> {
        let mut slots = vec![0u8; f.header.slots as usize * 4];
        f.file.read_exact_at(&mut slots, HEADER_BYTES as u64)?;
        let pages = slots.len().div_ceil(PAGE_BYTES);
        Ok(Active {
            written: f.header.count,
            f,
            slots,
            dirty: vec![false; pages],
            pending: Vec::new(),
        })
    }

    /// Every keyed record before this log offset is indexed.
    pub fn indexed_upto(&self) -> u64 {
        self.inner.lock().indexed_upto
    }

    /// Index the log from [`KeyIndex::indexed_upto`] up to `to` (a record boundary at or
    /// below the log's durable end), reading it with `scan(from, to, f)`
    /// ([`crate::store::Store::scan_records`]). Holds the index lock meanwhile, so lookups
    /// wait for it. `log_start` is the first offset the log still has; no record with a key
    /// ends after `keyed_end` ([`crate::store::LogReader::keyed_end`]), so the log from there to
    /// `to` is passed over unread (a keyless workload costs the indexer nothing).
    pub fn catch_up(
        &self,
        log_start: u64,
        to: u64,
        keyed_end: u64,
        scan: &LogScan<'_>,
    ) -> Result<()> {
        let mut inner = self.inner.lock();
        let from = inner.indexed_upto.max(log_start);
        if from >= to {
            return Ok(());
        }
        let scan_to = to.min(keyed_end);
        if scan_to <= from {
            inner.indexed_upto = to;
            return Ok(());
        }
        let inner = &mut *inner;
        let mut add = |view: &RecordView<'_>, size: u32| -> Result<()> {
            if view.key.is_empty() || view.header.kind == RecordKind::SegmentEnd {
                return Ok(());
            }
            self.add(inner, key_hash(view.key.as_bytes()), &view.header, size)
        };
        let reached = scan(from, scan_to, &mut add)?;
        // `keyed_end` is a record boundary (the end of a keyed record), so a scan that got
        // there has seen every keyed record below `to`.
        let reached = if reached >= scan_to { to } else { reached };
        inner.indexed_upto = inner.indexed_upto.max(reached);
        Ok(())
    }

    fn add(
        &self,
        inner: &mut Inner,
        hash: u64,
        header: &crate::record::Header,
        size: u32,
    ) -> Result<()> {
        let log_offset = header.log_offset;
        let full = inner
            .active
            .as_ref()
            .is_none_or(|a| a.f.header.count >= a.f.header.entries_max);
        if full {
            if let Some(a) = inner.active.take() {
                let upto = log_offset;
                let sealed = self.seal(a, upto)?;
                inner.sealed.push(sealed);
                inner.persisted_upto = inner.persisted_upto.max(upto);
            }
            inner.active = Some(self.create(log_offset)?);
        }
        let Some(a) = inner.active.as_mut() else {
            return Err(Error::Invalid {
                what: "key index",
                reason: "no active file after creating one".into(),
            });
        };
        let h = &mut a.f.header;
        let slot = h.slot_of(hash) as usize * 4;
        let number = h.count + 1;
        let e = Entry {
            hash,
            log_offset,
            timestamp_ms: header.timestamp_ms,
            size,
            prev: le_u32(&a.slots, slot),
        };
        a.pending.extend_from_slice(&e.encode());
        a.slots[slot..slot + 4].copy_from_slice(&number.to_le_bytes());
        a.dirty[slot / PAGE_BYTES] = true;
        h.count = number;
        h.last = log_offset;
        if a.pending.len() >= PENDING_BYTES_MAX {
            Self::write_pending(a)?;
        }
        Ok(())
    }

    fn write_pending(a: &mut Active) -> Result<()> {
        if a.pending.is_empty() {
            return Ok(());
        }
        let pos = a.f.header.entry_pos(a.written + 1);
        a.f.file.write_all_at(&a.pending, pos)?;
        // Whole entries only: pending holds count - written of them.
        a.written = a.f.header.count;
        a.pending.clear();
        Ok(())
    }

    /// Write entries and dirty slot pages, sync, then the header claiming `upto`.
    fn persist_active(a: &mut Active, upto: u64, sealed: bool) -> Result<()> {
        Self::write_pending(a)?;
        let mut i = 0;
        while i < a.dirty.len() {
            if !a.dirty[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < a.dirty.len() && a.dirty[i] {
                a.dirty[i] = false;
                i += 1;
            }
            let from = start * PAGE_BYTES;
            let to = (i * PAGE_BYTES).min(a.slots.len());
            a.f.file
                .write_all_at(&a.slots[from..to], HEADER_BYTES as u64 + from as u64)?;
        }
        a.f.file.sync_data()?;
        let h = &mut a.f.header;
        if h.count > 0 && upto <= h.last {
            return Err(Error::Invalid {
                what: "key index",
                reason: format!("mark {upto} is not past the last entry ({})", h.last),
            });
        }
        h.indexed_upto = upto.max(h.first);
        h.slots_crc = crc32fast::hash(&a.slots);
        h.sealed = sealed;
        a.f.file.write_all_at(&h.encode(), 0)?;
        a.f.file.sync_data()
    }

    fn seal(&self, mut a: Active, upto: u64) -> Result<IndexFile> {
        Self::persist_active(&mut a, upto, true)?;
        Ok(a.f)
    }

    fn create(&self, first: u64) -> Result<Active> {
        let header = Header {
            slots: self.slots,
            entries_max: self.entries_max,
            count: 0,
            first,
            last: first,
            indexed_upto: first,
            slots_crc: crc32fast::hash(&vec![0u8; self.slots as usize * 4]),
            sealed: false,
        };
        let path = self.dir.join(file_name(first));
        // A file left by an earlier, dropped generation of the index is replaced whole.
        if self.storage.exists(&path) {
            self.storage.remove_file(&path)?;
        }
        let file = self.storage.open(&path, true)?;
        // The slot table starts as zeros (a sparse extent on real files); entries are
        // appended as they come, so a file is only as long as what it holds.
        file.set_len(0)?;
        file.set_len(header.entry_pos(1))?;
        file.write_all_at(&header.encode(), 0)?;
        file.sync_data()?;
        self.storage.sync_dir(&self.dir)?;
        Self::activate(IndexFile { header, file, path })
    }

    /// Make the index durable up to [`KeyIndex::indexed_upto`] (about once a second from the
    /// indexer thread, and at close).
    pub fn persist(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        let upto = inner.indexed_upto;
        if upto <= inner.persisted_upto {
            return Ok(());
        }
        if inner.active.is_none() {
            // No keyed record since the last file (or ever): an empty file carries the mark,
            // so that the next open does not read the keyless log again.
            let first = inner.persisted_upto;
            inner.active = Some(self.create(first)?);
        }
        if let Some(a) = inner.active.as_mut() {
            Self::persist_active(a, upto, false)?;
        }
        inner.persisted_upto = upto;
        Ok(())
    }

    /// Every entry whose key has the hash of `key`, oldest first (by log offset), from every
    /// file. The caller reads each record back and compares the key. `Err(Damaged)` when a
    /// file fails a check on the way: [`KeyIndex::rebuild_from`] then re-indexing helps.
    pub fn lookup(&self, key: &[u8]) -> Result<std::result::Result<Vec<Entry>, Damaged>> {
        let hash = key_hash(key);
        let mut inner = self.inner.lock();
        let mut out = Vec::new();
        if let Some(a) = inner.active.as_mut() {
            Self::write_pending(a)?;
        }
        let inner = &*inner;
        let files = inner
            .sealed
            .iter()
            .map(|f| (f, None))
            .chain(inner.active.iter().map(|a| (&a.f, Some(&a.slots))));
        for (f, mem_slots) in files {
            if let Err(reason) = Self::walk(f, mem_slots.map(|s| s.as_slice()), hash, &mut out) {
                return Ok(Err(Damaged {
                    first: f.header.first,
                    reason: format!("{}: {reason}", f.path.display()),
                }));
            }
        }
        out.sort_by_key(|e| e.log_offset);
        out.dedup_by_key(|e| e.log_offset);
        Ok(Ok(out))
    }

    fn walk(
        f: &IndexFile,
        mem_slots: Option<&[u8]>,
        hash: u64,
        out: &mut Vec<Entry>,
    ) -> std::result::Result<(), String> {
        let h = &f.header;
        let slot = h.slot_of(hash);
        let mut number = match mem_slots {
            Some(s) => le_u32(s, slot as usize * 4),
            None => {
                let mut b = [0u8; 4];
                f.file
                    .read_exact_at(&mut b, HEADER_BYTES as u64 + u64::from(slot) * 4)
                    .map_err(|e| e.to_string())?;
                u32::from_le_bytes(b)
            }
        };
        let mut eb = [0u8; ENTRY_BYTES];
        let mut steps = 0u32;
        while number != 0 {
            if number > h.count || steps > h.count {
                return Err(format!("slot {slot}: entry {number} past the count"));
            }
            steps += 1;
            f.file
                .read_exact_at(&mut eb, h.entry_pos(number))
                .map_err(|e| e.to_string())?;
            let e = Entry::decode(&eb, number, h)?;
            if h.slot_of(e.hash) != slot {
                return Err(format!("entry {number} is not in slot {slot}"));
            }
            if e.hash == hash {
                out.push(e);
            }
            number = e.prev;
        }
        Ok(())
    }

    /// Forget every file from the one starting at `first` on (a lookup found it damaged):
    /// they are deleted, and indexing resumes where the previous file ends.
    pub fn rebuild_from(&self, first: u64) -> Result<()> {
        let mut inner = self.inner.lock();
        let mut doomed: Vec<PathBuf> = Vec::new();
        // The active file is the newest: it goes whenever anything goes.
        match inner.active.take() {
            Some(a) if a.f.header.first >= first => doomed.push(a.f.path.clone()),
            Some(a) => {
                inner.active = Some(a);
                return Ok(());
            }
            None => {}
        }
        let keep: Vec<IndexFile> = std::mem::take(&mut inner.sealed)
            .into_iter()
            .filter_map(|f| {
                if f.header.first >= first {
                    doomed.push(f.path.clone());
                    None
                } else {
                    Some(f)
                }
            })
            .collect();
        inner.sealed = keep;
        for p in &doomed {
            self.storage.remove_file(p)?;
        }
        self.storage.sync_dir(&self.dir)?;
        let upto = inner.sealed.last().map_or(0, |f| f.header.indexed_upto);
        inner.indexed_upto = upto;
        inner.persisted_upto = upto;
        tracing::warn!(
            files = doomed.len(),
            from = upto,
            "key index files dropped; re-indexing the log"
        );
        Ok(())
    }

    /// Delete the files whose every entry is below `log_start` (retention deleted those log
    /// segments). The newest file is kept while it is the one being appended to. Returns the
    /// number of files deleted.
    pub fn drop_below(&self, log_start: u64) -> Result<usize> {
        let mut inner = self.inner.lock();
        let (gone, keep): (Vec<IndexFile>, Vec<IndexFile>) = std::mem::take(&mut inner.sealed)
            .into_iter()
            .partition(|f| f.header.count == 0 || f.header.last < log_start);
        inner.sealed = keep;
        for f in &gone {
            self.storage.remove_file(&f.path)?;
        }
        if !gone.is_empty() {
            self.storage.sync_dir(&self.dir)?;
        }
        Ok(gone.len())
    }

    /// Entries in all files.
    pub fn entries(&self) -> u64 {
        let inner = self.inner.lock();
        inner
            .sealed
            .iter()
            .map(|f| &f.header)
            .chain(inner.active.iter().map(|a| &a.f.header))
            .map(|h| u64::from(h.count))
            .sum()
    }

    /// Index files (sealed and active).
    pub fn files(&self) -> usize {
        let inner = self.inner.lock();
        inner.sealed.len() + usize::from(inner.active.is_some())
    }

    /// The directory of the index files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::io::FsStorage;

    fn header(log_offset: u64) -> crate::record::Header {
        crate::record::Header {
            kind: RecordKind::Message,
            flags: 0,
            queue_id: 0,
            log_offset,
            queue_offset: 0,
            timestamp_ms: 1000 + log_offset,
        }
    }

    fn add_all(ix: &KeyIndex, keys: &[(&str, u64)]) {
        let mut inner = ix.inner.lock();
        for (k, off) in keys {
            ix.add(&mut inner, key_hash(k.as_bytes()), &header(*off), 60)
                .unwrap();
            inner.indexed_upto = off + 60;
        }
    }

    fn offsets(ix: &KeyIndex, key: &str) -> Vec<u64> {
        ix.lookup(key.as_bytes())
            .unwrap()
            .unwrap()
            .iter()
            .map(|e| e.log_offset)
            .collect()
    }

    #[test]
    fn header_and_entry_round_trip_and_reject_damage() {
        let h = Header {
            slots: 8,
            entries_max: 4,
            count: 2,
            first: 100,
            last: 300,
            indexed_upto: 400,
            slots_crc: 7,
            sealed: true,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in 0..HEADER_BYTES {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at {i} not caught");
        }
        assert!(Header::decode(&b[..40]).is_err());
        let e = Entry {
            hash: 5,
            log_offset: 200,
            timestamp_ms: 9,
            size: 60,
            prev: 1,
        };
        assert_eq!(Entry::decode(&e.encode(), 2, &h), Ok(e));
        assert!(
            Entry::decode(&e.encode(), 1, &h).is_err(),
            "prev must be older"
        );
        let mut bad = e.encode();
        bad[9] ^= 1;
        assert!(Entry::decode(&bad, 2, &h).is_err());
        assert_eq!(parse_file_name(&file_name(4096)), Some(4096));
        assert_eq!(parse_file_name("4096.idx"), None);
    }

    #[test]
    fn catch_up_reads_the_log_only_up_to_the_last_keyed_record() {
        let dir = tempfile::tempdir().unwrap();
        let st: Arc<dyn Storage> = Arc::new(FsStorage);
        let (ix, _) = KeyIndex::open(st, dir.path(), 64, 64).unwrap();
        let asked = Mutex::new(Vec::new());
        // A log whose scan reports reaching the end it was asked for, reading nothing.
        let scan = |from: u64,
                    to: u64,
                    _f: &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>|
         -> Result<u64> {
            asked.lock().push((from, to));
            Ok(to)
        };
        // The last keyed record ends at 100: read to there, the rest up to 500 passed over.
        ix.catch_up(0, 500, 100, &scan).unwrap();
        assert_eq!(ix.indexed_upto(), 500);
        // No keyed record since: nothing is read at all.
        ix.catch_up(0, 500, 100, &scan).unwrap();
        ix.catch_up(0, 600, 100, &scan).unwrap();
        assert_eq!(ix.indexed_upto(), 600);
        // A keyed record ends at 700: read to there, mark the rest as indexed.
        ix.catch_up(0, 900, 700, &scan).unwrap();
        assert_eq!(ix.indexed_upto(), 900);
        // The keyed record ends past the durable end: read to the durable end only.
        ix.catch_up(0, 1000, 1200, &scan).unwrap();
        assert_eq!(ix.indexed_upto(), 1000);
        assert_eq!(*asked.lock(), vec![(0, 100), (600, 700), (900, 1000)]);
        // A scan that stops short (a record not yet readable) marks only what it read.
        let short = |from: u64,
                     _to: u64,
                     _f: &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>|
         -> Result<u64> { Ok(from + 10) };
        ix.catch_up(0, 2000, 1500, &short).unwrap();
        assert_eq!(ix.indexed_upto(), 1010);
    }

    #[test]
    fn collisions_rollover_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let st: Arc<dyn Storage> = Arc::new(FsStorage);
        let (ix, _) = KeyIndex::open(st.clone(), dir.path(), 2, 3).unwrap();
        let keys: Vec<(String, u64)> = (0..10)
            .map(|i| (format!("k{}", i % 4), 100 * (i + 1)))
            .collect();
        let refs: Vec<(&str, u64)> = keys.iter().map(|(k, o)| (k.as_str(), *o)).collect();
        add_all(&ix, &refs);
        assert_eq!(ix.files(), 4);
        assert_eq!(offsets(&ix, "k1"), vec![200, 600, 1000]);
        assert_eq!(offsets(&ix, "k0"), vec![100, 500, 900]);
        assert!(offsets(&ix, "nope").is_empty());
        ix.persist().unwrap();
        drop(ix);
        let (ix, rep) = KeyIndex::open(st.clone(), dir.path(), 2, 3).unwrap();
        assert_eq!(rep.files, 4);
        assert_eq!(rep.files_dropped, 0);
        assert_eq!(rep.indexed_upto, 1060);
        assert_eq!(offsets(&ix, "k1"), vec![200, 600, 1000]);
        assert_eq!(ix.drop_below(700).unwrap(), 2);
        assert_eq!(offsets(&ix, "k1"), vec![1000]);
    }

    #[test]
    fn unpersisted_entries_are_forgotten_and_stale_slots_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let st: Arc<dyn Storage> = Arc::new(FsStorage);
        let (ix, _) = KeyIndex::open(st.clone(), dir.path(), 4, 100).unwrap();
        add_all(&ix, &[("a", 100), ("b", 200)]);
        ix.persist().unwrap();
        add_all(&ix, &[("a", 300)]);
        // Written (slots and entry) but never persisted: as after a crash.
        {
            let mut inner = ix.inner.lock();
            let a = inner.active.as_mut().unwrap();
            KeyIndex::write_pending(a).unwrap();
            let slots = a.slots.clone();
            a.f.file.write_all_at(&slots, HEADER_BYTES as u64).unwrap();
        }
        drop(ix);
        let (ix, rep) = KeyIndex::open(st, dir.path(), 4, 100).unwrap();
        assert_eq!(rep.slot_tables_rebuilt, 1);
        assert_eq!(rep.indexed_upto, 260);
        assert_eq!(offsets(&ix, "a"), vec![100]);
        add_all(&ix, &[("a", 300)]);
        assert_eq!(offsets(&ix, "a"), vec![100, 300]);
    }
}
