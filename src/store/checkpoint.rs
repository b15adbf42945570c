//! Recovery checkpoints: "every consume-queue index is durable up to this log offset, with
//! these lengths". Recovery starts reading the log there instead of at its beginning.
//!
//! ```text
//! checkpoint.<seq as 20 digits>
//!   0   8  magic "HALFMQCP"
//!   8   4  format version u32 LE = 1
//!  12   4  crc32 of the payload
//!  16   8  payload length u64 LE
//!  24      payload: bincode of Checkpoint
//! ```
//!
//! A new checkpoint is a new file (written, synced, then its directory synced) and the
//! older ones are removed after, so a crash at any point leaves at least one valid
//! checkpoint or none; with none, recovery rebuilds the indexes from the start of the log.

use std::path::{Path, PathBuf};

use crate::codec;
use crate::error::Result;
use crate::store::io::Storage;

const MAGIC: &[u8; 8] = b"HALFMQCP";
const FORMAT_VERSION: u32 = 1;
const HEAD_BYTES: usize = 24;
const PREFIX: &str = "checkpoint.";

/// What a checkpoint records.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// Sequence number (the file name).
    pub seq: u64,
    /// Every message record before this log offset is in its consume queue, durably.
    pub log_offset: u64,
    /// Length of every consume queue at `log_offset`: (topic, queue id, entries).
    pub queues: Vec<(String, u32, u64)>,
    /// Written by a clean close: `log_offset` is the end of the log and nothing was written
    /// after it, so recovery need not look for a torn tail.
    pub clean: bool,
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

/// Load the newest valid checkpoint, if any. Damaged checkpoint files are skipped with a
/// warning: they are derived data and the log can always be re-read.
pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Option<Checkpoint>> {
    for (seq, path) in list(storage, dir)?.into_iter().rev() {
        match read_one(storage, &path) {
            Ok(cp) if cp.seq == seq => return Ok(Some(cp)),
            Ok(_) => {
                tracing::warn!(file = %path.display(), "checkpoint sequence does not match its name; skipped")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable checkpoint skipped")
            }
        }
    }
    Ok(None)
}

fn read_one(storage: &dyn Storage, path: &Path) -> Result<Checkpoint> {
    let f = storage.open(path, false)?;
    let len = f.len()?;
    let bad = |reason: &str| crate::Error::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: reason.to_string(),
    };
    if len < HEAD_BYTES as u64 || len > codec::DECODE_BYTES_MAX as u64 {
        return Err(bad("checkpoint length out of range"));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0)?;
    if &buf[0..8] != MAGIC || buf[8..12] != FORMAT_VERSION.to_le_bytes() {
        return Err(bad("bad magic or version"));
    }
    let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&buf[16..24]);
    let payload_len = u64::from_le_bytes(b8);
    if payload_len != len - HEAD_BYTES as u64 {
        return Err(bad("payload length does not match file length"));
    }
    let payload = &buf[HEAD_BYTES..];
    if crc32fast::hash(payload) != crc {
        return Err(bad("CRC mismatch"));
    }
    codec::decode(payload, "checkpoint")
}

/// Durably write `cp` as a new checkpoint file, then remove all but the previous one.
pub fn store(storage: &dyn Storage, dir: &Path, cp: &Checkpoint) -> Result<()> {
    let payload = codec::encode(cp, "checkpoint")?;
    let mut buf = Vec::with_capacity(HEAD_BYTES + payload.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(&payload);
    let path = file_path(dir, cp.seq);
    let f = storage.open(&path, true)?;
    f.set_len(0)?;
    f.write_all_at(&buf, 0)?;
    f.sync_data()?;
    storage.sync_dir(dir)?;
    for (seq, old) in list(storage, dir)? {
        if seq + 1 < cp.seq {
            storage.remove_file(&old)?;
        }
    }
    Ok(())
}
