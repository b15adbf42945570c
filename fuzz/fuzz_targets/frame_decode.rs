//! Frame checking and parsing, and decoding any body as every protocol message, never
//! panic, never allocate past the limits, and accepted frames re-encode identically.
#![no_main]

use halfmq_client::frame::{self, FRAME_BYTES_MAX_DEFAULT};
use halfmq_client::protocol::{self, Push, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(len)) = frame::check(rest, FRAME_BYTES_MAX_DEFAULT) {
        if let Ok(f) = frame::parse(&rest[..len]) {
            let mut again = Vec::new();
            frame::encode_into(&mut again, f.kind, f.correlation, &f.body, FRAME_BYTES_MAX_DEFAULT)
                .expect("a parsed frame is encodable");
            assert_eq!(&again[..], &rest[..len]);
            let _ = protocol::decode::<Request>(&f.body);
            let _ = protocol::decode::<Response>(&f.body);
            let _ = protocol::decode::<Push>(&f.body);
        }
        rest = &rest[len..];
    }
    // Bodies on their own, too: most random bytes never get past the CRC.
    let _ = protocol::decode::<Request>(data);
    let _ = protocol::decode::<Response>(data);
});
