//! Dedup never causes loss: when delivery fails, the request's ids are released in
//! Redis (not marked seen), so the client's retry is delivered once the sink is back,
//! exactly once.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::{Kafka, Redis};
use support::*;

#[test]
fn ids_of_a_failed_request_are_released_and_the_retry_lands_once() {
    let redis = Redis::start();
    let mut kafka = Kafka::start_persistent();
    kafka.create_topic("events", 1);
    let config = format!(
        "[redis]\nurl = \"{}\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"events\"\n",
        redis.url(),
        kafka.brokers()
    );
    let server = Server::start_with(&config, &[]);
    let batch = json!({ "batch": (0..20).map(|i| track(&format!("retry-{i}"))).collect::<Vec<_>>() });

    kafka.kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = post_json(&server, "/v1/batch", &batch);
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests kept succeeding with the broker down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not marked seen, not left claimed.
    for id in ["retry-0", "retry-19"] {
        let reply = redis.command(&["EXISTS", &format!("breakwater:dedup:default:{id}")]);
        assert_eq!(reply.trim(), ":0", "{id} is still in Redis after a failed delivery");
    }

    kafka.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = post_json(&server, "/v1/batch", &batch);
        if status == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "the retry never succeeded: {body}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        body.get("duplicates"),
        None,
        "the retry must be delivered, not treated as seen: {body}"
    );
    let records = kafka.read_all("events", 1, 20);
    let counts = id_counts(&records.iter().map(|r| r.payload.clone()).collect::<Vec<_>>());
    assert_eq!(counts.len(), 20, "every event of the retried batch is in Kafka");
    assert!(
        counts.values().all(|n| *n == 1),
        "an event was delivered twice: {counts:?}"
    );
    assert_eq!(
        redis.command(&["GET", "breakwater:dedup:default:retry-0"]).trim(),
        "$1\r\ns"
    );
}
