//! Per-source rate limits: a source over its limit gets `429 rate_limited` with
//! `Retry-After`, and every other source keeps being served.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const NOISY_RATE: u64 = 200;

#[test]
fn a_noisy_source_gets_429_with_retry_after_while_a_quiet_one_is_served() {
    let config = format!(
        r#"
[limits]
source_events_per_second = 5000

[[sources]]
name = "noisy"
write_key = "noisy-key"
events_per_second = {NOISY_RATE}

[[sources]]
name = "quiet"
write_key = "quiet-key"
"#
    );
    let server = Server::start_with(&config, &[]);
    let client = client();
    let noisy_accepted = AtomicU64::new(0);
    let noisy_refused = AtomicU64::new(0);
    let started = Instant::now();
    let run_for = Duration::from_secs(3);

    let quiet_requests = std::thread::scope(|scope| {
        for writer in 0..4 {
            let (client, server, accepted, refused) = (&client, &server, &noisy_accepted, &noisy_refused);
            scope.spawn(move || {
                let mut request = 0;
                while started.elapsed() < run_for {
                    request += 1;
                    let batch = json!({ "batch": (0..50).map(|i| track(&format!("noisy-{writer}-{request}-{i}"))).collect::<Vec<_>>() });
                    let response = client
                        .post(server.url("/v1/batch"))
                        .basic_auth("noisy-key", Some(""))
                        .json(&batch)
                        .send()
                        .unwrap();
                    match response.status().as_u16() {
                        200 => {
                            accepted.fetch_add(50, Ordering::Relaxed);
                        }
                        429 => {
                            let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                            assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
                            // Segment's browser SDK reads only this one (seconds to wait).
                            let reset: u64 = response.headers()["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
                            assert_eq!(reset, retry_after);
                            let body: serde_json::Value = response.json().unwrap();
                            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                            assert_eq!(body["error"]["retryable"], true, "{body}");
                            let message = body["error"]["message"].as_str().unwrap();
                            assert!(message.contains("`noisy`") && message.contains("200 events/s"), "{message}");
                            assert!(!body.to_string().contains("noisy-key"), "the key must not be echoed");
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("noisy: unexpected {other}"),
                    }
                }
            });
        }
        // The quiet source: a small batch every 100 ms, every one served.
        let (client, server) = (&client, &server);
        let quiet = scope.spawn(move || {
            let mut request = 0;
            while started.elapsed() < run_for {
                request += 1;
                let batch =
                    json!({ "batch": (0..10).map(|i| track(&format!("quiet-{request}-{i}"))).collect::<Vec<_>>() });
                let response = client
                    .post(server.url("/v1/batch"))
                    .header("x-write-key", "quiet-key")
                    .json(&batch)
                    .send()
                    .unwrap();
                assert_eq!(response.status(), 200, "quiet request {request} was not served");
                std::thread::sleep(Duration::from_millis(100));
            }
            request
        });
        quiet.join().unwrap()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = noisy_accepted.load(Ordering::Relaxed);
    let refused = noisy_refused.load(Ordering::Relaxed);
    assert!(refused > 0, "the noisy source was never limited");
    // The burst (one second's worth), the rate for the run, and one batch of debt
    // per writer at most.
    let ceiling = NOISY_RATE as f64 * (1.0 + elapsed) + 4.0 * 50.0;
    assert!(
        (accepted as f64) <= ceiling,
        "noisy accepted {accepted} events in {elapsed:.1} s; at most {ceiling} allowed"
    );
    assert_eq!(
        server.metric("breakwater_requests_rate_limited_total{source=\"noisy\"}"),
        refused as f64
    );
    assert_eq!(
        server.metric("breakwater_requests_rate_limited_total{source=\"quiet\"}"),
        0.0
    );
    let stored = server.sink_events();
    let quiet = stored.iter().filter(|e| e["sourceName"] == "quiet").count();
    assert_eq!(quiet, quiet_requests * 10, "every quiet event stored");
    assert_eq!(
        stored.iter().filter(|e| e["sourceName"] == "noisy").count() as u64,
        accepted,
        "every accepted noisy event stored, no refused one"
    );
}
