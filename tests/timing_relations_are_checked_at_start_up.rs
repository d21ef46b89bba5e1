//! The guarantees lean on timing relations between settings: a request's Redis
//! claims must outlive the longest the request can take, or another request (a
//! client's retry, another instance) claims the same ids while the first is still
//! writing them, and both deliver (issue 19, finding g). An impossible combination is
//! refused, naming the keys, by `config check` and by `serve` before it listens.

mod support;

use support::breakwater_command;

fn run(args: &[&str], config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakwater.toml");
    std::fs::write(&path, config).unwrap();
    let data_dir = dir.path().join("data");
    let mut command = breakwater_command();
    command.args(args).arg("--config").arg(&path);
    if args[0] == "serve" {
        command
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0"]);
    }
    // A server that was not refused would serve until stopped: give it 15 s.
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// Redis and Kafka configured (neither needs to be reachable to be refused), with
/// the embedded default policy: Kafka's two attempts of 31 s alone outlast 60 s.
const SHORT_PENDING_TTL: &str = "[redis]\nurl = \"redis://127.0.0.1:9\"\npending_ttl_ms = 60000\n\n\
    [kafka]\nbrokers = \"127.0.0.1:9\"\n";

#[test]
fn a_claim_that_can_expire_mid_request_is_refused_by_config_check_and_serve() {
    for args in [&["config", "check"][..], &["serve"][..]] {
        let (code, text) = run(args, SHORT_PENDING_TTL);
        assert_eq!(code, 2, "{args:?} accepted it:\n{text}");
        assert!(text.contains("redis.pending_ttl_ms"), "{args:?}: {text}");
        assert!(text.contains("kafka"), "names the sink that takes longest: {text}");
    }
}

#[test]
fn the_defaults_hold_with_every_backend_configured() {
    let config = "[redis]\nurl = \"redis://127.0.0.1:9\"\n\n[kafka]\nbrokers = \"127.0.0.1:9\"\n\n\
        [clickhouse]\nurl = \"http://127.0.0.1:9\"\n";
    let (code, text) = run(&["config", "check"], config);
    assert_eq!(code, 0, "{text}");
}
