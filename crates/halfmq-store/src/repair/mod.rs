//! `halfmq repair`: quarantine damaged bytes of the commit log so the store opens again.
//!
//! Recovery never cuts acknowledged records: damage to them stops the open with
//! `Error::Damaged`. Repair (the store closed, its directory locked) reads every segment in
//! full and finds the same damage recovery would stop at, and damage in older segments that
//! recovery does not read. For each damaged stretch of a segment (from the damaged record to
//! the next valid record) it
//!
//! 1. finds what was lost: the consume-queue entries that point into the stretch give the
//!    topic, queue, queue offset and key hash of each message in it, and whatever the
//!    damaged bytes still say (kind, topic, key) fills in the rest, checked against those
//!    entries where they exist ([`LostRecord`]);
//! 2. copies the damaged bytes aside, with that report, to `quarantine/` (`quarantine`
//!    module), synced before anything else changes;
//! 3. overwrites the stretch with [`RecordKind::Quarantined`] records of the same total
//!    length, so every later log offset still holds: one per lost message whose entry is
//!    known, carrying its topic, queue and queue offset (the offset stays taken, a read of it
//!    is `Error::Lost`), and one for each stretch between them; at the end of a full
//!    segment whose SegmentEnd was lost, a SegmentEnd of the right length.
//!
//! A blank or damaged segment header is restored from the file's name and contents (a
//! record there must confirm the base offset), its old 32 bytes quarantined first.
//! Damage beyond everything acknowledged (a torn tail) is reported and left for the next
//! open to cut, as it would be anyway.
//!
//! Every step is checked before it is done again, so repair can be re-run, also after a
//! crash in the middle: a stretch already overwritten is valid records and not damage any
//! more; an intact quarantine copy is never replaced, so a stretch whose overwrite was cut
//! short still takes its original bytes from the first copy.

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::io::{Storage, StorageFile};
use crate::record::{self, Header, RecordKind, HEADER_BYTES, RECORD_BYTES_MAX};
use crate::recovery::damage;
use crate::recovery::scan::{last_nonzero, Scanner};
use crate::segment::{self, SEGMENT_HEADER_BYTES};
use halfmq_types::error::Result;

mod lost;
mod quarantine;

pub use lost::LostRecord;
use lost::Pointer;

/// One damaged stretch of a segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRange {
    /// The segment file.
    pub path: PathBuf,
    /// Position of the first damaged byte in the file.
    pub file_pos: u64,
    /// Its log offset.
    pub log_offset: u64,
    /// Bytes in the stretch.
    pub len: u64,
    /// What was wrong, and how repair knows it was acknowledged.
    pub reason: String,
    /// What the bytes held, as far as it can be known (empty for a segment header).
    pub lost: Vec<LostRecord>,
    /// The copy of the original bytes (to be written, in a dry run).
    pub quarantine: PathBuf,
}

/// What `repair` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Damaged stretches of acknowledged data, quarantined (or to be, in a dry run).
    pub damaged: Vec<DamagedRange>,
    /// Torn tails (file, position, bytes): never acknowledged, left for the next open to
    /// cut.
    pub torn: Vec<(PathBuf, u64, u64)>,
}

impl RepairReport {
    /// Every lost record, in log order.
    pub fn lost(&self) -> impl Iterator<Item = &LostRecord> {
        self.damaged.iter().flat_map(|d| d.lost.iter())
    }
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.damaged.is_empty() && self.torn.is_empty() {
            return writeln!(f, "no damage found");
        }
        let verb = if self.dry_run {
            "would quarantine"
        } else {
            "quarantined"
        };
        for d in &self.damaged {
            writeln!(
                f,
                "{verb} {} bytes of {} at byte {} (log offset {}) to {}: {}",
                d.len,
                d.path.display(),
                d.file_pos,
                d.log_offset,
                d.quarantine.display(),
                d.reason
            )?;
            for l in &d.lost {
                writeln!(f, "  lost {l}")?;
            }
        }
        for (path, pos, bytes) in &self.torn {
            writeln!(
                f,
                "torn tail of {bytes} bytes in {} at byte {pos}: never acknowledged, the next open cuts it",
                path.display()
            )?;
        }
        Ok(())
    }
}

/// Find and quarantine damaged acknowledged data in the store at `dir` (see the module
/// documentation). Takes the directory's lock, so it fails with `Error::Locked` while a
/// broker has the store open. With `dry_run`, reports what it would do and changes nothing.
pub fn repair(storage: &dyn Storage, dir: &Path, dry_run: bool) -> Result<RepairReport> {
    let _lock = storage.lock_dir(dir)?;
    let ctx = Ctx {
        storage,
        cq_dir: dir.join("cq"),
        qdir: dir.join("quarantine"),
        cp_end: checkpoint::load(storage, dir)?.map(|c| c.log_offset),
        copies: quarantine::load_all(storage, &dir.join("quarantine"))?,
        dry_run,
    };
    let mut report = RepairReport {
        dry_run,
        ..RepairReport::default()
    };
    let mut files = Vec::new();
    for (base, path) in segment::list(storage, &dir.join("log"))? {
        let file = storage.open(&path, false)?;
        let len = file.len()?;
        // A file with nothing in it at all is a segment prepared ahead, or one whose
        // creation never finished: recovery removes it.
        if last_nonzero(&*file, len, 0)?.is_some() {
            files.push((base, file, len));
        }
    }
    for i in 0..files.len() {
        let (base, file, len) = &files[i];
        let next_base = files.get(i + 1).map(|f| f.0);
        ctx.segment(&mut report, *base, &**file, *len, next_base)?;
    }
    Ok(report)
}

struct Ctx<'a> {
    storage: &'a dyn Storage,
    cq_dir: PathBuf,
    qdir: PathBuf,
    cp_end: Option<u64>,
    copies: Vec<quarantine::Copy>,
    dry_run: bool,
}

/// One Quarantined (or closing SegmentEnd) record to write: at `at` in the file, `len` bytes,
/// for the message `who` (topic, queue, queue offset) when known.
struct Piece {
    at: u64,
    len: u64,
    who: Option<(String, u32, u64)>,
    seal: bool,
}

impl Ctx<'_> {
    fn segment(
        &self,
        report: &mut RepairReport,
        base: u64,
        file: &dyn StorageFile,
        len: u64,
        next_base: Option<u64>,
    ) -> Result<()> {
        let newest = next_base.is_none();
        let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
        file.read_at(&mut h, 0)?;
        let size = match segment::parse_header(&h, base) {
            Ok((_, size)) => size,
            Err(why) => {
                let size = next_base.map(|n| n - base).unwrap_or(len);
                let survey = damage::survey(file, base, size, SEGMENT_HEADER_BYTES - 1, size)?;
                let acked = if newest {
                    damage::acknowledged(base, self.cp_end, &survey)
                } else {
                    Some("it is not the newest segment".into())
                };
                let Some(acked) = acked else {
                    let data = last_nonzero(file, size, 0)?.map_or(0, |l| l + 1);
                    report.torn.push((file.path().to_path_buf(), 0, data));
                    return Ok(());
                };
                let reason = format!(
                    "segment header: {why}; {acked}, so the segment held acknowledged records ({} in it)",
                    survey.counts()
                );
                let fix = segment::header_bytes(base, size);
                self.quarantine(report, file, base, 0, &h, reason, Vec::new(), &|f| {
                    f.write_all_at(&fix, 0)
                })?;
                size
            }
        };
        let mut pos = SEGMENT_HEADER_BYTES;
        loop {
            let mut scan = Scanner::new(file, size, pos);
            let reason = loop {
                if let Err(reason) = scan.next()? {
                    break reason;
                }
                let view = match scan.current() {
                    Ok(v) => v,
                    Err(e) => break e.to_string(),
                };
                if view.header.log_offset != base + scan.pos {
                    break format!(
                        "record claims log offset {}, found at {}",
                        view.header.log_offset,
                        base + scan.pos
                    );
                }
                let end = view.header.kind == RecordKind::SegmentEnd;
                scan.advance();
                if end {
                    return Ok(());
                }
            };
            let d = scan.pos;
            let last = last_nonzero(file, size, d)?;
            if newest && last.is_none() {
                return Ok(()); // the end of the log
            }
            let to = last.map_or(size, |l| l + 1);
            let survey = damage::survey(file, base, size, d, to)?;
            let acked = if newest {
                damage::acknowledged(base + d, self.cp_end, &survey)
            } else {
                Some("it is in a full segment, all of which was durable".into())
            };
            let Some(acked) = acked else {
                report.torn.push((file.path().to_path_buf(), d, to - d));
                return Ok(());
            };
            // The stretch ends at the next valid record; without one, at the end of the data
            // (newest segment) or of the file (a full segment, whose SegmentEnd was lost).
            let mut e = match survey.next_valid {
                Some(p) => p,
                None if newest => to.max(d + HEADER_BYTES as u64).min(size),
                None => size,
            };
            let seal = !newest && survey.next_valid.is_none();
            let pointers = lost::pointers_into(self.storage, &self.cq_dir, base + d, base + e)?;
            if survey.next_valid.is_none() && newest {
                let reach = pointers
                    .iter()
                    .map(|p| p.entry.log_offset + u64::from(p.entry.size) - base)
                    .max()
                    .unwrap_or(0);
                e = e.max(reach.min(size));
            }
            let original = self.original(file, base, d, e)?;
            let lost = lost::lost_records(&original, base + d, &pointers);
            let pieces = layout(base, d, e, &pointers, seal);
            let reason = format!("{reason}; {acked}, so it was acknowledged");
            self.quarantine(report, file, base, d, &original, reason, lost, &|f| {
                write_pieces(f, base, &pieces)
            })?;
            if seal {
                return Ok(());
            }
            pos = e;
        }
    }

    /// The original bytes of `[d, e)` of a segment: from an intact quarantine copy if an
    /// earlier run made one, else from the file.
    fn original(&self, file: &dyn StorageFile, base: u64, d: u64, e: u64) -> Result<Vec<u8>> {
        if let Some(b) = self
            .copies
            .iter()
            .find_map(|c| c.covering(base + d, base + e))
        {
            return Ok(b.to_vec());
        }
        let mut buf = vec![0u8; (e - d) as usize];
        let n = file.read_at(&mut buf, d)?;
        buf.truncate(n);
        buf.resize((e - d) as usize, 0);
        Ok(buf)
    }

    /// Copy `original` (the bytes at `pos` of the segment) aside, unless an earlier run
    /// did, then apply `fix` and sync; record the range in the report.
    #[allow(clippy::too_many_arguments)]
    fn quarantine(
        &self,
        report: &mut RepairReport,
        file: &dyn StorageFile,
        base: u64,
        pos: u64,
        original: &[u8],
        reason: String,
        lost: Vec<LostRecord>,
        fix: &dyn Fn(&dyn StorageFile) -> Result<()>,
    ) -> Result<()> {
        let lo = base + pos;
        let hi = lo + original.len() as u64;
        let existing = self
            .copies
            .iter()
            .find(|c| c.covering(lo, hi).is_some())
            .map(|c| c.path.clone());
        let mut range = DamagedRange {
            path: file.path().to_path_buf(),
            file_pos: pos,
            log_offset: lo,
            len: original.len() as u64,
            reason,
            lost,
            quarantine: existing
                .clone()
                .unwrap_or_else(|| self.qdir.join(quarantine::file_name(base, pos))),
        };
        if !self.dry_run {
            if existing.is_none() {
                let text = RepairReport {
                    dry_run: false,
                    damaged: vec![range.clone()],
                    torn: Vec::new(),
                }
                .to_string();
                range.quarantine =
                    quarantine::store(self.storage, &self.qdir, base, pos, lo, original, &text)?;
            }
            fix(file)?;
            file.sync_data()?;
        }
        if self.dry_run {
            tracing::warn!(file = %range.path.display(), at = pos, bytes = range.len, lost = range.lost.len(), "would quarantine damaged bytes (dry run: nothing written)");
        } else {
            tracing::warn!(file = %range.path.display(), at = pos, bytes = range.len, lost = range.lost.len(), "quarantined damaged bytes");
        }
        report.damaged.push(range);
        Ok(())
    }
}

/// The records that replace the damaged stretch `[d, e)` of the segment at `base`: one per
/// message whose index entry lies wholly inside, and one for each stretch between them; a
/// single one for the whole stretch when the entries do not tile it (each record needs at
/// least a header's bytes).
fn layout(base: u64, d: u64, e: u64, pointers: &[Pointer], seal: bool) -> Vec<Piece> {
    let hb = HEADER_BYTES as u64;
    let whole = || {
        let mut v = Vec::new();
        split(&mut v, d, e - d, seal);
        v
    };
    let mut out = Vec::new();
    let mut cur = d;
    for p in pointers {
        let at = p.entry.log_offset - base;
        let len = u64::from(p.entry.size);
        if at < cur || at + len > e || len < hb + p.topic.len() as u64 {
            return whole();
        }
        if at > cur {
            if at - cur < hb {
                return whole();
            }
            split(&mut out, cur, at - cur, false);
        }
        out.push(Piece {
            at,
            len,
            who: Some((p.topic.clone(), p.queue, p.queue_offset)),
            seal: false,
        });
        cur = at + len;
    }
    if e > cur {
        if e - cur < hb {
            return whole();
        }
        split(&mut out, cur, e - cur, seal);
    } else if seal {
        return whole();
    }
    out
}

/// Anonymous pieces covering `len` bytes from `at`, each at most a record's largest size
/// and at least a header; the last one a SegmentEnd when `seal`.
fn split(out: &mut Vec<Piece>, mut at: u64, mut len: u64, seal: bool) {
    let hb = HEADER_BYTES as u64;
    let max = u64::from(RECORD_BYTES_MAX);
    while len > max {
        let take = if len - max >= hb { max } else { len - hb };
        out.push(Piece {
            at,
            len: take,
            who: None,
            seal: false,
        });
        at += take;
        len -= take;
    }
    out.push(Piece {
        at,
        len,
        who: None,
        seal,
    });
}

fn write_pieces(file: &dyn StorageFile, base: u64, pieces: &[Piece]) -> Result<()> {
    let mut buf = Vec::new();
    for p in pieces {
        buf.clear();
        let (topic, queue_id, queue_offset) = match &p.who {
            Some((t, q, o)) => (t.as_str(), *q, *o),
            None => ("", 0, 0),
        };
        let header = Header {
            kind: if p.seal {
                RecordKind::SegmentEnd
            } else {
                RecordKind::Quarantined
            },
            flags: 0,
            queue_id,
            log_offset: base + p.at,
            queue_offset,
            timestamp_ms: 0,
        };
        // `layout` means every piece to be at least a header plus its topic, and at most
        // RECORD_BYTES_MAX; a stretch too short to hold a record header (found by the
        // `recovery` fuzz target) cannot be replaced by a record, so it is refused.
        let Some(body_len) = p.len.checked_sub(HEADER_BYTES as u64 + topic.len() as u64) else {
            return Err(halfmq_types::Error::Invalid {
                what: "quarantine record",
                reason: format!(
                    "the damaged stretch at byte {} is {} bytes, shorter than a record header",
                    base + p.at,
                    p.len
                ),
            });
        };
        let body = vec![0u8; body_len as usize];
        record::encode_into(&mut buf, &header, topic, "", &[], &body).map_err(|reason| {
            halfmq_types::Error::Invalid {
                what: "quarantine record",
                reason,
            }
        })?;
        file.write_all_at(&buf, p.at)?;
    }
    Ok(())
}
