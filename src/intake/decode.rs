//! From HTTP body to JSON bytes: content-type and encoding checks, a size-capped
//! read with a deadline, and decompression (gzip, deflate, brotli) that stops at the
//! cap instead of allocating whatever a hostile body claims to inflate to.
//!
//! Liberal in what it reads, as the reference servers are: a body is JSON if it
//! parses as JSON, whatever common label it carries (SDKs label JSON `text/plain`
//! to avoid a CORS preflight, or form-urlencoded by accident); anything else is
//! refused with the labels that are accepted.

use std::io::Read;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::IntakeError;
use crate::pipeline::budget::HELD_PER_BODY_BYTE;

/// How the body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    Identity,
    Gzip,
    /// HTTP's `deflate`: zlib-wrapped, or raw deflate as some clients send it.
    Deflate,
    Brotli,
}

/// The content types read as JSON (with any parameters), and no content type at
/// all. Named in the 415 answer.
pub const ACCEPTED_CONTENT_TYPES: &[&str] = &["application/json", "text/plain", "application/x-www-form-urlencoded"];

/// The content encodings read, named in the 415 answer.
pub const ACCEPTED_ENCODINGS: &[&str] = &["gzip", "deflate", "br", "identity"];

/// Every accepted label (`ACCEPTED_CONTENT_TYPES`), `application/*+json`, and none:
/// the body is JSON if it parses as JSON.
pub fn check_content_type(headers: &HeaderMap) -> Result<(), IntakeError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("<not ascii>");
    let essence = text.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let json_suffix = essence.starts_with("application/") && essence.ends_with("+json");
    if essence.is_empty() || json_suffix || ACCEPTED_CONTENT_TYPES.contains(&essence.as_str()) {
        Ok(())
    } else {
        Err(IntakeError::UnsupportedMediaType(truncate_for_message(text)))
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
        ContentEncoding::Gzip | ContentEncoding::Deflate | ContentEncoding::Brotli => max,
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
        "deflate" => Ok(ContentEncoding::Deflate),
        "br" => Ok(ContentEncoding::Brotli),
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

/// Returns the body as plain JSON bytes, decompressed. A decoder is read for at
/// most `max_bytes + 1` bytes, so a decompression bomb costs at most `max_bytes` of
/// memory.
pub fn decompress(raw: Bytes, encoding: ContentEncoding, max_bytes: usize) -> Result<Bytes, IntakeError> {
    match encoding {
        ContentEncoding::Identity => Ok(raw),
        ContentEncoding::Gzip => inflate(MultiGzDecoder::new(&raw[..]), raw.len(), max_bytes, "gzip"),
        // RFC 9110's deflate is zlib-wrapped; some clients send the raw stream.
        ContentEncoding::Deflate if has_zlib_header(&raw) => {
            inflate(ZlibDecoder::new(&raw[..]), raw.len(), max_bytes, "deflate")
        }
        ContentEncoding::Deflate => inflate(DeflateDecoder::new(&raw[..]), raw.len(), max_bytes, "deflate"),
        ContentEncoding::Brotli => inflate(
            brotli_decompressor::Decompressor::new(&raw[..], 4096),
            raw.len(),
            max_bytes,
            "br",
        ),
    }
}

/// A zlib stream starts with a header whose two bytes are a multiple of 31, with
/// method 8 (deflate); a raw deflate stream rarely does.
fn has_zlib_header(raw: &[u8]) -> bool {
    match raw {
        [cmf, flg, ..] => cmf & 0x0f == 8 && (u16::from(*cmf) * 256 + u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

fn inflate(decoder: impl Read, compressed: usize, max_bytes: usize, name: &'static str) -> Result<Bytes, IntakeError> {
    let mut inflated = Vec::with_capacity((compressed * 4).min(max_bytes + 1));
    decoder
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| IntakeError::InvalidCompression(name, e.to_string()))?;
    if inflated.len() > max_bytes {
        return Err(IntakeError::BodyTooLarge { limit: max_bytes });
    }
    Ok(Bytes::from(inflated))
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

    fn zlib(data: &[u8]) -> Bytes {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        Bytes::from(encoder.finish().unwrap())
    }

    fn raw_deflate(data: &[u8]) -> Bytes {
        let mut encoder = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        Bytes::from(encoder.finish().unwrap())
    }

    fn brotli(data: &[u8]) -> Bytes {
        let mut out = Vec::new();
        brotli::BrotliCompress(&mut &data[..], &mut out, &brotli::enc::BrotliEncoderParams::default()).unwrap();
        Bytes::from(out)
    }

    #[test]
    fn deflate_either_way_and_brotli_round_trip() {
        let json = b"{\"a\":1}";
        for (encoding, body) in [
            (ContentEncoding::Deflate, zlib(json)),
            (ContentEncoding::Deflate, raw_deflate(json)),
            (ContentEncoding::Brotli, brotli(json)),
        ] {
            assert_eq!(&decompress(body, encoding, 100).unwrap()[..], json, "{encoding:?}");
        }
        assert!(matches!(
            decompress(Bytes::from_static(b"not brotli at all"), ContentEncoding::Brotli, 100),
            Err(IntakeError::InvalidCompression("br", _))
        ));
    }

    #[test]
    fn every_decompression_bomb_stops_at_the_cap() {
        let spaces = vec![b' '; 8 * 1024 * 1024];
        for (encoding, bomb) in [
            (ContentEncoding::Deflate, zlib(&spaces)),
            (ContentEncoding::Brotli, brotli(&spaces)),
        ] {
            assert!(bomb.len() < 100 * 1024, "{encoding:?}: {}", bomb.len());
            let err = decompress(bomb, encoding, 500 * 1024).unwrap_err();
            assert!(
                matches!(err, IntakeError::BodyTooLarge { limit: 512000 }),
                "{encoding:?}"
            );
        }
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
            Err(IntakeError::InvalidCompression("gzip", _))
        ));
    }

    #[test]
    fn content_types() {
        let mut headers = HeaderMap::new();
        assert!(check_content_type(&headers).is_ok());
        headers.insert(header::CONTENT_TYPE, "text/plain;charset=UTF-8".parse().unwrap());
        assert!(check_content_type(&headers).is_ok());
        for label in [
            "application/x-www-form-urlencoded",
            "application/json; charset=utf-8",
            "application/vnd.api+json",
        ] {
            headers.insert(header::CONTENT_TYPE, label.parse().unwrap());
            assert!(check_content_type(&headers).is_ok(), "{label}");
        }
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
        headers.insert(header::CONTENT_ENCODING, "deflate".parse().unwrap());
        assert_eq!(content_encoding(&headers).unwrap(), ContentEncoding::Deflate);
        headers.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert_eq!(content_encoding(&headers).unwrap(), ContentEncoding::Brotli);
        headers.insert(header::CONTENT_ENCODING, "zstd".parse().unwrap());
        assert!(matches!(
            content_encoding(&headers),
            Err(IntakeError::UnsupportedEncoding(_))
        ));
    }
}
