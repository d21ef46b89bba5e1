//! Two breakwater instances sharing one Redis store a messageId once, whichever
//! instance receives it and even when both receive it at the same time. An id
//! another instance is still delivering makes the request wait, then 503, and is
//! free once that claim expires; an id another instance delivered is a duplicate.
//! A Redis that is down does not stop intake (dedup fails open, counted).

mod support;

use serde_json::json;
use support::backends::{ClickHouse, Redis};
use support::*;

fn config(redis_url: &str, clickhouse: &ClickHouse, database: &str) -> String {
    format!(
        "[redis]\nurl = \"{redis_url}\"\ncommand_timeout_ms = 300\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\n",
        clickhouse.url()
    )
}

fn batch(prefix: &str, count: usize) -> serde_json::Value {
    json!({ "batch": (0..count).map(|i| track(&format!("{prefix}-{i}"))).collect::<Vec<_>>() })
}

#[test]
fn the_same_message_id_sent_to_both_instances_is_stored_once() {
    let redis = Redis::start();
    let clickhouse = ClickHouse::start();
    let config = config(&redis.url(), &clickhouse, "shared");
    let first = Server::start_with(&config, &[]);
    let second = Server::start_with(&config, &[]);

    // One after the other.
    let (status, body) = post_json(&first, "/v1/batch", &batch("seq", 200));
    assert_eq!((status, body["duplicates"].as_u64()), (200, None), "{body}");
    let (status, body) = post_json(&second, "/v1/batch", &batch("seq", 200));
    assert_eq!(
        (status, body["duplicates"].as_u64()),
        (200, Some(200)),
        "second instance must see them as seen: {body}"
    );

    // At the same time, several rounds: each id still stored once.
    for round in 0..5 {
        let same = batch(&format!("race{round}"), 100);
        std::thread::scope(|scope| {
            for server in [&first, &second, &first, &second] {
                let same = &same;
                scope.spawn(move || {
                    let (status, body) = post_json(server, "/v1/batch", same);
                    assert_eq!(status, 200, "{body}");
                });
            }
        });
    }
    clickhouse.wait_for_count("shared.events", 200 + 5 * 100);
    let duplicated = clickhouse
        .query("SELECT count() FROM (SELECT message_id FROM shared.events GROUP BY message_id HAVING count() > 1)");
    assert_eq!(duplicated.trim(), "0", "some message ids were stored twice");
}

/// The key breakwater keeps for `message_id`, found from one it wrote for a
/// first event (`<prefix>:<source>:<messageId>`).
fn dedup_key_prefix(redis: &Redis, server: &Server) -> String {
    let (status, body) = post_json(server, "/v1/batch", &batch("probe", 1));
    assert_eq!(status, 200, "{body}");
    let keys = redis.command(&["KEYS", "*:probe-0"]);
    let key = keys
        .lines()
        .find(|line| line.ends_with(":probe-0"))
        .unwrap_or_else(|| panic!("no dedup key for probe-0 in {keys:?}"));
    key.trim_end_matches("probe-0").to_string()
}

fn delivered_ids(server: &Server, id: &str) -> usize {
    server.sink_events().iter().filter(|e| e["messageId"] == id).count()
}

#[test]
fn an_id_held_by_another_instance_waits_then_503s_and_is_free_once_that_claim_expires() {
    let redis = Redis::start();
    // File sink only; a short wait for held ids so the test runs in about 3 s.
    let config = format!(
        "[redis]\nurl = \"{}\"\ncommand_timeout_ms = 500\npending_wait_ms = 300\n",
        redis.url()
    );
    let server = Server::start_with(&config, &[]);
    let prefix = dedup_key_prefix(&redis, &server);

    // Another instance is delivering held-0 right now (its claim expires in 1.5 s).
    let held_key = format!("{prefix}held-0");
    assert!(redis
        .command(&["SET", &held_key, "p:other-instance:1", "PX", "1500"])
        .starts_with("+OK"));
    let request = json!({ "batch": [track("held-0"), track("free-0")] });
    let (status, body) = post_json(&server, "/v1/batch", &request);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "in_flight_elsewhere", "{body}");
    // Nothing of the refused request was written or kept claimed.
    assert_eq!(delivered_ids(&server, "free-0"), 0);
    assert!(
        redis.command(&["GET", &format!("{prefix}free-0")]).starts_with("$-1"),
        "the refused request released its own claims"
    );

    // Once the other claim expires (its instance died mid-request), the retry lands.
    std::thread::sleep(std::time::Duration::from_millis(1600));
    let (status, body) = post_json(&server, "/v1/batch", &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicates"].as_u64(), None, "both were new: {body}");
    assert_eq!(
        (delivered_ids(&server, "held-0"), delivered_ids(&server, "free-0")),
        (1, 1)
    );
    assert!(
        redis.command(&["GET", &held_key]).contains("\r\ns\r\n"),
        "held-0 is now marked delivered"
    );

    // An id another instance delivered is acknowledged as a duplicate, not written.
    assert!(redis
        .command(&["SET", &format!("{prefix}elsewhere-0"), "s", "EX", "60"])
        .starts_with("+OK"));
    let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": [track("elsewhere-0")] }));
    assert_eq!((status, body["duplicates"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(delivered_ids(&server, "elsewhere-0"), 0);
}

#[test]
fn a_down_redis_does_not_stop_intake() {
    let clickhouse = ClickHouse::start();
    // Nothing listens on this port.
    let dead_redis = format!("redis://127.0.0.1:{}", support::backends::free_port());
    let server = Server::start_with(&config(&dead_redis, &clickhouse, "failopen"), &[]);
    let (status, body) = post_json(&server, "/v1/batch", &batch("open", 10));
    assert_eq!(status, 200, "{body}");
    clickhouse.wait_for_count("failopen.events", 10);
    assert!(server.metric("breakwater_dedup_fail_open_total") >= 1.0);
    let (_, ready) = status_and_json(client().get(server.url("/health/ready")).send().unwrap());
    assert_eq!(ready["dependencies"]["redis"]["healthy"], false, "{ready}");
    // Repeats within this instance are still caught locally.
    let (_, body) = post_json(&server, "/v1/batch", &batch("open", 10));
    assert_eq!(body["duplicates"], 10);
}
