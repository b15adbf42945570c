//! What damaged bytes held: the consume-queue entries that point into them (topic, queue,
//! queue offset, size and key hash, from the index files, which are derived from the log
//! and survive its damage), and what can still be read from the damaged bytes themselves
//! (kind, topic, key), checked against those entries where they exist.

use std::path::Path;

use crate::consume_queue::{self, Entry, CQ_HEADER_BYTES, ENTRY_BYTES};
use crate::io::{Storage, StorageFile};
use crate::record::{u16_at, u32_at, u64_at, RecordKind, HEADER_BYTES};
use halfmq_types::error::Result;

/// A record lost to damage, as far as it can be known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRecord {
    /// Where the record started in the log.
    pub log_offset: u64,
    /// Its encoded size (from its index entry, or from the damaged header).
    pub size: Option<u32>,
    /// What it was (`"message"`, `"half"`, ...), when the damaged header still says so.
    pub kind: Option<&'static str>,
    /// Its topic.
    pub topic: Option<String>,
    /// Its queue.
    pub queue: Option<u32>,
    /// Its queue offset.
    pub queue_offset: Option<u64>,
    /// Its key, when the damaged bytes still hold it.
    pub key: Option<String>,
    /// How sure the report is: `true` when the record's place comes from its consume-queue
    /// entry (and a key read from the damaged bytes matches the entry's key hash); `false`
    /// when everything was read from the damaged bytes alone.
    pub from_index: bool,
}

impl std::fmt::Display for LostRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        write!(
            f,
            "log offset {}: {} {}/{}@{} key {}{}",
            self.log_offset,
            self.kind.unwrap_or("record"),
            opt(self.topic.clone()),
            opt(self.queue.map(|q| q.to_string())),
            opt(self.queue_offset.map(|q| q.to_string())),
            match &self.key {
                Some(k) if k.is_empty() => "(none)".to_string(),
                Some(k) => format!("{k:?}"),
                None => "?".into(),
            },
            if self.from_index {
                ""
            } else {
                " (read from the damaged bytes; unverified)"
            }
        )
    }
}

/// An index entry that points into a damaged range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pointer {
    pub(crate) topic: String,
    pub(crate) queue: u32,
    pub(crate) queue_offset: u64,
    pub(crate) entry: Entry,
}

fn entry_at(file: &dyn StorageFile, i: u64) -> Result<Entry> {
    let mut b = [0u8; ENTRY_BYTES];
    let n = file.read_at(&mut b, CQ_HEADER_BYTES + i * ENTRY_BYTES as u64)?;
    if n < ENTRY_BYTES {
        return Ok(Entry::decode(&[0u8; ENTRY_BYTES]));
    }
    Ok(Entry::decode(&b))
}

/// Every consume-queue entry whose record starts in `[lo, hi)` (log offsets).
pub(crate) fn pointers_into(
    storage: &dyn Storage,
    cq_dir: &Path,
    lo: u64,
    hi: u64,
) -> Result<Vec<Pointer>> {
    let mut out = Vec::new();
    for topic in storage.list_dir(cq_dir)? {
        if consume_queue::validate_topic_name(&topic).is_err() {
            continue;
        }
        for name in storage.list_dir(&cq_dir.join(&topic))? {
            let Some(queue) = consume_queue::parse_file_name(&name) else {
                continue;
            };
            let file = storage.open(&cq_dir.join(&topic).join(&name), false)?;
            let entries = file.len()?.saturating_sub(CQ_HEADER_BYTES) / ENTRY_BYTES as u64;
            // Entries are in log order; reserved space at the end reads as zeros, so the
            // search runs over entries up to the last non-zero one.
            let mut n = entries;
            while n > 0 && entry_at(&*file, n - 1)?.log_offset == 0 {
                n -= 1;
            }
            let (mut a, mut b) = (0u64, n);
            while a < b {
                let mid = a + (b - a) / 2;
                if entry_at(&*file, mid)?.log_offset < lo {
                    a = mid + 1;
                } else {
                    b = mid;
                }
            }
            let mut i = a;
            while i < n {
                let entry = entry_at(&*file, i)?;
                if entry.log_offset >= hi {
                    break;
                }
                out.push(Pointer {
                    topic: topic.clone(),
                    queue,
                    queue_offset: i,
                    entry,
                });
                i += 1;
            }
        }
    }
    out.sort_by_key(|p| p.entry.log_offset);
    Ok(out)
}

/// What a damaged record header still says, read without its CRC: (kind, queue id, queue
/// offset, size, topic, key). `None` when the bytes do not even look like a record at
/// `log_offset`.
pub(crate) type Unverified = (
    Option<&'static str>,
    u32,
    u64,
    u32,
    Option<String>,
    Option<String>,
);

/// Read a record header from damaged bytes (`bytes` starts where the record should).
pub(crate) fn read_unverified(bytes: &[u8], log_offset: u64) -> Option<Unverified> {
    if bytes.len() < HEADER_BYTES || u64_at(bytes, 16) != log_offset {
        return None;
    }
    let kind = match bytes[9] {
        k if k == RecordKind::Message as u8 => Some("message"),
        k if k == RecordKind::Half as u8 => Some("half"),
        k if k == RecordKind::TxnEnd as u8 => Some("transaction end"),
        k if k == RecordKind::Delayed as u8 => Some("delayed message"),
        k if k == RecordKind::Mark as u8 => Some("batch mark"),
        k if k == RecordKind::SegmentEnd as u8 => Some("segment end"),
        _ => None,
    };
    let size = u32_at(bytes, 0);
    let (topic_len, key_len) = (
        usize::from(u16_at(bytes, 40)),
        usize::from(u16_at(bytes, 42)),
    );
    let text = |from: usize, len: usize| {
        bytes
            .get(from..from + len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(str::to_owned)
    };
    let topic = text(HEADER_BYTES, topic_len);
    let key = text(HEADER_BYTES + topic_len, key_len);
    Some((kind, u32_at(bytes, 12), u64_at(bytes, 24), size, topic, key))
}

/// The lost records of the damaged range `[lo, lo + original.len())`: one per index entry
/// pointing into it, plus the record at its start when no entry names it.
pub(crate) fn lost_records(original: &[u8], lo: u64, pointers: &[Pointer]) -> Vec<LostRecord> {
    let mut out = Vec::new();
    let at = |log_offset: u64| {
        let i = (log_offset - lo) as usize;
        original
            .get(i..)
            .and_then(|b| read_unverified(b, log_offset))
    };
    if !pointers.iter().any(|p| p.entry.log_offset == lo) {
        if let Some((kind, queue, queue_offset, size, topic, key)) = at(lo) {
            let message = kind == Some("message");
            out.push(LostRecord {
                log_offset: lo,
                size: Some(size),
                kind,
                topic,
                queue: message.then_some(queue),
                queue_offset: message.then_some(queue_offset),
                key,
                from_index: false,
            });
        } else {
            out.push(LostRecord {
                log_offset: lo,
                size: None,
                kind: None,
                topic: None,
                queue: None,
                queue_offset: None,
                key: None,
                from_index: false,
            });
        }
    }
    for p in pointers {
        let read = at(p.entry.log_offset);
        // A key read from the damaged bytes counts only if its hash is the entry's.
        let key = read
            .as_ref()
            .and_then(|r| r.5.clone())
            .filter(|k| consume_queue::key_hash(k) == p.entry.key_hash);
        out.push(LostRecord {
            log_offset: p.entry.log_offset,
            size: Some(p.entry.size),
            kind: Some("message"),
            topic: Some(p.topic.clone()),
            queue: Some(p.queue),
            queue_offset: Some(p.queue_offset),
            key,
            from_index: true,
        });
    }
    out
}
