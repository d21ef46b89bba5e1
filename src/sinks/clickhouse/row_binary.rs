//! RowBinary encoding of events for the table in `schema.rs`, written by hand so the
//! bytes are ours to test: `tests/clickhouse_rowbinary_decodes_on_current_engine.rs`
//! decodes them with the current ClickHouse engine.
//!
//! RowBinary: columns back to back, no names; `String` (and `LowCardinality(String)`)
//! is a LEB128 length then the bytes; `DateTime64(3)` is an i64 of milliseconds;
//! `DateTime` a u32 of seconds; all little-endian.

use super::schema::Layout;
use crate::event::NormalizedEvent;

/// Appends one row for `event` to `out`.
pub fn encode_row(layout: Layout, source: &str, event: &NormalizedEvent, out: &mut Vec<u8>) {
    put_string(out, event.message_id.as_bytes());
    put_string(out, source.as_bytes());
    put_string(out, event.event_type.as_str().as_bytes());
    put_string(out, event.event_name.as_bytes());
    put_string(out, event.user_id.as_deref().unwrap_or("").as_bytes());
    put_string(out, event.anonymous_id.as_deref().unwrap_or("").as_bytes());
    for time_ms in [event.timestamp_ms, event.received_at_ms] {
        match layout {
            Layout::Modern => out.extend_from_slice(&time_ms.to_le_bytes()),
            Layout::Legacy => {
                let seconds = time_ms.div_euclid(1000).clamp(0, u32::MAX as i64) as u32;
                out.extend_from_slice(&seconds.to_le_bytes());
            }
        }
    }
    put_string(out, &event.json);
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    put_leb128(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leb128_lengths() {
        for (value, expected) in [
            (0u64, vec![0u8]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
        ] {
            let mut out = Vec::new();
            put_leb128(&mut out, value);
            assert_eq!(out, expected, "{value}");
        }
    }

    #[test]
    fn legacy_times_clamp_to_u32_seconds() {
        let event = NormalizedEvent {
            event_type: crate::event::EventType::Page,
            event_name: String::new(),
            timestamp_ms: -5_000,
            received_at_ms: 1_700_000_000_999,
            ..NormalizedEvent::fixture("m", b"{}")
        };
        let mut out = Vec::new();
        encode_row(Layout::Legacy, "web", &event, &mut out);
        // m, web, page, "", "", a = 2+4+5+1+1+2 bytes, then two u32 times.
        let times = &out[15..23];
        assert_eq!(&times[..4], &0u32.to_le_bytes());
        assert_eq!(&times[4..], &1_700_000_000u32.to_le_bytes());
    }
}
