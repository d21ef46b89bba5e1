//! breakwater-load: a bounded load generator for benchmarks (not tests). Sends
//! realistic ~400-byte track and identify events (`--identify-percent`; larger
//! with `--event-bytes`) with unique
//! messageIds over N connections — HTTP `/v1/batch` requests on keep-alive
//! connections, or WebSocket frames on `/v1/ws` — as fast as acks allow or at a
//! fixed rate, for a duration or a number of requests; then reports acked events/s
//! (and frames/s), ack latency percentiles and every refusal.
//!
//! `--reference` first runs the same load against a minimal server in this process
//! (it reads each body and answers 200, or acks each frame) on its own two threads,
//! so the result can be stated as a fraction of the machine's loopback ceiling.
//! `--idle-websockets N` holds N more WebSocket connections open, silent, for the
//! run (for memory measurements). Loopback targets only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Server address; must be a loopback address. Several (comma-separated or the
    /// flag repeated) spread the connections over them round robin, as a client
    /// of N instances behind no balancer would: connection i goes to target i mod N.
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',', required = true)]
    target: Vec<SocketAddr>,
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
    /// Fixed rate in events/s over all connections (default: as fast as acks allow).
    /// Latency is then measured from each request's scheduled time, so a stall
    /// counts for every request it delays.
    #[arg(long)]
    rate: Option<u64>,
    /// Stop after this many requests in all (default: run for the duration only).
    #[arg(long)]
    requests: Option<u64>,
    /// Approximate size of each event's JSON in bytes (at least ~400: the base
    /// event; larger sizes pad a property).
    #[arg(long, default_value_t = 400)]
    event_bytes: usize,
    /// Share of the events, in percent, that are identify calls (traits, no event
    /// name) instead of track calls; the rest are track. 0 keeps runs comparable
    /// with the published figures, which were all track.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    identify_percent: u8,
    /// Also measure a minimal server (reads each body, answers 200) with the same
    /// load, first, and report the target as a fraction of it.
    #[arg(long)]
    reference: bool,
    /// Hold this many extra WebSocket connections open and silent during the run.
    #[arg(long, default_value_t = 0)]
    idle_websockets: usize,
    /// `NAME=PID`: also report the CPU time (user + system, from /proc, the process
    /// and its descendants) this process used during the measured run, in seconds
    /// and in microseconds per acknowledged event. Repeatable; the generator's own
    /// CPU is always reported as `load_generator`.
    #[arg(long = "watch", value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
    /// Send this share (percent) of the acknowledged `/v1/batch` bodies a second
    /// time, unchanged, as an SDK resends a batch whose answer it lost — to another
    /// target when there are several (a resend through the other instance). The
    /// resends' events are not counted as acked events again; `requests_resent_ok`
    /// reports them. HTTP only.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    resend_percent: u8,
}

fn parse_watch(value: &str) -> Result<(String, u32), String> {
    let (name, pid) = value
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got '{value}'"))?;
    let pid = pid.parse().map_err(|_| format!("'{pid}' is not a process id"))?;
    if name.is_empty() {
        return Err(format!("expected NAME=PID, got '{value}'"));
    }
    Ok((name.to_string(), pid))
}

/// The base event's size; `--event-bytes` above it adds padding.
const BASE_EVENT_BYTES: usize = 400;

#[derive(Default)]
struct WorkerResult {
    latencies_micros: Vec<u32>,
    ok_requests: u64,
    /// Resent bodies (`--resend-percent`) answered 200.
    resent_ok_requests: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    errors: u64,
}

/// Appends one realistic event (~400 bytes of JSON) to `body`: an identify call for
/// `identify_percent` of the sequence numbers, a track call for the others. Written
/// with a format string, not a JSON tree, so the generator spends little of the CPU
/// it shares with the server.
fn push_event(body: &mut String, run_id: &str, worker: usize, sequence: u64, padding: &str, identify_percent: u8) {
    use std::fmt::Write;
    let identify = sequence % 100 < u64::from(identify_percent);
    let kind = if identify { "identify" } else { "track" };
    let user = sequence % 10_000;
    let _ = write!(
        body,
        r#"{{"type":"{kind}","messageId":"{run_id}-{worker}-{sequence}","userId":"user-{user}","#
    );
    let _ = if identify {
        let logins = sequence % 500;
        write!(
            body,
            r#""traits":{{"email":"user-{user}@example.com","plan":"pro","company":"Example GmbH","logins":{logins}{padding}}},"#
        )
    } else {
        let (sku, position) = (sequence % 5_000, sequence % 20);
        write!(
            body,
            r#""event":"Product Viewed","properties":{{"product_id":"sku-{sku}","category":"outdoor","price":129.99,"currency":"EUR","position":{position}{padding}}},"#
        )
    };
    body.push_str(concat!(
        r#""context":{"library":{"name":"analytics-python","version":"2.3.2"},"ip":"192.0.2.10","#,
        r#""userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36","locale":"de-DE"},"#,
        r#""timestamp":"2024-05-01T12:00:00.000Z"}"#
    ));
}

/// The padding property that brings an event to about `event_bytes`.
fn padding_for(event_bytes: usize) -> String {
    let extra = event_bytes.saturating_sub(BASE_EVENT_BYTES);
    if extra < 16 {
        return String::new();
    }
    format!(r#","notes":"{}""#, "x".repeat(extra - 11))
}

fn batch_body(run: &Run, index: usize, sequence: &mut u64, frame_id: Option<u64>) -> String {
    let (args, run_id, padding) = (&run.args, run.run_id.as_str(), run.padding.as_str());
    let mut body = String::with_capacity(args.batch_size * (args.event_bytes.max(BASE_EVENT_BYTES) + 50) + 32);
    match frame_id {
        Some(id) => body.push_str(&format!(r#"{{"id":{id},"batch":["#)),
        None => body.push_str(r#"{"batch":["#),
    }
    for i in 0..args.batch_size {
        if i > 0 {
            body.push(',');
        }
        *sequence += 1;
        push_event(&mut body, run_id, index, *sequence, padding, args.identify_percent);
    }
    body.push_str("]}");
    body
}

/// One measured run: where to send, until when, how much.
struct Run {
    args: Arc<Args>,
    targets: Vec<SocketAddr>,
    run_id: String,
    padding: String,
    deadline: Instant,
    /// Requests left when `--requests` is given.
    budget: Option<AtomicU64>,
    /// Acknowledged bodies waiting to be sent again (`--resend-percent`), with the
    /// index of the target that acknowledged them.
    resends: std::sync::Mutex<std::collections::VecDeque<(usize, Bytes)>>,
}

/// The target connection `index` talks to: round robin over the targets.
fn round_robin(targets: &[SocketAddr], index: usize) -> SocketAddr {
    targets[index % targets.len()]
}

/// Whether the `acked`-th acknowledged body (from 1) is one of the `percent` % to
/// send again: spread evenly, whenever the running share crosses a whole body.
fn resend_this_one(acked: u64, percent: u8) -> bool {
    let percent = u64::from(percent);
    acked * percent / 100 > (acked - 1) * percent / 100
}

impl Run {
    fn target(&self, index: usize) -> SocketAddr {
        round_robin(&self.targets, index)
    }

    /// A body to send again through a target other than `target_index` (any target
    /// when there is only one), if one is waiting.
    fn take_resend(&self, target_index: usize) -> Option<Bytes> {
        let mut resends = self.resends.lock().expect("resend queue");
        let position = resends
            .iter()
            .position(|(acked_by, _)| self.targets.len() == 1 || *acked_by != target_index)?;
        resends.remove(position).map(|(_, body)| body)
    }

    /// Takes one request from the budget; false once the run is over.
    fn next_request(&self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        match &self.budget {
            None => true,
            Some(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }
}

/// When one connection sends: as fast as acks allow, or on a fixed schedule (the
/// connections staggered over one interval).
struct Pace {
    interval: Option<Duration>,
    next: Instant,
}

impl Pace {
    fn new(args: &Args, index: usize) -> Pace {
        let interval = args
            .rate
            .map(|rate| Duration::from_secs_f64(args.connections as f64 * args.batch_size as f64 / rate.max(1) as f64));
        let offset = interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / args.connections as f64));
        Pace {
            interval,
            next: Instant::now() + offset,
        }
    }

    /// Waits for this connection's next turn; returns the time latency counts from.
    async fn turn(&mut self) -> Instant {
        let Some(interval) = self.interval else {
            return Instant::now();
        };
        let scheduled = self.next;
        tokio::time::sleep_until(scheduled.into()).await;
        self.next += interval;
        scheduled
    }
}

fn micros_since(start: Instant) -> u32 {
    start.elapsed().as_micros().min(u32::MAX as u128) as u32
}

/// One WebSocket connection: a frame, wait for its answer, repeat.
async fn ws_worker(run: Arc<Run>, index: usize) -> WorkerResult {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut result = WorkerResult::default();
    let mut socket = match connect_websocket(&run.args, run.target(index)).await {
        Ok(socket) => socket,
        Err(error) => {
            eprintln!("connection {index}: {error}");
            result.errors += 1;
            return result;
        }
    };
    let mut pace = Pace::new(&run.args, index);
    let mut sequence = 0u64;
    let mut frame = 0u64;
    loop {
        let started = pace.turn().await;
        if !run.next_request() {
            break;
        }
        frame += 1;
        let body = batch_body(&run, index, &mut sequence, Some(frame));
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
        result.latencies_micros.push(micros_since(started));
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

type WebSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_websocket(args: &Args, target: SocketAddr) -> Result<WebSocket, String> {
    let query = args
        .write_key
        .as_ref()
        .map(|key| format!("?writeKey={key}"))
        .unwrap_or_default();
    tokio_tungstenite::connect_async(format!("ws://{target}/v1/ws{query}"))
        .await
        .map(|(socket, _)| socket)
        .map_err(|e| e.to_string())
}

async fn worker(run: Arc<Run>, index: usize) -> WorkerResult {
    if run.args.transport == "ws" {
        return ws_worker(run, index).await;
    }
    let mut result = WorkerResult::default();
    let target = run.target(index);
    let stream = match tokio::net::TcpStream::connect(target).await {
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
    let authorization = run.args.write_key.as_ref().map(|key| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
        )
    });
    let host = target.to_string();
    let mut pace = Pace::new(&run.args, index);
    let mut sequence = 0u64;
    let target_index = index % run.targets.len();
    let mut sent = 0u64;
    loop {
        let started = pace.turn().await;
        if !run.next_request() {
            break;
        }
        let resend = run.take_resend(target_index);
        let is_resend = resend.is_some();
        let body = resend.unwrap_or_else(|| Bytes::from(batch_body(&run, index, &mut sequence, None)));
        let mut request = Request::post("/v1/batch")
            .header(HOST, &host)
            .header(CONTENT_TYPE, "application/json");
        if let Some(authorization) = &authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let request = request.body(Full::new(body.clone())).expect("valid request");
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                result.latencies_micros.push(micros_since(started));
                if status == 200 && is_resend {
                    result.resent_ok_requests += 1;
                } else if status == 200 {
                    result.ok_requests += 1;
                    sent += 1;
                    if resend_this_one(sent, run.args.resend_percent) {
                        run.resends
                            .lock()
                            .expect("resend queue")
                            .push_back((target_index, body));
                    }
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

/// What one run measured, and against which servers.
struct Measured {
    targets: Vec<SocketAddr>,
    total: WorkerResult,
    elapsed: f64,
    acked_events: u64,
}

impl Measured {
    fn events_per_second(&self) -> f64 {
        self.acked_events as f64 / self.elapsed
    }

    fn report(&self, args: &Args) -> serde_json::Value {
        let latencies = &self.total.latencies_micros;
        let targets: Vec<String> = self.targets.iter().map(SocketAddr::to_string).collect();
        json!({
            "target": targets.join(","),
            "transport": args.transport,
            "connections": args.connections,
            "batch_size": args.batch_size,
            "event_bytes": args.event_bytes.max(BASE_EVENT_BYTES),
            "identify_percent": args.identify_percent,
            "rate_events_per_second": args.rate,
            "duration_seconds": self.elapsed,
            "requests_ok": self.total.ok_requests,
            "requests_resent_ok": self.total.resent_ok_requests,
            "acked_frames_per_second": self.total.ok_requests as f64 / self.elapsed,
            "acked_events": self.acked_events,
            "acked_events_per_second": self.events_per_second(),
            "latency_ms": {
                "p50": percentile(latencies, 0.50),
                "p99": percentile(latencies, 0.99),
                "p999": percentile(latencies, 0.999),
                "max": percentile(latencies, 1.0),
            },
            "non_200": self.total.statuses.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "connection_errors": self.total.errors,
        })
    }

    fn summary(&self, args: &Args, label: &str) -> String {
        let latencies = &self.total.latencies_micros;
        format!(
            "{label} {} {:.0} events/s acked ({} requests x {} events in {:.1} s, {} connections, {} resent and acked again); latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; non-200: {:?}; connection errors: {}",
            args.transport,
            self.events_per_second(),
            self.total.ok_requests,
            args.batch_size,
            self.elapsed,
            args.connections,
            self.total.resent_ok_requests,
            percentile(latencies, 0.50),
            percentile(latencies, 0.99),
            percentile(latencies, 0.999),
            self.total.statuses,
            self.total.errors
        )
    }
}

async fn measure(args: Arc<Args>, targets: Vec<SocketAddr>) -> Measured {
    let started = Instant::now();
    let run = Arc::new(Run {
        args: args.clone(),
        targets: targets.clone(),
        run_id: uuid::Uuid::new_v4().simple().to_string(),
        padding: padding_for(args.event_bytes),
        deadline: started + Duration::from_secs(args.duration_seconds),
        budget: args.requests.map(AtomicU64::new),
        resends: Default::default(),
    });
    let workers: Vec<_> = (0..args.connections)
        .map(|i| tokio::spawn(worker(run.clone(), i)))
        .collect();
    let mut total = WorkerResult::default();
    for handle in workers {
        let Ok(result) = handle.await else {
            total.errors += 1;
            continue;
        };
        total.latencies_micros.extend(result.latencies_micros);
        total.ok_requests += result.ok_requests;
        total.resent_ok_requests += result.resent_ok_requests;
        total.errors += result.errors;
        for (status, count) in result.statuses {
            *total.statuses.entry(status).or_default() += count;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    total.latencies_micros.sort_unstable();
    let acked_events = total.ok_requests * args.batch_size as u64;
    Measured {
        targets,
        total,
        elapsed,
        acked_events,
    }
}

/// Opens `count` WebSocket connections; they stay open until the returned sockets
/// are dropped.
async fn hold_idle_websockets(args: &Args, count: usize) -> Vec<WebSocket> {
    let mut sockets = Vec::with_capacity(count);
    let mut failed = 0;
    for index in 0..count {
        match connect_websocket(args, round_robin(&args.target, index)).await {
            Ok(socket) => sockets.push(socket),
            Err(error) => {
                failed += 1;
                if failed == 1 {
                    eprintln!("idle websocket: {error}");
                }
            }
        }
    }
    sockets
}

fn main() -> std::process::ExitCode {
    let args = Arc::new(Args::parse());
    if !args.target.iter().all(|target| target.ip().is_loopback()) {
        eprintln!("error: breakwater-load only targets loopback addresses (127.0.0.0/8, ::1)");
        return std::process::ExitCode::from(2);
    }
    if args.transport != "http" && args.transport != "ws" {
        eprintln!("error: --transport must be http or ws");
        return std::process::ExitCode::from(2);
    }
    if args.transport == "ws" && args.resend_percent > 0 {
        eprintln!("error: --resend-percent is for --transport http only");
        return std::process::ExitCode::from(2);
    }
    if args.connections == 0 || args.batch_size == 0 || args.duration_seconds == 0 {
        eprintln!("error: --connections, --batch-size and --duration-seconds must be positive");
        return std::process::ExitCode::from(2);
    }
    raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let reference = args.reference.then(|| {
        let server = reference::start(&args.transport);
        let measured = runtime.block_on(measure(args.clone(), vec![server.addr]));
        eprintln!("{}", measured.summary(&args, "reference"));
        measured
    });
    let idle = runtime.block_on(hold_idle_websockets(&args, args.idle_websockets));
    let opened = idle.len();
    if args.idle_websockets > 0 {
        eprintln!(
            "holding {opened} of {} idle websocket connections",
            args.idle_websockets
        );
    }
    let cpu_before = cpu::Snapshot::take(&args.watch);
    let measured = runtime.block_on(measure(args.clone(), args.target.clone()));
    let cpu_used = cpu::Snapshot::take(&args.watch).since(&cpu_before);
    drop(idle);
    let mut report = measured.report(&args);
    report["cpu"] = cpu::report(&cpu_used, measured.acked_events);
    let fraction = reference
        .as_ref()
        .map(|reference| measured.events_per_second() / reference.events_per_second());
    if let (Some(reference), Some(fraction)) = (&reference, fraction) {
        report["reference"] = reference.report(&args);
        report["fraction_of_reference"] = json!(fraction);
    }
    if args.idle_websockets > 0 {
        report["idle_websockets_open"] = json!(opened);
    }
    println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    let fraction = fraction
        .map(|fraction| format!(" = {:.0} % of the reference", 100.0 * fraction))
        .unwrap_or_default();
    eprintln!("{}{fraction}", measured.summary(&args, "target"));
    eprintln!("{}", cpu::summary(&cpu_used, measured.acked_events));
    std::process::ExitCode::SUCCESS
}

/// Many connections need many descriptors: raise the soft limit to the hard one.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// CPU time of watched processes over the measured run, from /proc (Linux).
mod cpu {
    use serde_json::json;

    /// CPU seconds per watched name, the load generator itself first.
    pub struct Snapshot(Vec<(String, f64)>);

    impl Snapshot {
        pub fn take(watched: &[(String, u32)]) -> Snapshot {
            let mut seconds = vec![("load_generator".to_string(), tree_seconds(std::process::id()))];
            seconds.extend(watched.iter().map(|(name, pid)| (name.clone(), tree_seconds(*pid))));
            Snapshot(seconds)
        }

        /// What each process used between `before` and this snapshot.
        pub fn since(&self, before: &Snapshot) -> Snapshot {
            Snapshot(
                self.0
                    .iter()
                    .zip(&before.0)
                    .map(|((name, now), (_, then))| (name.clone(), (now - then).max(0.0)))
                    .collect(),
            )
        }
    }

    fn micros_per_event(seconds: f64, events: u64) -> f64 {
        if events == 0 {
            0.0
        } else {
            seconds * 1e6 / events as f64
        }
    }

    pub fn report(used: &Snapshot, acked_events: u64) -> serde_json::Value {
        used.0
            .iter()
            .map(|(name, seconds)| {
                let value =
                    json!({"cpu_seconds": seconds, "cpu_us_per_acked_event": micros_per_event(*seconds, acked_events)});
                (name.clone(), value)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    pub fn summary(used: &Snapshot, acked_events: u64) -> String {
        let total: f64 = used.0.iter().map(|(_, seconds)| seconds).sum();
        let parts: Vec<String> = used
            .0
            .iter()
            .map(|(name, seconds)| format!("{name} {:.2}", micros_per_event(*seconds, acked_events)))
            .collect();
        format!(
            "cpu: µs per acked event: {}; all of these {:.2} ({total:.2} CPU s)",
            parts.join(", "),
            micros_per_event(total, acked_events)
        )
    }

    /// User + system CPU seconds of `pid` and every live descendant (a server that
    /// forks workers, like clickhouse-server's watchdog, counts as a whole), plus
    /// children they have waited for. 0 when /proc does not have the process.
    fn tree_seconds(pid: u32) -> f64 {
        let ticks_per_second = clock_ticks_per_second();
        let stats: Vec<(u32, u32, u64)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|p| {
                let (parent, ticks) = parse_stat(&std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?)?;
                Some((p, parent, ticks))
            })
            .collect();
        let mut tree = vec![pid];
        let mut index = 0;
        while index < tree.len() {
            let parent = tree[index];
            tree.extend(
                stats
                    .iter()
                    .filter(|(_, p, _)| *p == parent)
                    .map(|(child, _, _)| *child),
            );
            index += 1;
        }
        let ticks: u64 = stats
            .iter()
            .filter(|(p, _, _)| tree.contains(p))
            .map(|(_, _, ticks)| ticks)
            .sum();
        ticks as f64 / ticks_per_second
    }

    /// (parent pid, utime + stime + cutime + cstime in ticks) from /proc/PID/stat;
    /// the command name in parentheses may hold spaces, so fields count from its end.
    fn parse_stat(stat: &str) -> Option<(u32, u64)> {
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        let parent = fields.get(1)?.parse().ok()?;
        let ticks = (11..=14)
            .map(|i| fields.get(i)?.parse::<u64>().ok())
            .sum::<Option<u64>>()?;
        Some((parent, ticks))
    }

    fn clock_ticks_per_second() -> f64 {
        // SAFETY: sysconf with a valid name has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            ticks as f64
        } else {
            100.0
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn stat_fields_count_from_the_end_of_the_name() {
            let stat = "42 (tokio (worker) 1) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 3 2 20 0 4 0 99";
            assert_eq!(super::parse_stat(stat), Some((7, 305)));
        }

        #[test]
        fn this_process_is_its_own_tree() {
            let spin = std::time::Instant::now();
            while spin.elapsed() < std::time::Duration::from_millis(50) {}
            assert!(super::tree_seconds(std::process::id()) > 0.0);
        }
    }
}

/// The reference: the least a server can do for this load (read the body, answer
/// 200; or ack each frame), on its own two threads like a separate process.
mod reference {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    pub struct Reference {
        pub addr: SocketAddr,
    }

    pub fn start(transport: &str) -> Reference {
        let websocket = transport == "ws";
        let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("reference runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_sender
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    if websocket {
                        tokio::spawn(ack_frames(stream));
                    } else {
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(answer_200);
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                }
            });
        });
        Reference {
            addr: addr_receiver.recv().expect("reference server started"),
        }
    }

    async fn answer_200(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let _ = request.into_body().collect().await;
        Ok(Response::new(Full::new(Bytes::from_static(br#"{"success":true}"#))))
    }

    async fn ack_frames(stream: tokio::net::TcpStream) {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(_) = message {
                if socket.send(Message::text(r#"{"type":"ack"}"#)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events for sequence numbers 1..=200 of one worker, parsed back.
    fn events(identify_percent: u8, event_bytes: usize) -> Vec<(usize, serde_json::Value)> {
        let padding = padding_for(event_bytes);
        (1..=200)
            .map(|sequence| {
                let mut body = String::new();
                push_event(&mut body, "run", 3, sequence, &padding, identify_percent);
                let event = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
                (body.len(), event)
            })
            .collect()
    }

    #[test]
    fn events_are_valid_json_of_the_asked_mix_and_size() {
        for (percent, expected_identify) in [(0, 0), (20, 40), (100, 200)] {
            let events = events(percent, 400);
            let identify = events.iter().filter(|(_, e)| e["type"] == "identify").count();
            assert_eq!(identify, expected_identify, "identify share at {percent} %");
            for (size, event) in &events {
                assert!((350..=450).contains(size), "{size} bytes: {event}");
                assert!(event["userId"].is_string() && event["context"]["library"].is_object());
                match event["type"].as_str() {
                    Some("identify") => assert!(event["traits"]["email"].is_string(), "{event}"),
                    Some("track") => assert!(event["event"].is_string() && event["properties"].is_object()),
                    other => panic!("unexpected type {other:?}"),
                }
            }
            let ids: std::collections::HashSet<_> = events.iter().map(|(_, e)| e["messageId"].to_string()).collect();
            assert_eq!(ids.len(), events.len(), "messageIds are unique");
        }
    }

    fn run_over(targets: usize) -> Run {
        let args = Args::parse_from(["breakwater-load", "--target", "127.0.0.1:1"]);
        Run {
            args: Arc::new(args),
            targets: (0..targets)
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))
                .collect(),
            run_id: "run".into(),
            padding: String::new(),
            deadline: Instant::now(),
            budget: None,
            resends: Default::default(),
        }
    }

    #[test]
    fn connections_spread_round_robin_and_resends_go_through_another_target() {
        let run = run_over(2);
        assert_eq!(run.target(0), run.targets[0]);
        assert_eq!(run.target(3), run.targets[1]);
        run.resends
            .lock()
            .unwrap()
            .push_back((0, Bytes::from_static(b"acked by 0")));
        assert_eq!(run.take_resend(0), None, "not through the target that acknowledged it");
        assert_eq!(run.take_resend(1).as_deref(), Some(&b"acked by 0"[..]));
        assert_eq!(run.take_resend(1), None, "sent once more, not twice");
        // One target: it is the only way to resend.
        let single = run_over(1);
        single.resends.lock().unwrap().push_back((0, Bytes::from_static(b"x")));
        assert!(single.take_resend(0).is_some());
    }

    #[test]
    fn resends_are_spread_evenly_over_the_acknowledged_bodies() {
        let chosen = |percent| (1..=200).filter(|&acked| resend_this_one(acked, percent)).count();
        assert_eq!((chosen(0), chosen(5), chosen(50), chosen(100)), (0, 10, 100, 200));
    }

    #[test]
    fn watched_processes_are_name_equals_pid() {
        assert_eq!(parse_watch("redis=42"), Ok(("redis".to_string(), 42)));
        assert!(parse_watch("redis").unwrap_err().contains("NAME=PID"));
        assert!(parse_watch("=42").is_err());
        assert!(parse_watch("redis=x").unwrap_err().contains("not a process id"));
    }

    #[test]
    fn event_bytes_pads_both_kinds() {
        for (size, event) in events(50, 2000) {
            assert!((1950..=2050).contains(&size), "{size} bytes: {event}");
        }
    }
}
