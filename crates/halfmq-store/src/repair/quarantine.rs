//! Quarantine files: copies of damaged bytes, kept before `halfmq repair` changes anything.
//!
//! `quarantine/<segment base:020>-<position in file:020>.q`:
//!
//! ```text
//!  0   8  magic "HALFMQQT"
//!  8   4  format version u32 LE = 1
//! 12   4  crc32 of bytes [16, end)
//! 16   8  log offset of the first damaged byte u64 LE
//! 24   8  damaged bytes u64 LE (n)
//! 32   n  the damaged bytes, as they were
//! 32+n    what repair found they held (UTF-8 text, to the end of the file)
//! ```
//!
//! A copy is written and synced (file and directory) before the damaged bytes are
//! overwritten. A copy that fails its checks was cut short by a crash before it was synced,
//! so the bytes it should hold are still in the segment, and it is written again; a copy
//! that passes them is never replaced, so a repair re-run after a crash in the middle of
//! overwriting still has the original bytes.

use std::path::{Path, PathBuf};

use crate::io::Storage;
use halfmq_types::error::Result;

const MAGIC: &[u8; 8] = b"HALFMQQT";
const VERSION: u32 = 1;
const HEAD: usize = 32;

/// One intact quarantine file.
pub(crate) struct Copy {
    pub(crate) path: PathBuf,
    pub(crate) log_offset: u64,
    pub(crate) bytes: Vec<u8>,
}

impl Copy {
    /// The original bytes of `[lo, hi)` if this copy holds all of them.
    pub(crate) fn covering(&self, lo: u64, hi: u64) -> Option<&[u8]> {
        let end = self.log_offset + self.bytes.len() as u64;
        if lo < self.log_offset || hi > end {
            return None;
        }
        let from = (lo - self.log_offset) as usize;
        Some(&self.bytes[from..from + (hi - lo) as usize])
    }
}

/// The file name of the copy of the damaged bytes at `pos` of the segment starting at `base`.
pub(crate) fn file_name(base: u64, pos: u64) -> String {
    format!("{base:020}-{pos:020}.q")
}

/// Every intact copy in `dir` (copies that fail their checks are left out).
pub(crate) fn load_all(storage: &dyn Storage, dir: &Path) -> Result<Vec<Copy>> {
    let mut out = Vec::new();
    for name in storage.list_dir(dir)? {
        if !name.ends_with(".q") {
            continue;
        }
        let path = dir.join(&name);
        let file = storage.open(&path, false)?;
        let len = file.len()?;
        if len < HEAD as u64 || len > 1 << 32 {
            continue;
        }
        let mut all = vec![0u8; len as usize];
        file.read_exact_at(&mut all, 0)?;
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&all[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let crc = u32::from_le_bytes([all[12], all[13], all[14], all[15]]);
        let n = u64_at(24);
        if &all[0..8] != MAGIC
            || all[8..12] != VERSION.to_le_bytes()
            || crc32fast::hash(&all[16..]) != crc
            || n > len - HEAD as u64
        {
            tracing::warn!(file = %path.display(), "quarantine file is incomplete; it is written again if its damage is still there");
            continue;
        }
        out.push(Copy {
            path,
            log_offset: u64_at(16),
            bytes: all[HEAD..HEAD + n as usize].to_vec(),
        });
    }
    Ok(out)
}

/// Write a copy of `bytes` (the damaged bytes at `log_offset`, position `pos` of the segment
/// starting at `base`) with `report`, durably.
pub(crate) fn store(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    pos: u64,
    log_offset: u64,
    bytes: &[u8],
    report: &str,
) -> Result<PathBuf> {
    storage.create_dir_all(dir)?;
    let path = dir.join(file_name(base, pos));
    let mut all = Vec::with_capacity(HEAD + bytes.len() + report.len());
    all.extend_from_slice(MAGIC);
    all.extend_from_slice(&VERSION.to_le_bytes());
    all.extend_from_slice(&[0u8; 4]);
    all.extend_from_slice(&log_offset.to_le_bytes());
    all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    all.extend_from_slice(bytes);
    all.extend_from_slice(report.as_bytes());
    let crc = crc32fast::hash(&all[16..]);
    all[12..16].copy_from_slice(&crc.to_le_bytes());
    let file = storage.open(&path, true)?;
    file.set_len(0)?;
    file.write_all_at(&all, 0)?;
    file.sync_data()?;
    storage.sync_dir(dir)?;
    Ok(path)
}
