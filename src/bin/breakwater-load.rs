//! breakwater-load: a bounded load generator for benchmarks (not tests). Sends
//! Segment `/v1/batch` requests of realistic ~400-byte track events with unique
//! messageIds over N keep-alive connections for a fixed time, then reports acked
//! events/s, latency percentiles and every non-200. Loopback targets only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-load",
    version,
    about = "Load generator for breakwater benchmarks (loopback only)"
)]
struct Args {
    /// Server address; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Events per `/v1/batch` request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// How long to send, in seconds (the run stops by itself).
    #[arg(long, default_value_t = 10)]
    duration_seconds: u64,
    /// Write key sent as HTTP Basic, if the server needs one.
    #[arg(long)]
    write_key: Option<String>,
}

#[derive(Default)]
struct WorkerResult {
    latencies_micros: Vec<u32>,
    ok_requests: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    errors: u64,
}

/// Appends one realistic track event (~400 bytes of JSON) to `body`. Written with a
/// format string, not a JSON tree, so the generator spends little of the CPU it
/// shares with the server.
fn push_event(body: &mut String, run_id: &str, worker: usize, sequence: u64) {
    use std::fmt::Write;
    let _ = write!(
        body,
        concat!(
            r#"{{"type":"track","messageId":"{run}-{worker}-{seq}","userId":"user-{user}","event":"Product Viewed","#,
            r#""properties":{{"product_id":"sku-{sku}","category":"outdoor","price":129.99,"currency":"EUR","position":{position}}},"#,
            r#""context":{{"library":{{"name":"analytics-python","version":"2.3.2"}},"ip":"192.0.2.10","#,
            r#""userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36","locale":"de-DE"}},"#,
            r#""timestamp":"2024-05-01T12:00:00.000Z"}}"#
        ),
        run = run_id,
        worker = worker,
        seq = sequence,
        user = sequence % 10_000,
        sku = sequence % 5_000,
        position = sequence % 20,
    );
}

async fn worker(args: Arc<Args>, index: usize, run_id: String, deadline: Instant) -> WorkerResult {
    let mut result = WorkerResult::default();
    let stream = match tokio::net::TcpStream::connect(args.target).await {
        Ok(stream) => stream,
        Err(error) => {
            eprintln!("connection {index}: {error}");
            result.errors += 1;
            return result;
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(error) => {
            eprintln!("connection {index}: {error}");
            result.errors += 1;
            return result;
        }
    };
    tokio::spawn(connection);
    let authorization = args.write_key.as_ref().map(|key| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
        )
    });
    let host = args.target.to_string();
    let mut sequence = 0u64;
    while Instant::now() < deadline {
        let mut body = String::with_capacity(args.batch_size * 450 + 16);
        body.push_str(r#"{"batch":["#);
        for i in 0..args.batch_size {
            if i > 0 {
                body.push(',');
            }
            sequence += 1;
            push_event(&mut body, &run_id, index, sequence);
        }
        body.push_str("]}");
        let body = Bytes::from(body);
        let mut request = Request::post("/v1/batch")
            .header(HOST, &host)
            .header(CONTENT_TYPE, "application/json");
        if let Some(authorization) = &authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let request = request.body(Full::new(body)).expect("valid request");
        let started = Instant::now();
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                result
                    .latencies_micros
                    .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
                if status == 200 {
                    result.ok_requests += 1;
                } else {
                    *result.statuses.entry(status).or_default() += 1;
                }
            }
            Err(error) => {
                eprintln!("connection {index}: {error}");
                result.errors += 1;
                break;
            }
        }
    }
    result
}

fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Arc::new(Args::parse());
    if !args.target.ip().is_loopback() {
        eprintln!("error: breakwater-load only targets loopback addresses (127.0.0.0/8, ::1)");
        return std::process::ExitCode::from(2);
    }
    if args.connections == 0 || args.batch_size == 0 || args.duration_seconds == 0 {
        eprintln!("error: --connections, --batch-size and --duration-seconds must be positive");
        return std::process::ExitCode::from(2);
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_seconds);
    let workers: Vec<_> = (0..args.connections)
        .map(|i| tokio::spawn(worker(args.clone(), i, run_id.clone(), deadline)))
        .collect();
    let mut total = WorkerResult::default();
    for handle in workers {
        let Ok(result) = handle.await else {
            total.errors += 1;
            continue;
        };
        total.latencies_micros.extend(result.latencies_micros);
        total.ok_requests += result.ok_requests;
        total.errors += result.errors;
        for (status, count) in result.statuses {
            *total.statuses.entry(status).or_default() += count;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    total.latencies_micros.sort_unstable();
    let acked_events = total.ok_requests * args.batch_size as u64;
    let report = json!({
        "target": args.target.to_string(),
        "connections": args.connections,
        "batch_size": args.batch_size,
        "duration_seconds": elapsed,
        "requests_ok": total.ok_requests,
        "acked_events": acked_events,
        "acked_events_per_second": acked_events as f64 / elapsed,
        "latency_ms": {
            "p50": percentile(&total.latencies_micros, 0.50),
            "p99": percentile(&total.latencies_micros, 0.99),
            "p999": percentile(&total.latencies_micros, 0.999),
            "max": percentile(&total.latencies_micros, 1.0),
        },
        "non_200": total.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "connection_errors": total.errors,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    eprintln!(
        "{:.0} events/s acked ({} requests x {} events in {:.1} s, {} connections); latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; non-200: {:?}; connection errors: {}",
        acked_events as f64 / elapsed,
        total.ok_requests,
        args.batch_size,
        elapsed,
        args.connections,
        percentile(&total.latencies_micros, 0.50),
        percentile(&total.latencies_micros, 0.99),
        percentile(&total.latencies_micros, 0.999),
        total.statuses,
        total.errors
    );
    std::process::ExitCode::SUCCESS
}
