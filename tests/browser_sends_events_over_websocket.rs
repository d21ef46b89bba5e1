//! A real browser as a client: headless Chromium (Debian's `chromium`) loads the
//! example page served by breakwater, sends events over the WebSocket, receives
//! every ack, and reports back over HTTP. The events land in the sink once each.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn chromium() -> String {
    for candidate in ["chromium", "/usr/bin/chromium", "chromium-browser"] {
        if Command::new(candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate.to_string();
        }
    }
    panic!("chromium is not installed; run ./scripts/test.sh once (it installs Debian's chromium)");
}

#[test]
fn headless_chromium_sends_events_and_receives_every_ack() {
    let browser = chromium();
    let server = Server::start_with("[websocket]\nserve_example_page = true\n", &[]);
    let profile = tempfile::tempdir().unwrap();
    let url = server.url("/examples/websocket?count=25&prefix=chromium");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let events = server.sink_events();
        if let Some(report) = events.iter().find(|e| e["event"] == "Browser Acks Received") {
            break report.clone();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the browser never reported its acks; events so far: {}", events.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        report["properties"]["acked"], 25,
        "the page received an ack for every event"
    );
    let counts = id_counts(&server.sink_events());
    for i in 0..25 {
        assert_eq!(counts.get(&format!("chromium-{i}")), Some(&1), "chromium-{i}");
    }
    let sent = server.sink_events();
    let first = sent.iter().find(|e| e["messageId"] == "chromium-0").unwrap();
    assert!(
        first["properties"]["userAgent"].as_str().unwrap().contains("Chrome"),
        "{first}"
    );
    assert_eq!(
        server.metric("breakwater_events_total{source=\"default\",transport=\"websocket\",outcome=\"accepted\"}"),
        25.0
    );
}

#[test]
fn the_example_page_is_off_unless_enabled() {
    let server = Server::start();
    let response = client().get(server.url("/examples/websocket")).send().unwrap();
    assert_eq!(response.status().as_u16(), 404);
}
