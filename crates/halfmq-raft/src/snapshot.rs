//! Snapshots of the state machine: the journal of every applied batch ([`Journal`]).
//!
//! ```text
//! <dir>/snapshot/journal    frames (crate::frame) of (LogId, Batch), in log order
//! <dir>/snapshot/meta       the snapshot's meta and the journal's length, replaced whole
//! <dir>/snapshot/incoming   a snapshot being received from the leader
//! ```
//!
//! A snapshot is the journal's first `len` bytes, `len` and the snapshot's last log id and
//! membership being in `meta`. Every batch is appended to the journal as it is applied
//! ([`Journal::append`], written, not synced: nothing in memory waits for the next
//! snapshot); building one fsyncs the journal, then replaces `meta` with the length
//! written up to its last log id: a crash before `meta` is replaced leaves the old
//! snapshot, and opening ignores what is past its length and appends over it (the batches
//! after it are applied again from the raft log, which keeps every entry a snapshot does
//! not cover).
//! Installing one received from the leader checks every frame, fsyncs it, renames it over
//! the journal and replaces `meta`.
//!
//! Why a journal of commands and not a copy of the broker's files: the broker is rebuilt
//! from it by applying the same batches in the same order on a fresh data directory, which
//! gives the same bytes, offsets and transaction ids as on the leader, with no broker
//! change. Its cost is a second copy of the data (the broker's log holds it too) and a
//! replay on every start; ARCHITECTURE.md says what replaces it (the commit log itself as
//! the raft log, and its segments as the snapshot).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use halfmq_types::error::{Error, Result};
use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use crate::command::Batch;
use crate::frame::{self, Scan};
use crate::{LogId, NodeId};

/// The meta of a snapshot, as openraft has it.
pub type Meta = SnapshotMeta<NodeId, BasicNode>;

/// A snapshot's data: the first `len` bytes of a journal file. Clones read the same file;
/// the journal only grows past `len` or is replaced by rename, so the bytes stay put.
#[derive(Clone, Debug)]
pub struct JournalSnapshot {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
}

impl JournalSnapshot {
    /// Bytes of the snapshot.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a snapshot of nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Up to `max` bytes from `pos` (fewer at the end).
    pub fn read_chunk(&self, pos: u64, max: usize) -> Result<Vec<u8>> {
        let n = (self.len.saturating_sub(pos)).min(max as u64) as usize;
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, pos)
            .map_err(|e| Error::io(&self.path, "read", e))?;
        Ok(buf)
    }

    /// The snapshot's bytes in order, `max` at a time.
    pub fn chunks(&self, max: usize) -> impl Iterator<Item = Result<Vec<u8>>> + '_ {
        let max = max.max(1);
        let mut pos = 0u64;
        std::iter::from_fn(move || {
            if pos >= self.len {
                return None;
            }
            let chunk = self.read_chunk(pos, max);
            match &chunk {
                Ok(c) => pos += c.len() as u64,
                Err(_) => pos = self.len,
            }
            Some(chunk)
        })
    }

    /// `fdatasync` the file (everything written to it, past `len` too).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fdatasync", e))
    }

    /// Add bytes at the end of a snapshot being received.
    pub fn push_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, self.len)
            .map_err(|e| Error::io(&self.path, "write", e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetaFile {
    meta: Meta,
    len: u64,
}

/// The journal of applied batches, and the current snapshot.
pub struct Journal {
    dir: PathBuf,
    file: Arc<File>,
    len: u64,
    /// End of the batches appended (at least `len`: those past it are in no snapshot yet).
    written: u64,
    /// Snapshots installed by this process: a length taken before an install is a length
    /// in another file.
    installs: u64,
    meta: Option<Meta>,
    /// Snapshots built by this process, for unique snapshot ids.
    built: u64,
    /// The buffer the last append was encoded into, empty, kept for the next one (a fresh
    /// one per append was new memory the kernel zeroed as it was touched).
    buf: Vec<u8>,
}

fn open_rw(path: &Path, truncate: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
        .map_err(|e| Error::io(path, "open", e))
}

impl Journal {
    /// Open the journal in `<dir>/snapshot`, appending from the current snapshot's length.
    pub fn open(dir: &Path) -> Result<Journal> {
        let dir = dir.join("snapshot");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
        let m: Option<MetaFile> = frame::read_file(&dir.join("meta"), "snapshot meta")?;
        let path = dir.join("journal");
        let file = open_rw(&path, false)?;
        let len = m.as_ref().map_or(0, |m| m.len);
        let on_disk = file
            .metadata()
            .map_err(|e| Error::io(&path, "stat", e))?
            .len();
        if on_disk < len {
            return Err(Error::Damaged {
                path,
                offset: on_disk,
                reason: format!("snapshot journal shorter than its meta's {len} bytes"),
            });
        }
        // Bytes past `len` are batches appended since the snapshot (or by a build whose
        // meta was never written): the raft log holds them and applies them again, and
        // they are written over from `len`. They are left as they are, not cut, so that a
        // repair from peers moves the journal aside as it was found (`crate::repair`).
        Ok(Journal {
            dir,
            file: Arc::new(file),
            len,
            written: len,
            installs: 0,
            meta: m.map(|m| m.meta),
            built: 0,
            buf: Vec::new(),
        })
    }

    /// The current snapshot's meta.
    pub fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }

    /// The current snapshot.
    pub fn current(&self) -> Option<(Meta, JournalSnapshot)> {
        let meta = self.meta.clone()?;
        Some((
            meta,
            JournalSnapshot {
                file: self.file.clone(),
                path: self.dir.join("journal"),
                len: self.len,
            },
        ))
    }

    /// Every batch of the current snapshot, in order.
    pub fn for_each(&self, mut f: impl FnMut(LogId, Batch) -> Result<()>) -> Result<()> {
        let path = self.dir.join("journal");
        // From the start whatever an earlier read left the file's offset at (this reads
        // through it; every other read is positional).
        (&*self.file)
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(&path, "seek", e))?;
        let mut r = BufReader::with_capacity(1 << 20, (&*self.file).take(self.len));
        let mut pos = 0u64;
        let mut buf = Vec::new();
        while pos < self.len {
            buf.resize(frame::HEADER_BYTES, 0);
            r.read_exact(&mut buf)
                .map_err(|e| Error::io(&path, "read", e))?;
            let body = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if body > frame::BODY_BYTES_MAX {
                return Err(bad_journal(&path, pos, "frame length over the limit"));
            }
            buf.resize(frame::HEADER_BYTES + body, 0);
            r.read_exact(&mut buf[frame::HEADER_BYTES..])
                .map_err(|e| Error::io(&path, "read", e))?;
            if !matches!(frame::scan(&buf), Scan::Frame { .. }) {
                return Err(bad_journal(&path, pos, "frame CRC mismatch"));
            }
            let (log_id, batch): (LogId, Batch) = frame::decode(&buf, "snapshot journal")?;
            f(log_id, batch)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    /// Where the next appended batch goes, and how many snapshots were installed before:
    /// what a snapshot of everything applied so far is built up to ([`Journal::build`]).
    pub fn end(&self) -> (u64, u64) {
        (self.written, self.installs)
    }

    /// The journal's file, to sync the batches appended so far without holding the journal
    /// (see `StateMachine`'s snapshot builder); [`Journal::build`] syncs again.
    pub fn unsynced(&self) -> JournalSnapshot {
        JournalSnapshot {
            file: self.file.clone(),
            path: self.dir.join("journal"),
            len: self.written,
        }
    }

    /// Append `items`, batches just applied, in log order, after the ones appended before.
    /// Written, not synced: [`Journal::build`] syncs them when a snapshot takes them in.
    pub fn append(&mut self, items: &[(LogId, &Batch)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.clear();
        for item in items {
            frame::encode_into(item, &mut bytes, "snapshot journal")?;
        }
        let path = self.dir.join("journal");
        self.file
            .write_all_at(&bytes, self.written)
            .map_err(|e| Error::io(&path, "write", e))?;
        self.written += bytes.len() as u64;
        if bytes.capacity() <= frame::BUF_BYTES_KEEP {
            self.buf = bytes;
        }
        Ok(())
    }

    /// Make the batches appended up to `upto` (an [`Journal::end`], taken when everything up
    /// to `last_applied` was appended), with `last_applied` and `membership`, the new current
    /// snapshot.
    pub fn build(
        &mut self,
        (upto, installs): (u64, u64),
        last_applied: Option<LogId>,
        membership: openraft::StoredMembership<NodeId, BasicNode>,
    ) -> Result<(Meta, JournalSnapshot)> {
        let path = self.dir.join("journal");
        if installs != self.installs || upto < self.len || upto > self.written {
            return Err(Error::Invalid {
                what: "snapshot journal",
                reason: format!(
                    "a snapshot up to byte {upto} (after {installs} installs) does not fit the \
                     journal ({} bytes in the snapshot, {} written, {} installs)",
                    self.len, self.written, self.installs
                ),
            });
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(&path, "fdatasync", e))?;
        self.built += 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.built),
            None => format!("0-0-{}", self.built),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.write_meta(&meta, upto)?;
        self.len = upto;
        self.meta = Some(meta);
        self.current()
            .ok_or_else(|| bad_journal(&path, 0, "no meta right after writing it"))
    }

    /// An empty file to receive a snapshot into.
    pub fn receiving(&self) -> Result<JournalSnapshot> {
        let path = self.dir.join("incoming");
        let file = open_rw(&path, true)?;
        Ok(JournalSnapshot {
            file: Arc::new(file),
            path,
            len: 0,
        })
    }

    /// Make a received snapshot the current one: every frame checked, synced, renamed over
    /// the journal, then the meta replaced.
    pub fn install(&mut self, meta: &Meta, snap: &JournalSnapshot) -> Result<()> {
        let path = self.dir.join("journal");
        let copied;
        let snap = if snap.path == path || snap.path == self.dir.join("incoming") {
            snap
        } else {
            // Another journal's file (an in-process hand-over): copy, never take it.
            let mut into = self.receiving()?;
            for chunk in snap.chunks(1 << 20) {
                into.push_chunk(&chunk?)?;
            }
            copied = into;
            &copied
        };
        let mut pos = 0u64;
        while pos < snap.len {
            let head = snap.read_chunk(pos, frame::HEADER_BYTES)?;
            let body = if head.len() == frame::HEADER_BYTES {
                u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize
            } else {
                return Err(bad_journal(&snap.path, pos, "snapshot cut short"));
            };
            if body > frame::BODY_BYTES_MAX {
                return Err(bad_journal(&snap.path, pos, "frame length over the limit"));
            }
            let whole = snap.read_chunk(pos, frame::HEADER_BYTES + body)?;
            match frame::scan(&whole) {
                Scan::Frame { len } if len == whole.len() => pos += len as u64,
                other => return Err(bad_journal(&snap.path, pos, &format!("{other:?}"))),
            }
        }
        snap.file
            .sync_all()
            .map_err(|e| Error::io(&snap.path, "fsync", e))?;
        if snap.path != path {
            std::fs::rename(&snap.path, &path).map_err(|e| Error::io(&path, "rename", e))?;
            frame::sync_dir(&self.dir)?;
        }
        self.write_meta(meta, snap.len)?;
        self.file = Arc::new(open_rw(&path, false)?);
        self.len = snap.len;
        self.written = snap.len;
        self.installs += 1;
        self.meta = Some(meta.clone());
        Ok(())
    }

    fn write_meta(&self, meta: &Meta, len: u64) -> Result<()> {
        let m = MetaFile {
            meta: meta.clone(),
            len,
        };
        frame::write_atomic(&self.dir, "meta", &m, "snapshot meta")
    }
}

fn bad_journal(path: &Path, pos: u64, reason: &str) -> Error {
    Error::Damaged {
        path: path.to_path_buf(),
        offset: pos,
        reason: format!("snapshot journal: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Command;
    use openraft::{CommittedLeaderId, StoredMembership};

    fn item(index: u64) -> (LogId, Batch) {
        let topic = format!("t{index}");
        let batch = Batch::new(index, vec![Command::CreateTopic { topic, queues: 1 }]);
        (LogId::new(CommittedLeaderId::new(1, 1), index), batch)
    }

    fn append(j: &mut Journal, items: &[(LogId, Batch)]) {
        let refs: Vec<(LogId, &Batch)> = items.iter().map(|(l, b)| (*l, b)).collect();
        j.append(&refs).expect("append");
    }

    fn indexes(j: &Journal) -> Vec<u64> {
        let mut seen = Vec::new();
        j.for_each(|l, _| {
            seen.push(l.index);
            Ok(())
        })
        .expect("read the journal");
        seen
    }

    /// Batches appended as they are applied are in a snapshot only once one is built up to
    /// them; reopening ignores the ones after the snapshot (the raft log applies them
    /// again) and appends over them.
    #[test]
    fn a_snapshot_takes_the_batches_appended_up_to_its_end_and_reopening_ignores_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::open(dir.path()).expect("open");
        append(&mut j, &[item(1), item(2)]);
        let upto = j.end();
        append(&mut j, &[item(3)]);
        let last = Some(item(2).0);
        let (meta, snap) = j
            .build(upto, last, StoredMembership::default())
            .expect("build");
        assert_eq!(meta.last_log_id, last);
        assert_eq!(snap.len(), upto.0);
        assert_eq!(
            indexes(&j),
            vec![1, 2],
            "the snapshot holds what was appended before"
        );
        drop(j);
        let mut j = Journal::open(dir.path()).expect("reopen");
        assert_eq!(indexes(&j), vec![1, 2]);
        assert_eq!(j.end().0, upto.0, "batch 3 is in no snapshot: written over");
        let on_disk = std::fs::metadata(dir.path().join("snapshot/journal"))
            .expect("stat")
            .len();
        assert!(on_disk > upto.0, "left as found, not cut");
        append(&mut j, &[item(4)]);
        let upto = j.end();
        j.build(upto, Some(item(4).0), StoredMembership::default())
            .expect("build over the old tail");
        assert_eq!(indexes(&j), vec![1, 2, 4]);
        // An end taken before an install, or past what was written, builds nothing.
        append(&mut j, &[item(3)]);
        let stale = (j.end().0, j.end().1 + 1);
        assert!(j.build(stale, None, StoredMembership::default()).is_err());
        let beyond = (j.end().0 + 1, j.end().1);
        assert!(j.build(beyond, None, StoredMembership::default()).is_err());
    }
}
