//! Kafka (and the file sink) took a request's batch, but the request did not end
//! well: another sink failed it (ClickHouse's copy could not be spooled: 503), or
//! breakwater was killed while the request waited for ClickHouse. Either way the
//! client sends the same request again. Kafka's in-doubt marks (and its journal
//! entry) are kept until the request ends, so the resend is read back from the topic
//! instead of being written a second time; the file sink remembers what it wrote for
//! a failed request and leaves it out of the resend (issue 19 (d) and the journal's
//! "settled at the ack" gap).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::backends::{free_port, ClickHouse, Kafka};
use support::*;

const TOPIC: &str = "events";
const PARTITIONS: i32 = 2;

fn request(round: &str, events: usize) -> (Vec<String>, Value) {
    let ids: Vec<String> = (0..events).map(|i| format!("{round}-e{i}")).collect();
    let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
    (ids, body)
}

fn assert_each_once_in_kafka(kafka: &Kafka, expected: &[String], server: &Server) {
    support::assert_each_once_in_kafka(kafka, TOPIC, PARTITIONS, expected, server);
}

#[test]
fn a_request_refused_after_kafka_took_it_is_not_written_twice_by_its_retry() {
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let dir = tempfile::tempdir().unwrap();
    let policy = quick_clickhouse_policy(dir.path(), "500", "60000");
    // ClickHouse is not there: its copy of every request goes to the spool, while
    // Kafka and the file sink take theirs at once.
    let config = format!(
        "[server]\npolicy_file = \"{}\"\n\n[file_sink]\nenabled = true\n\n[clickhouse]\nurl = \"http://127.0.0.1:{}\"\ndatabase = \"partial\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\n",
        policy.display(),
        free_port(),
        kafka.brokers()
    );
    let server = Server::start_with(&config, &[]);
    let mut expected: Vec<String> = Vec::new();
    for round in 0..10 {
        let (ids, body) = request(&format!("before-{round}"), 50);
        let (status, answer) = post_json(&server, "/v1/batch", &body);
        assert_eq!(status, 200, "{answer}");
        expected.extend(ids);
    }

    // The disk fills: ClickHouse's copy cannot be spooled, so requests are refused
    // after Kafka took them.
    let spool_len = std::fs::metadata(server.data_dir.join("spool").join("spool.redb"))
        .unwrap()
        .len();
    set_file_size_limit(server.pid(), Some(spool_len));
    let mut refused: Vec<(Vec<String>, Value)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    while refused.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no request was refused while the disk was full"
        );
        let (ids, body) = request(&format!("full-{round}"), 50);
        round += 1;
        let (status, answer) = post_json(&server, "/v1/batch", &body);
        match status {
            200 => expected.extend(ids),
            503 => refused.push((ids, body)),
            other => panic!("unexpected {other} while the disk was full: {answer}"),
        }
    }

    // Space is back; the clients resend what was refused, as SDKs do.
    set_file_size_limit(server.pid(), None);
    for (ids, body) in refused {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, answer) = post_json(&server, "/v1/batch", &body);
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "{answer}");
            assert!(Instant::now() < deadline, "the resend was never accepted: {answer}");
            std::thread::sleep(Duration::from_millis(200));
        }
        expected.extend(ids);
    }
    assert_each_once_in_kafka(&kafka, &expected, &server);
    assert_each_once_in_the_files(&server, &expected);
    let left_out: f64 = ["file", "kafka", "clickhouse"]
        .iter()
        .map(|sink| {
            server.metric(&format!(
                "breakwater_sink_unsettled_left_out_events_total{{sink=\"{sink}\"}}"
            ))
        })
        .sum();
    assert!(
        left_out >= 50.0,
        "the resends' durable copies were left out: {left_out}"
    );
}

#[test]
fn a_batch_kafka_took_before_a_crash_is_not_written_again_when_its_request_is_resent() {
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let clickhouse = ClickHouse::start();
    let config = format!(
        "[file_sink]\nenabled = true\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"crash_wait\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\n",
        clickhouse.url(),
        kafka.brokers()
    );
    let mut server = Server::start_with(&config, &[]);
    let (warm_ids, warm) = request("warm-up", 20);
    let (status, answer) = post_json(&server, "/v1/batch", &warm);
    assert_eq!(status, 200, "{answer}");

    // ClickHouse hangs: the request waits for its INSERT after Kafka acknowledged
    // its copy; breakwater dies before answering.
    clickhouse.freeze();
    let (crash_ids, crash) = request("crash", 20);
    send_then_kill9(&mut server, &crash);
    clickhouse.thaw();

    // The client resends the unanswered request to the restarted server.
    let server = server.restart();
    let (status, answer) = post_json(&server, "/v1/batch", &crash);
    assert_eq!(status, 200, "{answer}\n{}", server.log());
    let expected: Vec<String> = warm_ids.into_iter().chain(crash_ids).collect();
    assert_each_once_in_kafka(&kafka, &expected, &server);
    // The file sink had fsynced the request's lines before the crash; its resend
    // must not write them again.
    assert_each_once_in_the_files(&server, &expected);
}

fn assert_each_once_in_the_files(server: &Server, expected: &[String]) {
    let lines = id_counts(&server.sink_events());
    let twice: Vec<_> = lines.iter().filter(|(_, n)| **n > 1).collect();
    let missing = expected.iter().filter(|id| !lines.contains_key(*id)).count();
    assert_eq!(missing, 0, "missing from the file sink");
    assert!(
        twice.is_empty(),
        "written to the file sink {} times over: {twice:?}",
        twice.len()
    );
}

/// Kafka is acknowledged on spool: its copy of a request is in the spool at once,
/// while the request waits for a frozen ClickHouse; breakwater dies before answering.
/// The copy is replayed after the restart, and the client's resend must not put the
/// same events in the topic a second time: the spool's recent records seed Kafka's
/// route memory at start-up, and a copy is not replayed while its request is still
/// unanswered (a replay then a crash would leave nothing to say it was written).
#[test]
fn a_copy_spooled_for_a_request_cut_off_by_a_crash_is_not_written_again_by_its_resend() {
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let clickhouse = ClickHouse::start();
    let config = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"spooled_crash\"\n\n[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\nacknowledge = \"on_spool\"\n",
        clickhouse.url(),
        kafka.brokers()
    );
    let mut server = Server::start_with(&config, &[]);
    let (warm_ids, warm) = request("spool-warm-up", 20);
    let (status, answer) = post_json(&server, "/v1/batch", &warm);
    assert_eq!(status, 200, "{answer}");

    clickhouse.freeze();
    let (crash_ids, crash) = request("spool-crash", 20);
    send_then_kill9(&mut server, &crash);
    clickhouse.thaw();

    let server = server.restart();
    let (status, answer) = post_json(&server, "/v1/batch", &crash);
    assert_eq!(status, 200, "{answer}\n{}", server.log());
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("breakwater_spool_events{sink=\"kafka\"}") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "Kafka's spool did not drain\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let expected: Vec<String> = warm_ids.into_iter().chain(crash_ids).collect();
    assert_each_once_in_kafka(&kafka, &expected, &server);
}
