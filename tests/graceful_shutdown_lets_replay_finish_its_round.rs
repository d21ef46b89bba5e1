//! SIGTERM while a replayer's call is under way: the replayer stops between rounds,
//! not in the middle of one. A round cut off after its sink took the batch left the
//! record in the spool, and the next start delivered it again (issue 19, finding h).
//! Counted in raw ClickHouse rows (no `FINAL`, which would hide a second copy).

mod support;

use std::time::Duration;

use serde_json::json;
use support::backends::ClickHouse;
use support::{post_json, track, Server};

#[test]
fn a_replay_round_under_way_at_sigterm_finishes_and_is_not_delivered_again() {
    let clickhouse = ClickHouse::start();
    // Acknowledged on spool: every event reaches ClickHouse through the replayer.
    let config = format!(
        "[clickhouse]\nurl = \"{}\"\ndatabase = \"graceful\"\nacknowledge = \"on_spool\"\ninsert_timeout_ms = 4000\n",
        clickhouse.url()
    );
    let mut server = Server::start_with(&config, &[]);
    let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": [track("warm")] }));
    assert_eq!(status, 200, "{body}");
    clickhouse.wait_for_count("graceful.events", 1);

    // ClickHouse hangs; the next round's INSERT waits on it.
    clickhouse.freeze();
    let batch: Vec<_> = (0..10).map(|i| track(&format!("round-{i}"))).collect();
    let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": batch }));
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(1_000));

    // SIGTERM with the INSERT under way; ClickHouse answers a second later.
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(1_000));
    clickhouse.thaw();
    let status = server.terminate(Duration::from_secs(40));
    assert!(status.success(), "{status:?}\n{}", server.log());

    // The next start finds nothing of that round left to replay.
    let server = server.restart();
    std::thread::sleep(Duration::from_secs(3));
    let raw = clickhouse.count("graceful.events");
    assert_eq!(
        raw,
        11,
        "raw rows (no FINAL): the round was delivered again after the restart\n{}",
        server.log()
    );
}
