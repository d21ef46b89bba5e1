//! Two breakwater instances sharing one Redis store a messageId once, whichever
//! instance receives it and even when both receive it at the same time. An id
//! another instance is still delivering makes the request wait, then 503, and is
//! free once that claim expires; an id another instance delivered is a duplicate;
//! keys written by the earlier key layout are understood.
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

/// Where breakwater keeps its dedup state, found from what it wrote for a first
/// event: the prefix of id keys (`<prefix>:<source>:`, followed by a messageId)
/// and of status keys (`<prefix>::claim:`, followed by a request's token).
fn dedup_key_prefixes(redis: &Redis, server: &Server) -> (String, String) {
    let (status, body) = post_json(server, "/v1/batch", &batch("probe", 1));
    assert_eq!(status, 200, "{body}");
    let find = |pattern: &str, marker: &str| {
        let keys = redis.command(&["KEYS", pattern]);
        let key = keys
            .lines()
            .find(|line| line.contains(marker))
            .unwrap_or_else(|| panic!("no key like {pattern} in {keys:?}"))
            .to_string();
        key[..key.find(marker).unwrap() + marker.len()].to_string()
    };
    let id_prefix = find("*:probe-0", ":probe-0").trim_end_matches("probe-0").to_string();
    let status_prefix = find("*::claim:*", "::claim:");
    (id_prefix, status_prefix)
}

fn delivered_ids(server: &Server, id: &str) -> usize {
    server.sink_events().iter().filter(|e| e["messageId"] == id).count()
}

fn set(redis: &Redis, args: &[&str]) {
    let reply = redis.command(&[&["SET"], args].concat());
    assert!(reply.starts_with("+OK"), "SET {args:?}: {reply:?}");
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
    let (ids, statuses) = dedup_key_prefixes(&redis, &server);

    // Another instance is delivering held-0 and held-1 right now; its claims lapse in
    // 1.5 s (it died mid-request): each id names that request's token, whose status
    // is pending until it expires.
    let other = "c:000000000000000000000001";
    set(&redis, &[&format!("{ids}held-0"), other, "EX", "60"]);
    set(&redis, &[&format!("{ids}held-1"), other, "EX", "60"]);
    set(&redis, &[&format!("{statuses}{other}"), "p", "PX", "1500"]);
    for held in ["held-0", "held-1"] {
        let request = json!({ "batch": [track(held), track("free-0")] });
        let (status, body) = post_json(&server, "/v1/batch", &request);
        assert_eq!(status, 503, "{held}: {body}");
        assert_eq!(body["error"]["code"], "in_flight_elsewhere", "{body}");
    }
    // Nothing of the refused requests was written or kept claimed.
    assert_eq!(delivered_ids(&server, "free-0"), 0);
    assert!(
        redis.command(&["GET", &format!("{ids}free-0")]).starts_with("$-1"),
        "the refused request released its own claims"
    );

    // Once the other claims lapse, the retry lands.
    std::thread::sleep(std::time::Duration::from_millis(1600));
    let request = json!({ "batch": [track("held-0"), track("held-1"), track("free-0")] });
    let (status, body) = post_json(&server, "/v1/batch", &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicates"].as_u64(), None, "all were new: {body}");
    for id in ["held-0", "held-1", "free-0"] {
        assert_eq!(delivered_ids(&server, id), 1, "{id}");
    }
    // held-0 now names this request's token, whose status says delivered.
    let reply = redis.command(&["GET", &format!("{ids}held-0")]);
    let token = reply.lines().nth(1).unwrap_or_default();
    assert!(token.starts_with("c:") && token != other, "{reply:?}");
    assert!(
        redis
            .command(&["GET", &format!("{statuses}{token}")])
            .contains("\r\nd\r\n"),
        "the request's status is delivered"
    );
    let (_, body) = post_json(&server, "/v1/batch", &request);
    assert_eq!(body["duplicates"].as_u64(), Some(3), "{body}");

    // Ids another instance delivered are duplicates, not written (its request's
    // status is delivered).
    let done = "c:000000000000000000000002";
    set(&redis, &[&format!("{ids}elsewhere-0"), done, "EX", "60"]);
    set(&redis, &[&format!("{ids}elsewhere-1"), done, "EX", "60"]);
    set(&redis, &[&format!("{statuses}{done}"), "d", "EX", "60"]);
    let request = json!({ "batch": [track("elsewhere-0"), track("elsewhere-1")] });
    let (status, body) = post_json(&server, "/v1/batch", &request);
    assert_eq!((status, body["duplicates"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(
        delivered_ids(&server, "elsewhere-0") + delivered_ids(&server, "elsewhere-1"),
        0
    );
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
