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
