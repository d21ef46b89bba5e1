//! Write keys from HTTP Basic, X-Write-Key or the body map to their source; a
//! missing or wrong key is 401; an open (keyless) server refuses a public address.

mod support;

use serde_json::json;
use support::*;

const CONFIG: &str = r#"
[[sources]]
name = "web"
write_key = "wk-web-secret"

[[sources]]
name = "backend"
write_key = "wk-backend-secret"
"#;

fn send(
    server: &Server,
    id: &str,
    configure: impl FnOnce(reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder,
    body_key: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut event = track(id);
    if let Some(key) = body_key {
        event["writeKey"] = json!(key);
    }
    let request = client()
        .post(server.url("/v1/track"))
        .header("content-type", "application/json")
        .body(event.to_string());
    status_and_json(configure(request).send().unwrap())
}

#[test]
fn each_key_style_maps_to_its_source() {
    let server = Server::start_with(CONFIG, &[("BREAKWATER_WRITE_KEYS", "mobile=wk-mobile-secret")]);
    let basic = send(&server, "basic", |r| r.basic_auth("wk-web-secret", Some("")), None);
    let header = send(
        &server,
        "header",
        |r| r.header("x-write-key", "wk-backend-secret"),
        None,
    );
    let body = send(&server, "body", |r| r, Some("wk-mobile-secret"));
    assert_eq!([basic.0, header.0, body.0], [200, 200, 200]);

    let events = server.sink_events();
    let source_of = |id: &str| events.iter().find(|e| e["messageId"] == id).unwrap()["sourceName"].clone();
    assert_eq!(source_of("basic"), "web");
    assert_eq!(source_of("header"), "backend");
    assert_eq!(source_of("body"), "mobile");
}

#[test]
fn missing_and_wrong_keys_get_401_with_a_json_reason() {
    let server = Server::start_with(CONFIG, &[]);
    let (status, body) = send(&server, "none", |r| r, None);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "missing_write_key");

    let response = client()
        .post(server.url("/v1/track"))
        .basic_auth("wk-web-secre", Some(""))
        .body(track("wrong").to_string())
        .send()
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Basic realm=\"breakwater\"");
    let (status, body) = status_and_json(response);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_write_key");

    // A wrong header key is not rescued by a right body key: the header wins.
    let (status, _) = send(
        &server,
        "mixed",
        |r| r.header("x-write-key", "nope"),
        Some("wk-web-secret"),
    );
    assert_eq!(status, 401);
    assert!(server.sink_events().is_empty());
    assert_eq!(
        server.metric("breakwater_requests_refused_total{reason=\"invalid_write_key\"}"),
        2.0
    );
}

#[test]
fn keys_never_appear_in_logs_sinks_or_metrics() {
    let server = Server::start_with(CONFIG, &[("BREAKWATER_LOG", "debug")]);
    send(&server, "a", |r| r.basic_auth("wk-web-secret", Some("")), None);
    send(&server, "b", |r| r.header("x-write-key", "wk-wrong-secret"), None);
    send(&server, "c", |r| r, Some("wk-backend-secret"));
    let everything = format!(
        "{}{}{}",
        server.log(),
        serde_json::to_string(&server.sink_events()).unwrap(),
        server.metrics()
    );
    assert!(!everything.contains("-secret"), "a write key leaked");
}

#[test]
fn an_open_server_refuses_a_non_loopback_address_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = breakwater_command()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without write keys"), "{stderr}");
    assert!(stderr.contains("BREAKWATER_WRITE_KEYS"), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "{stderr}");
}

#[test]
fn with_keys_a_non_loopback_address_is_allowed() {
    // Binds 0.0.0.0 on an ephemeral port: no traffic is sent to it from here.
    let dir = tempfile::tempdir().unwrap();
    let mut child = breakwater_command()
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env("BREAKWATER_WRITE_KEYS", "web=k1")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(child.try_wait().unwrap().is_none(), "server exited");
    child.kill().unwrap();
    child.wait().unwrap();
}
