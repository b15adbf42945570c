//! The bytes of an index file: the header, the slot table and the entries, laid out as the
//! parent module's docs show, each with its CRC. Stored on disk: a change here needs a new
//! format version.

/// Bytes of a file header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of one entry.
pub const ENTRY_BYTES: usize = 40;
/// Largest number of slots or entries in one file (keeps a file under 11 GiB).
pub const FILE_ITEMS_MAX: u32 = 1 << 28;
const MAGIC: &[u8; 8] = b"HMQKIDX\0";
const VERSION: u32 = 1;

const _: () = assert!(HEADER_BYTES == 64 && ENTRY_BYTES == 40);

/// The file name of the index file whose first record is at `first`.
pub fn file_name(first: u64) -> String {
    format!("{first:020}.idx")
}

pub(super) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".idx")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The 64-bit hash of a key: FNV-1a, then a finalizer so that the low bits used for the
/// slot are well mixed. Stored in files: never change it without a new format version.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

pub(super) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A file header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) slots: u32,
    pub(super) entries_max: u32,
    pub(super) count: u32,
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) indexed_upto: u64,
    pub(super) slots_crc: u32,
    pub(super) sealed: bool,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.slots.to_le_bytes());
        b[16..20].copy_from_slice(&self.entries_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.first.to_le_bytes());
        b[32..40].copy_from_slice(&self.last.to_le_bytes());
        b[40..48].copy_from_slice(&self.indexed_upto.to_le_bytes());
        b[48..52].copy_from_slice(&self.slots_crc.to_le_bytes());
        b[52..56].copy_from_slice(&u32::from(self.sealed).to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HEADER_BYTES {
            return Err(format!("header of {} bytes", b.len()));
        }
        if &b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        if le_u32(b, 60) != crc32fast::hash(&b[0..60]) {
            return Err("header CRC mismatch".into());
        }
        if le_u32(b, 8) != VERSION {
            return Err(format!("unknown version {}", le_u32(b, 8)));
        }
        let h = Header {
            slots: le_u32(b, 12),
            entries_max: le_u32(b, 16),
            count: le_u32(b, 20),
            first: le_u64(b, 24),
            last: le_u64(b, 32),
            indexed_upto: le_u64(b, 40),
            slots_crc: le_u32(b, 48),
            sealed: le_u32(b, 52) != 0,
        };
        if h.slots == 0 || h.slots > FILE_ITEMS_MAX || h.entries_max == 0 {
            return Err(format!("bad geometry {} slots", h.slots));
        }
        if h.entries_max > FILE_ITEMS_MAX || h.count > h.entries_max {
            return Err(format!("{} entries of {}", h.count, h.entries_max));
        }
        if h.count > 0 && (h.last < h.first || h.indexed_upto <= h.last) {
            return Err("log offsets out of order".into());
        }
        Ok(h)
    }

    pub(super) fn file_len(&self) -> u64 {
        HEADER_BYTES as u64
            + u64::from(self.slots) * 4
            + u64::from(self.entries_max) * ENTRY_BYTES as u64
    }

    pub(super) fn entry_pos(&self, number: u32) -> u64 {
        HEADER_BYTES as u64 + u64::from(self.slots) * 4 + u64::from(number - 1) * ENTRY_BYTES as u64
    }

    pub(super) fn slot_of(&self, hash: u64) -> u32 {
        // The remainder is below `slots`, a u32.
        (hash % u64::from(self.slots)) as u32
    }
}

/// One entry: where a record with a key of this hash is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Hash of the key ([`key_hash`]).
    pub hash: u64,
    /// Position of the record in the commit log.
    pub log_offset: u64,
    /// When the record was written, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Encoded size of the record.
    pub size: u32,
    pub(super) prev: u32,
}

impl Entry {
    pub(super) fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..8].copy_from_slice(&self.hash.to_le_bytes());
        b[8..16].copy_from_slice(&self.log_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        b[24..28].copy_from_slice(&self.size.to_le_bytes());
        b[28..32].copy_from_slice(&self.prev.to_le_bytes());
        let crc = crc32fast::hash(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode entry number `number` of a file with header `h`, checking its CRC and that it
    /// is where an entry of that file can be.
    pub(super) fn decode(b: &[u8], number: u32, h: &Header) -> std::result::Result<Entry, String> {
        if b.len() < ENTRY_BYTES || le_u32(b, 32) != crc32fast::hash(&b[0..32]) {
            return Err(format!("entry {number}: CRC mismatch"));
        }
        let e = Entry {
            hash: le_u64(b, 0),
            log_offset: le_u64(b, 8),
            timestamp_ms: le_u64(b, 16),
            size: le_u32(b, 24),
            prev: le_u32(b, 28),
        };
        if e.prev >= number || e.log_offset < h.first || e.log_offset > h.last {
            return Err(format!("entry {number}: out of bounds"));
        }
        Ok(e)
    }
}
