//! Every Segment route and browser short path accepts its call type, in JSON or
//! text/plain, plain or gzipped, and the normalized event lands in the file sink.

mod support;

use serde_json::{json, Value};
use support::*;

fn event_for(path: &str, id: &str) -> Value {
    let mut event = json!({ "messageId": id, "userId": "u-1" });
    let extra = match path.trim_start_matches("/v1/") {
        "track" | "t" => json!({ "event": "Clicked" }),
        "group" | "g" => json!({ "groupId": "g-1" }),
        "alias" | "a" => json!({ "previousId": "anon-1" }),
        _ => json!({}),
    };
    event
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    event
}

const SINGLE_ROUTES: [(&str, &str); 12] = [
    ("/v1/track", "track"),
    ("/v1/identify", "identify"),
    ("/v1/page", "page"),
    ("/v1/screen", "screen"),
    ("/v1/group", "group"),
    ("/v1/alias", "alias"),
    ("/v1/t", "track"),
    ("/v1/i", "identify"),
    ("/v1/p", "page"),
    ("/v1/s", "screen"),
    ("/v1/g", "group"),
    ("/v1/a", "alias"),
];

#[test]
fn every_single_event_route_accepts_its_type() {
    let server = Server::start();
    for (path, event_type) in SINGLE_ROUTES {
        let (status, body) = post_json(&server, path, &event_for(path, &format!("id{path}")));
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body, json!({ "success": true }), "{path}");
        let _ = event_type;
    }
    let events = server.sink_events();
    assert_eq!(events.len(), SINGLE_ROUTES.len());
    for (path, event_type) in SINGLE_ROUTES {
        let event = events
            .iter()
            .find(|e| e["messageId"] == format!("id{path}"))
            .unwrap_or_else(|| panic!("{path} not in sink"));
        assert_eq!(event["type"], event_type, "{path}");
        assert_eq!(event["sourceName"], "default");
        assert!(event["receivedAt"].is_string());
        assert!(event["timestamp"].is_string());
    }
}

#[test]
fn batch_import_and_short_batch_take_all_six_types() {
    let server = Server::start();
    for path in ["/v1/batch", "/v1/import", "/v1/b"] {
        let batch: Vec<Value> = SINGLE_ROUTES[..6]
            .iter()
            .map(|(route, event_type)| {
                let mut event = event_for(route, &format!("{path}-{event_type}"));
                event["type"] = json!(event_type);
                event
            })
            .collect();
        let (status, body) = post_json(&server, path, &json!({ "batch": batch }));
        assert_eq!((status, &body), (200, &json!({ "success": true })), "{path}");
    }
    let counts = id_counts(&server.sink_events());
    assert_eq!(counts.len(), 18);
    assert!(counts.values().all(|n| *n == 1));
}

#[test]
fn browser_style_text_plain_with_body_write_key_is_accepted() {
    let server = Server::start_with("[[sources]]\nname = \"browser\"\nwrite_key = \"wk-browser\"\n", &[]);
    let mut event = event_for("/v1/t", "browser-1");
    event["writeKey"] = json!("wk-browser");
    let response = client()
        .post(server.url("/v1/t"))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(event.to_string())
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let events = server.sink_events();
    assert_eq!(events[0]["sourceName"], "browser");
    assert!(events[0].get("writeKey").is_none(), "the key must not reach the sink");
}

#[test]
fn gzip_bodies_are_inflated() {
    let server = Server::start();
    let body = json!({ "batch": (0..100).map(|i| track(&format!("gz-{i}"))).collect::<Vec<_>>() });
    let response = client()
        .post(server.url("/v1/batch"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(body.to_string().as_bytes()))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(server.sink_events().len(), 100);
}

#[test]
fn client_clock_skew_is_corrected_and_fields_are_kept() {
    let server = Server::start();
    // The device clock runs one hour fast; the event was created 5 s before sending.
    let device_now = chrono::Utc::now() + chrono::Duration::hours(1);
    let created = device_now - chrono::Duration::seconds(5);
    let (status, _) = post_json(
        &server,
        "/v1/batch",
        &json!({
            "sentAt": device_now.to_rfc3339(),
            "context": { "library": { "name": "test-sdk" } },
            "batch": [{
                "type": "identify", "messageId": "skew-1", "anonymousId": "anon-9",
                "timestamp": created.to_rfc3339(), "traits": { "plan": "pro" },
                "context": { "ip": "192.0.2.1" }
            }]
        }),
    );
    assert_eq!(status, 200);
    let event = &server.sink_events()[0];
    let parse = |field: &str| chrono::DateTime::parse_from_rfc3339(event[field].as_str().unwrap()).unwrap();
    let corrected_lag = parse("receivedAt") - parse("timestamp");
    assert!(
        (corrected_lag.num_milliseconds() - 5000).abs() < 50,
        "timestamp should be receivedAt - 5 s, was {corrected_lag}"
    );
    assert_eq!(
        event["originalTimestamp"].as_str().unwrap()[..19],
        created.to_rfc3339()[..19]
    );
    assert_eq!(event["traits"]["plan"], "pro");
    assert_eq!(event["context"]["ip"], "192.0.2.1");
    assert_eq!(event["context"]["library"]["name"], "test-sdk");
}
