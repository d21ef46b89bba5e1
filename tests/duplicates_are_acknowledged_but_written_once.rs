//! A messageId seen within the dedup window gets 200 but is not written again —
//! across requests, within a batch, under concurrency and across restarts.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

#[test]
fn a_repeated_message_id_is_acknowledged_and_counted_but_written_once() {
    let server = Server::start();
    let (status, first) = post_json(&server, "/v1/track", &track("m-1"));
    assert_eq!((status, first), (200, json!({ "success": true })));
    let (status, second) = post_json(&server, "/v1/track", &track("m-1"));
    assert_eq!((status, second), (200, json!({ "success": true, "duplicates": 1 })));
    let (status, _) = post_json(
        &server,
        "/v1/batch",
        &json!({ "batch": [track("m-2"), track("m-2"), track("m-1")] }),
    );
    assert_eq!(status, 200);
    let counts = id_counts(&server.sink_events());
    assert_eq!(counts.len(), 2);
    assert!(counts.values().all(|n| *n == 1));
    assert_eq!(
        server.metric("breakwater_events_total{source=\"default\",transport=\"http\",outcome=\"duplicate\"}"),
        3.0
    );
}

#[test]
fn concurrent_retries_of_the_same_batch_write_each_event_once() {
    let server = Server::start();
    let batch = json!({ "batch": (0..50).map(|i| track(&format!("c-{i}"))).collect::<Vec<_>>() });
    std::thread::scope(|scope| {
        for _ in 0..16 {
            scope.spawn(|| {
                let (status, _) = post_json(&server, "/v1/batch", &batch);
                assert_eq!(status, 200);
            });
        }
    });
    let counts = id_counts(&server.sink_events());
    assert_eq!(counts.len(), 50);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}

#[test]
fn sources_have_separate_id_spaces() {
    let server = Server::start_with("", &[("BREAKWATER_WRITE_KEYS", "web=k-web,ios=k-ios")]);
    for key in ["k-web", "k-ios"] {
        let response = client()
            .post(server.url("/v1/track"))
            .header("x-write-key", key)
            .body(track("shared-id").to_string())
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    }
    assert_eq!(server.sink_events().len(), 2);
}

#[test]
fn dedup_survives_a_restart() {
    let mut server = Server::start();
    post_json(&server, "/v1/batch", &json!({ "batch": [track("r-1"), track("r-2")] }));
    assert!(server.terminate(Duration::from_secs(10)).success());
    let restarted = server.restart();
    let (status, body) = post_json(
        &restarted,
        "/v1/batch",
        &json!({ "batch": [track("r-1"), track("r-3")] }),
    );
    assert_eq!(status, 200);
    assert_eq!(body["duplicates"], 1);
    let counts = id_counts(&restarted.sink_events());
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|n| *n == 1));
    assert_eq!(restarted.metric("breakwater_dedup_entries"), 3.0);
}

#[test]
fn ids_older_than_the_window_are_accepted_again() {
    let server = Server::start_with("[dedup]\nwindow_seconds = 1\n", &[]);
    post_json(&server, "/v1/track", &track("w-1"));
    std::thread::sleep(Duration::from_millis(2100));
    let (_, body) = post_json(&server, "/v1/track", &track("w-1"));
    assert_eq!(body, json!({ "success": true }));
    assert_eq!(server.sink_events().len(), 2);
}
