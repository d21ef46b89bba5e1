//! A spool append that outlives `server.spool_write_timeout_ms` (the disk under the
//! spool stalls: `fsfreeze` on a real ext4 file system) answers `503 spool_slow`
//! within the deadline instead of holding the request, and its memory, for as long
//! as the disk hangs. The write goes on: while its outcome is unknown, the client's
//! resend is refused (`503 in_flight_elsewhere`); once it landed, the resend is
//! acknowledged without a second copy, and ClickHouse holds each event once (raw
//! rows, no FINAL).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::backends::ClickHouse;
use support::{client, status_and_json, track, FreezableDisk, Server};

fn post_batch(server: &Server, body: &Value) -> (u16, Value, Duration) {
    let started = Instant::now();
    let response = client()
        .post(server.url("/v1/batch"))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(20))
        .body(body.to_string())
        .send()
        .expect("an answer within 20 s");
    let (status, body) = status_and_json(response);
    (status, body, started.elapsed())
}

#[test]
fn a_stalled_spool_write_answers_503_in_time_and_its_resend_is_not_written_twice() {
    let clickhouse = ClickHouse::start();
    let disk = FreezableDisk::new(64);
    // Acknowledged on spool: a request waits only for its spool append.
    let config = format!(
        "[server]\nspool_write_timeout_ms = 1000\n\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"stall\"\nacknowledge = \"on_spool\"\n",
        clickhouse.url()
    );
    let server = Server::start_in(&disk.path().join("data"), &config, &[]);
    let (status, body, _) = post_batch(&server, &json!({ "batch": [track("warm")] }));
    assert_eq!(status, 200, "{body}");
    clickhouse.wait_for_count("stall.events", 1);

    let stalled = json!({ "batch": (0..20).map(|i| track(&format!("stalled-{i}"))).collect::<Vec<_>>() });
    let frozen = disk.freeze();
    let (status, body, took) = post_batch(&server, &stalled);
    assert_eq!(status, 503, "{body}\n{}", server.log());
    assert_eq!(body["code"], "spool_slow", "{body}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    assert_eq!(
        server.metric("breakwater_spool_writes_past_deadline_total{sink=\"clickhouse\"}"),
        1.0
    );
    assert!(
        server.metric("breakwater_memory_budget_held_bytes") > 0.0,
        "the write still holds its copy: its budget stays held"
    );

    // The client resends at once: the first write's outcome is not known yet.
    let (status, body, _) = post_batch(&server, &stalled);
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "in_flight_elsewhere", "{body}");

    // The disk comes back: the stalled write lands, and the resend leaves it out.
    frozen.thaw();
    let deadline = Instant::now() + Duration::from_secs(20);
    let written = "breakwater_spool_writes_decided_late_total{sink=\"clickhouse\",outcome=\"written\"}";
    while server.metric(written) < 1.0 {
        assert!(Instant::now() < deadline, "never decided\n{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.metric("breakwater_memory_budget_held_bytes"), 0.0);
    let (status, body, _) = post_batch(&server, &stalled);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.metric("breakwater_sink_unsettled_left_out_events_total{sink=\"clickhouse\"}"),
        20.0
    );

    clickhouse.wait_for_count("stall.events", 21);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(clickhouse.count("stall.events"), 21, "raw rows: an event written twice");
    let distinct = clickhouse.query("SELECT uniqExact(message_id) FROM stall.events");
    assert_eq!(distinct.trim(), "21");
    drop(server);
}
