//! RudderStack's browser endpoints under the same contract as every intake route:
//! `POST /beacon/v1/batch?writeKey=…` (what `navigator.sendBeacon` sends on page
//! unload: no headers of its own, so the key is in the query) and `GET
//! /pixel/v1/track` / `/pixel/v1/page` (an image whose query is the event; the GIF
//! comes back only once the event is durable).

mod support;

use serde_json::json;
use support::{client, id_counts, status_and_json, track, Server};

const CONFIG: &str = "[[sources]]\nname = \"web\"\nwrite_key = \"key-web\"\n";

#[test]
fn beacons_carry_the_key_in_the_query() {
    let server = Server::start_with(CONFIG, &[]);
    let body = json!({ "batch": [track("beacon-1"), track("beacon-2")], "sentAt": "2026-12-07T06:00:00.000Z" });
    let send = |query: &str| {
        client()
            .post(server.url(&format!("/beacon/v1/batch{query}")))
            .header("content-type", "text/plain;charset=UTF-8")
            .body(body.to_string())
            .send()
            .unwrap()
    };
    let (status, answer) = status_and_json(send("?writeKey=key-web"));
    assert_eq!(status, 200, "{answer}");
    // The same beacon again (a page unloaded twice): acknowledged, stored once.
    assert_eq!(send("?writeKey=key-web").status(), 200);
    for query in ["", "?writeKey=wrong"] {
        let (status, answer) = status_and_json(send(query));
        assert_eq!(status, 401, "{query}: {answer}");
    }
    let counts = id_counts(&server.sink_events());
    assert_eq!((counts.get("beacon-1"), counts.get("beacon-2")), (Some(&1), Some(&1)));
}

#[test]
fn pixels_answer_a_gif_once_the_event_is_durable() {
    let server = Server::start_with(CONFIG, &[]);
    let pixel = |path: &str| {
        client()
            .get(server.url(path))
            .header("user-agent", "PixelBrowser/1")
            .send()
            .unwrap()
    };
    let track_url = "/pixel/v1/track?writeKey=key-web&anonymousId=a1&messageId=px-1&event=Signup&properties.plan=pro";
    for _ in 0..2 {
        let response = pixel(track_url);
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/gif");
        assert!(response.bytes().unwrap().starts_with(b"GIF89a"));
    }
    let response = pixel("/pixel/v1/page?writeKey=key-web&anonymousId=a1&messageId=px-2&name=Home&context.page.url=https%3A%2F%2Fshop.example.com%2F");
    assert_eq!(response.status(), 200);
    let (status, answer) = status_and_json(pixel("/pixel/v1/track?anonymousId=a1&event=x"));
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("missing_write_key"))
    );

    let events = server.sink_events();
    assert_eq!(
        id_counts(&events).get("px-1"),
        Some(&1),
        "the resent pixel is stored once"
    );
    let tracked = events.iter().find(|e| e["messageId"] == "px-1").unwrap();
    assert_eq!(tracked["type"], "track");
    assert_eq!(tracked["event"], "Signup");
    assert_eq!(tracked["properties"]["plan"], "pro");
    assert_eq!(tracked["context"]["userAgent"], "PixelBrowser/1");
    assert!(tracked.get("writeKey").is_none());
    let page = events.iter().find(|e| e["messageId"] == "px-2").unwrap();
    assert_eq!(page["type"], "page");
    assert_eq!(page["context"]["page"]["url"], "https://shop.example.com/");
}
