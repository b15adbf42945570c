//! The body digest of a message handed to a RocketMQ client: MD5 (RFC 1321) as upper-case
//! hex.
//!
//! Clients check it on every message they decode: the Node.js client cannot decode a message
//! without one, and the Python client marks a message whose digest does not match as
//! corrupted (its push consumers discard those). MD5 is the one type the official clients
//! agree on the text of: their CRC32 checksums differ (decimal in Node.js, zero-padded hex in
//! Python).

/// Per-round shift amounts.
const S: [u32; 64] = [
    7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9,
    14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10, 15,
    21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
];

/// `floor(abs(sin(i + 1)) * 2^32)`.
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// Mix one 64-byte block into the state.
fn block(state: &mut [u32; 4], chunk: &[u8; 64]) {
    let mut m = [0u32; 16];
    for (w, b) in m.iter_mut().zip(chunk.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    let [mut a, mut b, mut c, mut d] = *state;
    for i in 0..64 {
        let (f, g) = match i / 16 {
            0 => ((b & c) | (!b & d), i),
            1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
            2 => (b ^ c ^ d, (3 * i + 5) % 16),
            _ => (c ^ (b | !d), (7 * i) % 16),
        };
        let f = f.wrapping_add(a).wrapping_add(K[i]).wrapping_add(m[g]);
        a = d;
        d = c;
        c = b;
        b = b.wrapping_add(f.rotate_left(S[i]));
    }
    for (s, v) in state.iter_mut().zip([a, b, c, d]) {
        *s = s.wrapping_add(v);
    }
}

/// The MD5 of `data`.
pub(crate) fn md5(data: &[u8]) -> [u8; 16] {
    let mut state = [0x67452301u32, 0xefcdab89, 0x98badcfe, 0x10325476];
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        let mut buf = [0u8; 64];
        buf.copy_from_slice(c);
        block(&mut state, &buf);
    }
    // The rest, a 1 bit, zeros, and the length in bits: one or two more blocks.
    let rest = chunks.remainder();
    let mut tail = [0u8; 128];
    tail[..rest.len()].copy_from_slice(rest);
    tail[rest.len()] = 0x80;
    let tail_len = if rest.len() < 56 { 64 } else { 128 };
    let bits = (data.len() as u64).wrapping_mul(8);
    tail[tail_len - 8..tail_len].copy_from_slice(&bits.to_le_bytes());
    for c in tail[..tail_len].chunks_exact(64) {
        let mut buf = [0u8; 64];
        buf.copy_from_slice(c);
        block(&mut state, &buf);
    }
    let mut out = [0u8; 16];
    for (o, s) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// The MD5 of `data` as upper-case hex, as the clients write it.
pub(crate) fn md5_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    md5(data)
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
