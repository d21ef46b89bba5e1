//! Redis killed: intake continues on the local dedup cache (counted); when Redis
//! returns, shared dedup resumes by itself.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::{ClickHouse, Redis};
use support::*;

#[test]
fn intake_survives_a_redis_crash_and_shared_dedup_resumes() {
    let mut redis = Redis::start();
    let clickhouse = ClickHouse::start();
    let config = format!(
        "[redis]\nurl = \"{}\"\ncommand_timeout_ms = 300\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"r\"\n",
        redis.url(),
        clickhouse.url()
    );
    let first = Server::start_with(&config, &[]);
    let second = Server::start_with(&config, &[]);
    let (status, _) = post_json(&first, "/v1/batch", &json!({ "batch": [track("a-1")] }));
    assert_eq!(status, 200);

    redis.kill9();
    let (status, body) = post_json(&first, "/v1/batch", &json!({ "batch": [track("b-1"), track("b-2")] }));
    assert_eq!(status, 200, "intake must go on without Redis: {body}");
    assert!(first.metric("breakwater_dedup_fail_open_total") >= 1.0);
    let (_, body) = post_json(&first, "/v1/batch", &json!({ "batch": [track("b-1")] }));
    assert_eq!(body["duplicates"], 1, "the local cache still catches repeats: {body}");
    // The Redis breaker opens, after which requests no longer wait for Redis.
    for i in 0..8 {
        let (status, _) = post_json(&first, "/v1/batch", &json!({ "batch": [track(&format!("o-{i}"))] }));
        assert_eq!(status, 200);
    }
    assert!(
        first.metric("breakwater_circuit_breaker_transitions_total{dependency=\"redis\",to=\"open\"}") >= 1.0,
        "the redis breaker should have opened"
    );
    let attempts = |server: &Server| server.metric("breakwater_redis_errors_total{operation=\"claim\"}");
    let before = attempts(&first);
    let (status, _) = post_json(&first, "/v1/batch", &json!({ "batch": [track("while-open")] }));
    assert_eq!(status, 200);
    assert_eq!(
        attempts(&first),
        before,
        "with the breaker open no Redis command is even tried"
    );

    redis.restart();
    // Once Redis answers again, an id delivered by one instance is a duplicate at
    // the other.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        round += 1;
        let id = format!("c-{round}");
        post_json(&first, "/v1/batch", &json!({ "batch": [track(&id)] }));
        let (_, body) = post_json(&second, "/v1/batch", &json!({ "batch": [track(&id)] }));
        if body["duplicates"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shared dedup did not resume after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
