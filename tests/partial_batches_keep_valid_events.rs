//! One bad event never sinks a good one: a batch with invalid events is accepted for
//! its valid ones, the refusals are listed by index and kept in the rejected store.

mod support;

use serde_json::json;
use support::*;

#[test]
fn valid_events_land_and_invalid_ones_are_listed_and_kept() {
    let server = Server::start();
    let batch = json!({ "batch": [
        track("good-0"),
        { "type": "track", "messageId": "bad-1", "userId": "u" },
        track("good-2"),
        { "type": "identify", "messageId": "bad-3" },
        "not an object",
        { "type": "page", "messageId": "good-5", "anonymousId": "a" },
    ]});
    let (status, body) = post_json(&server, "/v1/batch", &batch);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    let rejected: Vec<_> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), r["code"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        rejected,
        [
            (1, "missing_event".to_string()),
            (3, "missing_identity".to_string()),
            (4, "not_an_object".to_string())
        ]
    );

    let mut landed: Vec<_> = server
        .sink_events()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    landed.sort();
    assert_eq!(landed, ["good-0", "good-2", "good-5"]);

    let records = server.rejected_records();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["index"], 1);
    assert_eq!(records[0]["reason"]["code"], "missing_event");
    assert_eq!(records[0]["event"]["messageId"], "bad-1");
    assert_eq!(records[0]["source"], "default");
    assert_eq!(records[2]["event"], "\"not an object\"");
    assert_eq!(
        server.metric("breakwater_events_total{source=\"default\",transport=\"http\",outcome=\"rejected\"}"),
        3.0
    );
}

#[test]
fn a_batch_of_only_invalid_events_is_400_with_details() {
    let server = Server::start();
    let (status, body) = post_json(
        &server,
        "/v1/batch",
        &json!({ "batch": [{ "type": "track", "userId": "u" }, { "type": "nope", "userId": "u" }] }),
    );
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_batch");
    assert_eq!(body["error"]["rejected"][1]["code"], "invalid_type");
    assert_eq!(server.rejected_records().len(), 2);
    assert!(server.sink_events().is_empty());
}

#[test]
fn an_invalid_single_event_is_400_with_its_reason() {
    let server = Server::start();
    let (status, body) = post_json(&server, "/v1/group", &json!({ "userId": "u" }));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_event");
    assert_eq!(body["error"]["event"]["code"], "missing_group_id");
    assert_eq!(server.rejected_records()[0]["reason"]["code"], "missing_group_id");
}

#[test]
fn the_rejected_store_stays_within_its_budget() {
    let server = Server::start_with("[rejected_store]\nmax_bytes = 16384\n", &[]);
    for i in 0..200 {
        let event = json!({ "type": "track", "messageId": format!("bad-{i}"), "userId": "u", "pad": "p".repeat(200) });
        post_json(
            &server,
            "/v1/batch",
            &json!({ "batch": [event, track(&format!("ok-{i}"))] }),
        );
    }
    let dir = server.data_dir.join("rejected");
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total <= 16384, "{total} bytes");
    assert!(server.metric("breakwater_rejected_store_discarded_bytes_total") > 0.0);
    assert_eq!(server.sink_events().len(), 200);
}
