//! The dashboards are proven, not drawn: a real Prometheus scrapes breakwater while
//! it takes HTTP and WebSocket load and one backend (ClickHouse) is down; then every
//! query of every panel in grafana/dashboards must return data. Also: `promtool
//! check metrics` passes on a live scrape, and `promtool check rules` on the
//! example alert rules.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::backends::{free_port, Prometheus};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn dashboard_queries() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/dashboards");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                queries.push((
                    panel["title"].as_str().unwrap().to_string(),
                    target["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    assert!(queries.len() >= 20, "the overview dashboard has its panels");
    queries
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is not installed; run ./scripts/test.sh once (it installs Debian's prometheus)");
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn every_dashboard_panel_returns_data_from_a_real_prometheus() {
    // File sink healthy, ClickHouse down: spooling, an open breaker, retries.
    let server = Server::start_with(
        &format!(
            "[file_sink]\nenabled = true\n[clickhouse]\nurl = \"http://127.0.0.1:{}\"\n",
            free_port()
        ),
        &[],
    );
    let prometheus = Prometheus::start(server.addr);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let batch: Vec<_> = (0..20).map(|i| track(&format!("h{n}-{i}"))).collect();
                post_json(&server, "/v1/batch", &json!({ "batch": batch }));
                // Now and then: a refused request and a partly invalid batch.
                if n % 10 == 0 {
                    let _ = client().post(server.url("/v1/batch")).body("{").send();
                    post_json(
                        &server,
                        "/v1/batch",
                        &json!({ "batch": [track(&format!("p{n}")), {"type": "track"}] }),
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        runtime.block_on(async {
            let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", server.addr))
                .await
                .unwrap();
            let mut f = 0;
            while Instant::now() < deadline {
                f += 1;
                let frame = json!({ "id": f, "batch": [track(&format!("w{f}"))] });
                socket.send(Message::text(frame.to_string())).await.unwrap();
                let _ = socket.next().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Stays open, so the connections gauge is non-zero at query time.
            std::mem::forget(socket);
        });
    });
    // Let Prometheus take a few more scrapes.
    std::thread::sleep(Duration::from_secs(3));

    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        if prometheus.query(&expr).is_empty() {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(empty.is_empty(), "panels without data:\n{}", empty.join("\n"));
    // The ClickHouse breaker opened (read from the server: Prometheus's 1 s scrapes
    // can miss samples when the machine is saturated).
    assert!(
        server.metric("breakwater_circuit_breaker_transitions_total{dependency=\"clickhouse\",to=\"open\"}") >= 1.0,
        "the ClickHouse breaker opened"
    );

    // Readiness names each dependency's breaker and spool headroom; a down sink
    // whose spool has room does not make the server unready.
    let (status, ready) = status_and_json(client().get(server.url("/health/ready")).send().unwrap());
    assert_eq!(status, 200, "{ready}");
    assert_ne!(ready["sinks"]["clickhouse"]["circuitBreaker"], "closed", "{ready}");
    assert!(
        ready["sinks"]["clickhouse"]["spoolHeadroomBytes"].as_u64().unwrap() > 0,
        "{ready}"
    );
    assert_eq!(ready["sinks"]["file"]["circuitBreaker"], "closed", "{ready}");

    let (ok, report) = promtool(&["check", "metrics"], Some(&server.metrics()));
    assert!(ok, "promtool check metrics on a live scrape:\n{report}");
}

#[test]
fn the_example_alert_rules_are_valid() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/alerts.yml");
    let (ok, report) = promtool(&["check", "rules", rules], None);
    assert!(ok, "{report}");
    assert!(report.contains("SUCCESS"), "{report}");
}
