//! A full disk under a spooling sink. The disk is made to fill on cue with a
//! file-size limit on the breakwater process (RLIMIT_FSIZE: its writes past the
//! limit fail with EFBIG, as on a full disk): while the spool cannot grow, requests
//! are refused with 503 and nothing is acknowledged that is not on disk; once the
//! limit is lifted, the spool file is reopened by itself and requests are accepted
//! again without a restart; once ClickHouse is back, every acknowledged event is in
//! it exactly once.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::backends::{free_port, ClickHouse};
use support::*;

const DATABASE: &str = "disk_full";
const EVENTS_PER_REQUEST: usize = 50;

/// Posts one batch; returns the status and the error code, if any.
fn send(server: &Server, round: &str, request: usize) -> (u16, Value, Vec<String>) {
    let ids: Vec<String> = (0..EVENTS_PER_REQUEST)
        .map(|i| format!("{round}-r{request}-e{i}"))
        .collect();
    let body = json!({ "batch": ids.iter().map(|id| track(id)).collect::<Vec<_>>() });
    let (status, answer) = post_json(server, "/v1/batch", &body);
    (status, answer, ids)
}

fn spool_file_len(server: &Server) -> u64 {
    std::fs::metadata(server.data_dir.join("spool").join("spool.redb"))
        .expect("the spool file exists")
        .len()
}

#[test]
fn spool_refuses_while_the_disk_is_full_and_recovers_without_a_restart() {
    let clickhouse_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let policy = quick_clickhouse_policy(dir.path(), "500", "500");
    let config = format!(
        "[server]\npolicy_file = \"{}\"\n\n[clickhouse]\nurl = \"http://127.0.0.1:{clickhouse_port}\"\ndatabase = \"{DATABASE}\"\n",
        policy.display()
    );
    // ClickHouse is not there: every batch goes to the spool.
    let server = Server::start_with(&config, &[]);
    let mut acked: HashSet<String> = HashSet::new();

    for request in 0..20 {
        let (status, answer, ids) = send(&server, "before", request);
        assert_eq!(status, 200, "spooling while ClickHouse is away: {answer}");
        acked.extend(ids);
    }
    assert!(server.metric("breakwater_spool_events{sink=\"clickhouse\"}") >= 1000.0);

    // The disk is full: the spool file may not grow past its size now.
    set_file_size_limit(server.pid(), Some(spool_file_len(&server)));
    let mut refused = 0;
    let mut request = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused < 5 {
        assert!(
            Instant::now() < deadline,
            "no request was refused while the disk was full"
        );
        let (status, answer, ids) = send(&server, "full", request);
        request += 1;
        match status {
            200 => acked.extend(ids),
            503 => {
                assert_eq!(answer["code"], "spool_unavailable", "{answer}");
                refused += 1;
            }
            other => panic!("unexpected {other} while the disk was full: {answer}"),
        }
    }
    assert!(server.metric("breakwater_spool_io_errors_total") >= 1.0);
    // Still full for 3 s: the file is reopened about once a second, and a write
    // that fits in the space the file already has may be accepted (it is on disk);
    // any other is refused. Checked at the end: every 200 is in ClickHouse.
    let still_full_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < still_full_until {
        let (status, answer, ids) = send(&server, "still-full", request);
        request += 1;
        match status {
            200 => acked.extend(ids),
            503 => refused += 1,
            other => panic!("unexpected {other} while the disk was full: {answer}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Space is back: accepted again, without a restart.
    set_file_size_limit(server.pid(), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut request = 0;
    loop {
        let (status, answer, ids) = send(&server, "after", request);
        request += 1;
        if status == 200 {
            acked.extend(ids);
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(
            Instant::now() < deadline,
            "the spool did not recover: {answer}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for request in 1..20 {
        let (status, answer, ids) = send(&server, "after-more", request);
        assert_eq!(status, 200, "{answer}");
        acked.extend(ids);
    }
    assert!(server.metric("breakwater_spool_reopened_total") >= 1.0);
    let (status, ready) = status_and_json(client().get(server.url("/health/ready")).send().unwrap());
    assert_eq!(ready["sinks"]["clickhouse"]["spoolWritable"], true, "{ready}");
    assert_eq!(status, 200, "{ready}");

    // ClickHouse arrives: the spool drains, each acknowledged event once.
    let clickhouse = ClickHouse::start_at(clickhouse_port);
    let deadline = Instant::now() + Duration::from_secs(90);
    while server.metric("breakwater_spool_events{sink=\"clickhouse\"}") > 0.0 {
        assert!(Instant::now() < deadline, "the spool did not drain:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let stored: Vec<String> = clickhouse
        .query(&format!("SELECT message_id FROM {DATABASE}.events"))
        .lines()
        .map(str::to_string)
        .collect();
    let unique: HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "duplicates in ClickHouse");
    let missing = acked.iter().filter(|id| !unique.contains(id)).count();
    assert_eq!(missing, 0, "{missing} of {} acknowledged events missing", acked.len());
    let unknown = unique.iter().filter(|id| !acked.contains(**id)).count();
    println!(
        "{} events acknowledged, {refused}+ requests refused while full; {} rows in ClickHouse ({unknown} from refused requests that had reached the disk)",
        acked.len(),
        stored.len()
    );
}
