//! Real analytics SDKs from PyPI, unmodified, configured only with breakwater's URL
//! and a write key, against real Redis, ClickHouse and Kafka (tansu):
//!
//! - segment-analytics-python 2.2.3: the write key by HTTP Basic only;
//! - segment-analytics-python 2.3.6: the write key only in the body (`writeKey`);
//! - segment-analytics-python 2.4.0 (latest): both, and it honours `Retry-After`;
//! - rudder-sdk-python 2.1.9: HTTP Basic, gzip on by default.
//!
//! Each sends every call type in batches and flushes; every event must arrive
//! exactly once in ClickHouse and in Kafka with its fields. Then the SDKs ride out a
//! ClickHouse outage (200 from the spool) and a full spool (503; they retry and
//! every event lands exactly once in the end). scripts/test.sh installs each release
//! into target/sdks/<release>; tests/sdk/send_with_sdk.py drives them.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::backends::{ClickHouse, Kafka, Redis};
use support::*;

const TOPIC: &str = "events";
const PARTITIONS: i32 = 3;
const DATABASE: &str = "sdk";
const TABLE: &str = "sdk.events";

struct Sdk {
    /// The folder under target/sdks (package-version).
    release: &'static str,
    /// Which client module tests/sdk/send_with_sdk.py imports.
    module: &'static str,
    /// The breakwater source its write key belongs to: the stored `source_name`
    /// proves breakwater read the key the way this release sends it.
    source: &'static str,
    write_key: &'static str,
}

const SDKS: [Sdk; 4] = [
    Sdk {
        release: "segment-analytics-python-2.2.3",
        module: "segment",
        source: "segment-basic",
        write_key: "wk-segment-basic",
    },
    Sdk {
        release: "segment-analytics-python-2.3.6",
        module: "segment",
        source: "segment-body",
        write_key: "wk-segment-body",
    },
    Sdk {
        release: "segment-analytics-python-2.4.0",
        module: "segment",
        source: "segment-latest",
        write_key: "wk-segment-latest",
    },
    Sdk {
        release: "rudder-sdk-python-2.1.9",
        module: "rudder",
        source: "rudder",
        write_key: "wk-rudder",
    },
];

/// What one SDK run asked for, and the errors it reported after its own retries.
struct SdkRun {
    expected: Vec<Value>,
    errors: Vec<Value>,
}

fn sdk_dir(sdk: &Sdk) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/sdks")
        .join(sdk.release);
    assert!(
        dir.join(".installed").is_file(),
        "{} is not installed in {}: run scripts/test.sh, which installs every tested SDK release",
        sdk.release,
        dir.display()
    );
    dir
}

/// Runs one SDK for `rounds` rounds of all six call types. `padding_bytes` of random
/// hex go into each track event's properties: bytes spool compression cannot shrink.
fn run_sdk(sdk: &Sdk, server: &Server, write_key: &str, prefix: &str, rounds: u32, padding_bytes: usize) -> SdkRun {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/send_with_sdk.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["--sdk", sdk.module, "--host", &server.url(""), "--write-key", write_key])
        .args(["--prefix", prefix, "--rounds", &rounds.to_string()])
        .args(["--padding-bytes", &padding_bytes.to_string()])
        .env("PYTHONPATH", sdk_dir(sdk))
        .output()
        .expect("python3 must be installed (scripts/test.sh checks)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed: {}\n{stdout}",
        sdk.release,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut lines: Vec<Value> = stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let summary = lines.pop().expect("a summary line");
    SdkRun {
        expected: lines,
        errors: summary["errors"].as_array().cloned().unwrap_or_default(),
    }
}

fn config(redis: &Redis, clickhouse: &ClickHouse, kafka: &Kafka, extra: &str) -> String {
    let mut config = format!(
        "{extra}\n[redis]\nurl = \"{}\"\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{DATABASE}\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\n",
        redis.url(),
        clickhouse.url(),
        kafka.brokers()
    );
    for sdk in &SDKS {
        config.push_str(&format!(
            "\n[[sources]]\nname = \"{}\"\nwrite_key = \"{}\"\n",
            sdk.source, sdk.write_key
        ));
    }
    config
}

/// Waits until ClickHouse holds `expected` distinct ids, then returns each id's
/// payload as stored (read with FINAL: a replayed INSERT collapses), checking that
/// no id is there twice.
fn clickhouse_payloads(clickhouse: &ClickHouse, expected: usize) -> HashMap<String, (Value, Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let distinct = clickhouse
            .try_query(&format!("SELECT uniqExact(message_id) FROM {TABLE}"))
            .ok()
            .and_then(|n| n.trim().parse::<usize>().ok());
        if distinct == Some(expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ClickHouse: expected {expected} distinct events, found {distinct:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows = clickhouse.rows(&format!("SELECT * FROM {TABLE} FINAL"));
    assert_eq!(rows.len(), expected, "ClickHouse rows (FINAL): each event exactly once");
    rows.into_iter()
        .map(|row| {
            let payload: Value = serde_json::from_str(row["payload"].as_str().unwrap()).unwrap();
            (row["message_id"].as_str().unwrap().to_string(), (row, payload))
        })
        .collect()
}

/// Every event the SDKs were asked to send is in Kafka exactly once, with the same
/// payload ClickHouse stored; nothing else is there.
fn check_kafka(kafka: &Kafka, stored: &HashMap<String, (Value, Value)>) {
    let records = kafka.read_all(TOPIC, PARTITIONS, stored.len());
    let counts = id_counts(&records.iter().map(|r| r.payload.clone()).collect::<Vec<_>>());
    let wrong: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(wrong.is_empty(), "Kafka: events not exactly once: {wrong:?}");
    assert_eq!(records.len(), stored.len(), "Kafka: records");
    for record in &records {
        let id = record.payload["messageId"].as_str().unwrap();
        let (_, payload) = stored
            .get(id)
            .unwrap_or_else(|| panic!("Kafka holds {id}, which no SDK sent"));
        assert_eq!(&record.payload, payload, "{id}: Kafka and ClickHouse payloads differ");
    }
}

/// Every event the SDKs were asked to send is in ClickHouse and Kafka exactly once,
/// with its fields; nothing else is.
fn check_every_event_once(clickhouse: &ClickHouse, kafka: &Kafka, expected: &[(&Sdk, Value)]) {
    let stored = clickhouse_payloads(clickhouse, expected.len());
    for (sdk, event) in expected {
        let id = event["messageId"].as_str().unwrap();
        let (row, payload) = stored
            .get(id)
            .unwrap_or_else(|| panic!("{id} from {} missing from ClickHouse", sdk.release));
        check_fields(sdk, event, row, payload);
    }
    check_kafka(kafka, &stored);
}

/// The event as stored carries every field the SDK was asked to send.
fn check_fields(sdk: &Sdk, expected: &Value, row: &Value, payload: &Value) {
    let id = expected["messageId"].as_str().unwrap();
    let kind = expected["type"].as_str().unwrap();
    assert_eq!(payload["type"], kind, "{id}: type");
    assert_eq!(row["type"], kind, "{id}: type column");
    assert_eq!(
        row["source_name"], sdk.source,
        "{id}: the write key maps to {}",
        sdk.source
    );
    assert_eq!(payload["sourceName"], sdk.source, "{id}: sourceName");
    assert_eq!(
        row["user_id"],
        expected["userId"].as_str().unwrap_or(""),
        "{id}: user_id column"
    );
    assert_eq!(
        row["anonymous_id"],
        expected["anonymousId"].as_str().unwrap_or(""),
        "{id}: anonymous_id column"
    );
    for field in [
        "userId",
        "anonymousId",
        "event",
        "properties",
        "name",
        "category",
        "groupId",
        "previousId",
    ] {
        if let Some(value) = expected.get(field) {
            assert_eq!(&payload[field], value, "{id}: `{field}`");
        }
    }
    // rudder-sdk-python moves identify's traits into context.traits (it sends no
    // root `traits`); breakwater stores what the SDK sent.
    if let Some(traits) = expected.get("traits") {
        let found = if payload["traits"].is_null() {
            &payload["context"]["traits"]
        } else {
            &payload["traits"]
        };
        assert_eq!(found, traits, "{id}: traits");
    }
    for (key, value) in expected["context"].as_object().unwrap() {
        assert_eq!(&payload["context"][key], value, "{id}: context.{key}");
    }
    assert_eq!(
        payload["context"]["library"]["name"], "analytics-python",
        "{id}: the SDK's library context"
    );
    // The SDK's timestamp is the original; breakwater corrects it for clock skew.
    let original = millis(&expected["timestamp"]);
    assert_eq!(
        millis(&payload["originalTimestamp"]),
        original,
        "{id}: originalTimestamp"
    );
    let received = millis(&payload["receivedAt"]);
    let sent_at = millis(&payload["sentAt"]);
    let corrected = millis(&payload["timestamp"]);
    assert!(
        (corrected - (received - (sent_at - original))).abs() <= 1,
        "{id}: timestamp must be receivedAt - (sentAt - originalTimestamp): {payload}"
    );
}

#[test]
fn every_sdk_sends_every_call_type_exactly_once_with_its_fields() {
    let redis = Redis::start();
    let clickhouse = ClickHouse::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let server = Server::start_with(&config(&redis, &clickhouse, &kafka, ""), &[]);

    let mut expected = Vec::new();
    for sdk in &SDKS {
        let run = run_sdk(sdk, &server, sdk.write_key, sdk.release, 10, 0);
        assert!(run.errors.is_empty(), "{}: {:?}", sdk.release, run.errors);
        assert_eq!(run.expected.len(), 60, "{}: six call types × 10 rounds", sdk.release);
        expected.extend(run.expected.into_iter().map(|event| (sdk, event)));
    }

    // A wrong key: each SDK is told 401 once and gives up (it reads the top-level
    // `code` and `message`; without them it would retry ten times).
    for sdk in &SDKS {
        let run = run_sdk(sdk, &server, "not-a-key", &format!("{}-wrong", sdk.release), 1, 0);
        assert_eq!(run.errors.len(), 1, "{}: {:?}", sdk.release, run.errors);
        assert_eq!(run.errors[0]["status"], 401, "{}", sdk.release);
        assert_eq!(run.errors[0]["code"], "invalid_write_key", "{}", sdk.release);
    }
    assert_eq!(
        server.metric("breakwater_http_requests_total{route=\"/v1/batch\",status=\"401\"}"),
        SDKS.len() as f64,
        "one 401 per SDK: none retried it"
    );

    check_every_event_once(&clickhouse, &kafka, &expected);
}

#[test]
fn sdks_get_200_during_an_outage_and_retry_a_full_spool_until_every_event_lands_once() {
    let redis = Redis::start();
    let mut clickhouse = ClickHouse::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(
        dir.path(),
        "small-spool.toml",
        &[("clickhouse.spool", "max_bytes", "1048576")],
    );
    let server_config = config(
        &redis,
        &clickhouse,
        &kafka,
        &format!("[server]\npolicy_file = \"{}\"\n", policy.display()),
    );
    let server = Server::start_with(&server_config, &[]);
    let rudder = &SDKS[3];
    let segment_basic = &SDKS[0];
    let segment_latest = &SDKS[2];

    // Create the table, then take ClickHouse away.
    let first = run_sdk(rudder, &server, rudder.write_key, "before", 1, 0);
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    clickhouse_payloads(&clickhouse, 6);
    clickhouse.kill9();

    // Down, spool with room: the SDK gets 200 and never knows.
    let during = run_sdk(rudder, &server, rudder.write_key, "outage", 10, 0);
    assert!(during.errors.is_empty(), "{:?}", during.errors);
    assert!(server.metric("breakwater_spool_events{sink=\"clickhouse\"}") >= 60.0);

    // Still down, and the 1 MiB spool fills (padded events: spool records are
    // compressed): 503 with Retry-After. The SDKs retry
    // (with backoff; 2.4.0 honours Retry-After) while ClickHouse comes back.
    let mut expected = Vec::new();
    std::thread::scope(|scope| {
        let runs: Vec<_> = [segment_basic, segment_latest]
            .into_iter()
            .map(|sdk| {
                let server = &server;
                scope.spawn(move || {
                    (
                        sdk,
                        run_sdk(sdk, server, sdk.write_key, &format!("full-{}", sdk.release), 300, 4000),
                    )
                })
            })
            .collect();
        let refused = || server.metric("breakwater_http_requests_total{route=\"/v1/batch\",status=\"503\"}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while refused() == 0.0 {
            assert!(Instant::now() < deadline, "the spool never filled");
            std::thread::sleep(Duration::from_millis(100));
        }
        clickhouse.restart();
        for run in runs {
            let (sdk, run) = run.join().unwrap();
            assert!(run.errors.is_empty(), "{} gave up: {:?}", sdk.release, run.errors);
            expected.extend(run.expected.into_iter().map(|event| (sdk, event)));
        }
    });
    let refused = server.metric("breakwater_http_requests_total{route=\"/v1/batch\",status=\"503\"}");
    assert!(
        server.metric("breakwater_spool_full_total{sink=\"clickhouse\"}") > 0.0,
        "the spool was full"
    );
    expected.extend(first.expected.into_iter().map(|event| (rudder, event)));
    expected.extend(during.expected.into_iter().map(|event| (rudder, event)));

    check_every_event_once(&clickhouse, &kafka, &expected);
    eprintln!(
        "{} events (rudder twice, two Segment releases), {refused} requests answered 503 and retried by the SDKs, each event once in ClickHouse and Kafka",
        expected.len()
    );
}
