//! The browser SDKs from npm — `@segment/analytics-next` and
//! `@rudderstack/analytics-js`, bundled as shipped (scripts/browser-sdks.sh) — in
//! headless Chromium, on a page served from another loopback origin than
//! breakwater. Each is configured only with breakwater's address (API host and
//! settings/config URL) and a write key; it fetches its settings from breakwater,
//! passes the CORS preflight, and sends every call type. Its first requests meet a
//! real `503 memory_budget` (a request waiting for its body holds breakwater's whole
//! memory budget) and are retried by the SDK. Two more pages send on page unload: Segment's batched events flushed
//! with `fetch` keepalive, RudderStack's with `navigator.sendBeacon`. Every event
//! must be in ClickHouse (raw rows) and in Kafka exactly once, with the browser's
//! `context` (userAgent, page, locale, library, ip) and the clock-skew-corrected
//! timestamp.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use support::backends::{ClickHouse, Kafka};
use support::*;

const TOPIC: &str = "events";
/// The body limit; the memory budget is three times it (the least allowed), so one
/// request declaring the largest body holds all of it.
const MAX_REQUEST_BYTES: usize = 65536;
const REFUSED_FOR_BUDGET: &str = "breakwater_requests_refused_total{reason=\"memory_budget\"}";
const PARTITIONS: i32 = 2;

/// One page run: which SDK code path, its source (and write key), what it sends.
struct Run {
    sdk: &'static str,
    source: &'static str,
    /// Event types it sends, each once.
    types: &'static [&'static str],
    /// Whether it leaves the page to send (unload path).
    leaves: bool,
}

const RUNS: [Run; 4] = [
    Run {
        sdk: "segment",
        source: "segment",
        types: &["alias", "group", "identify", "page", "track"],
        leaves: false,
    },
    Run {
        sdk: "rudder",
        source: "rudder",
        types: &["alias", "group", "identify", "page", "track"],
        leaves: false,
    },
    Run {
        sdk: "segment-unload",
        source: "segment-unload",
        types: &["identify", "track"],
        leaves: true,
    },
    Run {
        sdk: "rudder-beacon",
        source: "rudder-beacon",
        types: &["identify", "track"],
        leaves: true,
    },
];

fn bundle() -> PathBuf {
    let bundle = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-sdks/sdks.js");
    assert!(
        bundle.is_file(),
        "{} is missing: run scripts/browser-sdks.sh (scripts/test.sh does), which installs the browser SDKs from npm and bundles them",
        bundle.display()
    );
    bundle
}

/// The test page's own server, on another port (another origin) than breakwater:
/// the page, the SDK bundle, and `/report`, where the page says what it did.
struct PageServer {
    origin: String,
    reports: Arc<Mutex<Vec<Value>>>,
}

impl PageServer {
    fn start() -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let reports = Arc::new(Mutex::new(Vec::new()));
        let page =
            std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/sdk-page.html")).unwrap();
        let sdks = std::fs::read(bundle()).unwrap();
        let served = reports.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (page, sdks, reports) = (page.clone(), sdks.clone(), served.clone());
                std::thread::spawn(move || serve_page(stream, &page, &sdks, &reports));
            }
        });
        PageServer { origin, reports }
    }

    fn report(&self, sdk: &str) -> Option<Value> {
        self.reports.lock().unwrap().iter().find(|r| r["sdk"] == sdk).cloned()
    }
}

fn serve_page(stream: TcpStream, page: &[u8], sdks: &[u8], reports: &Mutex<Vec<Value>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (content_type, content): (&str, &[u8]) = if path.starts_with("/sdk-page.html") {
        ("text/html", page)
    } else if path == "/sdks.js" {
        ("application/javascript", sdks)
    } else if path == "/report" {
        if let Ok(report) = serde_json::from_slice(&body) {
            reports.lock().unwrap().push(report);
        }
        ("application/json", b"{}")
    } else {
        ("text/html", b"<!doctype html><title>left</title>")
    };
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        content.len()
    );
    let _ = stream.write_all(content);
}

fn chromium(url: &str, profile: &std::path::Path) -> Child {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| Command::new(name).arg("--version").output().is_ok())
        .expect("chromium is needed (scripts/test.sh installs it)");
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--lang=de-DE",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(profile.join("console.log")).unwrap())
        .spawn()
        .expect("start chromium")
}

/// Holds breakwater's whole memory budget (a keyed request declaring the largest
/// body, which never comes) until the SDK has met a `503 memory_budget`, then lets
/// go: from then on there is room for every request.
fn hold_the_budget_until_a_503(server: &Server, key: &str, profile: &std::path::Path) {
    let refused = |server: &Server| server.metric(REFUSED_FOR_BUDGET);
    let before = refused(server);
    let mut holder = TcpStream::connect(server.addr).unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    write!(
        holder,
        "POST /v1/batch HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {basic}\r\nContent-Type: application/json\r\nContent-Length: {MAX_REQUEST_BYTES}\r\n\r\n",
        server.addr
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while refused(server) <= before {
        assert!(
            Instant::now() < deadline,
            "the SDK never met the 503\nbrowser console:\n{}\n{}",
            console(profile),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(holder);
}

/// What the page logged to its console (for failure messages).
fn console(profile: &std::path::Path) -> String {
    let log = std::fs::read_to_string(profile.join("console.log")).unwrap_or_default();
    log.lines()
        .filter(|line| line.contains("CONSOLE") || (line.contains("ERROR") && !line.contains("dbus")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits for `expected` raw rows of the source and returns their payloads.
fn rows_of(
    clickhouse: &ClickHouse,
    source: &str,
    expected: usize,
    server: &Server,
    profile: &std::path::Path,
) -> Vec<Value> {
    let sql = format!("SELECT count() FROM browser.events WHERE source_name = '{source}'");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The database appears with breakwater's first INSERT.
        let count: usize = clickhouse
            .try_query(&sql)
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        if count >= expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{source}: {count} of {expected} events in ClickHouse: {}\nrequests: {}\nbrowser console:\n{}\n{}",
            clickhouse
                .try_query(&format!(
                    "SELECT groupArray(type) FROM browser.events WHERE source_name = '{source}'"
                ))
                .unwrap_or_default(),
            server
                .metrics()
                .lines()
                .filter(
                    |l| l.starts_with("breakwater_http_requests_total") || l.starts_with("breakwater_events_rejected")
                )
                .collect::<Vec<_>>()
                .join("\n"),
            console(profile),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    clickhouse
        .rows(&format!(
            "SELECT payload FROM browser.events WHERE source_name = '{source}'"
        ))
        .iter()
        .map(|row| serde_json::from_str(row["payload"].as_str().unwrap()).unwrap())
        .collect()
}

fn check_event(run: &Run, page_origin: &str, event: &Value) {
    let context = &event["context"];
    let what = format!("{} {}: {event}", run.sdk, event["type"]);
    assert!(context["userAgent"].as_str().unwrap_or("").contains("Chrome"), "{what}");
    assert!(
        context["page"]["url"].as_str().unwrap_or("").starts_with(page_origin),
        "{what}"
    );
    assert!(context["locale"].as_str().is_some_and(|l| !l.is_empty()), "{what}");
    assert!(context["library"]["name"].as_str().is_some(), "{what}");
    assert_eq!(context["ip"], "127.0.0.1", "{what}");
    // The clock-skew-corrected timestamp: receivedAt − (sentAt − originalTimestamp).
    let corrected = millis(&event["receivedAt"]) - (millis(&event["sentAt"]) - millis(&event["originalTimestamp"]));
    assert_eq!(millis(&event["timestamp"]), corrected, "{what}");
}

#[test]
fn browser_sdks_on_another_origin_send_every_call_once() {
    let page = PageServer::start();
    let clickhouse = ClickHouse::start();
    let kafka = Kafka::start();
    kafka.create_topic(TOPIC, PARTITIONS as u32);
    let mut config = format!(
        "[server]\nmemory_budget_bytes = {}\nbody_read_timeout_ms = 40000\n\n\
         [limits]\nmax_request_bytes = {MAX_REQUEST_BYTES}\n\n\
         [clickhouse]\nurl = \"{}\"\ndatabase = \"browser\"\n\n\
         [kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\n",
        3 * MAX_REQUEST_BYTES,
        clickhouse.url(),
        kafka.brokers()
    );
    for run in &RUNS {
        config.push_str(&format!(
            "\n[[sources]]\nname = \"{0}\"\nwrite_key = \"wk-{0}\"\nallowed_origins = [\"{1}\"]\n",
            run.source, page.origin
        ));
    }
    let server = Server::start_with(&config, &[]);
    let bw = format!("http://{}", server.addr);
    let mut message_ids = Vec::new();
    for run in &RUNS {
        let profile = tempfile::tempdir().unwrap();
        let url = format!(
            "{}/sdk-page.html?sdk={}&key=wk-{}&run=run-{}&bw={}",
            page.origin, run.sdk, run.source, run.sdk, bw
        );
        let mut browser = chromium(&url, profile.path());
        if !run.leaves {
            hold_the_budget_until_a_503(&server, &format!("wk-{}", run.source), profile.path());
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        let report = loop {
            if let Some(report) = page.report(run.sdk) {
                break report;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the page never reported\n{}",
                run.sdk,
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(report.get("error").is_none(), "{}: {report}", run.sdk);
        let events = rows_of(&clickhouse, run.source, run.types.len(), &server, profile.path());
        let _ = browser.kill();
        let _ = browser.wait();

        let mut types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        types.sort_unstable();
        assert_eq!(types, run.types, "{}: each call once (raw rows)", run.sdk);
        for event in &events {
            check_event(run, &page.origin, event);
            message_ids.push(event["messageId"].as_str().unwrap().to_string());
        }
    }
    assert_each_once_in_kafka(&kafka, TOPIC, PARTITIONS, &message_ids, &server);
    let distinct: std::collections::HashSet<_> = message_ids.iter().collect();
    assert_eq!(distinct.len(), message_ids.len(), "every messageId once in ClickHouse");
    assert!(
        server.metric(REFUSED_FOR_BUDGET) >= 2.0,
        "both SDKs met a 503 and retried"
    );
    // The unload pages sent through their unload paths: Segment's batch flushed as
    // the page went away (`/v1/b`), RudderStack's beacons.
    for route in ["/v1/b", "/beacon/v1/batch"] {
        let sent = server.metric(&format!(
            "breakwater_http_requests_total{{route=\"{route}\",status=\"200\"}}"
        ));
        assert!(sent >= 1.0, "nothing came through {route}");
    }
}
