//! Any bytes as a spool record (a damaged disk, a bad sector): decoding answers
//! with the batch or `CorruptRecord`, never a panic; what decodes re-encodes to a
//! record that decodes to the same batch.
#![no_main]

use breakwater::spool::record::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((created_at_ms, batch)) = decode(data) {
        let again = encode(&batch, created_at_ms);
        let (created_again, batch_again) = decode(&again).expect("a re-encoded record decodes");
        assert_eq!(created_again, created_at_ms);
        assert_eq!(batch_again.events.len(), batch.events.len());
        assert_eq!(encode(&batch_again, created_again), again);
    }
});
