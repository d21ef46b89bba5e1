//! With Redis dedup, ClickHouse and Kafka all on (real servers on loopback ports),
//! every accepted event lands exactly once in ClickHouse and in Kafka, with its
//! fields intact — single events, a batch of 1,000, and many concurrent clients.

mod support;

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use support::backends::{ClickHouse, Kafka, Redis};
use support::*;

const TOPIC: &str = "events";
const PARTITIONS: i32 = 3;

fn config(redis: &Redis, clickhouse: &ClickHouse, kafka: &Kafka) -> String {
    format!(
        r#"
[redis]
url = "{}"

[clickhouse]
url = "{}"
database = "bw_test"

[kafka]
brokers = "{}"
topic = "{TOPIC}"
"#,
        redis.url(),
        clickhouse.url(),
        kafka.brokers()
    )
}

fn single_events() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/track",
            json!({"messageId":"s-track","userId":"u-1","event":"Signed Up","properties":{"plan":"pro","seats":3}}),
        ),
        (
            "/v1/identify",
            json!({"messageId":"s-identify","userId":"u-1","traits":{"email":"a@example.com","name":"Zoë \"Q\""}}),
        ),
        (
            "/v1/page",
            json!({"messageId":"s-page","anonymousId":"anon-7","name":"Pricing","properties":{"path":"/pricing"}}),
        ),
        (
            "/v1/screen",
            json!({"messageId":"s-screen","userId":"u-2","name":"Home"}),
        ),
        (
            "/v1/group",
            json!({"messageId":"s-group","userId":"u-1","groupId":"g-1","traits":{"size":12}}),
        ),
        (
            "/v1/alias",
            json!({"messageId":"s-alias","userId":"u-3","previousId":"anon-7"}),
        ),
    ]
}

#[test]
fn every_event_lands_once_in_clickhouse_and_kafka_with_its_fields() {
    let redis = Redis::start();
    let clickhouse = ClickHouse::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let server = Server::start_with(&config(&redis, &clickhouse, &kafka), &[]);

    // 1. Single events of every type.
    for (path, event) in single_events() {
        let (status, body) = post_json(&server, path, &event);
        assert_eq!(status, 200, "{path}: {body}");
    }
    // 2. One batch of 1,000 (and the same batch again: all duplicates).
    let big_batch = json!({ "batch": (0..1000).map(|i| json!({
        "type": "track", "messageId": format!("big-{i}"), "anonymousId": format!("anon-{}", i % 17),
        "event": "Item Viewed", "properties": { "i": i }
    })).collect::<Vec<_>>() });
    let (status, body) = post_json(&server, "/v1/batch", &big_batch);
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_json(&server, "/v1/batch", &big_batch);
    assert_eq!((status, body["duplicates"].as_u64()), (200, Some(1000)), "{body}");
    // 3. Concurrent clients, each resending one of its batches.
    std::thread::scope(|scope| {
        for client_index in 0..12 {
            let server = &server;
            scope.spawn(move || {
                for request in 0..8 {
                    let batch = json!({ "batch": (0..25).map(|i| track(&format!("c{client_index}-r{request}-e{i}"))).collect::<Vec<_>>() });
                    let (status, body) = post_json(server, "/v1/batch", &batch);
                    assert_eq!(status, 200, "client {client_index}: {body}");
                    if request == 3 {
                        let (status, _) = post_json(server, "/v1/batch", &batch);
                        assert_eq!(status, 200);
                    }
                }
            });
        }
    });
    let expected = 6 + 1000 + 12 * 8 * 25;

    // ClickHouse: every event once, nothing else.
    let table = "bw_test.events";
    clickhouse.wait_for_count(table, expected as u64);
    let duplicated = clickhouse.query(&format!(
        "SELECT count() FROM (SELECT message_id FROM {table} GROUP BY message_id HAVING count() > 1)"
    ));
    assert_eq!(
        duplicated.trim(),
        "0",
        "message ids stored more than once in ClickHouse"
    );

    // Field by field for the single events.
    let rows: HashMap<String, Value> = clickhouse
        .rows(&format!("SELECT * FROM {table} WHERE message_id LIKE 's-%'"))
        .into_iter()
        .map(|row| (row["message_id"].as_str().unwrap().to_string(), row))
        .collect();
    for (path, sent) in single_events() {
        let id = sent["messageId"].as_str().unwrap();
        let row = rows
            .get(id)
            .unwrap_or_else(|| panic!("{id} ({path}) missing from ClickHouse"));
        let payload: Value = serde_json::from_str(row["payload"].as_str().unwrap()).unwrap();
        let expected_type = path.trim_start_matches("/v1/");
        assert_eq!(row["type"], expected_type, "{id}: type column");
        assert_eq!(row["source_name"], "default", "{id}: source_name column");
        assert_eq!(
            row["user_id"],
            sent["userId"].as_str().unwrap_or(""),
            "{id}: user_id column"
        );
        assert_eq!(
            row["anonymous_id"],
            sent["anonymousId"].as_str().unwrap_or(""),
            "{id}: anonymous_id column"
        );
        assert_eq!(row["event"], sent["event"].as_str().unwrap_or(""), "{id}: event column");
        for (field, value) in sent.as_object().unwrap() {
            assert_eq!(&payload[field], value, "{id}: payload field `{field}` differs");
        }
        assert_eq!(payload["type"], expected_type, "{id}: payload type");
        // The legacy (18.16) layout stores whole seconds; the payload keeps milliseconds.
        let column_seconds =
            chrono::NaiveDateTime::parse_from_str(row["received_at"].as_str().unwrap(), "%Y-%m-%d %H:%M:%S")
                .unwrap()
                .and_utc()
                .timestamp();
        assert_eq!(
            column_seconds,
            millis(&payload["receivedAt"]).div_euclid(1000),
            "{id}: received_at column"
        );
    }

    // Kafka: every event once, keyed by user, with headers, payload = ClickHouse payload.
    let records = kafka.read_all(TOPIC, PARTITIONS, expected);
    let mut by_id: BTreeMap<String, Vec<&support::backends::KafkaRecord>> = BTreeMap::new();
    for record in &records {
        by_id
            .entry(record.payload["messageId"].as_str().unwrap().to_string())
            .or_default()
            .push(record);
    }
    assert_eq!(by_id.len(), expected, "distinct events in Kafka");
    let doubled: Vec<_> = by_id.iter().filter(|(_, r)| r.len() > 1).map(|(id, _)| id).collect();
    assert!(doubled.is_empty(), "events in Kafka more than once: {doubled:?}");
    assert_eq!(records.len(), expected, "records in Kafka");
    for (id, found) in &by_id {
        let record = found[0];
        let payload = &record.payload;
        let expected_key = payload["userId"].as_str().or(payload["anonymousId"].as_str());
        assert_eq!(
            record.key.as_deref(),
            expected_key,
            "{id}: key must be userId, else anonymousId"
        );
        assert_eq!(
            record.headers.get("messageId").map(String::as_str),
            Some(id.as_str()),
            "{id}: messageId header"
        );
        assert_eq!(
            record.headers.get("type"),
            payload["type"].as_str().map(str::to_string).as_ref(),
            "{id}: type header"
        );
        assert_eq!(
            record.headers.get("source").map(String::as_str),
            Some("default"),
            "{id}: source header"
        );
        if let Some(row) = rows.get(id) {
            let stored: Value = serde_json::from_str(row["payload"].as_str().unwrap()).unwrap();
            assert_eq!(
                &stored, payload,
                "{id}: Kafka payload differs from the ClickHouse payload"
            );
        }
    }
    // One user's events share a partition (ordering per user).
    let mut partitions_of_user: HashMap<String, std::collections::HashSet<i32>> = HashMap::new();
    for record in &records {
        partitions_of_user
            .entry(record.key.clone().unwrap_or_default())
            .or_default()
            .insert(record.partition);
    }
    assert!(
        partitions_of_user.values().all(|p| p.len() == 1),
        "a key spread over partitions: {partitions_of_user:?}"
    );

    // Redis: a delivered id names its request's token, whose status says delivered;
    // both are kept for the configured TTL.
    let reply = redis.command(&["GET", "breakwater:dedup:default:big-7"]);
    let token = reply.lines().nth(1).unwrap_or_default().to_string();
    assert!(token.starts_with("c:"), "{reply:?}");
    let status_key = format!("breakwater:dedup::claim:{token}");
    assert_eq!(redis.command(&["GET", &status_key]).trim(), "$1\r\nd");
    for key in ["breakwater:dedup:default:big-7", status_key.as_str()] {
        let ttl: i64 = redis
            .command(&["TTL", key])
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap();
        assert!((86_000..=86_400).contains(&ttl), "ttl of {key}: {ttl}");
    }
    // One claim round trip per request that had new ids, never one per event.
    let claims = server.metric("breakwater_redis_round_trips_total{operation=\"claim\"}");
    let requests = 6.0 + 2.0 + 12.0 * 9.0;
    assert!(claims <= requests, "{claims} claim round trips for {requests} requests");
}
