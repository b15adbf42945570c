//! Telling damage to acknowledged records from a torn tail.
//!
//! Every group-commit batch begins with a [`RecordKind::Mark`] holding the durable end of
//! the log when the flusher wrote the batch: every byte below it had been synced (and so
//! acknowledged) before any byte of the batch reached the file. A record that fails its
//! checks at log offset `d` was therefore acknowledged if a valid mark *after* it holds a
//! durable end above `d`, or if the checkpoint (written only at durable offsets) is above
//! `d`. Otherwise it lies beyond everything ever known durable: a torn tail.
//!
//! Finding marks after a damaged record means finding the next valid record without the
//! damaged record's length. Records are not aligned, so every byte position is a candidate;
//! a record stores its own log offset, so a candidate is checked cheaply (length in range,
//! version, the offset field equal to its position) before its CRC is computed.

use super::scan::Scanner;
use crate::io::StorageFile;
use crate::record::{self, RecordKind, HEADER_BYTES, RECORD_BYTES_MAX, VERSION};
use halfmq_types::error::Result;

/// What lies after a damaged record in a segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Survey {
    /// Valid records found after the damage (the group commits' marks included).
    pub(crate) records: u64,
    /// How many of them are messages.
    pub(crate) messages: u64,
    /// The highest durable end held by a mark after the damage, and that mark's log offset.
    pub(crate) mark: Option<(u64, u64)>,
    /// File position of the first valid record after the damage.
    pub(crate) next_valid: Option<u64>,
}

impl Survey {
    /// The records found, for people: "N valid records, M of them messages".
    pub(crate) fn counts(&self) -> String {
        format!(
            "{} valid records, {} of them messages",
            self.records, self.messages
        )
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The first position in `[from, to)` of the segment file starting at log offset `base`
/// that holds a valid record saying it is there, and that record's length.
pub(crate) fn next_valid(
    file: &dyn StorageFile,
    base: u64,
    size: u64,
    from: u64,
    to: u64,
) -> Result<Option<(u64, u64)>> {
    const CHUNK: u64 = 1 << 20;
    let hb = HEADER_BYTES as u64;
    let to = to.min(size);
    let mut buf = Vec::new();
    let mut record_buf = Vec::new();
    let mut at = from;
    while at < to && at + hb <= size {
        // Positions [at, at + n) with their headers: read `hb` bytes more.
        let n = (to - at).min(CHUNK);
        let want = (n + hb).min(size - at);
        buf.resize(want as usize, 0);
        let got = file.read_at(&mut buf, at)?;
        buf.truncate(got);
        if got < HEADER_BYTES {
            break;
        }
        let starts = n.min((got - HEADER_BYTES) as u64 + 1) as usize;
        for i in 0..starts {
            let p = at + i as u64;
            let total = u32_at(&buf, i);
            if total < HEADER_BYTES as u32
                || total > RECORD_BYTES_MAX
                || buf[i + 8] != VERSION
                || u64_at(&buf, i + 16) != base + p
                || p + u64::from(total) > size
            {
                continue;
            }
            let total = total as usize;
            let ok = if i + total <= buf.len() {
                record::decode(&buf[i..i + total]).is_ok()
            } else {
                record_buf.resize(total, 0);
                file.read_exact_at(&mut record_buf, p)?;
                record::decode(&record_buf).is_ok()
            };
            if ok {
                return Ok(Some((p, total as u64)));
            }
        }
        at += starts as u64;
    }
    Ok(None)
}

/// Look at `(from, to)` of a segment file after the damaged record at `from`: every valid
/// record there (following lengths, and searching again after each damaged stretch), and
/// the marks among them.
pub(crate) fn survey(
    file: &dyn StorageFile,
    base: u64,
    size: u64,
    from: u64,
    to: u64,
) -> Result<Survey> {
    let mut s = Survey::default();
    let mut at = from + 1;
    while at < to {
        let Some((p, _)) = next_valid(file, base, size, at, to)? else {
            break;
        };
        s.next_valid.get_or_insert(p);
        let mut scan = Scanner::new(file, size, p);
        while scan.pos < to {
            if scan.next()?.is_err() {
                break;
            }
            let Ok(view) = scan.current() else {
                break;
            };
            if view.header.log_offset != base + scan.pos {
                break;
            }
            s.records += 1;
            if view.header.kind == RecordKind::Message {
                s.messages += 1;
            }
            if let Some(v) = view.mark() {
                if s.mark.is_none_or(|(m, _)| v > m) {
                    s.mark = Some((v, view.header.log_offset));
                }
            }
            let end = view.header.kind == RecordKind::SegmentEnd;
            scan.advance();
            if end {
                return Ok(s);
            }
        }
        at = scan.pos.max(p) + 1;
    }
    Ok(s)
}

/// Why damage at log offset `at` lies in acknowledged data, if it does: the checkpoint,
/// or a mark found after it, says the log was durable beyond it.
pub(crate) fn acknowledged(at: u64, checkpoint: Option<u64>, survey: &Survey) -> Option<String> {
    if let Some(c) = checkpoint.filter(|&c| c > at) {
        return Some(format!("the checkpoint says the log was durable up to {c}"));
    }
    if let Some((v, m)) = survey.mark.filter(|&(v, _)| v > at) {
        return Some(format!(
            "the group commit at log offset {m} recorded the log as durable up to {v}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{FsStorage, Storage};
    use crate::record::{encode_mark, Header};

    fn message(out: &mut Vec<u8>, base: u64, body: &[u8]) {
        let header = Header {
            kind: RecordKind::Message,
            flags: 0,
            queue_id: 0,
            log_offset: base + out.len() as u64,
            queue_offset: 0,
            timestamp_ms: 1,
        };
        record::encode_into(out, &header, "t", "k", &[], body).unwrap();
    }

    #[test]
    fn the_next_valid_record_and_the_marks_after_damage_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let base = 1 << 20;
        let mut bytes = vec![0u8; 32];
        encode_mark(&mut bytes, base + 32, 0, 1);
        let damaged = bytes.len();
        message(&mut bytes, base, b"first");
        let second = bytes.len();
        message(&mut bytes, base, b"second");
        let mark = bytes.len();
        encode_mark(&mut bytes, base + mark as u64, base + second as u64, 1);
        message(&mut bytes, base, b"third");
        let end = bytes.len();
        bytes.resize(4096, 0);
        bytes[damaged + 55] ^= 0x40; // in the first message's body
        let storage = FsStorage;
        let f = storage.open(&dir.path().join("seg"), true).unwrap();
        f.write_all_at(&bytes, 0).unwrap();
        let found = next_valid(&*f, base, 4096, damaged as u64 + 1, 4096).unwrap();
        assert_eq!(found.map(|(p, _)| p), Some(second as u64));
        let s = survey(&*f, base, 4096, damaged as u64, end as u64).unwrap();
        assert_eq!((s.records, s.messages), (3, 2));
        assert_eq!(s.counts(), "3 valid records, 2 of them messages");
        assert_eq!(s.next_valid, Some(second as u64));
        assert_eq!(s.mark, Some((base + second as u64, base + mark as u64)));
        let at = base + damaged as u64;
        assert!(
            acknowledged(at, None, &s).is_some(),
            "a later mark covers it"
        );
        assert!(acknowledged(base + second as u64, None, &s).is_none());
        assert!(acknowledged(base + second as u64, Some(base + end as u64), &s).is_some());
    }
}
