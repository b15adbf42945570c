//! The on-disk record: the unit of everything durable in halfmq.
//!
//! ```text
//! byte  size  field
//!    0     4  total_len     u32 LE, length of the whole record including this field
//!    4     4  crc32         u32 LE, CRC-32 (crc32fast) of bytes [8, total_len)
//!    8     1  version       = 1
//!    9     1  kind          RecordKind
//!   10     2  flags         u16 LE, reserved (0)
//!   12     4  queue_id      u32 LE
//!   16     8  log_offset    u64 LE, the record's own position in the log
//!   24     8  queue_offset  u64 LE, its index in (topic, queue_id); 0 where unused
//!   32     8  timestamp_ms  u64 LE, milliseconds since the Unix epoch
//!   40     2  topic_len     u16 LE
//!   42     2  key_len       u16 LE
//!   44     4  props_len     u32 LE
//!   48     4  body_len      u32 LE
//!   52        topic (UTF-8) | key (UTF-8) | properties (bincode map) | body
//! ```
//!
//! A record stores its own log offset so that a record read from the wrong place, or stale
//! bytes that happen to look like a record, are rejected. A `total_len` of zero means "no
//! record here" (the zeroed, preallocated rest of a segment).

use halfmq_types::codec;

/// Bytes in the fixed-width header.
pub const HEADER_BYTES: usize = 52;
/// The only record format version so far.
pub const VERSION: u8 = 1;
/// Hard upper bound on one record, whatever the configuration says: a length field above
/// this is damage, not data, and is rejected before anything is allocated.
pub const RECORD_BYTES_MAX: u32 = 64 * 1024 * 1024;
/// Longest topic name in bytes.
pub const TOPIC_BYTES_MAX: usize = 127;
/// Longest key in bytes (the field is a u16).
pub const KEY_BYTES_MAX: usize = u16::MAX as usize;

const _: () = assert!(HEADER_BYTES == 52);

/// Flag of a Message record that commits a transaction: its properties hold the
/// transaction id (`halfmq.txn`), and it is both the outcome and the visible message.
pub const FLAG_TXN_COMMIT: u16 = 1;
/// Flag of a `Message` record that delivers a delayed message (property `halfmq.delayed`
/// holds the log offset of its `Delayed` record).
pub const FLAG_DELAYED_FIRE: u16 = 2;

pub use halfmq_types::Properties;

/// Bytes of a [`RecordKind::Mark`] record: a header with empty topic and key, and an 8-byte
/// body.
pub const MARK_BYTES: usize = HEADER_BYTES + 8;

/// Encode a [`RecordKind::Mark`] at `log_offset` whose durable end is `durable` into `out`.
/// Its timestamp is that of the record that opened the batch, so the first record of a
/// segment (read by retention by age) always has a real time.
pub fn encode_mark(out: &mut Vec<u8>, log_offset: u64, durable: u64, timestamp_ms: u64) {
    let header = Header {
        kind: RecordKind::Mark,
        flags: 0,
        queue_id: 0,
        log_offset,
        queue_offset: 0,
        timestamp_ms,
    };
    // Cannot fail: empty topic and key, an 8-byte body.
    let _ = encode_into(out, &header, "", "", &[], &durable.to_le_bytes());
}

/// Set the durable end of the [`RecordKind::Mark`] encoded at the start of `mark` (which is
/// [`MARK_BYTES`] long) and recompute its CRC. The flusher does this when it writes the
/// batch, so the mark says what was durable at that moment, not when the batch began.
pub fn set_mark(mark: &mut [u8], durable: u64) {
    if mark.len() < MARK_BYTES {
        return;
    }
    mark[HEADER_BYTES..MARK_BYTES].copy_from_slice(&durable.to_le_bytes());
    let crc = crc32fast::hash(&mark[8..MARK_BYTES]);
    mark[4..8].copy_from_slice(&crc.to_le_bytes());
}

impl RecordView<'_> {
    /// The durable end a [`RecordKind::Mark`] carries (`None` for any other record).
    pub fn mark(&self) -> Option<u64> {
        if self.header.kind != RecordKind::Mark || self.body.len() != 8 {
            return None;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(self.body);
        Some(u64::from_le_bytes(b))
    }
}

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum RecordKind {
    /// A message visible to consumers of its topic and queue.
    Message = 1,
    /// A half (prepared) transactional message, invisible until committed.
    Half = 2,
    /// The end of a transaction that made nothing visible (rollback).
    TxnEnd = 3,
    /// A message to deliver later: invisible until a `Message` record with
    /// [`FLAG_DELAYED_FIRE`] copies it into its queue at its time.
    Delayed = 4,
    /// The head of a group-commit batch: its body (8 bytes, u64 LE) is the durable end of
    /// the log when the batch was written, so every record below it had been acknowledged
    /// (see [`MARK_BYTES`] and `crate::recovery`). Written since segment format version 2.
    Mark = 5,
    /// Written by `halfmq repair` over damaged bytes, with the same length, so every later
    /// offset still holds; the original bytes are kept in `quarantine/`. When the damaged
    /// bytes were a message whose consume-queue entry is known, the topic, queue id and
    /// queue offset are that message's, and the queue offset stays taken (a read of it is
    /// `Error::Lost`); otherwise the topic is empty.
    Quarantined = 6,
    /// Marks the clean end of a segment: the next record is in the next segment.
    SegmentEnd = 127,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Message),
            2 => Some(RecordKind::Half),
            3 => Some(RecordKind::TxnEnd),
            4 => Some(RecordKind::Delayed),
            5 => Some(RecordKind::Mark),
            6 => Some(RecordKind::Quarantined),
            127 => Some(RecordKind::SegmentEnd),
            _ => None,
        }
    }
}

/// The fixed-width part of a record, as the writer fills it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the record is.
    pub kind: RecordKind,
    /// Reserved flags.
    pub flags: u16,
    /// Queue within the topic.
    pub queue_id: u32,
    /// Position of this record in the log.
    pub log_offset: u64,
    /// Index of this record in its consume queue (messages only).
    pub queue_offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// A decoded record that borrows the bytes it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    /// The fixed-width header.
    pub header: Header,
    /// Topic name.
    pub topic: &'a str,
    /// Message key ("" when there is none).
    pub key: &'a str,
    /// Encoded properties (see [`RecordView::properties`]).
    pub props: &'a [u8],
    /// The payload.
    pub body: &'a [u8],
}

/// A record that owns its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The fixed-width header.
    pub header: Header,
    /// Topic name.
    pub topic: String,
    /// Message key ("" when there is none).
    pub key: String,
    /// User properties.
    pub properties: Properties,
    /// The payload.
    pub body: Vec<u8>,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record claims (or than a header): the tail is cut short.
    Incomplete {
        /// Bytes needed in all.
        needed: usize,
    },
    /// `total_len` is zero: there is no record here.
    Empty,
    /// The bytes are damaged or not a record.
    Invalid(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Incomplete { needed } => {
                write!(f, "incomplete record, {needed} bytes needed")
            }
            DecodeError::Empty => write!(f, "no record (zero length)"),
            DecodeError::Invalid(r) => write!(f, "{r}"),
        }
    }
}

/// Exact encoded size of a record with these parts, or an error if it cannot be a record.
pub fn encoded_len(topic: &str, key: &str, props: &[u8], body: &[u8]) -> Result<u32, String> {
    if topic.len() > TOPIC_BYTES_MAX {
        return Err(format!(
            "topic is {} bytes, at most {TOPIC_BYTES_MAX}",
            topic.len()
        ));
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(format!(
            "key is {} bytes, at most {KEY_BYTES_MAX}",
            key.len()
        ));
    }
    let total = HEADER_BYTES as u64
        + topic.len() as u64
        + key.len() as u64
        + props.len() as u64
        + body.len() as u64;
    if total > u64::from(RECORD_BYTES_MAX) {
        return Err(format!(
            "record is {total} bytes, at most {RECORD_BYTES_MAX}"
        ));
    }
    Ok(total as u32)
}

/// Append one encoded record to `out`. `props` must already be encoded with
/// [`encode_properties`]. Returns the number of bytes written.
pub fn encode_into(
    out: &mut Vec<u8>,
    header: &Header,
    topic: &str,
    key: &str,
    props: &[u8],
    body: &[u8],
) -> Result<u32, String> {
    let total = encoded_len(topic, key, props, body)?;
    let start = out.len();
    out.reserve(total as usize);
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // CRC, filled in below
    out.push(VERSION);
    out.push(header.kind as u8);
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&header.queue_id.to_le_bytes());
    out.extend_from_slice(&header.log_offset.to_le_bytes());
    out.extend_from_slice(&header.queue_offset.to_le_bytes());
    out.extend_from_slice(&header.timestamp_ms.to_le_bytes());
    // The casts below cannot truncate: encoded_len checked every length against its field.
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(props.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    debug_assert_eq!(out.len() - start, HEADER_BYTES);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(props);
    out.extend_from_slice(body);
    debug_assert_eq!(out.len() - start, total as usize);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(total)
}

/// The little-endian number at `at` in `b` (which must hold it), as record headers store them.
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
/// See [`u16_at`].
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
/// See [`u16_at`].
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Learn the length of the record at the start of `bytes` without decoding it: the cheap
/// first phase of a read. `Ok(len)` means `len` bytes must be available to decode.
pub fn check_len(bytes: &[u8]) -> Result<u32, DecodeError> {
    if bytes.len() < 4 {
        return Err(DecodeError::Incomplete { needed: 4 });
    }
    let total = u32_at(bytes, 0);
    if total == 0 {
        return Err(DecodeError::Empty);
    }
    if (total as usize) < HEADER_BYTES || total > RECORD_BYTES_MAX {
        return Err(DecodeError::Invalid(format!(
            "record length {total} out of range"
        )));
    }
    Ok(total)
}

/// Decode the record at the start of `bytes`, verifying length, CRC, version, kind and the
/// field sizes. Never panics, whatever the input. Returns the view and its encoded length.
pub fn decode(bytes: &[u8]) -> Result<(RecordView<'_>, usize), DecodeError> {
    let total = check_len(bytes)? as usize;
    if bytes.len() < total {
        return Err(DecodeError::Incomplete { needed: total });
    }
    let b = &bytes[..total];
    let crc_stored = u32_at(b, 4);
    let crc = crc32fast::hash(&b[8..]);
    if crc != crc_stored {
        return Err(DecodeError::Invalid(format!(
            "CRC mismatch (stored {crc_stored:#010x}, computed {crc:#010x})"
        )));
    }
    if b[8] != VERSION {
        return Err(DecodeError::Invalid(format!(
            "unknown record version {}",
            b[8]
        )));
    }
    let kind = RecordKind::from_u8(b[9])
        .ok_or_else(|| DecodeError::Invalid(format!("unknown record kind {}", b[9])))?;
    let header = Header {
        kind,
        flags: u16_at(b, 10),
        queue_id: u32_at(b, 12),
        log_offset: u64_at(b, 16),
        queue_offset: u64_at(b, 24),
        timestamp_ms: u64_at(b, 32),
    };
    let topic_len = u16_at(b, 40) as usize;
    let key_len = u16_at(b, 42) as usize;
    let props_len = u32_at(b, 44) as usize;
    let body_len = u32_at(b, 48) as usize;
    let sum = HEADER_BYTES + topic_len + key_len + props_len + body_len;
    if sum != total {
        return Err(DecodeError::Invalid(format!(
            "field lengths add up to {sum}, record length is {total}"
        )));
    }
    let mut at = HEADER_BYTES;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    let topic = std::str::from_utf8(take(topic_len))
        .map_err(|_| DecodeError::Invalid("topic is not UTF-8".into()))?;
    let key = std::str::from_utf8(take(key_len))
        .map_err(|_| DecodeError::Invalid("key is not UTF-8".into()))?;
    let props = take(props_len);
    let body = take(body_len);
    Ok((
        RecordView {
            header,
            topic,
            key,
            props,
            body,
        },
        total,
    ))
}

impl RecordView<'_> {
    /// Decode the properties.
    pub fn properties(&self) -> halfmq_types::Result<Properties> {
        decode_properties(self.props)
    }

    /// Copy into an owned [`Record`].
    pub fn to_record(&self) -> halfmq_types::Result<Record> {
        Ok(Record {
            header: self.header,
            topic: self.topic.to_owned(),
            key: self.key.to_owned(),
            properties: self.properties()?,
            body: self.body.to_vec(),
        })
    }
}

/// Encode properties for a record; an empty map takes no bytes at all.
pub fn encode_properties(props: &Properties) -> halfmq_types::Result<Vec<u8>> {
    if props.is_empty() {
        return Ok(Vec::new());
    }
    codec::encode(props, "record properties")
}

/// Decode properties stored by [`encode_properties`].
pub fn decode_properties(bytes: &[u8]) -> halfmq_types::Result<Properties> {
    if bytes.is_empty() {
        return Ok(Properties::new());
    }
    codec::decode::<Properties>(bytes, "record properties")
}

/// Encode a whole owned record (used by tests, tools and fuzz seeds).
pub fn encode_record(r: &Record) -> halfmq_types::Result<Vec<u8>> {
    let props = encode_properties(&r.properties)?;
    let mut out = Vec::new();
    encode_into(&mut out, &r.header, &r.topic, &r.key, &props, &r.body).map_err(|reason| {
        halfmq_types::Error::Invalid {
            what: "record",
            reason,
        }
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut properties = Properties::new();
        properties.insert("a".into(), "b".into());
        Record {
            header: Header {
                kind: RecordKind::Message,
                flags: 0,
                queue_id: 3,
                log_offset: 4096,
                queue_offset: 7,
                timestamp_ms: 1_700_000_000_000,
            },
            topic: "payments".into(),
            key: "order-1".into(),
            properties,
            body: b"confirmed".to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = encode_record(&r).unwrap();
        let (view, len) = decode(&bytes).unwrap();
        assert_eq!(len, bytes.len());
        assert_eq!(view.to_record().unwrap(), r);
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let bytes = encode_record(&sample()).unwrap();
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut]) {
                Err(DecodeError::Incomplete { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_bit_flip_is_rejected() {
        let bytes = encode_record(&sample()).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let r = decode(&b);
                assert!(r.is_err(), "flip of bit {bit} in byte {i} was accepted");
            }
        }
    }

    #[test]
    fn a_mark_round_trips_and_can_be_set_later() {
        let mut out = Vec::new();
        encode_mark(&mut out, 4096, 0, 1);
        assert_eq!(out.len(), MARK_BYTES);
        set_mark(&mut out, 1234);
        let (view, len) = decode(&out).unwrap();
        assert_eq!(
            (len, view.header.kind, view.mark()),
            (MARK_BYTES, RecordKind::Mark, Some(1234))
        );
        assert_eq!(view.header.log_offset, 4096);
        out[HEADER_BYTES] ^= 1;
        assert!(decode(&out).is_err(), "a changed mark fails its CRC");
    }

    #[test]
    fn zero_length_is_empty() {
        assert_eq!(decode(&[0u8; 64]).unwrap_err(), DecodeError::Empty);
    }
}
