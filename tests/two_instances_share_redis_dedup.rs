//! Two breakwater instances sharing one Redis store a messageId once, whichever
//! instance receives it and even when both receive it at the same time. A Redis
//! that is down does not stop intake (dedup fails open, counted).

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
