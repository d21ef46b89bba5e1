//! Liveness, readiness and metrics for operators; SIGTERM drains in-flight requests
//! and exits cleanly; two processes cannot share a data directory.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

#[test]
fn health_endpoints_answer_json() {
    let server = Server::start();
    let (status, live) = status_and_json(client().get(server.url("/health/live")).send().unwrap());
    assert_eq!((status, live["status"].as_str()), (200, Some("live")));
    let (status, ready) = status_and_json(client().get(server.url("/health/ready")).send().unwrap());
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["sinks"]["file"]["healthy"], true);
}

#[test]
fn metrics_cover_requests_events_and_latency() {
    let server = Server::start();
    post_json(&server, "/v1/track", &track("m"));
    post_json(&server, "/v1/track", &serde_json::json!({ "userId": "u" }));
    let metrics = server.metrics();
    for expected in [
        "breakwater_http_requests_total{route=\"/v1/track\",status=\"200\"} 1",
        "breakwater_http_requests_total{route=\"/v1/track\",status=\"400\"} 1",
        "breakwater_events_total{source=\"default\",transport=\"http\",outcome=\"accepted\"} 1",
        "breakwater_http_request_duration_seconds_bucket{route=\"/v1/track\",le=\"0.1\"}",
        "breakwater_file_sink_fsync_duration_seconds_count",
        "breakwater_build_info{version=\"",
        "# HELP breakwater_events_total",
    ] {
        assert!(metrics.contains(expected), "missing `{expected}` in\n{metrics}");
    }
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut server = Server::start();
    let body = track("in-flight").to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    write!(
        stream,
        "POST /v1/track HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(200));
    stream.write_all(tail.as_bytes()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = server.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert_eq!(server.sink_events().len(), 1);
    assert!(server.log().contains("breakwater stopped"));
}

#[test]
fn a_second_process_cannot_use_the_same_data_directory() {
    let server = Server::start();
    let output = breakwater_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use by another breakwater process"));
}
