//! Any text frame: reading its head (id, batch or not) and then ingesting it as the
//! WebSocket handler does (the same parsing and normalization as HTTP) never panics.
#![no_main]

use breakwater::intake::websocket::frame_head;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    // The WebSocket layer hands over text frames only (it refuses invalid UTF-8).
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (_id, kind) = frame_head(text);
    common::parse_and_normalize(text.as_bytes(), kind);
});
