//! Recovery: make the directory consistent again after any kind of stop.
//!
//! 1. Segments: every segment but the newest must be complete (end in a SegmentEnd record)
//!    and contiguous with the next. Blank newest segments (creation never finished) are
//!    removed.
//! 2. Consume queues are trimmed to the lengths in the newest checkpoint (or to zero, with
//!    the log read from its start, when there is no usable checkpoint or an index is
//!    missing or short).
//! 3. The log is read from the checkpoint: each message is indexed again. In an older
//!    segment, a record that fails its checks is corruption: open fails, naming the file and
//!    offset. In the newest segment it is the torn tail of an unclean stop: it and everything
//!    after it is zeroed, provided the damage is no longer than an unsynced batch can be.
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
use crate::record::{self, DecodeError, RecordKind, RecordView};
use halfmq_types::error::{Error, Result};

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
fn torn_tail_bytes_max(config: &StoreConfig) -> u64 {
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
    let (mut segments, removed_bytes) = open_segments(storage, log_dir, config)?;
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
        ..RecoveryReport::default()
    };
    let first_record = segments
        .first()
        .map(|s| s.base + SEGMENT_HEADER_BYTES)
        .unwrap_or(0);
    let last_end = segments.last().map(|s| s.base + s.size).unwrap_or(0);

    let cp = checkpoint::load(storage, dir)?;
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
                        break;
                    }
                    return Err(corrupt(seg, scan.pos, reason));
                }
                Err(reason) => {
                    if newest {
                        break;
                    }
                    return Err(corrupt(
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
                RecordKind::Message => {
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
                    let expected = q.assigned.load(Ordering::Relaxed);
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
                RecordKind::Half | RecordKind::TxnEnd | RecordKind::Delayed => {}
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
fn open_segments(
    storage: &dyn Storage,
    log_dir: &Path,
    config: &StoreConfig,
) -> Result<(Vec<Segment>, u64)> {
    let mut out: Vec<Segment> = Vec::new();
    let mut blanks: Vec<(u64, std::path::PathBuf)> = Vec::new();
    for (base, path) in segment::list(storage, log_dir)? {
        match Segment::open(storage, &path, base, config.segment_bytes)? {
            HeaderCheck::Blank(_) => blanks.push((base, path)),
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
    // stop can leave: it holds nothing acknowledged, and the older segment is the newest.
    // Anything longer stays, and the torn-tail rule below reports it as corruption. Like any
    // torn tail, the removed bytes are reported (a bit flip in the first record looks the
    // same, and then they held acknowledged records).
    let mut removed_bytes = 0;
    if out.len() > 1 {
        if let Some(last) = out.last() {
            let extent = match last_nonzero(&*last.file, last.size, SEGMENT_HEADER_BYTES)? {
                Some(at) => at + 1 - SEGMENT_HEADER_BYTES,
                None => 0,
            };
            if !first_record_valid(last)? && extent <= torn_tail_bytes_max(config) {
                if extent > 0 {
                    tracing::warn!(
                        file = %last.path().display(),
                        bytes = extent,
                        "the newest segment has no valid first record: cutting it as a torn tail"
                    );
                }
                removed_bytes = extent;
                remove.push(last.path().to_path_buf());
                out.pop();
            }
        }
    }
    if !remove.is_empty() {
        for p in &remove {
            // Blank (prepared ahead by `crate::prepare`, or its creation never finished), or
            // its first record never became durable (reported above): it held nothing
            // acknowledged.
            tracing::info!(file = %p.display(), "removing a segment file that holds no record");
            storage.remove_file(p)?;
        }
        storage.sync_dir(log_dir)?;
    }
    Ok((out, removed_bytes))
}

/// Position of the last non-zero byte in [pos, size) of a file.
fn last_nonzero(file: &dyn StorageFile, size: u64, pos: u64) -> Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut last = None;
    let mut at = pos;
    while at < size {
        let n = ((size - at) as usize).min(CHUNK);
        let got = file.read_at(&mut buf[..n], at)?;
        if let Some(i) = buf[..got].iter().rposition(|&b| b != 0) {
            last = Some(at + i as u64);
        }
        if got < n {
            break;
        }
        at += n as u64;
    }
    Ok(last)
}

/// Whether the first record slot of a segment holds a valid record.
fn first_record_valid(seg: &Segment) -> Result<bool> {
    let mut scan = Scanner::new(&*seg.file, seg.size, SEGMENT_HEADER_BYTES);
    Ok(match scan.next()? {
        Ok(()) => scan
            .current()
            .is_ok_and(|v| v.header.log_offset == seg.base + SEGMENT_HEADER_BYTES),
        Err(_) => false,
    })
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

/// Write bytes `[from, to)` of a file again, unchanged, and sync them.
///
/// Recovery does this for everything it read after the checkpoint before it derives anything
/// from it (indexes, the checkpoint it writes, transactions, what consumers are given). After
/// a failed fsync the kernel may keep the written pages readable in the page cache while
/// marking them clean, so they never reach the disk ("fsyncgate"). A reopen without a reboot
/// reads them back as valid records; without this, the store would index them, hand them to
/// consumers and acknowledge later records after them, and the next power loss would take
/// them away: a hole of zeros before acknowledged records, or a lost segment header. Written
/// again, the pages are dirty again and this sync makes them durable, or fails and open fails.
/// The cost is one write and sync of what recovery read (at most about `checkpoint_bytes`
/// plus the tail), and only on an unclean open.
fn make_durable(file: &dyn StorageFile, from: u64, to: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    if from >= to {
        return Ok(());
    }
    let mut buf = vec![0u8; (to - from).min(CHUNK) as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        file.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

/// Zero everything after `pos` in the newest segment. Returns the bytes that were not zero.
/// Damage longer than an unclean stop can leave is corruption, not a torn tail.
fn cut_tail(file: &dyn StorageFile, size: u64, pos: u64, config: &StoreConfig) -> Result<u64> {
    const CHUNK: usize = 1 << 20;
    let Some(last) = last_nonzero(file, size, pos)? else {
        return Ok(0);
    };
    let damaged = last + 1 - pos;
    if damaged > torn_tail_bytes_max(config) {
        return Err(Error::Corrupt {
            path: file.path().to_path_buf(),
            offset: pos,
            reason: format!(
                "invalid record followed by {damaged} bytes of data; an unclean stop leaves at most {} \
                 (pending_bytes_max and record_bytes_max), so this is damage to acknowledged data, \
                 not a torn tail",
                torn_tail_bytes_max(config)
            ),
        });
    }
    let zeros = vec![0u8; CHUNK];
    let mut at = pos;
    while at <= last {
        let n = ((last + 1 - at) as usize).min(CHUNK);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()?;
    Ok(damaged)
}

/// Reads records from a segment through a buffer.
struct Scanner<'f> {
    file: &'f dyn StorageFile,
    size: u64,
    /// Position of the current record in the file.
    pos: u64,
    /// Length of the record last returned.
    len: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

const SCAN_BUF_BYTES: usize = 1 << 20;

impl<'f> Scanner<'f> {
    fn new(file: &'f dyn StorageFile, size: u64, pos: u64) -> Scanner<'f> {
        Scanner {
            file,
            size,
            pos,
            len: 0,
            buf: Vec::new(),
            buf_start: pos,
        }
    }

    fn advance(&mut self) {
        self.pos += self.len;
        self.len = 0;
    }

    /// Make bytes [pos, pos + want) available in the buffer (fewer at the end of the file).
    fn fill(&mut self, want: u64) -> Result<()> {
        let have_end = self.buf_start + self.buf.len() as u64;
        if self.pos >= self.buf_start && self.pos + want <= have_end {
            return Ok(());
        }
        let n = want
            .max(SCAN_BUF_BYTES as u64)
            .min(self.size.saturating_sub(self.pos)) as usize;
        self.buf.resize(n, 0);
        let got = self.file.read_at(&mut self.buf, self.pos)?;
        self.buf.truncate(got);
        self.buf_start = self.pos;
        Ok(())
    }

    /// Buffer the record at `pos` and learn its length; `Err(reason)` when there is no
    /// plausible record there (zeros, a bad length, the end of the file).
    fn next(&mut self) -> Result<Result<(), String>> {
        if self.pos + record::HEADER_BYTES as u64 > self.size {
            return Ok(Err("end of file".into()));
        }
        self.fill(record::HEADER_BYTES as u64)?;
        let at = (self.pos - self.buf_start) as usize;
        let total = match record::check_len(&self.buf[at..]) {
            Ok(t) => u64::from(t),
            Err(DecodeError::Empty) => return Ok(Err("no record (zeros)".into())),
            Err(e) => return Ok(Err(e.to_string())),
        };
        if self.pos + total > self.size {
            return Ok(Err(format!(
                "record of {total} bytes runs past the end of the segment"
            )));
        }
        self.fill(total)?;
        self.len = total;
        Ok(Ok(()))
    }

    /// Decode and verify the record buffered by `next`.
    fn current(&self) -> std::result::Result<RecordView<'_>, DecodeError> {
        let at = (self.pos - self.buf_start) as usize;
        let end = (at + self.len as usize).min(self.buf.len());
        record::decode(&self.buf[at..end]).map(|(view, _)| view)
    }
}
