//! From HTTP body to JSON bytes: content-type and encoding checks, a size-capped
//! read with a deadline, and gzip inflation that stops at the cap instead of
//! allocating whatever a hostile body claims to inflate to.

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::IntakeError;
use crate::pipeline::budget::HELD_PER_BODY_BYTE;

/// How the body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    Identity,
    Gzip,
}

/// Segment's browser SDK sends JSON as `text/plain` to avoid CORS preflights, so
/// both are JSON here. A missing content type is tolerated (some HTTP clients omit it).
pub fn check_content_type(headers: &HeaderMap) -> Result<(), IntakeError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("<not ascii>");
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "text/plain" | "" => Ok(()),
        _ => Err(IntakeError::UnsupportedMediaType(truncate_for_message(text))),
    }
}

/// The room a request may need in the memory budget before its body is read: its
/// declared length (the body limit when it declares none), or the body limit when
/// compressed (it may decompress to that), times what parsing and normalizing add.
pub fn budget_for_body(headers: &HeaderMap, encoding: ContentEncoding, max_request_bytes: usize) -> u64 {
    let max = max_request_bytes as u64;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok())
        .map_or(max, |length| length.min(max));
    let decompressed = match encoding {
        ContentEncoding::Identity => declared,
        ContentEncoding::Gzip => max,
    };
    decompressed * HELD_PER_BODY_BYTE
}

pub fn content_encoding(headers: &HeaderMap) -> Result<ContentEncoding, IntakeError> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(ContentEncoding::Identity);
    };
    let text = value.to_str().unwrap_or("<not ascii>");
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(ContentEncoding::Identity),
        "gzip" | "x-gzip" => Ok(ContentEncoding::Gzip),
        _ => Err(IntakeError::UnsupportedEncoding(truncate_for_message(text))),
    }
}

/// Reads at most `max_bytes` of body within `timeout`.
pub async fn read_body(body: Body, max_bytes: usize, timeout: Duration) -> Result<Bytes, IntakeError> {
    let collect = Limited::new(body, max_bytes).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_elapsed) => Err(IntakeError::BodyReadTimeout(timeout.as_millis() as u64)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(IntakeError::BodyTooLarge { limit: max_bytes })
        }
        Ok(Err(error)) => Err(IntakeError::BodyRead(error.to_string())),
    }
}

/// Returns the body as plain JSON bytes, inflating gzip. Inflation reads at most
/// `max_bytes + 1` bytes, so a gzip bomb costs at most `max_bytes` of memory.
pub fn decompress(raw: Bytes, encoding: ContentEncoding, max_bytes: usize) -> Result<Bytes, IntakeError> {
    match encoding {
        ContentEncoding::Identity => Ok(raw),
        ContentEncoding::Gzip => {
            let mut inflated = Vec::with_capacity((raw.len() * 4).min(max_bytes + 1));
            MultiGzDecoder::new(&raw[..])
                .take(max_bytes as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| IntakeError::InvalidGzip(e.to_string()))?;
            if inflated.len() > max_bytes {
                return Err(IntakeError::BodyTooLarge { limit: max_bytes });
            }
            Ok(Bytes::from(inflated))
        }
    }
}

fn truncate_for_message(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Bytes {
        let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        Bytes::from(encoder.finish().unwrap())
    }

    #[test]
    fn gzip_round_trips() {
        let body = decompress(gzip(b"{\"a\":1}"), ContentEncoding::Gzip, 100).unwrap();
        assert_eq!(&body[..], b"{\"a\":1}");
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_cap() {
        let bomb = gzip(&vec![b' '; 50 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024);
        let err = decompress(bomb, ContentEncoding::Gzip, 500 * 1024).unwrap_err();
        assert!(matches!(err, IntakeError::BodyTooLarge { limit: 512000 }));
    }

    #[test]
    fn truncated_gzip_is_a_client_error() {
        let whole = gzip(&[b'x'; 10_000]);
        let cut = whole.slice(..whole.len() / 2);
        assert!(matches!(
            decompress(cut, ContentEncoding::Gzip, 100_000),
            Err(IntakeError::InvalidGzip(_))
        ));
    }

    #[test]
    fn content_types() {
        let mut headers = HeaderMap::new();
        assert!(check_content_type(&headers).is_ok());
        headers.insert(header::CONTENT_TYPE, "text/plain;charset=UTF-8".parse().unwrap());
        assert!(check_content_type(&headers).is_ok());
        headers.insert(header::CONTENT_TYPE, "application/xml".parse().unwrap());
        assert!(matches!(
            check_content_type(&headers),
            Err(IntakeError::UnsupportedMediaType(_))
        ));
    }

    #[test]
    fn encodings() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_encoding(&headers).unwrap(), ContentEncoding::Identity);
        headers.insert(header::CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(content_encoding(&headers).unwrap(), ContentEncoding::Gzip);
        headers.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert!(matches!(
            content_encoding(&headers),
            Err(IntakeError::UnsupportedEncoding(_))
        ));
    }
}
