//! Any bytes as a gzip body: decompression stops at the limit (a bomb is refused,
//! not inflated) and answers with a result, never a panic.
#![no_main]

use breakwater::intake::decode::{decompress, ContentEncoding};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Ok(inflated) = decompress(bytes::Bytes::copy_from_slice(data), ContentEncoding::Gzip, LIMIT) {
        assert!(inflated.len() <= LIMIT, "inflated past the limit: {}", inflated.len());
    }
});
