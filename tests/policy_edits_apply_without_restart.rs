//! Editing the running policy file changes behaviour without a restart; an invalid
//! edit keeps the running policy, and is logged and counted.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backends::free_port;
use support::*;

fn policy_hash(server: &Server) -> String {
    let (_, body) = admin_get(server, "/admin/policy");
    body["hash"].as_str().unwrap().to_string()
}

fn wait_for_hash_change(server: &Server, old: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hash = policy_hash(server);
        if hash != old {
            return hash;
        }
        assert!(Instant::now() < deadline, "the policy edit was not picked up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_smaller_spool_in_the_policy_takes_effect_live_and_a_bad_edit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = policy_file(dir.path(), "live.toml", &[]);
    // ClickHouse is down for the whole test: every event goes to its spool.
    let config = format!(
        "[server]\npolicy_file = \"{}\"\n\n[clickhouse]\nurl = \"http://127.0.0.1:{}\"\n",
        policy.display(),
        free_port()
    );
    let server = Server::start_with(&config, &[]);
    let (_, body) = admin_get(&server, "/admin/policy");
    assert_eq!(body["version"], "default");
    assert_eq!(body["file"], policy.display().to_string());

    // About 1.5 MB into the spool, with the default 1 GiB limit: all accepted.
    for request in 0..60 {
        let batch: Vec<_> = (0..25)
            .map(|i| padded_track(&format!("p{request}-{i}"), 1000))
            .collect();
        let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": batch }));
        assert_eq!(status, 200, "{body}");
    }

    // Shrink the ClickHouse spool to 1 MiB: the next request is refused.
    let before = policy_hash(&server);
    policy_file(dir.path(), "live.toml", &[("clickhouse.spool", "max_bytes", "1048576")]);
    wait_for_hash_change(&server, &before);
    let (status, body) = post_json(&server, "/v1/track", &track("after-shrink"));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "spool_full");
    assert_eq!(
        server.metric("breakwater_policy_reloads_total{result=\"applied\"}"),
        1.0
    );

    // An invalid edit is refused: the running policy (and its hash) stay.
    let running = policy_hash(&server);
    policy_file(
        dir.path(),
        "live.toml",
        &[
            ("clickhouse.retry", "max_backoff_ms", "1"),
            ("clickhouse.spool", "max_bytes", "1048576"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("breakwater_policy_reloads_total{result=\"invalid\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the invalid edit was not noticed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(policy_hash(&server), running);
    assert!(server.log().contains("invalid policy edit; keeping the running policy"));
    assert!(server.log().contains("clickhouse.retry.max_backoff_ms"));
}
