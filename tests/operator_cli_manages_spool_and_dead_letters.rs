//! The operator tools: a batch ClickHouse rejects for good goes to the dead-letter
//! store (the request still gets 200); `dlq list|show` show it with the sink's
//! error; after the table is fixed, `dlq replay` requeues it and `spool replay`
//! delivers it; `spool purge` asks before deleting.

mod support;

use serde_json::json;
use support::backends::ClickHouse;
use support::*;

fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String) {
    let output = breakwater_command().args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn dead_letters_can_be_inspected_fixed_and_replayed() {
    let clickhouse = ClickHouse::start();
    clickhouse.query("CREATE DATABASE dlq");
    clickhouse.query(
        "CREATE TABLE dlq.events (message_id UInt64, source_name UInt64, type UInt64, event UInt64, user_id UInt64, \
         anonymous_id UInt64, timestamp UInt64, received_at UInt64, payload UInt64) ENGINE = Memory",
    );
    let config_text = format!("[clickhouse]\nurl = \"{}\"\ndatabase = \"dlq\"\n", clickhouse.url());
    let mut server = Server::start_with(&config_text, &[]);
    for request in 0..2 {
        let batch: Vec<_> = (0..5).map(|i| track(&format!("d{request}-{i}"))).collect();
        let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": batch }));
        assert_eq!(status, 200, "a rejected batch is kept, so the request succeeds: {body}");
    }
    assert_eq!(
        server.metric("breakwater_dead_letter_events_total{sink=\"clickhouse\"}"),
        10.0
    );
    // The admin endpoint pages them, oldest first.
    let (status, first) = admin_get(&server, "/admin/dead-letters?limit=1");
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["deadLetters"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["deadLetters"][0]["events"], 5);
    assert_eq!(first["deadLetters"][0]["messageIds"][0], "d0-0");
    let next = first["next"].as_u64().expect("a next page");
    let (_, second) = admin_get(&server, &format!("/admin/dead-letters?after={next}&limit=1"));
    assert_eq!(second["deadLetters"][0]["messageIds"][0], "d1-0", "{second}");
    assert!(second["next"].is_null(), "the last page: {second}");
    let (_, spool) = admin_get(&server, "/admin/spool");
    assert_eq!(spool["deadLetterRecords"], 2, "{spool}");
    assert!(server.terminate(std::time::Duration::from_secs(10)).success());

    let config_path = server.data_dir.parent().unwrap().join("breakwater.toml");
    let data = [
        "--config",
        config_path.to_str().unwrap(),
        "--data-dir",
        server.data_dir.to_str().unwrap(),
    ];
    let with = |command: &[&'static str]| -> Vec<String> {
        command.iter().chain(data.iter()).map(|s| s.to_string()).collect()
    };

    let (code, listed) = cli(&with(&["dlq", "list"]));
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains("2 dead-letter records"), "{listed}");
    assert!(
        listed.contains("clickhouse rejected the batch"),
        "the sink's error is kept: {listed}"
    );
    let (code, page) = cli(&with(&["dlq", "list", "--limit", "1"]));
    assert_eq!(code, 0, "{page}");
    assert!(page.contains("more: dlq list --after 1"), "{page}");
    let (_, page) = cli(&with(&["dlq", "list", "--after", "1"]));
    assert!(!page.contains("more:") && page.contains("rejected"), "{page}");
    let (code, shown) = cli(&with(&["dlq", "show", "1"]));
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("\"messageId\":\"d0-0\""), "{shown}");

    // Destructive commands ask first (and refuse without a terminal).
    let (code, refused) = cli(&with(&["spool", "purge"]));
    assert_eq!(code, 2);
    assert!(refused.contains("pass --yes"), "{refused}");

    // Fix the table (breakwater recreates it), requeue, deliver.
    clickhouse.query("DROP TABLE dlq.events");
    let (code, out) = cli(&with(&["dlq", "replay", "--yes"]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("requeued 10 events"), "{out}");
    let (_, stats) = cli(&with(&["spool", "stats"]));
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("clickhouse") && l.split_whitespace().nth(1) == Some("10")),
        "{stats}"
    );
    let (code, out) = cli(&with(&["spool", "replay"]));
    assert_eq!(code, 0, "{out}");
    assert_eq!(clickhouse.count("dlq.events"), 10);
    let (_, stats) = cli(&with(&["spool", "stats"]));
    assert!(stats.contains("dead letters: 0 records"), "{stats}");
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("clickhouse") && l.split_whitespace().nth(1) == Some("0")),
        "{stats}"
    );
}

#[test]
fn policy_check_names_file_key_and_why() {
    let dir = tempfile::tempdir().unwrap();
    policy_file(dir.path(), "good.toml", &[]);
    let (code, out) = cli(&["policy", "check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok ") && out.contains("timeout_ms"),
        "prints the effective policy: {out}"
    );
    policy_file(dir.path(), "bad.toml", &[("kafka.retry", "max_backoff_ms", "1")]);
    let (code, out) = cli(&["policy", "check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("bad.toml: `kafka.retry.max_backoff_ms`: is 1 but must not be below"),
        "{out}"
    );
    let (code, out) = cli(&["policy", "check", concat!(env!("CARGO_MANIFEST_DIR"), "/policies")]);
    assert_eq!(code, 0, "the shipped policies are valid: {out}");
}
