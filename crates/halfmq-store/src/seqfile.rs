//! Small state files written whole and replaced by sequence number (checkpoints, the log
//! start): `<prefix><seq as 20 digits>`, each
//!
//! ```text
//!   0   8  magic
//!   8   4  format version u32 LE
//!  12   4  crc32 of the payload
//!  16   8  payload length u64 LE
//!  24      payload: bincode
//! ```
//!
//! A new value is a new file (written, synced, then its directory synced), and older files
//! are removed only after that, so a crash at any point leaves the newest durable value
//! readable. Loading takes the newest file that passes every check; damaged ones are skipped
//! with a warning.

use std::path::{Path, PathBuf};

use crate::io::Storage;
use halfmq_types::codec;
use halfmq_types::error::{Error, Result};

const HEAD_BYTES: usize = 24;

/// One kind of sequenced file.
pub(crate) struct Kind {
    /// File name prefix (`"checkpoint."`).
    pub prefix: &'static str,
    /// The first 8 bytes of every file.
    pub magic: &'static [u8; 8],
    /// Format version of the payload.
    pub version: u32,
    /// For errors and logs (`"checkpoint"`).
    pub what: &'static str,
    /// How many older files to keep after a store (1: the previous one stays too).
    pub keep_older: u64,
}

/// Files of `kind` in `dir`, oldest first.
fn list(storage: &dyn Storage, dir: &Path, kind: &Kind) -> Result<Vec<(u64, PathBuf)>> {
    let mut out: Vec<(u64, PathBuf)> = storage
        .list_dir(dir)?
        .into_iter()
        .filter_map(|n| {
            let seq = n.strip_prefix(kind.prefix)?.parse().ok()?;
            Some((seq, dir.join(n)))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The newest valid value, if any. `seq_of` gives the sequence number a value says it has,
/// which must match its file's name.
pub(crate) fn load<T: serde::de::DeserializeOwned>(
    storage: &dyn Storage,
    dir: &Path,
    kind: &Kind,
    seq_of: impl Fn(&T) -> u64,
) -> Result<Option<T>> {
    for (seq, path) in list(storage, dir, kind)?.into_iter().rev() {
        match read_one(storage, &path, kind) {
            Ok(v) if seq_of(&v) == seq => return Ok(Some(v)),
            Ok(_) => {
                tracing::warn!(file = %path.display(), what = kind.what, "sequence does not match the file name; skipped")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), what = kind.what, error = %e, "unreadable file skipped")
            }
        }
    }
    Ok(None)
}

fn read_one<T: serde::de::DeserializeOwned>(
    storage: &dyn Storage,
    path: &Path,
    kind: &Kind,
) -> Result<T> {
    let f = storage.open(path, false)?;
    let len = f.len()?;
    let bad = |reason: &str| Error::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason: format!("{}: {reason}", kind.what),
    };
    if len < HEAD_BYTES as u64 || len > codec::DECODE_BYTES_MAX as u64 {
        return Err(bad("length out of range"));
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0)?;
    if &buf[0..8] != kind.magic || buf[8..12] != kind.version.to_le_bytes() {
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
    codec::decode(payload, kind.what)
}

/// Durably write `value` as file `seq`, then remove the files older than the `keep_older`
/// before it.
pub(crate) fn store<T: serde::Serialize>(
    storage: &dyn Storage,
    dir: &Path,
    kind: &Kind,
    seq: u64,
    value: &T,
) -> Result<()> {
    let payload = codec::encode(value, kind.what)?;
    let mut buf = Vec::with_capacity(HEAD_BYTES + payload.len());
    buf.extend_from_slice(kind.magic);
    buf.extend_from_slice(&kind.version.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(&payload);
    let path = dir.join(format!("{}{seq:020}", kind.prefix));
    let f = storage.open(&path, true)?;
    f.set_len(0)?;
    f.write_all_at(&buf, 0)?;
    f.sync_data()?;
    storage.sync_dir(dir)?;
    for (old_seq, old) in list(storage, dir, kind)? {
        if old_seq.saturating_add(kind.keep_older) < seq {
            storage.remove_file(&old)?;
        }
    }
    Ok(())
}
