//! The raft log of one node, durable ([`LogStore`], openraft's `RaftLogStorage`).
//!
//! ```text
//! <dir>/log/<first index:020>.seg   entries, one frame (crate::frame) each, in index order
//! <dir>/vote                        the vote, one frame, replaced whole (frame::write_atomic)
//! <dir>/vote.copy                   the same, written just before it (write_vote, read_vote)
//! <dir>/purged                      the last purged log id, replaced whole
//! ```
//!
//! - **Append** writes the entries' frames into the active segment at once (so a reader sees
//!   them when `append` returns, as openraft requires) and hands the segment to the flusher
//!   thread, which fsyncs (`fdatasync`) every segment handed to it since its last round once
//!   and then tells openraft each append is durable: group commit, as in the store.
//!   A segment grows to its limit, then the next one is created; the full one is fsynced
//!   first and the directory after the new file, so an older segment is always whole.
//! - **Truncate** (a follower's uncommitted entries that conflict with the leader) removes
//!   the later segment files and syncs the directory, then cuts the segment holding the
//!   first removed entry and fsyncs it. A crash in between leaves the cut entries in place,
//!   as if the truncate had not started, and the leader truncates them again.
//! - **Purge** (entries a snapshot covers) records the purged log id first, then deletes
//!   the segments wholly below it.
//! - **Recent entries** stay in memory as well, decoded (up to [`RECENT_BYTES_MAX`] of their
//!   frames): openraft reads each entry back once to apply it and once per follower to send
//!   it, soon after it was appended, and a [`crate::Batch`]'s commands are shared, so those
//!   reads clone a pointer instead of reading, checking and decoding the frame again. Older
//!   entries (a follower far behind, a restart) are read from their segment.
//! - **Open** reads every segment: a frame cut short or failing its CRC at the end of the
//!   newest segment, with no whole frame after it, is a torn append that was never
//!   acknowledged, and is cut off; anywhere else it is damage, and opening fails with
//!   [`Error::Damaged`] naming the file and byte (`crate::repair` then repairs the node
//!   from its peers). A segment holds consecutive indexes; entries read back are checked
//!   against their CRC again.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use halfmq_types::error::{Error, Result};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, ErrorSubject, ErrorVerb, LogState, RaftLogId, RaftLogReader, StorageIOError, Vote,
};
use parking_lot::Mutex;

use crate::frame::{self, Scan};
use crate::{Entry, LogId, NodeId, StorageError, TypeConfig};

/// Default size a segment grows to before the next one starts.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// Most bytes (of their frames) of the newest entries kept decoded in memory.
pub const RECENT_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Most bytes (of their frames) of the entries openraft is given to send to a follower in
/// one append (at least one entry, whatever its size): see [`LogStore::limited_entries`].
/// A follower must write, fsync and answer an append within one heartbeat (50 ms). 1 MiB
/// measured no faster than 256 KiB (`scripts/cluster-throughput`, 2026-12-07).
pub const APPEND_BYTES_MAX: u64 = 256 << 10;

/// The raft log of one node. Clones share it (the log reader openraft asks for is a clone).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    segment_bytes: u64,
    /// [`RECENT_BYTES_MAX`] (smaller in tests).
    recent_bytes_max: u64,
    inner: Mutex<Inner>,
    /// To the flusher thread; dropped with the last clone, which ends the thread.
    flush_tx: Mutex<mpsc::Sender<FlushRequest>>,
}

#[derive(Default)]
struct Inner {
    /// Segments by the index of their first entry.
    segments: BTreeMap<u64, Segment>,
    /// Where each entry not purged is.
    index: BTreeMap<u64, Loc>,
    last_purged: Option<LogId>,
    vote: Option<Vote<NodeId>>,
    /// The newest entries, decoded, with their frame's length (see the module docs).
    recent: BTreeMap<u64, (Entry, u64)>,
    /// The frame bytes of `recent`.
    recent_bytes: u64,
    /// The buffer the last append was encoded into, empty, kept for the next one.
    scratch: Vec<u8>,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    /// The index the next entry written into it must have: a segment holds consecutive
    /// indexes (an append after a gap, the entries after a snapshot installed over a log
    /// that held entries, starts a new segment).
    next: u64,
}

#[derive(Clone, Copy)]
struct Loc {
    segment: u64,
    pos: u64,
    len: u64,
    log_id: LogId,
}

struct FlushRequest {
    file: Arc<File>,
    done: LogFlushed<TypeConfig>,
}

fn storage(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: &Error) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(e)).into()
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |e| Error::io(path, op, e)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

impl LogStore {
    /// Open (or create) the log in `dir`, with segments of about `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<LogStore> {
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir).map_err(io_err(&log_dir, "create directory"))?;
        let mut inner = Inner {
            vote: read_vote(dir)?,
            last_purged: frame::read_file(&dir.join("purged"), "raft purged log id")?,
            ..Inner::default()
        };
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(&log_dir).map_err(io_err(&log_dir, "list"))? {
            let e = e.map_err(io_err(&log_dir, "list"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let purged_index = inner.last_purged.map(|l| l.index);
        for (i, first) in firsts.iter().enumerate() {
            let newest = i + 1 == firsts.len();
            load_segment(&mut inner, &log_dir, *first, newest, purged_index)?;
        }
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("halfmq-raft-log-flush".to_owned())
            .spawn(move || flusher(rx))
            .map_err(io_err(&log_dir, "spawn the raft log flusher"))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                segment_bytes: segment_bytes.max(1),
                recent_bytes_max: RECENT_BYTES_MAX,
                inner: Mutex::new(inner),
                flush_tx: Mutex::new(tx),
            }),
        })
    }

    /// The log id of the newest entry, or the last purged one when there is no entry.
    pub fn last_log_id(&self) -> Option<LogId> {
        let inner = self.shared.inner.lock();
        inner.last_log_id()
    }

    /// Entries in `range` of indexes: the recent ones from memory, older ones read back
    /// from their segments.
    pub fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>> {
        enum Found {
            Kept(Entry),
            Stored(Loc, Arc<File>),
        }
        let found: Vec<Found> = {
            let inner = self.shared.inner.lock();
            let r = (range.start_bound().cloned(), range.end_bound().cloned());
            inner
                .index
                .range(r)
                .filter_map(|(i, l)| match inner.recent.get(i) {
                    Some((e, _)) if e.log_id == l.log_id => Some(Found::Kept(e.clone())),
                    _ => {
                        let seg = inner.segments.get(&l.segment)?;
                        Some(Found::Stored(*l, seg.file.clone()))
                    }
                })
                .collect()
        };
        let mut out = Vec::with_capacity(found.len());
        for f in found {
            let (l, file) = match f {
                Found::Kept(e) => {
                    out.push(e);
                    continue;
                }
                Found::Stored(l, file) => (l, file),
            };
            // A frame is at most 8 + 16 MiB (frame::BODY_BYTES_MAX): the cast is lossless.
            let mut buf = vec![0u8; l.len as usize];
            let path = self.shared.dir.join("log").join(segment_name(l.segment));
            file.read_exact_at(&mut buf, l.pos)
                .map_err(io_err(&path, "read"))?;
            // Checked again: bytes damaged since the log was opened are never served (to
            // the state machine, or to a follower).
            match frame::scan(&buf) {
                Scan::Frame { len } if len == buf.len() => {}
                other => return Err(damaged(&path, l.pos as usize, &format!("{other:?}"))),
            }
            out.push(frame::decode(&buf, "raft entry")?);
        }
        Ok(out)
    }

    /// The entries from `start` (inclusive) to `end` (exclusive) whose frames fit in
    /// `bytes_max` together, at least one: what openraft sends a follower in one append
    /// (`RaftLogReader::limited_get_log_entries`). Without the limit openraft asks for every
    /// entry the follower lacks and the network refuses an append too large to be written
    /// and fsynced within a heartbeat, after it was read and encoded, which costs a leader
    /// under load an encoding for nothing at every step.
    pub fn limited_entries(&self, start: u64, end: u64, bytes_max: u64) -> Result<Vec<Entry>> {
        let last = {
            let inner = self.shared.inner.lock();
            let mut bytes = 0;
            let mut last = None;
            for (i, l) in inner.index.range(start..end.max(start)) {
                if last.is_some() && bytes + l.len > bytes_max {
                    break;
                }
                bytes += l.len;
                last = Some(*i);
            }
            last
        };
        match last {
            Some(last) => self.entries(start..=last),
            None => Ok(Vec::new()),
        }
    }

    fn append_now(&self, entries: Vec<Entry>) -> Result<Arc<File>> {
        let mut inner = self.shared.inner.lock();
        let log_dir = self.shared.dir.join("log");
        // The frames are encoded straight into the buffer written, kept from one append to
        // the next (up to `frame::BUF_BYTES_KEEP`): a fresh buffer grown to an append's size
        // was new memory every time, zeroed by the kernel as it was first touched.
        let mut pending: Vec<u8> = std::mem::take(&mut inner.scratch);
        pending.clear();
        let mut pending_locs: Vec<Loc> = Vec::new();
        let mut written: Vec<(Entry, u64)> = Vec::with_capacity(entries.len());
        for entry in entries {
            let start = pending.len();
            let len = frame::encode_into(&entry, &mut pending, "raft entry")? as u64;
            let index = entry.get_log_id().index;
            let active = inner.segments.values().next_back().map(|s| {
                // The index after the frames gathered, or after the segment's own.
                let next = pending_locs.last().map_or(s.next, |l| l.log_id.index + 1);
                (s.len, next)
            });
            let needs_new = match active {
                None => true,
                Some((seg_len, next)) => {
                    let written = seg_len + start as u64;
                    written > 0 && (written + len > self.shared.segment_bytes || next != index)
                }
            };
            if needs_new {
                // This entry's frame starts the new segment: the frames before it go first.
                let this = pending[start..].to_vec();
                pending.truncate(start);
                inner.write_pending(&mut pending, &mut pending_locs)?;
                pending.extend_from_slice(&this);
                if let Some(seg) = inner.segments.values().next_back() {
                    seg.file
                        .sync_data()
                        .map_err(io_err(&seg.path, "fdatasync"))?;
                }
                let path = log_dir.join(segment_name(index));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(io_err(&path, "create"))?;
                frame::sync_dir(&log_dir)?;
                inner.segments.insert(
                    index,
                    Segment {
                        file: Arc::new(file),
                        path,
                        len: 0,
                        next: index,
                    },
                );
            }
            let (first, seg_len) = match inner.segments.iter().next_back() {
                Some((f, s)) => (*f, s.len),
                None => unreachable_segment()?,
            };
            pending_locs.push(Loc {
                segment: first,
                pos: seg_len + (pending.len() as u64 - len),
                len,
                log_id: *entry.get_log_id(),
            });
            written.push((entry, len));
        }
        inner.write_pending(&mut pending, &mut pending_locs)?;
        if pending.capacity() <= frame::BUF_BYTES_KEEP {
            inner.scratch = pending;
        }
        for (entry, len) in written {
            inner.keep_recent(entry, len, self.shared.recent_bytes_max);
        }
        match inner.segments.values().next_back() {
            Some(s) => Ok(s.file.clone()),
            None => unreachable_segment(),
        }
    }

    fn truncate_now(&self, log_id: LogId) -> Result<()> {
        let mut inner = self.shared.inner.lock();
        let Some(at) = inner.index.get(&log_id.index).copied() else {
            return Ok(());
        };
        let log_dir = self.shared.dir.join("log");
        let later: Vec<u64> = inner
            .segments
            .range((Bound::Excluded(at.segment), Bound::Unbounded))
            .map(|(f, _)| *f)
            .collect();
        for first in &later {
            if let Some(seg) = inner.segments.remove(first) {
                std::fs::remove_file(&seg.path).map_err(io_err(&seg.path, "remove"))?;
            }
        }
        if !later.is_empty() {
            frame::sync_dir(&log_dir)?;
        }
        if let Some(seg) = inner.segments.get_mut(&at.segment) {
            seg.file
                .set_len(at.pos)
                .map_err(io_err(&seg.path, "truncate"))?;
            seg.file.sync_all().map_err(io_err(&seg.path, "fsync"))?;
            seg.len = at.pos;
            seg.next = log_id.index;
        }
        inner.index.split_off(&log_id.index);
        let cut = inner.recent.split_off(&log_id.index);
        inner.recent_bytes -= cut.values().map(|(_, len)| len).sum::<u64>();
        Ok(())
    }

    fn purge_now(&self, log_id: LogId) -> Result<()> {
        frame::write_atomic(&self.shared.dir, "purged", &log_id, "raft purged log id")?;
        let mut inner = self.shared.inner.lock();
        inner.last_purged = Some(log_id);
        inner.index = inner.index.split_off(&(log_id.index + 1));
        inner.recent = inner.recent.split_off(&(log_id.index + 1));
        inner.recent_bytes = inner.recent.values().map(|(_, len)| len).sum();
        // A segment can go when the next one starts at or below the first entry kept.
        let firsts: Vec<u64> = inner.segments.keys().copied().collect();
        let mut removed = false;
        for pair in firsts.windows(2) {
            if pair[1] <= log_id.index + 1 {
                if let Some(seg) = inner.segments.remove(&pair[0]) {
                    std::fs::remove_file(&seg.path).map_err(io_err(&seg.path, "remove"))?;
                    removed = true;
                }
            }
        }
        if removed {
            frame::sync_dir(&self.shared.dir.join("log"))?;
        }
        Ok(())
    }
}

/// Write the vote in `dir` whole, twice: `vote.copy` first, then `vote` (each replaced
/// whole, [`frame::write_atomic`]). A crash between them leaves the copy newer, never older,
/// than the vote last acknowledged to openraft; damage to one leaves the other.
pub fn write_vote(dir: &Path, vote: &Vote<NodeId>) -> Result<()> {
    frame::write_atomic(dir, "vote.copy", vote, "raft vote")?;
    frame::write_atomic(dir, "vote", vote, "raft vote")
}

/// The vote in `dir` ([`write_vote`]): the greater of its two copies. A damaged copy is
/// renamed `<name>.damaged` (kept for inspection) when the other is whole; if neither is,
/// the vote is lost and this is the error ([`Error::Corrupt`]): a node that does not know
/// what it voted must not vote again as if it did (ARCHITECTURE.md, "Repair from peers").
/// A log written before the copy existed has only `vote`.
pub fn read_vote(dir: &Path) -> Result<Option<Vote<NodeId>>> {
    let read = |name: &str| frame::read_file::<Vote<NodeId>>(&dir.join(name), "raft vote");
    match (read("vote"), read("vote.copy")) {
        (Ok(a), Ok(b)) => Ok(if b > a { b } else { a }),
        (Ok(Some(v)), Err(e)) | (Err(e), Ok(Some(v))) => {
            let name = if read("vote").is_err() {
                "vote"
            } else {
                "vote.copy"
            };
            tracing::warn!(error = %e, "raft vote: one copy is damaged, the other is used");
            let (from, to) = (dir.join(name), dir.join(format!("{name}.damaged")));
            std::fs::rename(&from, &to).map_err(io_err(&from, "rename"))?;
            write_vote(dir, &v)?;
            Ok(Some(v))
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

fn unreachable_segment<T>() -> Result<T> {
    Err(Error::Invalid {
        what: "raft log",
        reason: "no active segment after creating one".to_owned(),
    })
}

impl Inner {
    fn last_log_id(&self) -> Option<LogId> {
        self.index
            .values()
            .next_back()
            .map(|l| l.log_id)
            .or(self.last_purged)
    }

    /// Keep `entry` (written, its frame `len` bytes) in memory, and forget the oldest kept
    /// ones beyond [`RECENT_BYTES_MAX`].
    fn keep_recent(&mut self, entry: Entry, len: u64, max: u64) {
        if let Some((_, old)) = self.recent.insert(entry.log_id.index, (entry, len)) {
            self.recent_bytes -= old;
        }
        self.recent_bytes += len;
        while self.recent_bytes > max {
            match self.recent.pop_first() {
                Some((_, (_, len))) => self.recent_bytes -= len,
                None => break,
            }
        }
    }

    /// Write the frames gathered for the active segment, and index them.
    fn write_pending(&mut self, pending: &mut Vec<u8>, locs: &mut Vec<Loc>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let Some(seg) = self.segments.values_mut().next_back() else {
            return unreachable_segment();
        };
        seg.file
            .write_all_at(pending, seg.len)
            .map_err(io_err(&seg.path, "write"))?;
        seg.len += pending.len() as u64;
        if let Some(l) = locs.last() {
            seg.next = l.log_id.index + 1;
        }
        for l in locs.drain(..) {
            self.index.insert(l.log_id.index, l);
        }
        pending.clear();
        Ok(())
    }
}

/// Read one segment into the index on open.
fn load_segment(
    inner: &mut Inner,
    log_dir: &Path,
    first: u64,
    newest: bool,
    purged_index: Option<u64>,
) -> Result<()> {
    let path = log_dir.join(segment_name(first));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "open"))?;
    let bytes = std::fs::read(&path).map_err(io_err(&path, "read"))?;
    let mut pos = 0usize;
    let mut expect = first;
    loop {
        match frame::scan(&bytes[pos..]) {
            Scan::Frame { len } => {
                let entry: Entry = frame::decode(&bytes[pos..pos + len], "raft entry")?;
                let log_id = *entry.get_log_id();
                if log_id.index != expect {
                    return Err(damaged(&path, pos, "entry index out of sequence"));
                }
                if purged_index.is_none_or(|p| log_id.index > p) {
                    inner.index.insert(
                        log_id.index,
                        Loc {
                            segment: first,
                            pos: pos as u64,
                            len: len as u64,
                            log_id,
                        },
                    );
                }
                expect += 1;
                pos += len;
            }
            Scan::End if bytes[pos..].iter().all(|b| *b == 0) => break,
            other if newest && !whole_frame_follows(&bytes[pos..]) => {
                // A torn append: never acknowledged (the flusher syncs before it tells).
                tracing::warn!(path = %path.display(), pos, ?other, "raft log: torn tail cut");
                file.set_len(pos as u64)
                    .map_err(io_err(&path, "truncate"))?;
                file.sync_all().map_err(io_err(&path, "fsync"))?;
                break;
            }
            other => return Err(damaged(&path, pos, &format!("{other:?}"))),
        }
    }
    inner.segments.insert(
        first,
        Segment {
            file: Arc::new(file),
            path,
            len: pos as u64,
            next: expect,
        },
    );
    Ok(())
}

/// Whether the bad frame at the start of `rest` is followed by a whole frame, which a torn
/// append cannot be: the flusher syncs before it tells openraft, so only the last write can
/// be torn, and a bad frame with a good one after it is damage to bytes that were synced
/// (and may have been acknowledged). It is reported, never cut. A bad frame whose own
/// length field is damaged cannot be told from a torn tail this way (ARCHITECTURE.md,
/// "Repair from peers", says what that leaves).
fn whole_frame_follows(rest: &[u8]) -> bool {
    if rest.len() < frame::HEADER_BYTES {
        return false;
    }
    let body = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let next = frame::HEADER_BYTES.saturating_add(body);
    body <= frame::BODY_BYTES_MAX
        && next < rest.len()
        && matches!(frame::scan(&rest[next..]), Scan::Frame { .. })
}

fn damaged(path: &Path, pos: usize, reason: &str) -> Error {
    Error::Damaged {
        path: path.to_path_buf(),
        offset: pos as u64,
        reason: format!("raft log: {reason}"),
    }
}

/// The flusher thread: one fdatasync per file per round for every append handed over since
/// the last round, then each append is told it is durable, in the order they came.
fn flusher(rx: mpsc::Receiver<FlushRequest>) {
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while let Ok(more) = rx.try_recv() {
            round.push(more);
        }
        let mut synced: Vec<(*const File, std::result::Result<(), String>)> = Vec::new();
        for req in &round {
            let key = Arc::as_ptr(&req.file);
            if !synced.iter().any(|(k, _)| *k == key) {
                synced.push((key, req.file.sync_data().map_err(|e| e.to_string())));
            }
        }
        for req in round {
            let key = Arc::as_ptr(&req.file);
            let result = synced
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, r)| r.clone())
                .unwrap_or(Ok(()));
            req.done
                .log_io_completed(result.map_err(std::io::Error::other));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> std::result::Result<Vec<Entry>, StorageError> {
        self.entries(range)
            .map_err(|e| storage(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> std::result::Result<Vec<Entry>, StorageError> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.limited_entries(start, end, APPEND_BYTES_MAX)
            .map_err(|e| storage(ErrorSubject::Logs, ErrorVerb::Read, &e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> std::result::Result<LogState<TypeConfig>, StorageError> {
        let inner = self.shared.inner.lock();
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: inner.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> std::result::Result<(), StorageError> {
        write_vote(&self.shared.dir, vote)
            .map_err(|e| storage(ErrorSubject::Vote, ErrorVerb::Write, &e))?;
        self.shared.inner.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> std::result::Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.shared.inner.lock().vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> std::result::Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let file = self
            .append_now(entries.into_iter().collect())
            .map_err(|e| storage(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        let sent = self.shared.flush_tx.lock().send(FlushRequest {
            file,
            done: callback,
        });
        if let Err(mpsc::SendError(req)) = sent {
            req.done.log_io_completed(Err(std::io::Error::other(
                "the raft log flusher has stopped",
            )));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> std::result::Result<(), StorageError> {
        self.truncate_now(log_id)
            .map_err(|e| storage(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }

    async fn purge(&mut self, log_id: LogId) -> std::result::Result<(), StorageError> {
        self.purge_now(log_id)
            .map_err(|e| storage(ErrorSubject::Logs, ErrorVerb::Delete, &e))
    }
}

#[cfg(test)]
mod tests;
