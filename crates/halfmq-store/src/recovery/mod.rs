//! Recovery: make the directory consistent again after any kind of stop.
//!
//! 1. Segments: every segment but the newest must be complete (end in a SegmentEnd record)
//!    and contiguous with the next. Blank newest segments (creation never finished) are
//!    removed.
//! 2. The newest segment below the checkpoint is read again and every record checked
//!    (`verify_checkpointed`): it was durable, so a record that fails is `Error::Damaged`.
//!    Older segments are checked when they are read.
//!    Consume queues are trimmed to the lengths in the newest checkpoint (or to zero, with
//!    the log read from its start, when there is no usable checkpoint or an index is
//!    missing or short).
//! 3. The log is read from the checkpoint: each message is indexed again. In an older
//!    segment, a record that fails its checks is damage to acknowledged data: open fails
//!    with `Error::Damaged`, naming the file and offset. In the newest segment it is the torn
//!    tail of an unclean stop, unless the checkpoint or the durable mark of a later batch
//!    (`damage`) is above it: then it was acknowledged, and open fails the same way. A torn
//!    tail is zeroed, provided it is no longer than an unsynced batch can be.
//!    Everything read after the checkpoint is written again and synced before it is trusted
//!    (a failed fsync can leave readable pages that never reach the disk).
//! 4. Indexes are synced and a new checkpoint is written.
//!
//! Every step either changes nothing or converges, so running recovery twice, or crashing
//! during it, gives the same result.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::checkpoint::{self, Checkpoint};
use super::consume_queue::{self, queue_in, ConsumeQueue, Entry, QueueMap};
use super::io::{Storage, StorageFile};
use super::log_start;
use super::segment::{self, HeaderCheck, Segment, SEGMENT_HEADER_BYTES};
use crate::batch::{Dispatch, DispatchBuf};
use crate::config::StoreConfig;
use crate::record::{RecordKind, RecordView};
use halfmq_types::error::{Error, Result};

pub(crate) mod damage;
pub(crate) mod scan;

use scan::{cut_tail, first_record_valid, last_nonzero, make_durable, Scanner};

/// A summary of what recovery found and did on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the log.
    pub segments: usize,
    /// Log offset where recovery started reading (the checkpoint).
    pub scanned_from: u64,
    /// Log offset of the end of the log after recovery.
    pub log_end: u64,
    /// Records read during recovery.
    pub records_scanned: u64,
    /// Bytes of torn tail cut off (zeroed) at the end of the log.
    pub torn_bytes_cut: u64,
    /// Consume queues were rebuilt from the start of the log (missing or short index).
    pub full_rebuild: bool,
    /// Where the log starts (retention deleted everything below; 0 if it never ran).
    pub log_start: u64,
    /// Segment files below the log start that an interrupted retention pass left and
    /// recovery removed.
    pub orphans_removed: usize,
    /// Bytes of the newest segment below the checkpoint read again and checked (every
    /// record's CRC and place) before the store opened.
    pub verified_bytes: u64,
}

pub(crate) struct Recovered {
    pub segments: BTreeMap<u64, Arc<Segment>>,
    pub active: Arc<Segment>,
    pub pos: u64,
    pub queues: QueueMap,
    pub checkpoint_seq: u64,
    /// Sequence number of the newest log-start file (0: none).
    pub log_start_seq: u64,
    pub report: RecoveryReport,
}

/// Most bytes past the last valid record that an unclean stop can leave non-zero: one batch
/// being written plus what async flush may hold unsynced.
pub(crate) fn torn_tail_bytes_max(config: &StoreConfig) -> u64 {
    2 * (config.pending_bytes_max + u64::from(config.record_bytes_max))
}

pub(crate) fn recover(
    storage: &dyn Storage,
    log_dir: &Path,
    cq_dir: &Path,
    dir: &Path,
    config: &StoreConfig,
    on_record: &mut dyn FnMut(&RecordView<'_>),
    hooks: Option<&dyn crate::hooks::StoreHooks>,
) -> Result<Recovered> {
    storage.create_dir_all(log_dir)?;
    storage.create_dir_all(cq_dir)?;
    // Where retention cut the log. Segments below it are orphans of a delete that a crash
    // interrupted; the first segment kept must start exactly there.
    let ls = log_start::load(storage, dir)?;
    let log_base = ls.as_ref().map(|l| l.base).unwrap_or(0);
    let orphans = remove_orphans(storage, log_dir, log_base)?;
    let cp = checkpoint::load(storage, dir)?;
    // Everything below the checkpoint was durable when it was written: damage there is
    // damage to acknowledged data, never a torn tail.
    let cp_end = cp.as_ref().map(|c| c.log_offset);
    let (mut segments, removed_bytes) = open_segments(storage, log_dir, config, cp_end)?;
    // The newest segment below the checkpoint was last checked when it was written, if ever
    // (a clean open reads nothing of the log): read it again before anything is served.
    let verified_bytes = match (segments.last(), cp_end) {
        (Some(newest), Some(c)) => verify_checkpointed(newest, c)?,
        _ => 0,
    };
    if let Some(first) = segments.first() {
        if first.base > log_base && ls.is_some() {
            return Err(Error::Corrupt {
                path: first.path().to_path_buf(),
                offset: 0,
                reason: format!(
                    "the log starts at {log_base} (retention) but its first segment starts at {}; a segment file is missing",
                    first.base
                ),
            });
        }
    }
    // No log-start file although the log does not start at 0: it was lost. Queues rebuilt
    // from the log then start at the first message found for them (see below).
    let lenient = ls.is_none() && segments.first().is_some_and(|s| s.base > 0);
    if lenient {
        tracing::warn!(
            "the log does not start at 0 and no log-start file says why; queue starts are taken from the log"
        );
    }
    let starts: HashMap<(String, u32), u64> = ls
        .as_ref()
        .map(|l| {
            l.queues
                .iter()
                .map(|(t, q, f)| ((t.clone(), *q), *f))
                .collect()
        })
        .unwrap_or_default();
    let mut report = RecoveryReport {
        segments: segments.len(),
        // A removed newest segment is a torn tail too: whatever it held is cut.
        torn_bytes_cut: removed_bytes,
        log_start: log_base,
        orphans_removed: orphans,
        verified_bytes,
        ..RecoveryReport::default()
    };
    let first_record = segments
        .first()
        .map(|s| s.base + SEGMENT_HEADER_BYTES)
        .unwrap_or(0);
    let last_end = segments.last().map(|s| s.base + s.size).unwrap_or(0);

    let checkpoint_seq = cp.as_ref().map(|c| c.seq).unwrap_or(0);
    let cp = cp.filter(|c| {
        let ok = c.log_offset >= first_record && c.log_offset <= last_end;
        if !ok {
            tracing::warn!(
                offset = c.log_offset,
                "checkpoint is outside the log; ignoring it"
            );
        }
        ok
    });

    let (mut queues, full) = open_queues(storage, cq_dir, cp.as_ref(), &starts)?;
    let start = match (&cp, full) {
        (Some(c), false) => c.log_offset,
        _ => {
            if cp.is_some() {
                tracing::warn!(
                    "a consume-queue index is missing or short; rebuilding all from the log"
                );
                for m in queues.values_mut() {
                    for q in m.values_mut() {
                        let (fresh, _) =
                            ConsumeQueue::open(storage, cq_dir, q.topic(), q.queue_id(), 0, 0)?;
                        *q = Arc::new(fresh);
                    }
                }
            }
            // Queues whose first messages were deleted by retention resume where the
            // log-start file says, so no queue offset is ever handed out twice.
            for ((topic, qid), &first) in &starts {
                let q = queue_in(&mut queues, storage, cq_dir, topic, *qid)?;
                if q.is_empty() && first > 0 {
                    q.start_empty_at(first)?;
                }
            }
            report.full_rebuild = cp.is_some() || log_base > 0 || lenient;
            first_record
        }
    };
    report.scanned_from = start;

    if segments.is_empty() {
        let seg = Segment::create(storage, log_dir, log_base, config.segment_bytes)?;
        segments.push(seg);
    }
    let segments: Vec<Arc<Segment>> = segments.into_iter().map(Arc::new).collect();

    // Read the log from `start`.
    let mut dispatch = DispatchBuf::default();
    let mut active_idx = segments.len() - 1;
    let mut pos = SEGMENT_HEADER_BYTES;
    let first_idx = segments
        .iter()
        .rposition(|s| s.base <= start && start < s.base + s.size)
        .unwrap_or(0);
    let mut need_new_segment = false;
    // The last quarantine record of unknown content read, and per queue the log offset of
    // its last message read (see `RecordKind::Quarantined` below).
    let mut quarantined: Option<(u64, u32)> = None;
    let mut last_message: HashMap<(String, u32), u64> = HashMap::new();
    for (idx, seg) in segments.iter().enumerate().skip(first_idx) {
        let newest = idx + 1 == segments.len();
        let from = if idx == first_idx {
            start.max(seg.base + SEGMENT_HEADER_BYTES) - seg.base
        } else {
            SEGMENT_HEADER_BYTES
        };
        let mut scan = Scanner::new(&*seg.file, seg.size, from);
        loop {
            let step = match scan.next()? {
                Ok(()) => scan.current().map_err(|e| e.to_string()),
                Err(reason) => Err(reason),
            };
            let view = match step {
                Ok(view) if view.header.log_offset == seg.base + scan.pos => view,
                Ok(view) => {
                    let reason = format!(
                        "record claims log offset {}, found at {}",
                        view.header.log_offset,
                        seg.base + scan.pos
                    );
                    if newest {
                        check_torn(seg, scan.pos, cp_end, &reason)?;
                        break;
                    }
                    return Err(damaged(seg, scan.pos, reason));
                }
                Err(reason) => {
                    if newest {
                        check_torn(seg, scan.pos, cp_end, &reason)?;
                        break;
                    }
                    return Err(damaged(
                        seg,
                        scan.pos,
                        format!("{reason}, before the end of a full segment"),
                    ));
                }
            };
            report.records_scanned += 1;
            match view.header.kind {
                RecordKind::SegmentEnd => {
                    scan.advance();
                    if newest {
                        need_new_segment = true;
                    }
                    break;
                }
                RecordKind::Quarantined if view.topic.is_empty() => {
                    // Repair could not tell what the damaged bytes held: a message among
                    // them shows as a gap in its queue's offsets, which this explains.
                    quarantined = Some((view.header.log_offset, scan.len as u32));
                }
                RecordKind::Message | RecordKind::Quarantined => {
                    let q = queue_in(
                        &mut queues,
                        storage,
                        cq_dir,
                        view.topic,
                        view.header.queue_id,
                    )?;
                    if lenient && q.assigned.load(Ordering::Relaxed) == 0 {
                        q.start_empty_at(view.header.queue_offset)?;
                    }
                    let mut expected = q.assigned.load(Ordering::Relaxed);
                    let place = (view.topic.to_owned(), view.header.queue_id);
                    let previous = last_message.get(&place).copied().unwrap_or(0);
                    if let Some((at, size)) = quarantined.filter(|&(at, _)| at > previous) {
                        // Offsets [expected, this one) were messages lost in the quarantined
                        // bytes: they stay taken, and a read of them is `Error::Lost`.
                        while expected < view.header.queue_offset {
                            q.assigned.store(expected + 1, Ordering::Relaxed);
                            dispatch.push(&Dispatch {
                                queue: q.clone(),
                                queue_offset: expected,
                                entry: Entry {
                                    log_offset: at,
                                    size,
                                    key_hash: 0,
                                },
                            });
                            expected += 1;
                        }
                    }
                    last_message.insert(place, view.header.log_offset);
                    if view.header.queue_offset != expected {
                        return Err(corrupt(
                            seg,
                            scan.pos,
                            format!(
                                "message has queue offset {} but {}/{} expects {expected}",
                                view.header.queue_offset, view.topic, view.header.queue_id
                            ),
                        ));
                    }
                    q.assigned.store(expected + 1, Ordering::Relaxed);
                    dispatch.push(&Dispatch {
                        queue: q,
                        queue_offset: expected,
                        entry: Entry {
                            log_offset: view.header.log_offset,
                            size: scan.len as u32,
                            key_hash: consume_queue::key_hash(view.key),
                        },
                    });
                }
                RecordKind::Half | RecordKind::TxnEnd | RecordKind::Delayed | RecordKind::Mark => {}
            }
            on_record(&view);
            scan.advance();
            if report.records_scanned.is_multiple_of(4096) {
                dispatch.apply()?;
            }
        }
        // Trust nothing read here before it is durable (see `make_durable`). A scan from the
        // start of a segment covers its header too.
        let rewrite_from = if from <= SEGMENT_HEADER_BYTES {
            0
        } else {
            from
        };
        make_durable(&*seg.file, rewrite_from, scan.pos)?;
        if newest {
            active_idx = idx;
            pos = scan.pos;
            let clean_end = cp
                .as_ref()
                .is_some_and(|c| c.clean && c.log_offset == seg.base + scan.pos);
            if !need_new_segment && !clean_end {
                report.torn_bytes_cut +=
                    cut_tail(&*seg.file, seg.size, pos, config).map_err(|e| match e {
                        Error::Corrupt { offset, reason, .. } => corrupt(seg, offset, reason),
                        other => other,
                    })?;
            }
        }
    }
    dispatch.apply()?;

    let mut map: BTreeMap<u64, Arc<Segment>> =
        segments.iter().map(|s| (s.base, s.clone())).collect();
    let mut active = segments[active_idx].clone();
    if need_new_segment {
        let base = active.base + active.size;
        let seg = Arc::new(Segment::create(
            storage,
            log_dir,
            base,
            config.segment_bytes,
        )?);
        map.insert(base, seg.clone());
        active = seg;
        pos = SEGMENT_HEADER_BYTES;
    }
    report.segments = map.len();
    report.log_end = active.base + pos;

    // The re-derived indexes are durable; record that so the next open starts here.
    let mut lens = Vec::new();
    for m in queues.values() {
        for q in m.values() {
            q.sync_if_dirty()?;
            lens.push((q.topic().to_owned(), q.queue_id(), q.len()));
        }
    }
    if let Some(h) = hooks {
        h.before_checkpoint(report.log_end)?;
    }
    let seq = checkpoint_seq + 1;
    checkpoint::store(
        storage,
        dir,
        &Checkpoint {
            seq,
            log_offset: report.log_end,
            queues: lens,
            clean: false,
        },
    )?;
    if report.torn_bytes_cut > 0 {
        tracing::warn!(
            bytes = report.torn_bytes_cut,
            at = report.log_end,
            "cut the torn tail of the log (records that were never acknowledged)"
        );
    }
    Ok(Recovered {
        segments: map,
        active,
        pos,
        queues,
        checkpoint_seq: seq,
        log_start_seq: ls.map(|l| l.seq).unwrap_or(0),
        report,
    })
}

fn corrupt(seg: &Segment, pos: u64, reason: String) -> Error {
    Error::Corrupt {
        path: seg.path().to_path_buf(),
        offset: pos,
        reason,
    }
}

fn damaged(seg: &Segment, pos: u64, reason: String) -> Error {
    Error::Damaged {
        path: seg.path().to_path_buf(),
        offset: pos,
        reason: format!(
            "the record at log offset {} fails its checks ({reason})",
            seg.base + pos
        ),
    }
}

/// Check every record of the newest segment below the checkpoint at log offset `cp_end`
/// (nothing when the checkpoint is not in it): its CRC and that it is where it says it is.
/// Everything there was durable when the checkpoint was written, so a record that fails is
/// damage to acknowledged data: `Error::Damaged`, before anything is changed or served.
/// Returns the bytes checked. The part at and after the checkpoint is read by the scan.
///
/// Older segments are not read (that would be the whole log at every open): their records
/// are checked when they are read, and `halfmq repair` reads everything.
fn verify_checkpointed(seg: &Segment, cp_end: u64) -> Result<u64> {
    let first = seg.base + SEGMENT_HEADER_BYTES;
    if cp_end <= first || cp_end > seg.base + seg.size {
        return Ok(0);
    }
    let to = cp_end - seg.base;
    let mut scan = Scanner::new(&*seg.file, seg.size, SEGMENT_HEADER_BYTES);
    while scan.pos < to {
        let step = match scan.next()? {
            Ok(()) => match scan.current() {
                Ok(view) if view.header.log_offset == seg.base + scan.pos => {
                    Ok(view.header.kind == RecordKind::SegmentEnd)
                }
                Ok(view) => Err(format!(
                    "record claims log offset {}, found at {}",
                    view.header.log_offset,
                    seg.base + scan.pos
                )),
                Err(e) => Err(e.to_string()),
            },
            Err(reason) => Err(reason),
        };
        match step {
            Ok(end) => {
                scan.advance();
                if end {
                    break;
                }
            }
            Err(reason) => {
                return Err(damaged(
                    seg,
                    scan.pos,
                    format!(
                        "{reason}; the checkpoint says the log was durable up to {cp_end}, so it was acknowledged"
                    ),
                ))
            }
        }
    }
    if scan.pos > to {
        return Err(damaged(
            seg,
            to,
            format!("the checkpoint at {cp_end} falls inside a record"),
        ));
    }
    Ok(scan.pos - SEGMENT_HEADER_BYTES)
}

/// The record at `pos` of the newest segment fails its checks. It and what follows are a
/// torn tail, to be cut, unless the checkpoint or a mark after it says it was durable:
/// then it is damage to acknowledged data, and open stops.
fn check_torn(seg: &Segment, pos: u64, cp_end: Option<u64>, reason: &str) -> Result<()> {
    let Some(last) = last_nonzero(&*seg.file, seg.size, pos)? else {
        return Ok(());
    };
    let survey = damage::survey(&*seg.file, seg.base, seg.size, pos, last + 1)?;
    match damage::acknowledged(seg.base + pos, cp_end, &survey) {
        Some(why) => Err(damaged(
            seg,
            pos,
            format!(
                "{reason}; {why}, so it was acknowledged ({} follow)",
                survey.counts()
            ),
        )),
        None => Ok(()),
    }
}

/// Remove segment files entirely below `log_base`: retention persisted the new log start
/// and a crash stopped it before (or while) it deleted them. Returns how many were removed.
fn remove_orphans(storage: &dyn Storage, log_dir: &Path, log_base: u64) -> Result<usize> {
    let mut n = 0;
    for (base, path) in segment::list(storage, log_dir)? {
        if base < log_base {
            tracing::info!(file = %path.display(), "removing a segment below the log start (an interrupted retention delete)");
            storage.remove_file(&path)?;
            n += 1;
        }
    }
    if n > 0 {
        storage.sync_dir(log_dir)?;
    }
    Ok(n)
}

/// Open every segment, check that they are contiguous, and drop blank newest ones. Also
/// returns how many non-zero bytes (after the header) the dropped segments held.
///
/// `cp_end` is the checkpoint's log offset: a newest segment with a blank header or an
/// invalid first record is removed only when neither the checkpoint nor a mark in it says
/// that any of it was durable.
fn open_segments(
    storage: &dyn Storage,
    log_dir: &Path,
    config: &StoreConfig,
    cp_end: Option<u64>,
) -> Result<(Vec<Segment>, u64)> {
    let mut out: Vec<Segment> = Vec::new();
    let mut blanks: Vec<(u64, std::path::PathBuf)> = Vec::new();
    let mut removed_bytes = 0;
    for (base, path) in segment::list(storage, log_dir)? {
        match Segment::open(storage, &path, base, config.segment_bytes)? {
            HeaderCheck::Blank(file) => {
                removed_bytes += check_blank(&*file, base, config, cp_end)?;
                blanks.push((base, path));
            }
            HeaderCheck::Valid(seg) => {
                if let Some((b, p)) = blanks.first() {
                    return Err(Error::Corrupt {
                        path: p.clone(),
                        offset: 0,
                        reason: format!("blank segment {b} is followed by segment {base}"),
                    });
                }
                if let Some(prev) = out.last() {
                    if prev.base + prev.size != base {
                        return Err(Error::Corrupt {
                            path: path.clone(),
                            offset: 0,
                            reason: format!(
                                "segment does not follow the previous one (it ends at {}); a segment file is missing",
                                prev.base + prev.size
                            ),
                        });
                    }
                }
                out.push(seg);
            }
        }
    }
    let mut remove: Vec<std::path::PathBuf> = blanks.into_iter().map(|(_, p)| p).collect();
    // A roll creates the next segment (header included) before the old one's SegmentEnd is
    // durable, and the flusher syncs the old segment before it writes anything to the new
    // one. So power loss can leave a newest segment whose records never became durable.
    // Such a segment has an invalid first record and no more non-zero bytes than an unclean
    // stop can leave, and neither the checkpoint nor a mark in it reaches into it: it holds
    // nothing acknowledged, and the older segment is the newest. Anything else stays, and the
    // scan reports it (`check_torn`).
    if out.len() > 1 {
        if let Some(last) = out.last() {
            let extent = match last_nonzero(&*last.file, last.size, SEGMENT_HEADER_BYTES)? {
                Some(at) => at + 1 - SEGMENT_HEADER_BYTES,
                None => 0,
            };
            if !first_record_valid(last)? && extent <= torn_tail_bytes_max(config) {
                let survey = damage::survey(
                    &*last.file,
                    last.base,
                    last.size,
                    SEGMENT_HEADER_BYTES,
                    SEGMENT_HEADER_BYTES + extent,
                )?;
                let first = last.base + SEGMENT_HEADER_BYTES;
                if damage::acknowledged(first, cp_end, &survey).is_none() {
                    if extent > 0 {
                        tracing::warn!(
                            file = %last.path().display(),
                            bytes = extent,
                            "the newest segment has no valid first record and nothing in it was durable: cutting it as a torn tail"
                        );
                    }
                    removed_bytes += extent;
                    remove.push(last.path().to_path_buf());
                    out.pop();
                }
            }
        }
    }
    if let Some(last) = out.last_mut() {
        // Records with marks are appended to it from now on.
        last.upgrade()?;
    }
    if !remove.is_empty() {
        for p in &remove {
            // Blank (prepared ahead by `crate::prepare`, or its creation never finished), or
            // its first record never became durable (reported above): it held nothing
            // acknowledged.
            tracing::info!(file = %p.display(), "removing a segment file that holds no acknowledged record");
            storage.remove_file(p)?;
        }
        storage.sync_dir(log_dir)?;
    }
    Ok((out, removed_bytes))
}

/// A segment file whose header is blank. All zeros, it is a segment prepared ahead or whose
/// creation never finished. With data after the header, it may only be removed when the
/// data is a torn tail: not longer than an unclean stop leaves, and neither the checkpoint
/// nor a mark in it says any of it was durable (the header is synced with the segment's
/// first records, so durable records mean the header was lost to damage). Returns the
/// non-zero bytes the file held.
fn check_blank(
    file: &dyn StorageFile,
    base: u64,
    config: &StoreConfig,
    cp_end: Option<u64>,
) -> Result<u64> {
    let size = file.len()?;
    let Some(last) = last_nonzero(file, size, SEGMENT_HEADER_BYTES)? else {
        return Ok(0);
    };
    let extent = last + 1 - SEGMENT_HEADER_BYTES;
    let survey = damage::survey(file, base, size, SEGMENT_HEADER_BYTES - 1, last + 1)?;
    let damaged = |reason: String| Error::Damaged {
        path: file.path().to_path_buf(),
        offset: 0,
        reason,
    };
    if let Some(why) = damage::acknowledged(base, cp_end, &survey) {
        return Err(damaged(format!(
            "the segment header is blank but the file holds {extent} bytes of data ({}); {why}, so they were acknowledged",
            survey.counts()
        )));
    }
    if extent > torn_tail_bytes_max(config) {
        return Err(damaged(format!(
            "the segment header is blank but the file holds {extent} bytes of data, more than an unclean stop leaves ({})",
            torn_tail_bytes_max(config)
        )));
    }
    tracing::warn!(
        file = %file.path().display(),
        bytes = extent,
        "a newest segment with a blank header holds nothing that was durable: cutting it as a torn tail"
    );
    Ok(extent)
}

/// Open every index under `cq_dir`, trimmed to its checkpointed length. Returns whether an
/// index was missing or short, so the log must be read from its start.
fn open_queues(
    storage: &dyn Storage,
    cq_dir: &Path,
    cp: Option<&Checkpoint>,
    starts: &HashMap<(String, u32), u64>,
) -> Result<(QueueMap, bool)> {
    let mut want: HashMap<(String, u32), u64> = HashMap::new();
    if let Some(c) = cp {
        for (t, q, n) in &c.queues {
            want.insert((t.clone(), *q), *n);
        }
    }
    let mut queues: QueueMap = HashMap::new();
    let mut full = false;
    for topic in storage.list_dir(cq_dir)? {
        if consume_queue::validate_topic_name(&topic).is_err() {
            tracing::warn!(dir = %cq_dir.join(&topic).display(), "ignoring unknown entry in the index directory");
            continue;
        }
        for name in storage.list_dir(&cq_dir.join(&topic))? {
            let Some(qid) = consume_queue::parse_file_name(&name) else {
                continue;
            };
            let len = want.remove(&(topic.clone(), qid)).unwrap_or(0);
            let start = starts.get(&(topic.clone(), qid)).copied().unwrap_or(0);
            let (cq, have) = ConsumeQueue::open(storage, cq_dir, &topic, qid, len, start)?;
            if have < len {
                full = true;
            }
            queues
                .entry(topic.clone())
                .or_default()
                .insert(qid, Arc::new(cq));
        }
    }
    if want.values().any(|&n| n > 0) {
        full = true;
    }
    Ok((queues, full))
}
