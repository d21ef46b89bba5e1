//! ClickHouse hangs (SIGSTOP) with an INSERT in its socket; the INSERT times out on
//! breakwater's side, the request is answered from the spool, and ClickHouse, once
//! it wakes, reads the INSERT and writes it anyway. Replaying the spooled copy as it
//! is would put every row in the table twice (one row under FINAL, two raw). The
//! events of an INSERT of unknown outcome are looked up before they are inserted
//! again (issue 19 e, ClickHouse).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::ClickHouse;
use support::*;

const DATABASE: &str = "in_doubt";
const EVENTS: usize = 20;

/// Rows (no FINAL) whose messageId starts with `prefix`.
fn raw_rows(clickhouse: &ClickHouse, database: &str, prefix: &str) -> u64 {
    clickhouse
        .query(&format!(
            "SELECT count() FROM {database}.events WHERE startsWith(message_id, '{prefix}')"
        ))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn an_insert_clickhouse_finished_after_it_timed_out_is_not_replayed() {
    let clickhouse = ClickHouse::start();
    let dir = tempfile::tempdir().unwrap();
    // One attempt of 1.5 s (the INSERT deadline fits: 1.24 s), a breaker that opens
    // at once and probes again after a second.
    let policy = quick_clickhouse_policy(dir.path(), "1500", "1000");
    let config = format!(
        "[server]\npolicy_file = \"{}\"\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{DATABASE}\"\n",
        policy.display(),
        clickhouse.url()
    );
    let server = Server::start_with(&config, &[]);
    let (status, answer) = post_json(&server, "/v1/batch", &json!({ "batch": [track("warm-up")] }));
    assert_eq!(status, 200, "{answer}");

    clickhouse.freeze();
    let ids: Vec<String> = (0..EVENTS).map(|i| format!("doubt-{i}")).collect();
    let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
    let (status, answer) = post_json(&server, "/v1/batch", &body);
    assert_eq!(status, 200, "answered from the spool: {answer}");
    assert!(server.metric("breakwater_spool_events{sink=\"clickhouse\"}") >= EVENTS as f64);
    // ClickHouse wakes, reads the abandoned INSERT and writes it.
    clickhouse.thaw();

    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("breakwater_spool_events{sink=\"clickhouse\"}") > 0.0 {
        assert!(Instant::now() < deadline, "the spool did not drain\n{}", server.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let raw = raw_rows(&clickhouse, DATABASE, "doubt-");
    assert_eq!(
        raw,
        EVENTS as u64,
        "raw rows (no FINAL): each event once (in doubt: {}, found: {})\n{}",
        server.metric("breakwater_clickhouse_in_doubt_events_total"),
        server.metric("breakwater_clickhouse_in_doubt_found_events_total"),
        server.log()
    );
}

/// The same INSERT, but breakwater is killed (`kill -9`) while it waits for it: the
/// memory of the INSERT dies with the process. Its in-doubt journal
/// (`<data_dir>/clickhouse/in-doubt.journal`) outlives it, so the client's resend of
/// the unanswered request is looked up before it is inserted again.
#[test]
fn an_insert_in_flight_at_a_kill_9_is_not_written_again_by_the_resend() {
    let clickhouse = ClickHouse::start();
    let config = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"{DATABASE}_crash\"\n",
        clickhouse.url()
    );
    let mut server = Server::start_with(&config, &[]);
    let (status, answer) = post_json(&server, "/v1/batch", &json!({ "batch": [track("warm-up")] }));
    assert_eq!(status, 200, "{answer}");

    clickhouse.freeze();
    let ids: Vec<String> = (0..EVENTS).map(|i| format!("crash-{i}")).collect();
    let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
    send_then_kill9(&mut server, &body);
    // ClickHouse wakes, reads the INSERT the dead process left in its socket, and
    // writes it.
    clickhouse.thaw();

    let server = server.restart();
    let (status, answer) = post_json(&server, "/v1/batch", &body);
    assert_eq!(status, 200, "the resend: {answer}\n{}", server.log());
    let raw = raw_rows(&clickhouse, &format!("{DATABASE}_crash"), "crash-");
    assert_eq!(
        raw,
        EVENTS as u64,
        "raw rows (no FINAL): each event once (found in the table: {})\n{}",
        server.metric("breakwater_clickhouse_in_doubt_found_events_total"),
        server.log()
    );
}
