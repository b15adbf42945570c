//! Wire frames, parsed in two phases without touching a socket.
//!
//! ```text
//! byte  size  field
//!    0     4  frame_len      u32 LE, whole frame including this field
//!    4     4  crc32          u32 LE, CRC-32 of bytes [8, frame_len)
//!    8     1  version        protocol version (PROTOCOL_VERSION)
//!    9     1  kind           FrameKind
//!   10     2  reserved       0
//!   12     8  correlation    u64 LE: a response carries its request's id
//!   20        body           bincode of the kind's message enum
//! ```
//!
//! [`check`] learns the length of the next frame from a buffer (`Ok(None)`: not all of it
//! is there yet — a normal outcome, not an error), rejecting an oversized length before
//! anything is allocated; [`parse`] then verifies and decodes exactly that many bytes.

use halfmq_types::error::{Error, Result};

/// Bytes before the body.
pub const FRAME_HEADER_BYTES: usize = 20;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Default largest frame (4 MiB).
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 4 * 1024 * 1024;

const _: () = assert!(FRAME_HEADER_BYTES == 4 + 4 + 1 + 1 + 2 + 8);

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → broker: a `Request`.
    Request = 1,
    /// Broker → client: the `Response` to the request with the same correlation id.
    Response = 2,
    /// Broker → client: a `Push` (a check-back question), with its own id.
    Push = 3,
}

impl FrameKind {
    /// Every kind: a byte on the wire is one of their discriminants or no frame kind.
    const ALL: [FrameKind; 3] = [FrameKind::Request, FrameKind::Response, FrameKind::Push];

    fn from_u8(v: u8) -> Option<FrameKind> {
        Self::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

/// A decoded frame whose body is still encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the body is.
    pub kind: FrameKind,
    /// Correlation id.
    pub correlation: u64,
    /// The bincode body.
    pub body: Vec<u8>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Decode {
        what: "frame",
        reason: reason.into(),
    }
}

/// Phase one: the length of the frame at the start of `buf`, `Ok(None)` if fewer than its
/// length prefix or its whole length are there yet. A length outside `FRAME_HEADER_BYTES
/// ..= frame_bytes_max` is an error at once, before anything is read or allocated.
pub fn check(buf: &[u8], frame_bytes_max: u32) -> Result<Option<usize>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if (len as usize) < FRAME_HEADER_BYTES || len > frame_bytes_max {
        return Err(bad(format!(
            "frame length {len} outside {FRAME_HEADER_BYTES} ..= {frame_bytes_max}"
        )));
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    Ok(Some(len as usize))
}

/// A frame checked by [`parse_ref`], its body still in the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// What the body is.
    pub kind: FrameKind,
    /// Correlation id.
    pub correlation: u64,
    /// The bincode body.
    pub body: &'a [u8],
}

/// Phase two: verify and split the frame that fills `buf` exactly (as measured by
/// [`check`]). Never panics, whatever the bytes.
pub fn parse(buf: &[u8]) -> Result<Frame> {
    parse_ref(buf).map(|f| Frame {
        kind: f.kind,
        correlation: f.correlation,
        body: f.body.to_vec(),
    })
}

/// [`parse`] without copying the body out of `buf`.
pub fn parse_ref(buf: &[u8]) -> Result<FrameRef<'_>> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Err(bad("shorter than a frame header"));
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len != buf.len() {
        return Err(bad(format!("frame says {len} bytes, {} given", buf.len())));
    }
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let crc = crc32fast::hash(&buf[8..]);
    if stored != crc {
        return Err(bad(format!(
            "CRC mismatch (stored {stored:#010x}, computed {crc:#010x})"
        )));
    }
    if buf[8] != PROTOCOL_VERSION {
        return Err(bad(format!(
            "protocol version {} (this broker speaks {PROTOCOL_VERSION})",
            buf[8]
        )));
    }
    let kind =
        FrameKind::from_u8(buf[9]).ok_or_else(|| bad(format!("unknown frame kind {}", buf[9])))?;
    // Reserved for a later version: a sender that sets them means something this build does
    // not know, so the frame is refused rather than half understood.
    if buf[10..12] != [0, 0] {
        return Err(bad(format!(
            "reserved header bytes {:#04x} {:#04x} are not zero",
            buf[10], buf[11]
        )));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&buf[12..20]);
    Ok(FrameRef {
        kind,
        correlation: u64::from_le_bytes(c),
        body: &buf[FRAME_HEADER_BYTES..],
    })
}

/// Encode a frame with an already encoded body, appending it to `out`.
pub fn encode_into(
    out: &mut Vec<u8>,
    kind: FrameKind,
    correlation: u64,
    body: &[u8],
    frame_bytes_max: u32,
) -> Result<()> {
    let len = FRAME_HEADER_BYTES + body.len();
    if len > frame_bytes_max as usize {
        return Err(too_large(len, frame_bytes_max));
    }
    out.reserve(len);
    encode_with(out, kind, correlation, frame_bytes_max, |out| {
        out.extend_from_slice(body);
        Ok(())
    })
}

/// Encode a frame whose body `write_body` appends to `out`, after the header: the body
/// needs no buffer of its own and is not copied. On any error `out` is as it was.
pub fn encode_with(
    out: &mut Vec<u8>,
    kind: FrameKind,
    correlation: u64,
    frame_bytes_max: u32,
    write_body: impl FnOnce(&mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]); // length and CRC, written below
    out.push(PROTOCOL_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0u8; 2]);
    out.extend_from_slice(&correlation.to_le_bytes());
    if let Err(e) = write_body(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start;
    if len > frame_bytes_max as usize {
        out.truncate(start);
        return Err(too_large(len, frame_bytes_max));
    }
    // `len <= frame_bytes_max`, a u32.
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn too_large(len: usize, frame_bytes_max: u32) -> Error {
    Error::Invalid {
        what: "frame",
        reason: format!("{len} bytes, more than the maximum frame size {frame_bytes_max}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_incomplete() {
        let mut buf = Vec::new();
        encode_into(&mut buf, FrameKind::Request, 42, b"hello", 1024).unwrap();
        for cut in 0..buf.len() {
            assert_eq!(check(&buf[..cut], 1024).unwrap(), None, "cut at {cut}");
        }
        let len = check(&buf, 1024).unwrap().unwrap();
        assert_eq!(len, buf.len());
        let f = parse(&buf[..len]).unwrap();
        assert_eq!(
            (f.kind, f.correlation, f.body.as_slice()),
            (FrameKind::Request, 42, &b"hello"[..])
        );
    }

    #[test]
    fn oversized_length_is_rejected_before_reading_it() {
        let huge = (u32::MAX).to_le_bytes();
        assert!(check(&huge, 1024).is_err());
    }

    #[test]
    fn every_bit_flip_is_rejected() {
        let mut buf = Vec::new();
        encode_into(&mut buf, FrameKind::Response, 7, b"body bytes", 1024).unwrap();
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                let ok = match check(&b, 1024) {
                    Ok(Some(n)) => parse(&b[..n]).is_ok(),
                    _ => false,
                };
                assert!(!ok, "flip of bit {bit} in byte {i} accepted");
            }
        }
    }

    /// Found by `cargo fuzz run frame_decode` in CI: a frame whose reserved bytes are set
    /// and whose CRC is right for them was accepted, and re-encoded differently.
    #[test]
    fn reserved_bytes_must_be_zero() {
        let mut buf = Vec::new();
        encode_into(&mut buf, FrameKind::Request, 3, b"x", 1024).unwrap();
        for (i, v) in [(10, 1u8), (11, 0x80)] {
            let mut b = buf.clone();
            b[i] = v;
            let crc = crc32fast::hash(&b[8..]);
            b[4..8].copy_from_slice(&crc.to_le_bytes());
            let e = parse(&b).unwrap_err().to_string();
            assert!(e.contains("reserved header bytes"), "byte {i}: {e}");
        }
        assert!(parse(&buf).is_ok());
    }

    #[test]
    fn encode_with_writes_what_encode_into_writes() {
        let mut a = b"before".to_vec();
        let mut b = a.clone();
        encode_into(&mut a, FrameKind::Push, 9, b"the body", 1024).unwrap();
        encode_with(&mut b, FrameKind::Push, 9, 1024, |out| {
            out.extend_from_slice(b"the body");
            Ok(())
        })
        .unwrap();
        assert_eq!(a, b);
        let f = parse_ref(&a[6..]).unwrap();
        assert_eq!(
            (f.kind, f.correlation, f.body),
            (FrameKind::Push, 9, &b"the body"[..])
        );
        // Too large, or a failing body: nothing is left behind.
        let big = encode_with(&mut b, FrameKind::Push, 9, 30, |out| {
            out.extend_from_slice(&[1; 11]);
            Ok(())
        });
        assert!(big.is_err());
        let failed = encode_with(&mut b, FrameKind::Push, 9, 1024, |out| {
            out.push(1);
            Err(Error::Invalid {
                what: "test",
                reason: "no".into(),
            })
        });
        assert!(failed.is_err());
        assert_eq!(a, b);
    }
}
