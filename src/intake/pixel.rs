//! RudderStack's pixel endpoints, `GET /pixel/v1/track` and `GET /pixel/v1/page`:
//! an `<img>` whose URL query is the event (`writeKey`, `anonymousId`, `event`,
//! dotted keys for nested fields such as `properties.plan` or `context.page.url`).
//! The same contract as every intake route: the 1×1 GIF (200) only once the event
//! is durable; a refusal is the usual JSON error (an image tag cannot retry, but
//! the status is in the server's counts and logs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::browser::Peer;
use super::error::IntakeError;
use super::http::answered;
use super::ingest::ingest_json;
use super::{IntakeState, RouteKind};
use crate::event::EventType;
use crate::pipeline::budget::HELD_PER_BODY_BYTE;

/// A transparent 1×1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff,
    0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x02,
    0x02, 0x44, 0x01, 0x00, 0x3b,
];

type Pairs = Query<Vec<(String, String)>>;

/// The pixel routes and the event type each takes.
pub const ROUTES: [(&str, EventType); 2] = [
    ("/pixel/v1/track", EventType::Track),
    ("/pixel/v1/page", EventType::Page),
];

/// `GET` on either pixel route; the route says the event's type.
pub async fn event(
    State(app): State<Arc<IntakeState>>,
    Peer(peer): Peer,
    uri: Uri,
    Query(pairs): Pairs,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let Some(&(route, event_type)) = ROUTES.iter().find(|(path, _)| *path == uri.path()) else {
        return IntakeError::NotFound.into_response();
    };
    let result = accept(&app, event_type, pairs, &headers, peer).await;
    answered(route, started, result.map(|()| gif()))
}

fn gif() -> Response {
    let mut response = (StatusCode::OK, PIXEL).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/gif"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn accept(
    app: &IntakeState,
    event_type: EventType,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<(), IntakeError> {
    let write_key = pairs.iter().find(|(key, _)| key == "writeKey").map(|(_, v)| v.as_str());
    let source = app.write_keys.authenticate(write_key)?;
    let json = serde_json::to_vec(&event_from_query(&pairs)).expect("a JSON map always serializes");
    if json.len() > app.limits.max_event_bytes {
        return Err(IntakeError::EventTooLarge {
            limit: app.limits.max_event_bytes,
        });
    }
    let held = app
        .budget
        .try_hold(json.len() as u64 * HELD_PER_BODY_BYTE)
        .ok_or(IntakeError::MemoryBudget)?;
    let _in_flight = app.in_flight.enter()?;
    let client = app.browser.client(headers, peer);
    ingest_json(
        app,
        RouteKind::Single(event_type),
        &json,
        Some(source),
        &client,
        "http",
        held,
    )
    .await?;
    Ok(())
}

/// The query as an event: `a.b.c=v` becomes `{"a":{"b":{"c":"v"}}}` (values are
/// strings, as a URL carries them); `writeKey` is left out; a key given twice keeps
/// the last value; a dotted key under a plain string value replaces it.
fn event_from_query(pairs: &[(String, String)]) -> Value {
    let mut event = Map::new();
    for (key, value) in pairs {
        if key == "writeKey" || key.is_empty() {
            continue;
        }
        let mut parts = key.split('.').filter(|part| !part.is_empty()).peekable();
        let mut object = &mut event;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                object.insert(part.to_string(), Value::String(value.clone()));
                break;
            }
            let entry = object
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            object = entry.as_object_mut().expect("made an object above");
        }
    }
    Value::Object(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_keys_nest_and_the_key_is_left_out() {
        let pairs: Vec<(String, String)> = [
            ("writeKey", "secret"),
            ("anonymousId", "a1"),
            ("event", "Signup"),
            ("properties.plan", "pro"),
            ("context.page.url", "https://shop.example.com/"),
            ("context.page.title", "Shop"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let event = event_from_query(&pairs);
        assert_eq!(
            event,
            serde_json::json!({
                "anonymousId": "a1",
                "event": "Signup",
                "properties": { "plan": "pro" },
                "context": { "page": { "url": "https://shop.example.com/", "title": "Shop" } },
            })
        );
    }

    #[test]
    fn the_pixel_is_a_gif() {
        assert!(PIXEL.starts_with(b"GIF89a") && PIXEL.ends_with(b";"));
    }
}
