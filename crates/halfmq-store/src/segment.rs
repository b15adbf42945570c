//! One commit-log segment: a preallocated file named by the log offset it starts at.
//!
//! ```text
//! segment file (segment_bytes long, preallocated, zero-filled)
//!   0   8  magic "HALFMQLG"
//!   8   4  format version u32 LE = 2 (1: written before batches carried durable marks)
//!  12   4  crc32 of bytes [16, 32)
//!  16   8  base_offset u64 LE (equals the number in the file name)
//!  24   8  segment_bytes u64 LE (this file's size; the next segment starts at base + size)
//!  32      records, back to back; a SegmentEnd record after the last one of a full segment;
//!          zeros after the last record of the newest segment
//! ```
//!
//! The log offset of a byte is `base_offset + position in file`, so offsets grow across
//! segments and the file name says where a file starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::{Storage, StorageFile};
use halfmq_types::error::{Error, Result};

/// Bytes of the segment header; the first record starts here.
pub const SEGMENT_HEADER_BYTES: u64 = 32;
const MAGIC: &[u8; 8] = b"HALFMQLG";
/// The format version new segments get: 2, since group-commit batches begin with a
/// [`crate::record::RecordKind::Mark`]. A binary that knows only version 1 refuses such a
/// segment instead of taking its marks for a torn tail. Version 1 segments are read as
/// before; recovery raises the newest one to version 2 before anything is appended to it.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest segment format version this build reads.
const FORMAT_VERSION_MIN: u32 = 1;

/// One open segment file.
pub struct Segment {
    /// Log offset of byte 0 of the file.
    pub base: u64,
    /// Size of the file in bytes.
    pub size: u64,
    /// The open file.
    pub file: Arc<dyn StorageFile>,
    /// The segment format version its header says.
    pub version: u32,
    /// Every byte past the header was written (with zeros) and synced before the segment
    /// took records (a prepared segment, see `crate::prepare`): writes into it convert no
    /// unwritten extents, so the flusher need not write zeros ahead of them.
    pub zeroed: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path())
            .field("base", &self.base)
            .finish()
    }
}

/// The file name of the segment starting at `base`.
pub fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The base offset in a segment file name, or `None` if it is not one.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The header of the segment starting at `base` of `size` bytes, in the current format.
pub fn header_bytes(base: u64, size: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    let crc = crc32fast::hash(&h[16..32]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What the header of an existing segment file says.
pub enum HeaderCheck {
    /// A valid header.
    Valid(Segment),
    /// The file is empty or its header is all zeros: a segment whose creation never finished.
    Blank(Arc<dyn StorageFile>),
}

impl Segment {
    /// Path of the file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Create a new segment file: allocate it, write its header, and make its directory entry
    /// durable. The header itself becomes durable with the first sync of the segment's data.
    pub fn create(storage: &dyn Storage, dir: &Path, base: u64, size: u64) -> Result<Segment> {
        let path = dir.join(file_name(base));
        let file = storage.open(&path, true)?;
        // fallocate, not zeros: writing a segment's worth of zeros at creation made the first
        // group commit after each roll stall every writer for 100-250 ms (measured). Writes
        // into fallocated blocks cost an extent conversion per fdatasync (about half the fsync
        // rate of written blocks on ext4 here); see ARCHITECTURE.md, "Performance notes".
        let made = file
            .allocate(size)
            .and_then(|()| file.write_all_at(&header_bytes(base, size), 0))
            .and_then(|()| storage.sync_dir(dir));
        if let Err(e) = made {
            // Leave no half-made file behind; if even that fails, recovery treats a blank
            // newest segment as never created.
            let _ = storage.remove_file(&path);
            return Err(e);
        }
        Ok(Segment {
            base,
            size,
            file,
            version: FORMAT_VERSION,
            zeroed: false,
        })
    }

    /// Make a prepared file (zero-filled and synced, its directory entry durable: see
    /// `crate::prepare`) the segment starting at `base` by writing its header. Like
    /// [`Segment::create`], the header becomes durable with the first sync of its data.
    pub fn adopt(file: Arc<dyn StorageFile>, base: u64, size: u64) -> Result<Segment> {
        file.write_all_at(&header_bytes(base, size), 0)?;
        Ok(Segment {
            base,
            size,
            file,
            version: FORMAT_VERSION,
            zeroed: true,
        })
    }

    /// Raise an older segment's header to the current format version, durably (the newest
    /// segment, before records with marks are appended to it).
    pub fn upgrade(&mut self) -> Result<()> {
        if self.version == FORMAT_VERSION {
            return Ok(());
        }
        self.file
            .write_all_at(&header_bytes(self.base, self.size), 0)?;
        self.file.sync_data()?;
        self.version = FORMAT_VERSION;
        Ok(())
    }

    /// Open an existing segment file and check its header against its name and size.
    pub fn open(
        storage: &dyn Storage,
        path: &Path,
        base: u64,
        configured_size: u64,
    ) -> Result<HeaderCheck> {
        let file = storage.open(path, false)?;
        let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
        let n = file.read_at(&mut h, 0)?;
        if h.iter().all(|&b| b == 0) {
            return Ok(HeaderCheck::Blank(file));
        }
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason,
        };
        if n < h.len() {
            return Err(corrupt(format!(
                "segment header is {n} bytes, {SEGMENT_HEADER_BYTES} expected"
            )));
        }
        let (version, size) = parse_header(&h, base).map_err(corrupt)?;
        let len = file.len()?;
        if len < size {
            // The allocation did not survive in full; the missing part reads as zeros. Only
            // for a segment of the configured size: a header that claims any other size the
            // file does not have is damage (and extending to it could mean terabytes).
            if size != configured_size {
                return Err(corrupt(format!(
                    "header says {size} bytes, the file has {len} and segments are {configured_size}"
                )));
            }
            file.set_len(size)?;
        }
        Ok(HeaderCheck::Valid(Segment {
            base,
            size,
            file,
            version,
            zeroed: false,
        }))
    }
}

/// Check a segment header against the base offset in its file name: `(format version,
/// segment size)`, or why it is not a valid header.
pub fn parse_header(
    h: &[u8; SEGMENT_HEADER_BYTES as usize],
    base: u64,
) -> std::result::Result<(u32, u64), String> {
    if &h[0..8] != MAGIC {
        return Err("not a halfmq segment (bad magic)".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err(format!("unknown segment format version {version}"));
    }
    let stored_crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if crc32fast::hash(&h[16..32]) != stored_crc {
        return Err("segment header CRC mismatch".into());
    }
    let mut b8 = [0u8; 8];
    b8.copy_from_slice(&h[16..24]);
    let stored_base = u64::from_le_bytes(b8);
    b8.copy_from_slice(&h[24..32]);
    let size = u64::from_le_bytes(b8);
    if stored_base != base {
        return Err(format!(
            "header says base offset {stored_base}, file name says {base}"
        ));
    }
    if size < SEGMENT_HEADER_BYTES + crate::record::HEADER_BYTES as u64 || size > (1 << 40) {
        return Err(format!("segment size {size} out of range"));
    }
    Ok((version, size))
}

/// Directory entries of `dir` that are segment files, as (base, path), sorted by base.
pub fn list(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for name in storage.list_dir(dir)? {
        match parse_file_name(&name) {
            Some(base) => out.push((base, dir.join(&name))),
            None => {
                tracing::warn!(file = %dir.join(&name).display(), "ignoring unknown file in log directory")
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(42), "00000000000000000042.log");
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("42.log"), None);
        assert_eq!(parse_file_name("0000000000000000004x.log"), None);
    }
}
