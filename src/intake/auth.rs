//! Write keys: where a producer may put its key, and which source it names.
//! Keys are compared as SHA-256 digests in constant time, so neither the content nor
//! the length of a configured key leaks through response timing.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::IntakeError;
use crate::config::Source;

/// Source name used when no keys are configured (loopback-only open mode).
pub const OPEN_SOURCE_NAME: &str = "default";

/// The configured write keys, or open mode when there are none.
pub struct WriteKeys {
    keys: Vec<([u8; 32], Arc<str>)>,
    open_source: Arc<str>,
}

impl WriteKeys {
    pub fn new(sources: &[Source]) -> Self {
        Self {
            keys: sources
                .iter()
                .map(|s| (digest(&s.write_key), Arc::from(s.name.as_str())))
                .collect(),
            open_source: Arc::from(OPEN_SOURCE_NAME),
        }
    }

    /// No keys configured: every request is accepted as source `default`.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every source name, for pre-registering metric series.
    pub fn source_names(&self) -> Vec<Arc<str>> {
        if self.is_open() {
            vec![self.open_source.clone()]
        } else {
            self.keys.iter().map(|(_, name)| name.clone()).collect()
        }
    }

    /// Maps a presented key to its source. Every configured key is compared, match
    /// or not, so the time taken does not depend on which key matched.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Arc<str>, IntakeError> {
        if self.is_open() {
            return Ok(self.open_source.clone());
        }
        let presented = presented
            .filter(|k| !k.is_empty())
            .ok_or(IntakeError::MissingWriteKey)?;
        let presented = digest(presented);
        let mut found = None;
        for (key, name) in &self.keys {
            if bool::from(key.ct_eq(&presented)) {
                found = Some(name.clone());
            }
        }
        found.ok_or(IntakeError::InvalidWriteKey)
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// `?writeKey=` on the routes that take the key in the query (beacons, RudderStack's
/// source config).
#[derive(Debug, serde::Deserialize)]
pub struct WriteKeyQuery {
    #[serde(rename = "writeKey")]
    pub write_key: Option<String>,
}

/// The key from the headers: HTTP Basic user name first, then `X-Write-Key`.
/// A malformed Basic header counts as no key from that header.
pub fn write_key_from_headers(headers: &HeaderMap) -> Option<String> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|encoded| base64::engine::general_purpose::STANDARD.decode(encoded).ok())
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .map(|user_pass| match user_pass.split_once(':') {
            Some((user, _password)) => user.to_string(),
            None => user_pass,
        })
        .filter(|k| !k.is_empty());
    basic.or_else(|| {
        headers
            .get("x-write-key")
            .and_then(|v| v.to_str().ok())
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn keys() -> WriteKeys {
        WriteKeys::new(&[
            Source {
                name: "web".into(),
                write_key: "key-web".into(),
            },
            Source {
                name: "ios".into(),
                write_key: "key-ios".into(),
            },
        ])
    }

    #[test]
    fn keys_map_to_their_source() {
        assert_eq!(&*keys().authenticate(Some("key-ios")).unwrap(), "ios");
        assert_eq!(&*keys().authenticate(Some("key-web")).unwrap(), "web");
    }

    #[test]
    fn missing_and_wrong_keys_are_told_apart() {
        assert!(matches!(keys().authenticate(None), Err(IntakeError::MissingWriteKey)));
        assert!(matches!(
            keys().authenticate(Some("")),
            Err(IntakeError::MissingWriteKey)
        ));
        assert!(matches!(
            keys().authenticate(Some("key-we")),
            Err(IntakeError::InvalidWriteKey)
        ));
    }

    #[test]
    fn open_mode_accepts_anything_as_default() {
        let open = WriteKeys::new(&[]);
        assert_eq!(&*open.authenticate(None).unwrap(), OPEN_SOURCE_NAME);
    }

    #[test]
    fn basic_user_name_is_the_key_and_wins_over_the_header() {
        let mut headers = HeaderMap::new();
        headers.insert("x-write-key", HeaderValue::from_static("from-header"));
        assert_eq!(write_key_from_headers(&headers).as_deref(), Some("from-header"));
        // "abc:" in base64, as Segment SDKs send it.
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic YWJjOg=="));
        assert_eq!(write_key_from_headers(&headers).as_deref(), Some("abc"));
    }

    #[test]
    fn malformed_basic_falls_back_to_other_places() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(write_key_from_headers(&headers), None);
    }
}
