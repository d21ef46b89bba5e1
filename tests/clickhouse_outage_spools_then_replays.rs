//! ClickHouse frozen, then killed and restarted, under load: intake keeps
//! answering 200, the spool takes what ClickHouse cannot, the breaker opens and
//! closes again, and after recovery every acknowledged event is in ClickHouse
//! exactly once. Also: breakwater `kill -9` with a non-empty spool, a start-up
//! while ClickHouse is not there at all, and a sink acknowledged on spool.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::{free_port, ClickHouse};
use support::*;

const DATABASE: &str = "outage";

/// Quick breaker and short timeouts so the test runs in seconds.
fn config(dir: &std::path::Path, clickhouse_port: u16) -> String {
    config_acknowledged(dir, clickhouse_port, "on_delivery")
}

fn config_acknowledged(dir: &std::path::Path, clickhouse_port: u16, acknowledge: &str) -> String {
    let policy = policy_file(
        dir,
        "fast.toml",
        &[
            ("clickhouse", "timeout_ms", "1000"),
            ("clickhouse.retry", "max_attempts", "2"),
            ("clickhouse.circuit_breaker", "consecutive_failures", "2"),
            ("clickhouse.circuit_breaker", "open_ms", "1000"),
        ],
    );
    format!(
        "[server]\npolicy_file = \"{}\"\n\n[clickhouse]\nurl = \"http://127.0.0.1:{clickhouse_port}\"\ndatabase = \"{DATABASE}\"\nacknowledge = \"{acknowledge}\"\n",
        policy.display()
    )
}

fn wait_for_empty_spool(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while server.metric("breakwater_spool_events{sink=\"clickhouse\"}") > 0.0 {
        assert!(Instant::now() < deadline, "the ClickHouse spool did not drain");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every acknowledged id is in the table once (duplicates collapsed by FINAL, which
/// is how the ReplacingMergeTree table is meant to be read), and nothing else.
fn assert_exactly_once(clickhouse: &ClickHouse, acked: &HashSet<String>) {
    let table = format!("{DATABASE}.events");
    let stored: HashSet<String> = clickhouse
        .query(&format!("SELECT message_id FROM {table} FINAL"))
        .lines()
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = acked.difference(&stored).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing, e.g. {missing:?}",
        acked.len() - stored.len().min(acked.len())
    );
    let unexpected: Vec<_> = stored.difference(acked).take(5).collect();
    assert!(unexpected.is_empty(), "events never acknowledged: {unexpected:?}");
    let final_count: usize = clickhouse
        .query(&format!("SELECT count() FROM {table} FINAL"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(final_count, acked.len(), "rows (FINAL) vs acknowledged events");
}

/// What four writers saw while `scenario` ran: 20-event requests, one every
/// `pause` per writer, until the scenario returns.
struct Load {
    acked: HashSet<String>,
    acked_requests: usize,
    /// Requests sent and acknowledged while `during` was set throughout.
    acked_during: usize,
    refused: Vec<(u16, serde_json::Value)>,
}

impl Load {
    fn assert_none_refused(&self, why: &str) {
        assert!(self.refused.is_empty(), "{why}: {:?}", self.refused);
    }
}

fn under_load(server: &Server, prefix: &str, pause: Duration, during: &AtomicBool, scenario: impl FnOnce()) -> Load {
    let load = Mutex::new(Load {
        acked: HashSet::new(),
        acked_requests: 0,
        acked_during: 0,
        refused: Vec::new(),
    });
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for writer in 0..4 {
            let (load, stop) = (&load, &stop);
            scope.spawn(move || {
                let mut request = 0;
                while !stop.load(Ordering::Relaxed) {
                    request += 1;
                    let batch: Vec<_> = (0..20)
                        .map(|i| track(&format!("{prefix}{writer}-r{request}-e{i}")))
                        .collect();
                    let during_before = during.load(Ordering::Relaxed);
                    let (status, body) = post_json(server, "/v1/batch", &json!({ "batch": batch }));
                    let mut load = load.lock().unwrap();
                    if status == 200 {
                        load.acked
                            .extend(batch.iter().map(|e| e["messageId"].as_str().unwrap().to_string()));
                        load.acked_requests += 1;
                        if during_before && during.load(Ordering::Relaxed) {
                            load.acked_during += 1;
                        }
                    } else {
                        load.refused.push((status, body));
                    }
                    drop(load);
                    std::thread::sleep(pause);
                }
            });
        }
        scenario();
        stop.store(true, Ordering::Relaxed);
    });
    load.into_inner().unwrap()
}

#[test]
fn freeze_and_kill_under_load_lose_nothing_and_double_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut clickhouse = ClickHouse::start();
    let server = Server::start_with(&config(dir.path(), clickhouse.http_port), &[]);
    let load = under_load(&server, "w", Duration::from_millis(20), &AtomicBool::new(false), || {
        std::thread::sleep(Duration::from_secs(1));
        clickhouse.freeze();
        std::thread::sleep(Duration::from_secs(3));
        clickhouse.thaw();
        std::thread::sleep(Duration::from_secs(1));
        clickhouse.kill9();
        std::thread::sleep(Duration::from_secs(2));
        clickhouse.restart();
        std::thread::sleep(Duration::from_secs(1));
    });
    load.assert_none_refused("intake must keep answering 200 through the outage");
    assert!(
        server.metric("breakwater_spool_appended_events_total{sink=\"clickhouse\"}") > 0.0,
        "the spool was used"
    );
    assert!(
        server.metric("breakwater_circuit_breaker_transitions_total{dependency=\"clickhouse\",to=\"open\"}") >= 1.0,
        "the breaker opened"
    );
    wait_for_empty_spool(&server);
    let acked = load.acked;
    assert!(acked.len() > 500, "load was too light to prove much: {}", acked.len());
    assert_exactly_once(&clickhouse, &acked);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("breakwater_circuit_breaker_state{dependency=\"clickhouse\"}") != 0.0 {
        assert!(Instant::now() < deadline, "the breaker did not close after recovery");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_spool_left_by_kill_9_is_replayed_after_restart_and_startup_needs_no_clickhouse() {
    let dir = tempfile::tempdir().unwrap();
    // ClickHouse is not there when breakwater starts.
    let port = free_port();
    let mut server = Server::start_with(&config(dir.path(), port), &[]);
    let mut acked = HashSet::new();
    for request in 0..30 {
        let batch: Vec<_> = (0..10).map(|i| track(&format!("k{request}-{i}"))).collect();
        let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": batch }));
        assert_eq!(status, 200, "a missing ClickHouse must not stop intake: {body}");
        acked.extend(batch.iter().map(|e| e["messageId"].as_str().unwrap().to_string()));
    }
    assert_eq!(server.metric("breakwater_spool_events{sink=\"clickhouse\"}"), 300.0);
    server.kill9();

    let clickhouse = ClickHouse::start_at(port);
    let restarted = server.restart();
    wait_for_empty_spool(&restarted);
    assert_exactly_once(&clickhouse, &acked);
    // A client resending after the crash: without Redis or the file sink the
    // in-process dedup starts empty, so the events are written again, and the
    // ReplacingMergeTree table collapses them by messageId.
    let again: Vec<_> = (0..10).map(|i| track(&format!("k0-{i}"))).collect();
    let (status, _) = post_json(&restarted, "/v1/batch", &json!({ "batch": again }));
    assert_eq!(status, 200);
    wait_for_empty_spool(&restarted);
    assert_exactly_once(&clickhouse, &acked);
}

#[test]
fn acknowledged_on_spool_clients_never_wait_for_clickhouse_and_every_event_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let clickhouse = ClickHouse::start();
    let server = Server::start_with(&config_acknowledged(dir.path(), clickhouse.http_port, "on_spool"), &[]);
    let frozen = AtomicBool::new(false);
    let load = under_load(&server, "s", Duration::from_millis(5), &frozen, || {
        std::thread::sleep(Duration::from_secs(1));
        // A stalled ClickHouse (no error, no answer): acks must not wait for it.
        clickhouse.freeze();
        frozen.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(2));
        frozen.store(false, Ordering::Relaxed);
        clickhouse.thaw();
        std::thread::sleep(Duration::from_secs(1));
    });
    load.assert_none_refused("every request is acknowledged from the spool");
    let acked = load.acked;
    assert!(acked.len() > 500, "load was too light to prove much: {}", acked.len());
    let while_frozen = load.acked_during;
    assert!(
        while_frozen >= 20,
        "requests kept being acknowledged while ClickHouse was frozen: {while_frozen}"
    );
    assert_eq!(
        server.metric("breakwater_spool_appended_events_total{sink=\"clickhouse\"}"),
        acked.len() as f64,
        "every acknowledged event went through the spool"
    );
    wait_for_empty_spool(&server);
    assert_exactly_once(&clickhouse, &acked);
    // Delivery behind the ack joins requests: fewer INSERTs than requests.
    let inserts = server.metric("breakwater_clickhouse_events_per_insert_count");
    let requests = load.acked_requests as f64;
    eprintln!(
        "acknowledged {} events in {requests} requests ({while_frozen} while ClickHouse was frozen); {inserts} INSERTs",
        acked.len()
    );
    assert!(
        inserts > 0.0 && inserts < requests / 2.0,
        "{inserts} INSERTs for {requests} acknowledged requests"
    );
}

/// With `policies/large-inserts.toml` an INSERT carries megabytes of RowBinary,
/// which the sink encodes and sends in chunks of about 1 MiB: every row arrives
/// whole and in one piece, whatever chunk its bytes fell into.
#[test]
fn large_inserts_sent_in_chunks_arrive_whole() {
    let clickhouse = ClickHouse::start();
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/large-inserts.toml");
    let server = Server::start_with(
        &format!(
            "[server]\npolicy_file = \"{}\"\n\n[clickhouse]\nurl = \"http://127.0.0.1:{}\"\ndatabase = \"{DATABASE}\"\nacknowledge = \"on_spool\"\n",
            policy.display(),
            clickhouse.http_port
        ),
        &[],
    );
    // 6,000 events of about 1.6 KB each, from 4 clients at once; the pad differs per
    // event so a row put together from the wrong bytes cannot pass.
    let pad = |i: usize| format!("{i:06}-{}", "x".repeat(1500));
    std::thread::scope(|scope| {
        for client_index in 0..4 {
            let server = &server;
            scope.spawn(move || {
                for request in 0..15 {
                    let batch: Vec<_> = (0..100)
                        .map(|e| {
                            let i = (client_index * 15 + request) * 100 + e;
                            json!({
                                "type": "track", "messageId": format!("big-{i}"), "anonymousId": "a",
                                "event": "Chunked", "properties": { "i": i, "pad": pad(i) }
                            })
                        })
                        .collect();
                    let (status, body) = post_json(server, "/v1/batch", &json!({ "batch": batch }));
                    assert_eq!(status, 200, "client {client_index}: {body}");
                }
            });
        }
    });
    wait_for_empty_spool(&server);
    let table = format!("{DATABASE}.events");
    clickhouse.wait_for_count(&table, 6000);
    let inserts = server.metric("breakwater_clickhouse_events_per_insert_count");
    let events_per_insert = server.metric("breakwater_clickhouse_events_per_insert_sum") / inserts;
    assert!(
        events_per_insert >= 1000.0,
        "INSERTs too small to span chunks: {inserts} INSERTs, {events_per_insert} events each"
    );
    let rows = clickhouse.rows(&format!("SELECT message_id, payload FROM {table}"));
    let mut seen = HashSet::new();
    for row in &rows {
        let payload: serde_json::Value = serde_json::from_str(row["payload"].as_str().unwrap()).unwrap();
        let i = payload["properties"]["i"].as_u64().unwrap() as usize;
        assert_eq!(row["message_id"], format!("big-{i}"), "message_id column of event {i}");
        assert_eq!(payload["properties"]["pad"], pad(i), "payload of event {i}");
        assert!(seen.insert(i), "event {i} stored twice");
    }
    assert_eq!(seen.len(), 6000);
    eprintln!("6,000 events in {inserts} INSERTs, {events_per_insert:.0} events each");
}
