//! Malformed, oversized, mis-typed and slow requests get a 4xx with a JSON body
//! naming the problem, and the server keeps serving everyone else.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn post_raw(server: &Server, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
    let mut request = client().post(server.url(path)).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    status_and_json(request.send().unwrap())
}

fn assert_error(result: (u16, Value), status: u16, code: &str) {
    let (got_status, body) = result;
    assert_eq!(got_status, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[test]
fn malformed_and_misshapen_bodies_are_400() {
    let server = Server::start();
    assert_error(
        post_raw(&server, "/v1/batch", &[JSON], b"{\"batch\": [".to_vec()),
        400,
        "invalid_json",
    );
    assert_error(
        post_raw(&server, "/v1/track", &[JSON], b"[1,2]".to_vec()),
        400,
        "invalid_body",
    );
    assert_error(
        post_raw(&server, "/v1/batch", &[JSON], b"{\"events\":[]}".to_vec()),
        400,
        "invalid_body",
    );
    assert_error(
        post_raw(&server, "/v1/batch", &[JSON], b"{\"batch\":[]}".to_vec()),
        400,
        "empty_batch",
    );
    assert_error(
        post_raw(&server, "/v1/track", &[JSON], vec![0xff, 0xfe, b'{']),
        400,
        "invalid_json",
    );
    let nested = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert_error(
        post_raw(&server, "/v1/track", &[JSON], nested.into_bytes()),
        400,
        "invalid_json",
    );
    assert!(server.sink_events().is_empty());
}

#[test]
fn wrong_types_and_encodings_are_415() {
    let server = Server::start();
    let body = track("x").to_string().into_bytes();
    assert_error(
        post_raw(
            &server,
            "/v1/track",
            &[("content-type", "application/xml")],
            body.clone(),
        ),
        415,
        "unsupported_media_type",
    );
    assert_error(
        post_raw(&server, "/v1/track", &[JSON, ("content-encoding", "zstd")], body),
        415,
        "unsupported_encoding",
    );
}

#[test]
fn limits_are_enforced_and_configurable() {
    let server = Server::start_with(
        "[limits]\nmax_event_bytes = 1000\nmax_request_bytes = 20000\nmax_batch_events = 10\n",
        &[],
    );
    let mut big = track("big");
    big["properties"]["blob"] = json!("x".repeat(1200));
    assert_error(post_json(&server, "/v1/track", &big), 413, "event_too_large");

    let too_many = json!({ "batch": (0..11).map(|i| track(&i.to_string())).collect::<Vec<_>>() });
    assert_error(post_json(&server, "/v1/batch", &too_many), 413, "too_many_events");

    let mut huge = track("huge");
    huge["properties"]["blob"] = json!("x".repeat(30_000));
    assert_error(
        post_json(&server, "/v1/batch", &json!({ "batch": [huge] })),
        413,
        "body_too_large",
    );

    // One oversized event in a batch is refused alone.
    let (status, body) = post_json(&server, "/v1/batch", &json!({ "batch": [track("ok"), big] }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(body["rejected"][0]["code"], "event_too_large");
    assert_eq!(server.sink_events().len(), 1);
}

#[test]
fn a_gzip_bomb_gets_413_and_the_server_stays_healthy() {
    let server = Server::start();
    // 64 MiB of spaces inside a valid JSON string compress to ~64 KiB.
    let mut inflated = b"{\"batch\":[{\"type\":\"track\",\"userId\":\"u\",\"event\":\"".to_vec();
    inflated.extend(std::iter::repeat_n(b' ', 64 * 1024 * 1024));
    inflated.extend(b"\"}]}");
    let bomb = gzip(&inflated);
    assert!(bomb.len() < 500 * 1024, "the compressed bomb fits the request limit");
    for _ in 0..5 {
        assert_error(
            post_raw(
                &server,
                "/v1/batch",
                &[JSON, ("content-encoding", "gzip")],
                bomb.clone(),
            ),
            413,
            "body_too_large",
        );
    }
    let (status, _) = post_json(&server, "/v1/track", &track("after-bomb"));
    assert_eq!(status, 200);
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap())
        })
        .unwrap();
    assert!(
        rss_kib < 60 * 1024,
        "peak RSS {rss_kib} KiB: the bomb was inflated in memory"
    );
}

#[test]
fn truncated_gzip_is_400() {
    let server = Server::start();
    let whole = gzip(json!({ "batch": [track("t")] }).to_string().as_bytes());
    let cut = whole[..whole.len() - 10].to_vec();
    assert_error(
        post_raw(&server, "/v1/batch", &[JSON, ("content-encoding", "gzip")], cut),
        400,
        "invalid_gzip",
    );
}

#[test]
fn unknown_paths_and_methods_answer_json() {
    let server = Server::start();
    assert_error(
        post_raw(&server, "/v2/track", &[JSON], b"{}".to_vec()),
        404,
        "not_found",
    );
    let response = client().get(server.url("/v1/track")).send().unwrap();
    assert_error(status_and_json(response), 405, "method_not_allowed");
}

#[test]
fn a_client_that_stalls_mid_body_gets_408_and_others_are_served() {
    let server = Server::start_with("[server]\nbody_read_timeout_ms = 300\n", &[]);
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    stalled
        .write_all(b"POST /v1/track HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"userId\":")
        .unwrap();
    // Meanwhile another client is served.
    let (status, _) = post_json(&server, "/v1/track", &track("meanwhile"));
    assert_eq!(status, 200);
    stalled.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = vec![0u8; 4096];
    let read = stalled.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_read_timeout"), "{answer}");
}

/// A body trickled one byte at a time never stalls long enough for an idle timer;
/// the body deadline is for the whole body, so it is cut all the same.
#[test]
fn a_body_sent_byte_by_byte_is_cut_at_the_body_deadline() {
    let server = Server::start_with("[server]\nbody_read_timeout_ms = 1000\n", &[]);
    let mut trickle = TcpStream::connect(server.addr).unwrap();
    trickle
        .write_all(
            b"POST /v1/track HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n",
        )
        .unwrap();
    trickle.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(8) {
        // One byte every 50 ms, until the server answers (or closes).
        if trickle.write_all(b" ").is_err() {
            break;
        }
        sent += 1;
        match trickle.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                break;
            }
            Err(_) => continue,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "after {sent} bytes: {answer}");
    assert!(answer.contains("body_read_timeout"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after {:?}, the deadline is 1 s",
        started.elapsed()
    );
    let (status, _) = post_json(&server, "/v1/track", &track("after-trickle"));
    assert_eq!(status, 200);
}
