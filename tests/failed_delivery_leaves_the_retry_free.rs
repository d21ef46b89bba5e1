//! Dedup never causes loss: when a request cannot be made durable (the sink is down
//! and its spool is full), it gets 503 with Retry-After and its ids are released in
//! Redis, so the client's retry is delivered once room returns — exactly once.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::{Kafka, Redis};
use support::*;

#[test]
fn a_full_spool_refuses_with_503_releases_the_ids_and_the_retry_lands_once() {
    let redis = Redis::start();
    let mut kafka = Kafka::start_persistent();
    kafka.create_topic("events", 1);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(
        dir.path(),
        "small-spool.toml",
        &[("kafka.spool", "max_bytes", "1048576")],
    );
    let config = format!(
        "[server]\npolicy_file = \"{}\"\n\n[redis]\nurl = \"{}\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"events\"\n",
        policy.display(),
        redis.url(),
        kafka.brokers()
    );
    let server = Server::start_with(&config, &[]);
    kafka.kill9();

    // Fill the 1 MiB spool until a request is refused.
    let mut acked = Vec::new();
    let mut refused = None;
    let padding = "p".repeat(2000);
    for request in 0..2000 {
        let batch: Vec<_> = (0..20)
            .map(|i| {
                let mut event = track(&format!("r{request}-e{i}"));
                event["properties"]["padding"] = json!(padding);
                event
            })
            .collect();
        let response = client()
            .post(server.url("/v1/batch"))
            .header("content-type", "application/json")
            .body(json!({ "batch": batch }).to_string())
            .send()
            .unwrap();
        let retry_after = response.headers().get("retry-after").cloned();
        let (status, body) = status_and_json(response);
        match status {
            200 => acked.extend(batch.iter().map(|e| e["messageId"].as_str().unwrap().to_string())),
            503 => {
                assert_eq!(body["error"]["code"], "spool_full", "{body}");
                assert!(retry_after.is_some(), "503 must carry Retry-After");
                refused = Some(batch);
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let refused = refused.expect("the spool never filled");
    let (status, ready) = status_and_json(client().get(server.url("/health/ready")).send().unwrap());
    assert_eq!(status, 503, "a full spool makes the server unready: {ready}");
    // The refused ids are neither seen nor claimed.
    for event in [&refused[0], &refused[19]] {
        let key = format!("breakwater:dedup:default:{}", event["messageId"].as_str().unwrap());
        assert_eq!(
            redis.command(&["EXISTS", &key]).trim(),
            ":0",
            "{key} left in Redis after a refusal"
        );
    }

    kafka.restart();
    // The retry finds room once the replayer has drained the spool into the
    // restarted broker (after reading back what was in doubt): seconds alone, but
    // over a minute once under the whole suite's load on two cores.
    let deadline = Instant::now() + Duration::from_secs(150);
    let body = loop {
        let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": refused }));
        if status == 200 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the retry never succeeded: {body}\nspool: {} events\n{}",
            server.metric("breakwater_spool_events{sink=\"kafka\"}"),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        body.get("duplicates"),
        None,
        "the retry must be delivered, not treated as seen: {body}"
    );
    acked.extend(refused.iter().map(|e| e["messageId"].as_str().unwrap().to_string()));
    while server.metric("breakwater_spool_events{sink=\"kafka\"}") > 0.0 {
        assert!(Instant::now() < deadline, "spool not drained");
        std::thread::sleep(Duration::from_millis(200));
    }
    let records = kafka.read_all("events", 1, acked.len());
    let counts = id_counts(&records.iter().map(|r| r.payload.clone()).collect::<Vec<_>>());
    assert_eq!(counts.len(), acked.len(), "every acknowledged event is in Kafka");
    assert!(counts.values().all(|n| *n == 1), "an event was delivered twice");
}
