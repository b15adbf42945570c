//! The persisted start of the log: where retention cut it, and where every consume queue
//! starts at that point.
//!
//! ```text
//! logstart.<seq as 20 digits>
//!   0   8  magic "HALFMQLS"
//!   8   4  format version u32 LE = 1
//!  12   4  crc32 of the payload
//!  16   8  payload length u64 LE
//!  24      payload: bincode of LogStart
//! ```
//!
//! Retention writes a new file (write, fsync, fsync directory) *before* it deletes any
//! segment, then removes older log-start files. So after a crash at any point the newest
//! valid file says where the log starts; segments below it are orphans of an unfinished
//! delete and recovery removes them, and a missing segment at or above it is a hole
//! (corruption), never silently accepted.
//!
//! The queue starts make a full index rebuild possible when the log no longer begins at 0:
//! queue `(t, q)` resumes at queue offset `first`, whose entries below are "expired".

use std::path::{Path, PathBuf};

use crate::codec;
use crate::error::{Error, Result};
use crate::store::io::Storage;

const MAGIC: &[u8; 8] = b"HALFMQLS";
const FORMAT_VERSION: u32 = 1;
const HEAD_BYTES: usize = 24;
const PREFIX: &str = "logstart.";

/// What a log-start file records.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogStart {
    /// Sequence number (the file name).
    pub seq: u64,
    /// Base offset of the first segment kept: every segment below it is deleted (or about to
    /// be).
    pub base: u64,
    /// (topic, queue id, first queue offset whose message is at or after `base`). Queues not
    /// listed start at 0.
    pub queues: Vec<(String, u32, u64)>,
}

fn file_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq:020}"))
}

fn list(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = storage
        .list_dir(dir)?
        .into_iter()
        .filter_map(|n| {
            let seq = n.strip_prefix(PREFIX)?.parse().ok()?;
            Some((seq, dir.join(n)))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Load the newest valid log-start file, if any. A damaged newest file is skipped with a
/// warning (the previous one is kept until a newer one is durable, so it is older but
/// never wrong: it only makes recovery remove fewer orphans).
pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<LogStart>> {
    for (seq, path) in list(storage, dir)?.into_iter().rev() {
        match read_one(storage, &path) {
            Ok(ls) if ls.seq == seq => return Ok(Some(ls)),
            Ok(_) => {
                tracing::warn!(file = %path.display(), "log-start sequence does not match its name; skipped")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable log-start file skipped")
            }
        }
    }
    Ok(None)
}

fn read_one(storage: &dyn Storage, path: &Path) -> Result<LogStart> {
    let f = storage.open(path, false)?;
    let len = f.len()?;
    let bad = |reason: &str| Error::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: reason.to_string(),
    };
    if len < HEAD_BYTES as u64 || len > codec::DECODE_BYTES_MAX as u64 {
        return Err(bad("log-start file length out of range"));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0)?;
    if &buf[0..8] != MAGIC || buf[8..12] != FORMAT_VERSION.to_le_bytes() {
        return Err(bad("bad magic or version"));
    }
    let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&buf[16..24]);
    if u64::from_le_bytes(b8) != len - HEAD_BYTES as u64 {
        return Err(bad("payload length does not match file length"));
    }
    let payload = &buf[HEAD_BYTES..];
    if crc32fast::hash(payload) != crc {
        return Err(bad("CRC mismatch"));
    }
    codec::decode(payload, "log start")
}

/// Durably write `ls` as a new file, then remove all older ones.
pub fn store(storage: &dyn Storage, dir: &Path, ls: &LogStart) -> Result<()> {
    let payload = codec::encode(ls, "log start")?;
    let mut buf = Vec::with_capacity(HEAD_BYTES + payload.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(&payload);
    let path = file_path(dir, ls.seq);
    let f = storage.open(&path, true)?;
    f.set_len(0)?;
    f.write_all_at(&buf, 0)?;
    f.sync_data()?;
    storage.sync_dir(dir)?;
    for (seq, old) in list(storage, dir)? {
        if seq < ls.seq {
            storage.remove_file(&old)?;
        }
    }
    Ok(())
}
