//! Any bytes as a spool record (a damaged disk, a bad sector): decoding answers
//! with the batch or `CorruptRecord`, never a panic; what decodes re-encodes to a
//! record that decodes to the same batch. A checksum guards every record, which
//! random bytes almost never pass; so the first byte can also ask for the rest to
//! be framed as a plain (`BWS1`) or compressed (`BWS2`) record with a correct
//! checksum, to reach the body decoder and the LZ4 decoder behind it.
#![no_main]

use breakwater::spool::record::{decode, encode};
use libfuzzer_sys::fuzz_target;

fn framed(magic: &[u8; 4], stored: &[u8]) -> Vec<u8> {
    let mut record = magic.to_vec();
    record.extend_from_slice(&crc32fast::hash(stored).to_le_bytes());
    record.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    record.extend_from_slice(stored);
    record
}

fuzz_target!(|data: &[u8]| {
    let record = match data.split_first() {
        Some((0, stored)) => framed(b"BWS1", stored),
        Some((1, stored)) => framed(b"BWS2", stored),
        _ => data.to_vec(),
    };
    if let Ok((created_at_ms, batch)) = decode(&record) {
        let again = encode(&batch, created_at_ms);
        let (created_again, batch_again) = decode(&again).expect("a re-encoded record decodes");
        assert_eq!(created_again, created_at_ms);
        assert_eq!(batch_again.events.len(), batch.events.len());
        assert_eq!(encode(&batch_again, created_again), again);
    }
});
