//! Reading a segment during recovery and repair: the buffered record scanner, and the
//! whole-file helpers (the last non-zero byte, re-writing what was read so it is durable,
//! zeroing a torn tail).

use super::torn_tail_bytes_max;
use crate::config::StoreConfig;
use crate::io::StorageFile;
use crate::record::{self, DecodeError, RecordView};
use crate::segment::{Segment, SEGMENT_HEADER_BYTES};
use halfmq_types::error::{Error, Result};

/// Position of the last non-zero byte in [pos, size) of a file.
pub(crate) fn last_nonzero(file: &dyn StorageFile, size: u64, pos: u64) -> Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut last = None;
    let mut at = pos;
    while at < size {
        let n = ((size - at) as usize).min(CHUNK);
        let got = file.read_at(&mut buf[..n], at)?;
        if let Some(i) = last_nonzero_in(&buf[..got]) {
            last = Some(at + i as u64);
        }
        if got < n {
            break;
        }
        at += n as u64;
    }
    Ok(last)
}

/// Index of the last non-zero byte of `buf`. A fresh segment is 64 MiB of zeros, so blocks
/// are first tested whole with an OR that the compiler vectorises (a byte-at-a-time
/// `rposition` over the whole file took ~0.3 s per open), and only the last non-zero block
/// is searched byte by byte.
fn last_nonzero_in(buf: &[u8]) -> Option<usize> {
    const BLOCK: usize = 4096;
    let mut end = buf.len();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &buf[start..end];
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return block.iter().rposition(|&b| b != 0).map(|i| start + i);
        }
        end = start;
    }
    None
}

/// Whether the first record slot of a segment holds a valid record.
pub(super) fn first_record_valid(seg: &Segment) -> Result<bool> {
    let mut scan = Scanner::new(&*seg.file, seg.size, SEGMENT_HEADER_BYTES);
    Ok(match scan.next()? {
        Ok(()) => scan
            .current()
            .is_ok_and(|v| v.header.log_offset == seg.base + SEGMENT_HEADER_BYTES),
        Err(_) => false,
    })
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
pub(super) fn make_durable(file: &dyn StorageFile, from: u64, to: u64) -> Result<()> {
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
pub(super) fn cut_tail(
    file: &dyn StorageFile,
    size: u64,
    pos: u64,
    config: &StoreConfig,
) -> Result<u64> {
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
pub(crate) struct Scanner<'f> {
    file: &'f dyn StorageFile,
    size: u64,
    /// Position of the current record in the file.
    pub(crate) pos: u64,
    /// Length of the record last returned.
    pub(crate) len: u64,
    buf: Vec<u8>,
    buf_start: u64,
}

const SCAN_BUF_BYTES: usize = 1 << 20;

impl<'f> Scanner<'f> {
    pub(crate) fn new(file: &'f dyn StorageFile, size: u64, pos: u64) -> Scanner<'f> {
        Scanner {
            file,
            size,
            pos,
            len: 0,
            buf: Vec::new(),
            buf_start: pos,
        }
    }

    pub(crate) fn advance(&mut self) {
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
    pub(crate) fn next(&mut self) -> Result<Result<(), String>> {
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
    pub(crate) fn current(&self) -> std::result::Result<RecordView<'_>, DecodeError> {
        let at = (self.pos - self.buf_start) as usize;
        let end = (at + self.len as usize).min(self.buf.len());
        record::decode(&self.buf[at..end]).map(|(view, _)| view)
    }
}

#[cfg(test)]
mod tests {
    use super::last_nonzero_in;

    #[test]
    fn last_nonzero_in_finds_the_last_set_byte_across_blocks() {
        let mut buf = vec![0u8; 3 * 4096 + 100];
        assert_eq!(last_nonzero_in(&buf), None);
        assert_eq!(last_nonzero_in(&[]), None);
        for at in [0, 1, 4095, 4096, 8191, 3 * 4096 + 99] {
            buf[at] = 7;
            assert_eq!(last_nonzero_in(&buf), Some(at), "byte {at}");
        }
        buf[3 * 4096 + 99] = 0;
        assert_eq!(last_nonzero_in(&buf), Some(8191));
    }
}
