//! The frame every byte of this crate is written in, on disk and on the peer socket.
//!
//! Raft log segments, the snapshot journal, the small state files and the peer protocol
//! are all sequences of:
//!
//! ```text
//! byte  size  field
//!    0     4  body_len   u32 LE
//!    4     4  crc32      u32 LE, CRC-32 of the body
//!    8        body       bincode of the value (`halfmq_types::codec`)
//! ```
//!
//! A body is at most [`BODY_BYTES_MAX`] bytes; a longer length is refused before anything
//! is allocated. On disk, a zero length ends the data (files are never preallocated here,
//! but a torn write may leave zeros), and a frame cut short or failing its CRC is a torn
//! tail when nothing valid follows it.

use halfmq_types::codec;
use halfmq_types::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes before the body.
pub const HEADER_BYTES: usize = 8;
/// Largest body: the largest value `halfmq_types::codec` decodes.
pub const BODY_BYTES_MAX: usize = codec::DECODE_BYTES_MAX;

/// Encode `value` as one whole frame.
pub fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode_into(value, &mut out, what)?;
    Ok(out)
}

/// Append one whole frame of `value` to `out` and return its length. Encoding straight into
/// a buffer the caller keeps spares a fresh buffer per frame, its growth and a copy (the raft
/// log's appends, the journal's, the peer socket's). On an error `out` is as it was.
pub fn encode_into<T: Serialize>(
    value: &T,
    out: &mut Vec<u8>,
    what: &'static str,
) -> Result<usize> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_BYTES]);
    if let Err(e) = codec::encode_append(value, out, what) {
        out.truncate(start);
        return Err(e);
    }
    let body = start + HEADER_BYTES;
    let body_len = out.len() - body;
    if body_len > BODY_BYTES_MAX {
        out.truncate(start);
        return Err(Error::Invalid {
            what,
            reason: format!("{body_len} bytes encoded, more than a frame's {BODY_BYTES_MAX}"),
        });
    }
    let crc = crc32fast::hash(&out[body..]);
    // body_len <= BODY_BYTES_MAX (16 MiB), checked above: it fits in a u32.
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..body].copy_from_slice(&crc.to_le_bytes());
    Ok(out.len() - start)
}

/// What the bytes at the start of a buffer are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// A whole frame whose CRC matches: its body is `buf[HEADER_BYTES..len]`.
    Frame {
        /// Bytes of the whole frame.
        len: usize,
    },
    /// Nothing more: the buffer is empty or starts with a zero length.
    End,
    /// Fewer bytes than the frame says it has.
    Short,
    /// A length over the limit, or a CRC that does not match.
    Bad(String),
}

/// Look at the frame at the start of `buf`.
pub fn scan(buf: &[u8]) -> Scan {
    if buf.is_empty() {
        return Scan::End;
    }
    if buf.len() < HEADER_BYTES {
        return Scan::Short;
    }
    let body_len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if body_len == 0 && crc == 0 {
        return Scan::End;
    }
    if body_len > BODY_BYTES_MAX {
        return Scan::Bad(format!("frame length {body_len} over {BODY_BYTES_MAX}"));
    }
    let len = HEADER_BYTES + body_len;
    if buf.len() < len {
        return Scan::Short;
    }
    if crc32fast::hash(&buf[HEADER_BYTES..len]) != crc {
        return Scan::Bad("frame CRC mismatch".to_owned());
    }
    Scan::Frame { len }
}

/// Decode the body of a frame `scan` accepted.
pub fn decode<T: DeserializeOwned>(frame: &[u8], what: &'static str) -> Result<T> {
    codec::decode(&frame[HEADER_BYTES.min(frame.len())..], what)
}

/// Read one frame from a socket and decode it; `Ok(None)` at a clean end of stream before
/// a frame starts.
pub async fn read<R, T>(r: &mut R, what: &'static str) -> Result<Option<T>>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_at_most(r, BODY_BYTES_MAX, what).await
}

/// [`read`] with a smaller limit on the body, refused before anything is allocated (a
/// peer's first frame, before it has shown the cluster's token).
pub async fn read_at_most<R, T>(r: &mut R, body_max: usize, what: &'static str) -> Result<Option<T>>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_into(r, body_max, &mut Vec::new(), what).await
}

/// [`read`] into `body`, a buffer the caller keeps from one frame to the next (a
/// connection's requests), so that each frame is not read into fresh memory.
pub async fn read_with<R, T>(r: &mut R, body: &mut Vec<u8>, what: &'static str) -> Result<Option<T>>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_into(r, BODY_BYTES_MAX, body, what).await
}

/// Largest buffer a caller of [`encode_into`] or [`read_with`] keeps for the next frame:
/// above it (a large snapshot chunk or append), the memory is given back.
pub const BUF_BYTES_KEEP: usize = 4 << 20;

async fn read_into<R, T>(
    r: &mut R,
    body_max: usize,
    body: &mut Vec<u8>,
    what: &'static str,
) -> Result<Option<T>>
where
    R: tokio::io::AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut head = [0u8; HEADER_BYTES];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io("peer socket", "read", e)),
    }
    let body_len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let max = body_max.min(BODY_BYTES_MAX);
    if body_len > max {
        return Err(Error::Decode {
            what,
            reason: format!("frame length {body_len} over {max}"),
        });
    }
    body.clear();
    body.resize(body_len, 0);
    r.read_exact(body)
        .await
        .map_err(|e| Error::io("peer socket", "read", e))?;
    if crc32fast::hash(body) != crc {
        return Err(Error::Decode {
            what,
            reason: "frame CRC mismatch".to_owned(),
        });
    }
    codec::decode(body, what).map(Some)
}

/// Encode `value` and write it as one frame.
pub async fn write<W, T>(w: &mut W, value: &T, what: &'static str) -> Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(value, what)?;
    w.write_all(&bytes)
        .await
        .map_err(|e| Error::io("peer socket", "write", e))?;
    w.flush()
        .await
        .map_err(|e| Error::io("peer socket", "flush", e))
}

/// Replace `dir/name` with one frame of `value`, durably: written to `name.tmp`, synced,
/// renamed over `name`, and the directory synced. A crash leaves the old file or the new
/// one, never a mix.
pub fn write_atomic<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    what: &'static str,
) -> Result<()> {
    let bytes = encode(value, what)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::io(p, op, e)
    };
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
    sync_dir(dir)
}

/// The value in a file [`write_atomic`] wrote; `Ok(None)` if there is no such file.
pub fn read_file<T: DeserializeOwned>(path: &Path, what: &'static str) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "read", e)),
    };
    match scan(&bytes) {
        Scan::Frame { len } if len == bytes.len() => decode(&bytes, what).map(Some),
        other => Err(Error::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("{what}: not one whole frame ({other:?})"),
        }),
    }
}

/// fsync a directory, so that the files created, renamed or removed in it stay so.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "fsync directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_scans_back_and_damage_is_seen() {
        let f = encode(&("abc".to_owned(), 7u64), "test").unwrap();
        assert_eq!(scan(&f), Scan::Frame { len: f.len() });
        let back: (String, u64) = decode(&f, "test").unwrap();
        assert_eq!(back, ("abc".to_owned(), 7));
        assert_eq!(scan(&f[..f.len() - 1]), Scan::Short);
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(scan(&bad), Scan::Bad(_)));
        assert_eq!(scan(&[0u8; 16]), Scan::End);
        let mut huge = f;
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(scan(&huge), Scan::Bad(_)));
    }

    #[test]
    fn frames_encoded_into_one_buffer_are_the_frames_encoded_alone() {
        let (a, b) = (("abc".to_owned(), 7u64), ("defgh".to_owned(), 1u64 << 40));
        let mut buf = vec![9u8; 3];
        let la = encode_into(&a, &mut buf, "test").unwrap();
        let lb = encode_into(&b, &mut buf, "test").unwrap();
        let (fa, fb) = (encode(&a, "test").unwrap(), encode(&b, "test").unwrap());
        assert_eq!((la, lb), (fa.len(), fb.len()));
        assert_eq!(&buf[..3], &[9, 9, 9]);
        assert_eq!(&buf[3..3 + la], &fa[..]);
        assert_eq!(&buf[3 + la..], &fb[..]);
        assert_eq!(scan(&buf[3..]), Scan::Frame { len: la });
    }

    #[test]
    fn a_body_as_bytes_is_encoded_as_the_plain_vec_was() {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Plain {
            key: String,
            body: Vec<u8>,
            properties: Vec<(String, String)>,
        }
        let m = crate::MessageData {
            key: "k".into(),
            body: (0..=255u8).cycle().take(3000).collect(),
            properties: vec![("a".into(), "b".into())],
        };
        let plain = Plain {
            key: m.key.clone(),
            body: m.body.clone(),
            properties: m.properties.clone(),
        };
        let (new, old) = (encode(&m, "m").unwrap(), encode(&plain, "p").unwrap());
        assert_eq!(new, old);
        assert_eq!(decode::<crate::MessageData>(&old, "m").unwrap(), m);
        assert_eq!(decode::<Plain>(&new, "p").unwrap(), plain);
    }
}
