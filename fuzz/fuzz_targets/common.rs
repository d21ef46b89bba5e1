//! Shared by the targets: parse a body as breakwater's intake does, then normalize
//! every event, as a request from source `fuzz` would be.

use breakwater::config::LimitsConfig;
use breakwater::intake::segment::{self, RequestContext};
use breakwater::intake::RouteKind;

pub fn parse_and_normalize(body: &[u8], kind: RouteKind) {
    let limits = LimitsConfig::default();
    let parsed = match kind {
        RouteKind::Batch => segment::parse_batch(body, &limits),
        RouteKind::Single(_) | RouteKind::Event => segment::parse_single(body, &limits),
    };
    let Ok(parsed) = parsed else { return };
    let route_type = match kind {
        RouteKind::Single(event_type) => Some(event_type),
        _ => None,
    };
    let request = RequestContext {
        route_type,
        sent_at: parsed.sent_at,
        context: parsed.context.as_ref(),
        received_at: chrono::Utc::now(),
        source: "fuzz",
        client_fields: &[],
    };
    for event in parsed.events.into_iter().flatten() {
        if let Ok(normalized) = segment::normalize(event, &request) {
            // What the sinks are given must be the JSON it claims to be.
            let _: serde_json::Value = serde_json::from_slice(&normalized.json).expect("normalized JSON");
            assert!(!normalized.json.contains(&b'\n'), "normalized JSON is one line");
        }
    }
}
