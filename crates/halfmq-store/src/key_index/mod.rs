//! The key index behind the broker's message trace (`Broker::trace` in the `halfmq` crate,
//! which depends on this one): an append-only on-disk hash index in the style of RocketMQ's
//! `IndexFile`, derived from the commit log.
//!
//! The code follows the seams: `format` holds the bytes of a file (header, slots, entries),
//! `write` the indexer's side (appending entries, persisting them), and this module opens
//! and checks the files and answers lookups.
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
//! log offset has its entry in the files, durably. When only keyless records passed since
//! the last persist, only the header is written and synced (one `fdatasync`, no CRC of the
//! slot table).
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

mod format;
mod write;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::io::{Storage, StorageFile};
use crate::record::RecordView;
use halfmq_types::error::{Error, Result};

pub use format::{file_name, key_hash, Entry, ENTRY_BYTES, FILE_ITEMS_MAX, HEADER_BYTES};
use format::{le_u32, parse_file_name, Header};
use write::Active;

/// Reads the log from `from` to `to`, calling the visitor with every record and its size;
/// returns the offset reached ([`crate::Store::scan_records`]).
pub type LogScan<'a> =
    dyn Fn(u64, u64, &mut dyn FnMut(&RecordView<'_>, u32) -> Result<()>) -> Result<u64> + 'a;

/// An index file that takes no more entries (or the active one, for reads).
struct IndexFile {
    header: Header,
    file: Arc<dyn StorageFile>,
    path: PathBuf,
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

    /// Every keyed record before this log offset is indexed.
    pub fn indexed_upto(&self) -> u64 {
        self.inner.lock().indexed_upto
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
    use crate::io::FsStorage;
    use crate::record::RecordKind;

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
            ix.add_record(&mut inner, &[key_hash(k.as_bytes())], &header(*off), 60)
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

    /// An index (4 slots, 100 entries a file) holding keys a at 100 and b at 200, persisted.
    fn a_and_b_persisted() -> (tempfile::TempDir, Arc<dyn Storage>, KeyIndex) {
        let dir = tempfile::tempdir().unwrap();
        let st: Arc<dyn Storage> = Arc::new(FsStorage);
        let (ix, _) = KeyIndex::open(st.clone(), dir.path(), 4, 100).unwrap();
        add_all(&ix, &[("a", 100), ("b", 200)]);
        ix.persist().unwrap();
        (dir, st, ix)
    }

    #[test]
    fn unpersisted_entries_are_forgotten_and_stale_slots_rebuilt() {
        let (dir, st, ix) = a_and_b_persisted();
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

    #[test]
    fn a_persist_that_only_moves_the_mark_keeps_the_slot_table_valid() {
        let (dir, st, ix) = a_and_b_persisted();
        // Only keyless records passed: the mark moves, no entry or slot changes.
        ix.inner.lock().indexed_upto = 5000;
        ix.persist().unwrap();
        drop(ix);
        let (ix, rep) = KeyIndex::open(st, dir.path(), 4, 100).unwrap();
        assert_eq!(rep.indexed_upto, 5000);
        assert_eq!(rep.slot_tables_rebuilt, 0);
        assert_eq!(offsets(&ix, "a"), vec![100]);
        assert_eq!(offsets(&ix, "b"), vec![200]);
    }
}
