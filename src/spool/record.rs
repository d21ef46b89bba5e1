//! The on-disk form of one spooled batch: a checksummed, versioned binary record.
//!
//! ```text
//! magic "BWS1" | crc32 of body (u32 LE) | body length (u32 LE) | body
//! magic "BWS2" | crc32 of stored (u32 LE) | stored length (u32 LE) | stored
//!   stored: body length (u32 LE) | body compressed as one LZ4 block
//! body: created_at_ms i64 | source str | event count u32 | events
//! event: message_id str | type u8 | user_id opt-str | anonymous_id opt-str
//!        | event_name str | timestamp_ms i64 | received_at_ms i64 | json bytes
//! str/bytes: u32 LE length + bytes; opt-str: u8 0|1 then str
//! ```
//!
//! Records are written compressed (`BWS2`) unless compression would not make them
//! smaller; both forms are read. Analytics events compress well (field names,
//! library context and timestamps repeat within a batch), so the spool holds
//! several times more events per byte and writes that many fewer bytes.

use std::sync::Arc;

use crate::event::{EventType, NormalizedEvent, SinkBatch};

/// A record whose body is stored as it is.
const PLAIN: &[u8; 4] = b"BWS1";
/// A record whose body is stored LZ4-compressed.
const COMPRESSED: &[u8; 4] = b"BWS2";
const HEADER_BYTES: usize = 12;
/// LZ4 cannot expand data more than about 255-fold; a length claiming more is corrupt.
const MAX_LZ4_EXPANSION: usize = 255;

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

/// The most bytes `encode` can produce for the batch (the size of its plain record),
/// for holding room in the spool before encoding.
pub fn max_encoded_len(batch: &SinkBatch) -> usize {
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

/// The batch as a record: compressed, or plain when compression does not pay.
pub fn encode(batch: &SinkBatch, created_at_ms: i64) -> Vec<u8> {
    let plain = encode_plain(batch, created_at_ms);
    let body = &plain[HEADER_BYTES..];
    let mut out = vec![0; HEADER_BYTES + 4 + lz4_flex::block::get_maximum_output_size(body.len())];
    let Ok(compressed_len) = lz4_flex::block::compress_into(body, &mut out[HEADER_BYTES + 4..]) else {
        return plain;
    };
    let stored_len = 4 + compressed_len;
    if HEADER_BYTES + stored_len >= plain.len() {
        return plain;
    }
    out.truncate(HEADER_BYTES + stored_len);
    out[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&(body.len() as u32).to_le_bytes());
    out[..4].copy_from_slice(COMPRESSED);
    seal(&mut out);
    out
}

fn encode_plain(batch: &SinkBatch, created_at_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(max_encoded_len(batch));
    out.extend_from_slice(PLAIN);
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
    seal(&mut out);
    out
}

/// Fills in the header's checksum and length of what follows the header.
fn seal(record: &mut [u8]) {
    let stored = &record[HEADER_BYTES..];
    let (crc, len) = (crc32fast::hash(stored), stored.len() as u32);
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    record[8..12].copy_from_slice(&len.to_le_bytes());
}

/// Reads a record back: its creation time and its batch.
pub fn decode(bytes: &[u8]) -> Result<(i64, SinkBatch), CorruptRecord> {
    if bytes.len() < HEADER_BYTES {
        return Err(CorruptRecord::Header);
    }
    let compressed = match &bytes[..4] {
        magic if magic == PLAIN => false,
        magic if magic == COMPRESSED => true,
        _ => return Err(CorruptRecord::Header),
    };
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let stored_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let stored = &bytes[HEADER_BYTES..];
    if stored.len() != stored_len {
        return Err(CorruptRecord::Body("length does not match the header"));
    }
    if crc32fast::hash(stored) != crc {
        return Err(CorruptRecord::Checksum);
    }
    let decompressed;
    let body = if compressed {
        decompressed = decompress(stored)?;
        &decompressed[..]
    } else {
        stored
    };
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
    Ok((created_at_ms, SinkBatch::new(source, events)))
}

/// `body length | LZ4 block` back to the body.
fn decompress(stored: &[u8]) -> Result<Vec<u8>, CorruptRecord> {
    let mut reader = Reader { bytes: stored };
    let body_len = reader.u32()? as usize;
    let block = reader.bytes;
    if body_len > block.len().saturating_mul(MAX_LZ4_EXPANSION) {
        return Err(CorruptRecord::Body("compressed length out of range"));
    }
    let mut body = vec![0; body_len];
    match lz4_flex::block::decompress_into(block, &mut body) {
        Ok(written) if written == body_len => Ok(body),
        _ => Err(CorruptRecord::Body("compressed body does not decompress")),
    }
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
        SinkBatch::new(
            Arc::from("web"),
            (0..events)
                .map(|i| NormalizedEvent {
                    event_type: EventType::ALL[i % 6],
                    user_id: (i % 2 == 0).then(|| format!("u-{i}")),
                    event_name: "Clicked ü".into(),
                    timestamp_ms: -5 + i as i64,
                    received_at_ms: 1_700_000_000_000,
                    ..NormalizedEvent::fixture(&format!("m-{i}"), format!("{{\"i\":{i}}}").as_bytes())
                })
                .collect(),
        )
    }

    fn assert_round_trip(bytes: &[u8], batch: &SinkBatch, created_at_ms: i64) {
        let (created, back) = decode(bytes).unwrap();
        assert_eq!(created, created_at_ms);
        assert_eq!(back.source, batch.source);
        assert_eq!(format!("{:?}", back.events), format!("{:?}", batch.events));
    }

    #[test]
    fn plain_records_have_the_exact_announced_length_and_still_decode() {
        let batch = sample(7);
        let plain = encode_plain(&batch, 42);
        assert_eq!(&plain[..4], PLAIN);
        assert_eq!(plain.len(), max_encoded_len(&batch));
        assert_round_trip(&plain, &batch, 42);
    }

    #[test]
    fn repetitive_batches_are_stored_compressed_and_round_trip() {
        let batch = sample(100);
        let bytes = encode(&batch, 42);
        assert_eq!(&bytes[..4], COMPRESSED);
        assert!(
            bytes.len() * 3 < max_encoded_len(&batch),
            "{} of {}",
            bytes.len(),
            max_encoded_len(&batch)
        );
        assert_round_trip(&bytes, &batch, 42);
    }

    #[test]
    fn incompressible_batches_are_stored_plain() {
        let mut batch = sample(1);
        // A xorshift stream: nothing for LZ4 to find.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        batch.events[0].json = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let bytes = encode(&batch, 1);
        assert_eq!(&bytes[..4], PLAIN);
        assert!(bytes.len() <= max_encoded_len(&batch));
        assert_round_trip(&bytes, &batch, 1);
    }

    #[test]
    fn any_flipped_bit_or_cut_is_detected() {
        for bytes in [encode_plain(&sample(3), 1), encode(&sample(30), 1)] {
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

    #[test]
    fn a_compressed_length_beyond_what_lz4_can_produce_is_corrupt() {
        let mut record = Vec::from(&COMPRESSED[..]);
        record.extend_from_slice(&[0; 8]);
        record.extend_from_slice(&u32::MAX.to_le_bytes());
        record.extend_from_slice(&[0x10, b'x']);
        seal(&mut record);
        assert_eq!(
            decode(&record).unwrap_err(),
            CorruptRecord::Body("compressed length out of range")
        );
    }
}
