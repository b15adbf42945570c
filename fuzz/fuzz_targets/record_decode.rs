//! Record decoding never panics on any bytes, and whatever it accepts encodes back to
//! exactly the same bytes.
#![no_main]

use halfmq_store::record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = record::check_len(data);
    if let Ok((view, len)) = record::decode(data) {
        assert!(len <= data.len());
        let mut again = Vec::new();
        let n = record::encode_into(&mut again, &view.header, view.topic, view.key, view.props, view.body)
            .expect("a decoded record is encodable");
        assert_eq!(n as usize, len);
        assert_eq!(&again[..], &data[..len], "decode/encode round trip changed the bytes");
        let _ = view.properties();
    }
});
