//! The on-disk form of one spooled batch: a checksummed, versioned binary record.
//!
//! ```text
//! magic "BWS1" | crc32 of body (u32 LE) | body length (u32 LE) | body
//! body: created_at_ms i64 | source str | event count u32 | events
//! event: message_id str | type u8 | user_id opt-str | anonymous_id opt-str
//!        | event_name str | timestamp_ms i64 | received_at_ms i64 | json bytes
//! str/bytes: u32 LE length + bytes; opt-str: u8 0|1 then str
//! ```

use std::sync::Arc;

use crate::intake::segment::{EventType, NormalizedEvent};
use crate::sinks::SinkBatch;

const MAGIC: &[u8; 4] = b"BWS1";
const HEADER_BYTES: usize = 12;

/// Why a stored record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptRecord {
    #[error("record too short or wrong magic")]
    Header,
    #[error("checksum mismatch")]
    Checksum,
    #[error("malformed body: {0}")]
    Body(&'static str),
}

/// Exact size `encode` will produce, for spool accounting before encoding.
pub fn encoded_len(batch: &SinkBatch) -> usize {
    let events: usize = batch
        .events
        .iter()
        .map(|e| {
            4 + e.message_id.len()
                + 1
                + opt_len(&e.user_id)
                + opt_len(&e.anonymous_id)
                + 4
                + e.event_name.len()
                + 16
                + 4
                + e.json.len()
        })
        .sum();
    HEADER_BYTES + 8 + 4 + batch.source.len() + 4 + events
}

fn opt_len(value: &Option<String>) -> usize {
    1 + value.as_ref().map_or(0, |v| 4 + v.len())
}

pub fn encode(batch: &SinkBatch, created_at_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(batch));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&created_at_ms.to_le_bytes());
    put_bytes(&mut out, batch.source.as_bytes());
    out.extend_from_slice(&(batch.events.len() as u32).to_le_bytes());
    for event in &batch.events {
        put_bytes(&mut out, event.message_id.as_bytes());
        out.push(event_type_code(event.event_type));
        put_opt(&mut out, &event.user_id);
        put_opt(&mut out, &event.anonymous_id);
        put_bytes(&mut out, event.event_name.as_bytes());
        out.extend_from_slice(&event.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&event.received_at_ms.to_le_bytes());
        put_bytes(&mut out, &event.json);
    }
    let body_len = (out.len() - HEADER_BYTES) as u32;
    let crc = crc32fast::hash(&out[HEADER_BYTES..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out[8..12].copy_from_slice(&body_len.to_le_bytes());
    out
}

/// Reads a record back: its creation time and its batch.
pub fn decode(bytes: &[u8]) -> Result<(i64, SinkBatch), CorruptRecord> {
    if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
        return Err(CorruptRecord::Header);
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let body_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let body = &bytes[HEADER_BYTES..];
    if body.len() != body_len {
        return Err(CorruptRecord::Body("length does not match the header"));
    }
    if crc32fast::hash(body) != crc {
        return Err(CorruptRecord::Checksum);
    }
    let mut reader = Reader { bytes: body };
    let created_at_ms = reader.i64()?;
    let source: Arc<str> = Arc::from(reader.string()?);
    let count = reader.u32()? as usize;
    let mut events = Vec::with_capacity(count.min(100_000));
    for _ in 0..count {
        let message_id = reader.string()?;
        let event_type = event_type_from(reader.u8()?)?;
        let user_id = reader.opt_string()?;
        let anonymous_id = reader.opt_string()?;
        let event_name = reader.string()?;
        let timestamp_ms = reader.i64()?;
        let received_at_ms = reader.i64()?;
        let json = reader.bytes()?.to_vec();
        events.push(NormalizedEvent {
            message_id,
            event_type,
            user_id,
            anonymous_id,
            event_name,
            timestamp_ms,
            received_at_ms,
            json,
        });
    }
    if !reader.bytes.is_empty() {
        return Err(CorruptRecord::Body("trailing bytes"));
    }
    Ok((created_at_ms, SinkBatch { source, events }))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, value: &Option<String>) {
    match value {
        Some(value) => {
            out.push(1);
            put_bytes(out, value.as_bytes());
        }
        None => out.push(0),
    }
}

fn event_type_code(event_type: EventType) -> u8 {
    EventType::ALL.iter().position(|t| *t == event_type).expect("listed") as u8
}

fn event_type_from(code: u8) -> Result<EventType, CorruptRecord> {
    EventType::ALL
        .get(code as usize)
        .copied()
        .ok_or(CorruptRecord::Body("unknown event type"))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CorruptRecord> {
        if self.bytes.len() < n {
            return Err(CorruptRecord::Body("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, CorruptRecord> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CorruptRecord> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i64(&mut self) -> Result<i64, CorruptRecord> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], CorruptRecord> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn string(&mut self) -> Result<String, CorruptRecord> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| CorruptRecord::Body("invalid UTF-8"))
    }
    fn opt_string(&mut self) -> Result<Option<String>, CorruptRecord> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            _ => Err(CorruptRecord::Body("bad option flag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample(events: usize) -> SinkBatch {
        SinkBatch {
            source: Arc::from("web"),
            events: (0..events)
                .map(|i| NormalizedEvent {
                    message_id: format!("m-{i}"),
                    event_type: EventType::ALL[i % 6],
                    user_id: (i % 2 == 0).then(|| format!("u-{i}")),
                    anonymous_id: Some("a".into()),
                    event_name: "Clicked ü".into(),
                    timestamp_ms: -5 + i as i64,
                    received_at_ms: 1_700_000_000_000,
                    json: format!("{{\"i\":{i}}}").into_bytes(),
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip_and_exact_length() {
        let batch = sample(7);
        let bytes = encode(&batch, 42);
        assert_eq!(bytes.len(), encoded_len(&batch));
        let (created, back) = decode(&bytes).unwrap();
        assert_eq!(created, 42);
        assert_eq!(back.source, batch.source);
        assert_eq!(format!("{:?}", back.events), format!("{:?}", batch.events));
    }

    #[test]
    fn any_flipped_bit_or_cut_is_detected() {
        let bytes = encode(&sample(3), 1);
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x10;
            assert!(decode(&damaged).is_err(), "flip at {position} went unnoticed");
        }
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} went unnoticed");
        }
    }
}
