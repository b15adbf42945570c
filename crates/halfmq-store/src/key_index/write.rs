//! The indexer's side: appending entries for the records it reads back from the log, and
//! making them durable ([`KeyIndex::persist`]). One indexer at a time: every method here
//! runs under the index lock.

use super::format::{file_name, key_hash, le_u32, Entry, Header, HEADER_BYTES};
use super::{IndexFile, Inner, KeyIndex, LogScan};
use crate::record::{RecordKind, RecordView};
use halfmq_types::error::{Error, Result};
use halfmq_types::props::{more_keys, PROP_KEYS};

/// Slot-table bytes tracked as one dirty unit.
const PAGE_BYTES: usize = 4096;
/// Buffered entry bytes that trigger a write (not a sync).
const PENDING_BYTES_MAX: usize = 1024 * 1024;

const _: () = assert!(PAGE_BYTES.is_multiple_of(4));

/// The file being appended to.
pub(super) struct Active {
    pub(super) f: IndexFile,
    /// The slot table, as stored (little-endian u32s).
    pub(super) slots: Vec<u8>,
    /// Slot pages changed since the last persist.
    pub(super) dirty: Vec<bool>,
    /// Entries not yet written to the file, starting with entry `written + 1`.
    pub(super) pending: Vec<u8>,
    /// Entries written to the file (not necessarily synced).
    pub(super) written: u32,
}

impl KeyIndex {
    /// Make `f` the file being appended to: its slot table is read into memory, where
    /// appends update it until the next persist writes the dirty pages back.
    pub(super) fn activate(f: IndexFile) -> Result<Active> {
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

    /// Index the log from [`KeyIndex::indexed_upto`] up to `to` (a record boundary at or
    /// below the log's durable end), reading it with `scan(from, to, f)`
    /// ([`crate::Store::scan_records`]). Holds the index lock meanwhile, so lookups
    /// wait for it. `log_start` is the first offset the log still has; no record with a key
    /// ends after `keyed_end` ([`crate::LogReader::keyed_end`]), so the log from there to
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
            let mut keys = vec![view.key];
            // Further keys (only on records with a key, so `keyed_end` covers them too). A
            // record passed its CRC; properties that still do not decode cost only their
            // further keys here (reading the record reports them).
            // Decode the properties only when the name is in their bytes: most keyed records
            // (an idempotency key, a tag) have properties but no further keys.
            let named = view
                .props
                .windows(PROP_KEYS.len())
                .any(|w| w == PROP_KEYS.as_bytes());
            let props = if named { view.properties().ok() } else { None };
            if let Some(v) = props.as_ref().and_then(|p| p.get(PROP_KEYS)) {
                for k in more_keys(v) {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
            let hashes: Vec<u64> = keys.iter().map(|k| key_hash(k.as_bytes())).collect();
            self.add_record(inner, &hashes, &view.header, size)
        };
        let reached = scan(from, scan_to, &mut add)?;
        // `keyed_end` is a record boundary (the end of a keyed record), so a scan that got
        // there has seen every keyed record below `to`.
        let reached = if reached >= scan_to { to } else { reached };
        inner.indexed_upto = inner.indexed_upto.max(reached);
        Ok(())
    }

    /// Index one record under each of `hashes` (its key's, then its further keys'), all in
    /// one file: a file is sealed at a record boundary, never between two entries of one
    /// record (its mark must be past its last entry). At most `entries_max` of them.
    pub(super) fn add_record(
        &self,
        inner: &mut Inner,
        hashes: &[u64],
        header: &crate::record::Header,
        size: u32,
    ) -> Result<()> {
        let room = hashes.len().min(self.entries_max as usize) as u32;
        let full = inner
            .active
            .as_ref()
            .is_none_or(|a| a.f.header.count + room > a.f.header.entries_max);
        if full {
            let log_offset = header.log_offset;
            if let Some(a) = inner.active.take() {
                let upto = log_offset;
                let sealed = self.seal(a, upto)?;
                inner.sealed.push(sealed);
                inner.persisted_upto = inner.persisted_upto.max(upto);
            }
            inner.active = Some(self.create(log_offset)?);
        }
        for &hash in &hashes[..room as usize] {
            self.push_entry(inner, hash, header, size)?;
        }
        Ok(())
    }

    fn push_entry(
        &self,
        inner: &mut Inner,
        hash: u64,
        header: &crate::record::Header,
        size: u32,
    ) -> Result<()> {
        let log_offset = header.log_offset;
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

    pub(super) fn write_pending(a: &mut Active) -> Result<()> {
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
    /// When nothing but the mark moved (only keyless records passed since the last
    /// persist), the entries and slots on disk are already synced and their CRC unchanged:
    /// only the header is written and synced.
    pub(super) fn persist_active(a: &mut Active, upto: u64, sealed: bool) -> Result<()> {
        let changed = !a.pending.is_empty() || a.dirty.iter().any(|&d| d);
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
        if changed {
            a.f.file.sync_data()?;
        }
        let h = &mut a.f.header;
        if h.count > 0 && upto <= h.last {
            return Err(Error::Invalid {
                what: "key index",
                reason: format!("mark {upto} is not past the last entry ({})", h.last),
            });
        }
        h.indexed_upto = upto.max(h.first);
        if changed {
            h.slots_crc = crc32fast::hash(&a.slots);
        }
        h.sealed = sealed;
        a.f.file.write_all_at(&h.encode(), 0)?;
        a.f.file.sync_data()
    }

    pub(super) fn seal(&self, mut a: Active, upto: u64) -> Result<IndexFile> {
        Self::persist_active(&mut a, upto, true)?;
        Ok(a.f)
    }

    pub(super) fn create(&self, first: u64) -> Result<Active> {
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
}
