//! The one place bincode is used, so that replacing it is a one-file change.
//!
//! Every decode has a size limit: bincode trusts length prefixes and would otherwise try to
//! allocate whatever a damaged or hostile input claims.

use crate::error::{Error, Result};

/// Largest value any decode here will build.
pub const DECODE_BYTES_MAX: usize = 16 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encode a value.
pub fn encode<T: serde::Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Decode {
        what,
        reason: format!("encode: {e}"),
    })
}

/// Encode a value at the end of `out` (no buffer of its own). On error `out` may hold part
/// of the value: the caller truncates it.
pub fn encode_append<T: serde::Serialize>(
    value: &T,
    out: &mut Vec<u8>,
    what: &'static str,
) -> Result<()> {
    bincode::serde::encode_into_std_write(value, out, config())
        .map(|_| ())
        .map_err(|e| Error::Decode {
            what,
            reason: format!("encode: {e}"),
        })
}

/// Decode a value that must fill `bytes` exactly.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T> {
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(bytes, config()).map_err(|e| Error::Decode {
            what,
            reason: e.to_string(),
        })?;
    if used != bytes.len() {
        return Err(Error::Decode {
            what,
            reason: format!("{} trailing bytes after the value", bytes.len() - used),
        });
    }
    Ok(value)
}

/// A `Vec<u8>` field as serde bytes (`#[serde(with = "halfmq_types::codec::bytes")]`). In
/// bincode these are the very bytes a `Vec<u8>` sequence gives (a varint length, then the
/// bytes: a `u8` is always one byte), so an encoding is unchanged; but they are copied at
/// once instead of element by element through the sequence visitor (the largest user-space
/// cost of a `Send` on the broker, and of decoding a raft entry). Formats that write bytes
/// as a sequence (serde_json: an array of numbers) are unchanged too, and a sequence is
/// still accepted when reading.
pub mod bytes {
    use serde::de::{SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    /// Serialize `body` as bytes.
    pub fn serialize<S: Serializer>(body: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(body)
    }

    /// Deserialize bytes, or a sequence of `u8`. Asked for as borrowed bytes: bincode then
    /// hands out the input's own slice, copied once into a buffer of exactly its length;
    /// asked for an owned buffer it zero-fills a new one and then copies into it (a second
    /// pass over every body decoded). Decoders that cannot lend their input hand over a
    /// buffer of their own, as before.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from the input: trust it only up to a small size.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Body {
        #[serde(with = "bytes")]
        body: Vec<u8>,
        tail: u32,
    }

    /// Bodies decode to the bytes encoded, from a slice (borrowed) and from a reader (owned),
    /// and their encoding is that of a plain `Vec<u8>`.
    #[test]
    fn bodies_decode_from_slices_and_readers() {
        for len in [0usize, 1, 250, 251, 1024, 70_000] {
            let v = Body {
                body: (0..len).map(|i| (i % 251) as u8).collect(),
                tail: 7,
            };
            let enc = encode(&v, "test").unwrap();
            assert_eq!(enc, encode(&(&v.body, 7u32), "test").unwrap(), "len {len}");
            assert_eq!(decode::<Body>(&enc, "test").unwrap(), v, "len {len}");
            let owned: Body =
                bincode::serde::decode_from_std_read(&mut enc.as_slice(), config()).unwrap();
            assert_eq!(owned, v, "len {len}");
            // A length past the input is an error, not a panic or a huge allocation.
            assert!(decode::<Body>(&enc[..enc.len() - 2], "test").is_err());
        }
    }
}
