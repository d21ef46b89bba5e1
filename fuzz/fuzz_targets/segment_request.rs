//! Any body on any Segment route: parsing (single and batch) and normalization
//! answer with a result, never a panic; what they accept is valid JSON.
#![no_main]

use breakwater::event::EventType;
use breakwater::intake::RouteKind;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let kind = match selector % 8 {
        0 => RouteKind::Batch,
        1 => RouteKind::Event,
        n => RouteKind::Single(EventType::ALL[(n - 2) as usize]),
    };
    common::parse_and_normalize(body, kind);
});
