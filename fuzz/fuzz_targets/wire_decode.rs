//! The control-protocol decoder on arbitrary bytes: never panics, and whatever decodes
//! re-encodes to a message of the same length.
#![no_main]

use cluster_proto::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match Message::decode(&data[at..]) {
            Ok(Some((m, n))) => {
                assert!(n > 0 && at + n <= data.len());
                assert_eq!(m.to_bytes().len(), n);
                at += n;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
