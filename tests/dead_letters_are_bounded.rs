//! The dead-letter store has a cap from the policy (`dead_letters.max_bytes`). A
//! ClickHouse table that refuses every INSERT fills it; once full, requests whose
//! events would go there get `503 dead_letters_full` (retryable) instead of being
//! acknowledged and dropped, the oldest letters are kept, and a purge frees it
//! (issue 20).

mod support;

use serde_json::json;
use support::backends::ClickHouse;
use support::*;

#[test]
fn a_full_dead_letter_store_refuses_instead_of_dropping() {
    let clickhouse = ClickHouse::start();
    clickhouse.query("CREATE DATABASE dlq_cap");
    clickhouse.query(
        // None of breakwater's columns: every INSERT is refused for good (code 16).
        "CREATE TABLE dlq_cap.events (x UInt8) ENGINE = Memory",
    );
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), "cap.toml", &[("dead_letters", "max_bytes", "1048576")]);
    let config = format!(
        "[server]\npolicy_file = \"{}\"\n\n[clickhouse]\nurl = \"{}\"\ndatabase = \"dlq_cap\"\n",
        policy.display(),
        clickhouse.url()
    );
    let server = Server::start_with(&config, &[]);
    // ~200 KB of incompressible events per request: the 1 MiB cap holds five.
    let request = |n: usize| {
        let batch: Vec<_> = (0..20).map(|i| padded_track(&format!("r{n}-{i}"), 10_000)).collect();
        json!({ "batch": batch })
    };
    let mut accepted = 0;
    let mut refused = None;
    for n in 0..12 {
        let (status, body) = post_json(&server, "/v1/batch", &request(n));
        match status {
            200 => accepted += 1,
            503 => {
                refused = Some((n, body));
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let (first_refused, body) = refused.unwrap_or_else(|| {
        panic!(
            "the dead-letter store never filled: {} bytes, {} events\n{}",
            server.metric("breakwater_dead_letter_bytes"),
            server.metric("breakwater_dead_letter_events_total{sink=\"clickhouse\"}"),
            server.log()
        )
    });
    assert_eq!(body["error"]["code"], "dead_letters_full", "{body}");
    assert_eq!(body["error"]["retryable"], true);
    assert!(
        (4..=5).contains(&accepted),
        "{accepted} requests dead-lettered before it was full"
    );
    assert_eq!(first_refused, accepted);
    assert_eq!(
        server.metric("breakwater_dead_letter_refused_events_total{sink=\"clickhouse\"}"),
        20.0
    );
    assert!(server.metric("breakwater_dead_letter_bytes") <= 1_048_576.0);
    // The oldest letters are kept: the first request's events are there.
    let (_, page) = admin_get(&server, "/admin/dead-letters?limit=1");
    assert_eq!(page["deadLetters"][0]["messageIds"][0], "r0-0", "{page}");
}
