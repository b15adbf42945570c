//! The body digest of a message handed to a RocketMQ client: MD5 (RFC 1321, RustCrypto's
//! `md-5`) as upper-case hex.
//!
//! Clients check it on every message they decode: the Node.js client cannot decode a message
//! without one, and the Python client marks a message whose digest does not match as
//! corrupted (its push consumers discard those). MD5 is the one type the official clients
//! agree on the text of: their CRC32 checksums differ (decimal in Node.js, zero-padded hex in
//! Python).

/// The MD5 of `data` as upper-case hex, as the clients write it.
pub(crate) fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    use std::fmt::Write;
    Md5::digest(data)
        .iter()
        .fold(String::with_capacity(32), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02X}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::md5_hex;

    #[test]
    fn the_rfc_1321_test_suite() {
        let cases: [(&[u8], &str); 7] = [
            (b"", "D41D8CD98F00B204E9800998ECF8427E"),
            (b"a", "0CC175B9C0F1B6A831C399E269772661"),
            (b"abc", "900150983CD24FB0D6963F7D28E17F72"),
            (b"message digest", "F96B697D7CB7938D525A2F31AAF161D0"),
            (
                b"abcdefghijklmnopqrstuvwxyz",
                "C3FCD3D76192E4007DFB496CCA67E13B",
            ),
            (
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "D174AB98D277D9F5A5611C2C9F419D9F",
            ),
            (
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57EDF4A22BE3C955AC49DA2E2107B67A",
            ),
        ];
        for (data, want) in cases {
            assert_eq!(md5_hex(data), want, "{:?}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn lengths_around_the_block_edges() {
        // Bodies of 55, 56, 63, 64, 65 and 1000 bytes of 'x' (the padding takes one or two blocks).
        let want = [
            (55, "04364420E25C512FD958A70738AA8F72"),
            (56, "668A72D5BA17F08E62DABCAFAD6DB14B"),
            (63, "7DC2CA208106A2F703567BDFF99D8981"),
            (64, "C1BB4F81D892B2D57947682AEB252456"),
            (65, "1BC932052302D074BDEC39795FE00CF6"),
            (1000, "398533D48111E9F664B1F64CB10C4B63"),
        ];
        for (n, digest) in want {
            assert_eq!(md5_hex(&vec![b'x'; n]), digest, "{n} bytes");
        }
    }
}
