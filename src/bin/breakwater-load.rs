//! breakwater-load: a bounded load generator for benchmarks (not tests). Sends
//! realistic ~400-byte track events with unique messageIds over N connections for a
//! fixed time — HTTP `/v1/batch` requests on keep-alive connections, or WebSocket
//! frames on `/v1/ws` — then reports acked events/s (and frames/s), ack latency
//! percentiles and every refusal. Loopback targets only.

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
    /// `http` (POST /v1/batch) or `ws` (frames on /v1/ws, one unacked frame each).
    #[arg(long, default_value = "http")]
    transport: String,
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

fn batch_body(args: &Args, run_id: &str, index: usize, sequence: &mut u64, frame_id: Option<u64>) -> String {
    let mut body = String::with_capacity(args.batch_size * 450 + 32);
    match frame_id {
        Some(id) => body.push_str(&format!(r#"{{"id":{id},"batch":["#)),
        None => body.push_str(r#"{"batch":["#),
    }
    for i in 0..args.batch_size {
        if i > 0 {
            body.push(',');
        }
        *sequence += 1;
        push_event(&mut body, run_id, index, *sequence);
    }
    body.push_str("]}");
    body
}

/// One WebSocket connection: a frame, wait for its answer, repeat.
async fn ws_worker(args: Arc<Args>, index: usize, run_id: String, deadline: Instant) -> WorkerResult {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut result = WorkerResult::default();
    let query = args
        .write_key
        .as_ref()
        .map(|key| format!("?writeKey={key}"))
        .unwrap_or_default();
    let url = format!("ws://{}/v1/ws{query}", args.target);
    let mut socket = match tokio_tungstenite::connect_async(url).await {
        Ok((socket, _)) => socket,
        Err(error) => {
            eprintln!("connection {index}: {error}");
            result.errors += 1;
            return result;
        }
    };
    let mut sequence = 0u64;
    let mut frame = 0u64;
    while Instant::now() < deadline {
        frame += 1;
        let body = batch_body(&args, &run_id, index, &mut sequence, Some(frame));
        let started = Instant::now();
        if socket.send(Message::text(body)).await.is_err() {
            result.errors += 1;
            break;
        }
        let answer = loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => break Some(text),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => continue,
            }
        };
        let Some(answer) = answer else {
            result.errors += 1;
            break;
        };
        result
            .latencies_micros
            .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if answer.as_str().contains(r#""type":"ack""#) {
            result.ok_requests += 1;
        } else {
            // Refusals are counted by a pseudo-status: 0 for a nack.
            *result.statuses.entry(0).or_default() += 1;
        }
    }
    let _ = socket.close(None).await;
    result
}

async fn worker(args: Arc<Args>, index: usize, run_id: String, deadline: Instant) -> WorkerResult {
    if args.transport == "ws" {
        return ws_worker(args, index, run_id, deadline).await;
    }
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
        let body = Bytes::from(batch_body(&args, &run_id, index, &mut sequence, None));
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
    if args.transport != "http" && args.transport != "ws" {
        eprintln!("error: --transport must be http or ws");
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
        "transport": args.transport,
        "acked_frames_per_second": total.ok_requests as f64 / elapsed,
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
        "{} {:.0} events/s acked ({} requests x {} events in {:.1} s, {} connections); latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; non-200: {:?}; connection errors: {}",
        args.transport,
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
