//! breakwater-chaos: runs chaos scenarios (`chaos/scenarios/*.toml`) against real
//! backends and a real breakwater on free loopback ports. Drives load with unique
//! messageIds (HTTP and WebSocket), records every acknowledged id, applies the fault
//! timeline, waits for the spools to drain, then checks the oracle: every
//! acknowledged event exactly once in each sink, nothing that was never sent.
//! Writes a JSON and a Markdown report with an SVG timeline per scenario.
//!
//!   breakwater-chaos [--scale 0.4] [--out target/chaos] chaos/scenarios/*.toml

mod proxy;
mod report;
mod scenario;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

use breakwater_test_backends::{ClickHouse, Kafka, Redis};
use proxy::{FaultProxy, ProxyFault};
use scenario::{Action, Fault, Scenario, Target};

#[derive(Parser)]
#[command(
    name = "breakwater-chaos",
    about = "Chaos scenarios against real backends, with a no-loss / no-duplicate oracle"
)]
struct Args {
    /// Multiply every duration and fault time (0.4 for the short CI run, 10 for a soak).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Multiply the request rate.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Where reports go (one folder per scenario).
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Keep the load going after the scenario's (scaled) duration until this many
    /// events are acknowledged (at most 4× the duration): a soak's event count then
    /// does not depend on how fast this machine is today.
    #[arg(long, default_value_t = 0)]
    min_events: u64,
    /// Scenario files.
    #[arg(required = true)]
    scenarios: Vec<PathBuf>,
}

const TOPIC: &str = "events";
const PARTITIONS: i32 = 3;
const DATABASE: &str = "chaos";

/// breakwater as a child process on a free port, restartable on the same data.
struct Breakwater {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Breakwater {
    /// Starts breakwater and appends its log (JSON lines) to `log`, across restarts,
    /// so a failed scenario can be read afterwards.
    fn start(config: &Path, data_dir: &Path, log: &Path) -> Result<Breakwater, String> {
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let binary = exe.with_file_name("breakwater");
        let mut child = Command::new(&binary)
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log_file, "{line}");
                if let Ok(entry) = serde_json::from_str::<Value>(&line) {
                    if entry["message"] == "breakwater listening" {
                        let _ = sender.send(entry["addr"].as_str().unwrap_or("").to_string());
                    }
                }
            }
        });
        let addr = receiver
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "breakwater did not start".to_string())?
            .parse()
            .map_err(|e| format!("bad address: {e}"))?;
        Ok(Breakwater {
            child,
            addr,
            config: config.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait (up to a minute) for the graceful stop to finish.
    fn terminate(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("   breakwater did not stop within 60 s of SIGTERM; killing it");
        self.kill9();
    }

    /// Its writes past the spool file's present size fail (EFBIG), as on a full
    /// disk; `full = false` lifts that.
    fn set_disk_full(&self, full: bool) {
        let spool_file = self.data_dir.join("spool").join("spool.redb");
        let bytes = std::fs::metadata(spool_file).map(|m| m.len()).unwrap_or(0);
        let limit = libc::rlimit {
            rlim_cur: if full { bytes } else { libc::RLIM_INFINITY },
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: prlimit on our own child with a pointer to a live rlimit.
        unsafe {
            libc::prlimit(
                self.child.id() as libc::pid_t,
                libc::RLIMIT_FSIZE,
                &limit,
                std::ptr::null_mut(),
            )
        };
    }

    fn restart(&mut self) -> Result<(), String> {
        *self = Breakwater::start(&self.config, &self.data_dir, &self.log)?;
        Ok(())
    }
}

impl Drop for Breakwater {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Everything the load, the faults and the sampler share.
struct Shared {
    /// Every instance's address; the first is the one faults hit.
    addrs: Mutex<Vec<SocketAddr>>,
    acked: Mutex<HashSet<String>>,
    sent: Mutex<HashSet<String>>,
    requests: AtomicU64,
    refused: AtomicU64,
    /// Refusals by the error code breakwater gave (HTTP body or WebSocket nack).
    refused_by_code: Mutex<BTreeMap<String, u64>>,
    errors: AtomicU64,
    stop: AtomicBool,
    started: Instant,
}

/// One sample of the timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub t: f64,
    pub acked_events: u64,
    pub refused_requests: u64,
    pub spool_events: f64,
    pub breakers: BTreeMap<String, f64>,
    /// breakwater's own count of transitions to open, all dependencies (restarts from
    /// 0 when breakwater does).
    pub breaker_openings: f64,
    /// Its count of transitions back to closed: one per outage that ended.
    pub breaker_closings: f64,
}

impl Shared {
    fn note_refusal(&self, code: String) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        *lock(&self.refused_by_code).entry(code).or_default() += 1;
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut results = Vec::new();
    for path in &args.scenarios {
        let scenario = match Scenario::load(path) {
            Ok(scenario) => scenario.scaled(args.scale),
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        };
        let mut scenario = scenario;
        scenario.load.requests_per_second =
            ((scenario.load.requests_per_second as f64) * args.rate_scale).max(1.0) as u32;
        eprintln!("== {}: {}", scenario.name, scenario.description);
        let outcome = run(&scenario, &args.out.join(&scenario.name), args.min_events);
        match &outcome {
            Ok(result) => eprintln!(
                "   {} acked {} events, refused {} requests {}, {}",
                if result["passed"] == true { "PASS" } else { "FAIL" },
                result["acked_events"],
                result["refused_requests"],
                result["refused_by_code"],
                result["verdict"].as_str().unwrap_or("")
            ),
            Err(error) => eprintln!("   ERROR {error}"),
        }
        results.push((scenario.name.clone(), outcome));
    }
    let passed = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok(v) if v["passed"] == true))
        .count();
    println!("{passed} passed, {} failed", results.len() - passed);
    if passed == results.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(scenario: &Scenario, out: &Path, min_events: u64) -> Result<Value, String> {
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let redis = scenario.backends.redis.then(|| Mutex::new(Redis::start()));
    let clickhouse = scenario.backends.clickhouse.then(|| Mutex::new(ClickHouse::start()));
    let clickhouse_proxy = match (&clickhouse, scenario.backends.clickhouse_proxy) {
        (Some(clickhouse), true) => {
            let upstream: SocketAddr = ([127, 0, 0, 1], lock(clickhouse).http_port).into();
            Some(FaultProxy::start("clickhouse", upstream)?)
        }
        _ => None,
    };
    let kafka = scenario.backends.kafka.then(|| {
        let kafka = Kafka::start_persistent();
        kafka.create_topic(TOPIC, PARTITIONS as u32);
        Mutex::new(kafka)
    });

    // Policy: the default with the scenario's edits.
    let mut policy: toml::Table = breakwater::policy::EMBEDDED_DEFAULT
        .parse()
        .map_err(|e| format!("{e}"))?;
    for (path, value) in &scenario.policy {
        let keys: Vec<&str> = path.split('.').collect();
        let (last, parents) = keys.split_last().ok_or("empty policy key")?;
        let mut table = &mut policy;
        for key in parents {
            table = table
                .get_mut(*key)
                .and_then(toml::Value::as_table_mut)
                .ok_or_else(|| format!("policy has no section {path}"))?;
        }
        table.insert(last.to_string(), value.clone());
    }
    let policy_path = work.path().join("policy.toml");
    std::fs::write(&policy_path, toml::to_string(&policy).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    // A spool write deadline of 5 s (not the 10 s default): these runs stall no
    // disk, and it keeps the 40 s Redis claims below longer than any request.
    let mut config = format!(
        "[server]\npolicy_file = \"{}\"\nspool_write_timeout_ms = 5000\n",
        policy_path.display()
    );
    let acknowledge = match &scenario.backends.acknowledge {
        Some(how) => format!("acknowledge = \"{how}\"\n"),
        None => String::new(),
    };
    if let Some(redis) = &redis {
        config.push_str(&format!(
            // Claims of a request cut off by a breakwater kill -9 block its resends
            // until they expire: 40 s (not the 120 s default) keeps the runs short;
            // breakwater checks it is still longer than any request can take.
            "[redis]\nurl = \"{}\"\ncommand_timeout_ms = 300\npending_ttl_ms = 40000\n",
            lock(redis).url()
        ));
    }
    if let Some(clickhouse) = &clickhouse {
        let url = match &clickhouse_proxy {
            Some(proxy) => format!("http://{}", proxy.listen),
            None => lock(clickhouse).url(),
        };
        config.push_str(&format!(
            "[clickhouse]\nurl = \"{url}\"\ndatabase = \"{DATABASE}\"\n{acknowledge}"
        ));
    }
    if scenario.backends.file {
        config.push_str("[file_sink]\nenabled = true\n");
    }
    if let Some(kafka) = &kafka {
        // tansu 0.6.0 panics when an idempotent producer bumps its epoch after a
        // timed-out batch (docs/backends.md), so the producer runs without
        // idempotence and without librdkafka's own retries: every failed delivery
        // goes through the spool and the read-back before replay.
        config.push_str(&format!(
            "[kafka]\nbrokers = \"{}\"\ntopic = \"{TOPIC}\"\nmessage_timeout_ms = 10000\n{acknowledge}\n[kafka.librdkafka]\n\"enable.idempotence\" = \"false\"\n\"message.send.max.retries\" = \"0\"\n",
            lock(kafka).brokers()
        ));
    }
    let config_path = work.path().join("breakwater.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let log = out.join("breakwater.log");
    let _ = std::fs::remove_file(&log);
    // The first instance on `data`, others on `data-1`, …; one log for all.
    let data_dirs: Vec<PathBuf> = (0..scenario.backends.instances.max(1))
        .map(|i| {
            work.path().join(if i == 0 {
                "data".to_string()
            } else {
                format!("data-{i}")
            })
        })
        .collect();
    let mut instances = Vec::new();
    for data_dir in &data_dirs {
        instances.push(Breakwater::start(&config_path, data_dir, &log)?);
    }
    let addrs: Vec<SocketAddr> = instances.iter().map(|b| b.addr).collect();
    let mut instances = instances.into_iter();
    let breakwater = Mutex::new(instances.next().expect("one instance at least"));
    let _others: Vec<Breakwater> = instances.collect();

    let shared = Arc::new(Shared {
        addrs: Mutex::new(addrs),
        acked: Mutex::new(HashSet::new()),
        sent: Mutex::new(HashSet::new()),
        requests: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        refused_by_code: Mutex::new(BTreeMap::new()),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        started: Instant::now(),
    });
    let samples = Mutex::new(Vec::<Sample>::new());
    let fault_log = Mutex::new(Vec::<Value>::new());
    let duration = Duration::from_secs_f64(scenario.load.duration_seconds);

    // Broker panics the runner answered with a restart, as an operator would: (when,
    // the panic). Reported, not hidden.
    let broker_restarts: Mutex<Vec<(f64, String)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for writer in 0..scenario.load.writers {
            let shared = shared.clone();
            scope.spawn(move || load_writer(scenario, writer, &shared));
        }
        scope.spawn(|| {
            while !shared.stop.load(Ordering::Relaxed) {
                if let Some(sample) = sample(&shared) {
                    lock(&samples).push(sample);
                }
                restart_broker_after_panic(&kafka, &mut broker_restarts.lock().unwrap(), &shared);
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        scope.spawn(|| {
            let mut timeline: Vec<(f64, &Fault)> = Vec::new();
            for fault in &scenario.faults {
                let repeats = fault.repeat.unwrap_or(1).max(1);
                for i in 0..repeats {
                    timeline.push((fault.at_seconds + i as f64 * fault.every_seconds.unwrap_or(0.0), fault));
                }
            }
            timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
            // Each fault's end (thaw, restart, rename back) is scheduled too.
            let mut pending: Vec<(f64, Box<dyn FnOnce() + Send + '_>)> = Vec::new();
            for (at, fault) in timeline {
                let end = at + fault.duration_seconds.unwrap_or(0.0);
                let (begin, finish) =
                    fault_steps(fault, &redis, &clickhouse, &clickhouse_proxy, &kafka, &breakwater, &shared);
                pending.push((at, begin));
                if let Some(finish) = finish {
                    pending.push((end, finish));
                }
                lock(&fault_log).push(json!({ "at_seconds": at, "end_seconds": end, "action": format!("{:?}", fault.action), "target": format!("{:?}", fault.target) }));
            }
            pending.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (at, step) in pending {
                let when = shared.started + Duration::from_secs_f64(at);
                if let Some(wait) = when.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                step();
            }
        });
        std::thread::sleep(duration);
        // Faults all fall within `duration`; past it the load only runs on.
        let longest = duration * 4;
        while (lock(&shared.acked).len() as u64) < min_events && shared.started.elapsed() < longest {
            std::thread::sleep(Duration::from_millis(250));
        }
        shared.stop.store(true, Ordering::Relaxed);
    });
    let load_ended = shared.started.elapsed().as_secs_f64();

    // Drain: every spool empty (replay done).
    let drain_deadline = Instant::now() + Duration::from_secs(180);
    let mut drained_at = None;
    let mut post = Vec::new();
    while Instant::now() < drain_deadline {
        restart_broker_after_panic(&kafka, &mut broker_restarts.lock().unwrap(), &shared);
        if let Some(sample) = sample(&shared) {
            let empty = sample.spool_events == 0.0;
            post.push(sample);
            if empty {
                drained_at = Some(shared.started.elapsed().as_secs_f64());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    lock(&samples).extend(post);

    // The oracle.
    let acked = lock(&shared.acked).clone();
    let sent = lock(&shared.sent).clone();
    let mut problems = Vec::new();
    let mut sinks = serde_json::Map::new();
    if let Some(clickhouse) = &clickhouse {
        let clickhouse = lock(clickhouse);
        let raw = counts(
            clickhouse
                .query(&format!("SELECT message_id FROM {DATABASE}.events"))
                .lines(),
        );
        let collapsed = counts(
            clickhouse
                .query(&format!("SELECT message_id FROM {DATABASE}.events FINAL"))
                .lines(),
        );
        check_sink("clickhouse", &collapsed, &acked, &sent, &mut problems);
        // Raw rows too: FINAL would hide an INSERT written twice.
        let raw_doubled = raw.values().filter(|n| **n > 1).count();
        if raw_doubled > 0 {
            problems.push(format!(
                "clickhouse: {raw_doubled} events in more than one raw row (FINAL hides them; must be one row)"
            ));
        }
        sinks.insert(
            "clickhouse".into(),
            json!({ "rows_final": collapsed.values().sum::<usize>(), "rows_raw": raw.values().sum::<usize>(),
                    "raw_duplicate_ids": raw.values().filter(|n| **n > 1).count() }),
        );
    }
    if scenario.backends.file {
        let mut ids: HashMap<String, usize> = HashMap::new();
        for data_dir in &data_dirs {
            for (id, n) in file_sink_ids(&data_dir.join("events")) {
                *ids.entry(id).or_insert(0) += n;
            }
        }
        check_sink("file", &ids, &acked, &sent, &mut problems);
        sinks.insert("file".into(), json!({ "lines": ids.values().sum::<usize>() }));
    }
    if let Some(kafka) = &kafka {
        let records = lock(kafka).read_all(TOPIC, PARTITIONS, acked.len());
        let ids = counts(records.iter().filter_map(|r| r.payload["messageId"].as_str()));
        check_sink("kafka", &ids, &acked, &sent, &mut problems);
        sinks.insert("kafka".into(), json!({ "records": records.len() }));
    }
    let refused = shared.refused.load(Ordering::Relaxed);
    let expect = &scenario.expect;
    if let Some(max) = expect.max_refused {
        if refused > max {
            problems.push(format!("{refused} requests refused; at most {max} expected"));
        }
    }
    if let Some(min) = expect.min_refused {
        if refused < min {
            problems.push(format!(
                "{refused} requests refused; at least {min} expected (no back-pressure seen)"
            ));
        }
    }
    let samples = samples.into_inner().unwrap_or_default();
    // Every opening, reopenings after failed half-open probes included; and
    // outages, counted by their end (back to closed).
    let opens = counter_growth(&samples, |s| s.breaker_openings);
    let outages = counter_growth(&samples, |s| s.breaker_closings);
    if let Some(max) = expect.max_breaker_outages {
        if outages > max {
            problems.push(format!(
                "breakers went through {outages} outages (closed, open, closed again); at most {max} expected (thrashing)"
            ));
        }
    }
    if drained_at.is_none() {
        problems.push("the spools did not drain within 180 s".into());
    }
    if (acked.len() as u64) < min_events {
        problems.push(format!(
            "only {} events acknowledged; --min-events asked for {min_events}",
            acked.len()
        ));
    }
    let broker_restarts = broker_restarts.into_inner().unwrap_or_default();
    let notes: Vec<String> = broker_restarts
        .iter()
        .map(|(at, panic)| {
            format!("at {at:.1} s the Kafka broker (tansu) panicked ({panic}); the runner restarted it, as an operator would")
        })
        .collect();
    if !expect.exactly_once {
        problems.retain(|p| !p.contains("once"));
    }
    let last_fault_end = lock(&fault_log)
        .iter()
        .filter_map(|f| f["end_seconds"].as_f64())
        .fold(0.0_f64, f64::max);
    let passed = problems.is_empty();
    let result = json!({
        "scenario": scenario.name,
        "description": scenario.description,
        "passed": passed,
        "verdict": if passed { "every acknowledged event exactly once, nothing unsent".to_string() } else { problems.join("; ") },
        "problems": problems,
        "requests": shared.requests.load(Ordering::Relaxed),
        "acked_events": acked.len(),
        "sent_events": sent.len(),
        "refused_requests": refused,
        "refused_by_code": *lock(&shared.refused_by_code),
        "connection_errors": shared.errors.load(Ordering::Relaxed),
        "load_seconds": load_ended,
        "min_events": min_events,
        "drained_at_seconds": drained_at,
        "time_to_recover_seconds": drained_at.map(|d| (d - last_fault_end).max(0.0)),
        "notes": notes,
        "breaker_opens": opens,
        "breaker_outages": outages,
        "faults": fault_log.into_inner().unwrap_or_default(),
        "sinks": sinks,
        "load": { "requests_per_second": scenario.load.requests_per_second, "batch_size": scenario.load.batch_size,
                  "websocket_share": scenario.load.websocket_share, "writers": scenario.load.writers },
    });
    report::write(out, &result, &samples).map_err(|e| e.to_string())?;
    if let Some(kafka) = &kafka {
        let _ = std::fs::copy(lock(kafka).log_path(), out.join("tansu.log"));
    }
    Ok(result)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn counts<'a>(ids: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id.trim().to_string()).or_insert(0) += 1;
    }
    counts
}

/// messageId → lines, over every NDJSON file the file sink wrote.
fn file_sink_ids(dir: &Path) -> HashMap<String, usize> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|path| path.extension().is_some_and(|e| e == "ndjson"));
    let mut ids = HashMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            let event: Value = serde_json::from_str(line).unwrap_or_default();
            if let Some(id) = event["messageId"].as_str() {
                *ids.entry(id.to_string()).or_insert(0) += 1;
            }
        }
    }
    ids
}

fn check_sink(
    sink: &str,
    found: &HashMap<String, usize>,
    acked: &HashSet<String>,
    sent: &HashSet<String>,
    problems: &mut Vec<String>,
) {
    let missing = acked.iter().filter(|id| !found.contains_key(*id)).count();
    // Acknowledged or not: an event a client sent once may be there at most once.
    let doubled = found.values().filter(|n| **n > 1).count();
    let invented = found.keys().filter(|id| !sent.contains(*id)).count();
    if missing > 0 {
        problems.push(format!(
            "{sink}: {missing} acknowledged events missing (must be there exactly once)"
        ));
    }
    if doubled > 0 {
        problems.push(format!(
            "{sink}: {doubled} events present more than once (must be at most once)"
        ));
    }
    if invented > 0 {
        problems.push(format!("{sink}: {invented} events that were never sent"));
    }
}

/// tansu 0.6.0 (sqlite) can panic in its storage task after a kill -9 under load
/// (docs/chaos.md); it then serves nothing until restarted. An operator would restart
/// it; so does the runner, once per new panic, and the report says so.
fn restart_broker_after_panic(kafka: &Option<Mutex<Kafka>>, restarts: &mut Vec<(f64, String)>, shared: &Shared) {
    let Some(kafka) = kafka else { return };
    if let Some(panic) = lock(kafka).restart_after_new_panic(restarts.len()) {
        eprintln!("   the broker panicked ({panic}); restarted it");
        restarts.push((shared.started.elapsed().as_secs_f64(), panic));
    }
}

/// How much a breakwater counter grew during the run, from its samples. A drop
/// means breakwater restarted: its counter began again at 0.
fn counter_growth(samples: &[Sample], counter: impl Fn(&Sample) -> f64) -> u64 {
    let mut growth = 0.0;
    let mut previous = 0.0;
    for sample in samples {
        let now = counter(sample);
        growth += if now >= previous { now - previous } else { now };
        previous = now;
    }
    growth as u64
}

/// Reads every instance's /metrics, summed (None while one is down).
fn sample(shared: &Shared) -> Option<Sample> {
    let addrs = lock(&shared.addrs).clone();
    let mut text = String::new();
    for addr in addrs {
        let one = reqwest::blocking::Client::new()
            .get(format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .ok()?
            .text()
            .ok()?;
        text.push_str(&one);
        text.push('\n');
    }
    let mut spool_events = 0.0;
    let mut breaker_openings = 0.0;
    let mut breaker_closings = 0.0;
    let mut breakers = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("breakwater_circuit_breaker_transitions_total{") {
            let value = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            if line.contains("to=\"open\"") {
                breaker_openings += value;
            } else if line.contains("to=\"closed\"") {
                breaker_closings += value;
            }
        }
        if let Some(rest) = line.strip_prefix("breakwater_spool_events{") {
            spool_events += rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = line.strip_prefix("breakwater_circuit_breaker_state{dependency=\"") {
            if let Some((name, value)) = rest.split_once("\"} ") {
                // The worst state over the instances (0 closed, 1 open, 2 half-open).
                let state = breakers.entry(name.to_string()).or_insert(0.0_f64);
                *state = state.max(value.parse().unwrap_or(0.0));
            }
        }
    }
    Some(Sample {
        t: shared.started.elapsed().as_secs_f64(),
        acked_events: lock(&shared.acked).len() as u64,
        refused_requests: shared.refused.load(Ordering::Relaxed),
        spool_events,
        breakers,
        breaker_openings,
        breaker_closings,
    })
}

type Step<'a> = Box<dyn FnOnce() + Send + 'a>;

/// The start and (if it has one) the end of a fault.
fn fault_steps<'a>(
    fault: &Fault,
    redis: &'a Option<Mutex<Redis>>,
    clickhouse: &'a Option<Mutex<ClickHouse>>,
    clickhouse_proxy: &'a Option<FaultProxy>,
    kafka: &'a Option<Mutex<Kafka>>,
    breakwater: &'a Mutex<Breakwater>,
    shared: &'a Shared,
) -> (Step<'a>, Option<Step<'a>>) {
    let has_end = fault.duration_seconds.is_some();
    match (fault.target, fault.action) {
        (Target::Clickhouse, Action::Freeze) => {
            let ch = clickhouse.as_ref().expect("scenario without clickhouse");
            (
                Box::new(move || lock(ch).freeze()),
                Some(Box::new(move || lock(ch).thaw())),
            )
        }
        (Target::Clickhouse, Action::Kill) => {
            let ch = clickhouse.as_ref().expect("scenario without clickhouse");
            (
                Box::new(move || lock(ch).kill9()),
                has_end.then(|| Box::new(move || lock(ch).restart()) as Step),
            )
        }
        (Target::Clickhouse, Action::Error) => {
            let ch = clickhouse.as_ref().expect("scenario without clickhouse");
            (
                Box::new(move || {
                    let _ = lock(ch).try_query(&format!("RENAME TABLE {DATABASE}.events TO {DATABASE}.events_away"));
                }),
                Some(Box::new(move || {
                    let _ = lock(ch).try_query(&format!("RENAME TABLE {DATABASE}.events_away TO {DATABASE}.events"));
                })),
            )
        }
        (Target::Clickhouse, action @ (Action::Slow | Action::Blackhole | Action::Reset)) => {
            let proxy = clickhouse_proxy
                .as_ref()
                .expect("scenario without clickhouse_proxy = true");
            let fault = match action {
                Action::Slow => ProxyFault::Slow,
                Action::Blackhole => ProxyFault::Blackhole,
                _ => ProxyFault::Reset,
            };
            (
                Box::new(move || proxy.apply(fault)),
                Some(Box::new(move || proxy.clear())),
            )
        }
        (Target::Redis, Action::Freeze) => freeze_steps(redis.as_ref().expect("scenario without redis"), Redis::pid),
        (Target::Redis, Action::Kill) => kill_steps(
            redis.as_ref().expect("scenario without redis"),
            Redis::kill9,
            Redis::restart,
            has_end,
        ),
        (Target::Kafka, Action::Freeze) => freeze_steps(kafka.as_ref().expect("scenario without kafka"), Kafka::pid),
        (Target::Kafka, Action::Kill) => kill_steps(
            kafka.as_ref().expect("scenario without kafka"),
            Kafka::kill9,
            Kafka::restart,
            has_end,
        ),
        (Target::Breakwater, action @ (Action::Kill | Action::Terminate)) => (
            Box::new(move || {
                let mut breakwater = lock(breakwater);
                match action {
                    Action::Kill => breakwater.kill9(),
                    _ => breakwater.terminate(),
                }
            }),
            Some(Box::new(move || {
                let mut breakwater = lock(breakwater);
                if breakwater.restart().is_ok() {
                    lock(&shared.addrs)[0] = breakwater.addr;
                }
            })),
        ),
        (Target::Breakwater, Action::DiskFull) => (
            Box::new(move || lock(breakwater).set_disk_full(true)),
            Some(Box::new(move || lock(breakwater).set_disk_full(false))),
        ),
        (target, action) => panic!("unsupported fault: {action:?} on {target:?}"),
    }
}

/// SIGSTOP now, SIGCONT at the end.
fn freeze_steps<'a, T: Send>(backend: &'a Mutex<T>, pid: fn(&T) -> u32) -> (Step<'a>, Option<Step<'a>>) {
    (
        Box::new(move || signal(pid(&lock(backend)), libc::SIGSTOP)),
        Some(Box::new(move || signal(pid(&lock(backend)), libc::SIGCONT))),
    )
}

/// SIGKILL now; restart at the end if the fault has one.
fn kill_steps<'a, T: Send>(
    backend: &'a Mutex<T>,
    kill: fn(&mut T),
    restart: fn(&mut T),
    has_end: bool,
) -> (Step<'a>, Option<Step<'a>>) {
    (
        Box::new(move || kill(&mut lock(backend))),
        has_end.then(|| Box::new(move || restart(&mut lock(backend))) as Step),
    )
}

fn signal(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// `len` random hex digits.
fn random_hex(len: usize) -> String {
    let mut text: String = (0..len.div_ceil(32))
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    text.truncate(len);
    text
}

/// A refused or unanswered request is sent again, same body, as the SDKs do:
/// after 200 ms, doubling to at most 5 s, for up to this many attempts (about a
/// minute: long enough to outlast a breakwater crash and restart). The writer
/// keeps at it after the load stops, as an SDK flushing its queue at exit would.
const MAX_ATTEMPTS: u32 = 16;

/// One writer: HTTP batches and WebSocket frames at its share of the rate; every
/// request sent until it is acknowledged or `MAX_ATTEMPTS` are used up.
fn load_writer(scenario: &Scenario, writer: usize, shared: &Shared) {
    let load = &scenario.load;
    let interval = Duration::from_secs_f64(load.writers as f64 / load.requests_per_second.max(1) as f64);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let mut socket: Option<(SocketAddr, WsSocket)> = None;
    let mut request = 0u64;
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        request += 1;
        let ids: Vec<String> = (0..load.batch_size)
            .map(|i| format!("c{writer}-r{request}-e{i}"))
            .collect();
        let events: Vec<Value> = ids
            .iter()
            .map(|id| {
                let mut event = json!({ "type": "track", "messageId": id, "userId": format!("user-{}", request % 97), "event": "Chaos Tested", "properties": { "writer": writer } });
                if load.event_padding_bytes > 0 {
                    event["properties"]["padding"] = json!(random_hex(load.event_padding_bytes));
                }
                event
            })
            .collect();
        lock(&shared.sent).extend(ids.iter().cloned());
        let over_websocket = (request % 100) < (load.websocket_share * 100.0) as u64;
        for attempt in 0..MAX_ATTEMPTS {
            shared.requests.fetch_add(1, Ordering::Relaxed);
            let addr = {
                let addrs = lock(&shared.addrs);
                addrs[(writer + attempt as usize) % addrs.len()]
            };
            let acked = if over_websocket {
                send_frame(&mut socket, addr, request, &events, shared)
            } else {
                match client
                    .post(format!("http://{addr}/v1/batch"))
                    .header("content-type", "application/json")
                    .body(json!({ "batch": events }).to_string())
                    .send()
                {
                    Ok(response) if response.status().as_u16() == 200 => true,
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let body: Value = response.json().unwrap_or_default();
                        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
                        shared.note_refusal(if code.is_empty() { status.to_string() } else { code });
                        false
                    }
                    Err(_) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                }
            };
            if acked {
                lock(&shared.acked).extend(ids.iter().cloned());
                break;
            }
            std::thread::sleep(Duration::from_millis(200 << attempt.min(5)).min(Duration::from_secs(5)));
        }
        next += interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

type WsSocket = tokio_tungstenite::tungstenite::WebSocket<
    tokio_tungstenite::tungstenite::stream::MaybeTlsStream<std::net::TcpStream>,
>;

fn send_frame(
    socket: &mut Option<(SocketAddr, WsSocket)>,
    addr: SocketAddr,
    id: u64,
    events: &[Value],
    shared: &Shared,
) -> bool {
    use tokio_tungstenite::tungstenite::Message;
    if socket.as_ref().is_none_or(|(a, _)| *a != addr) {
        match tokio_tungstenite::tungstenite::connect(format!("ws://{addr}/v1/ws")) {
            Ok((connected, _)) => *socket = Some((addr, connected)),
            Err(_) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
    }
    let Some((_, ws)) = socket.as_mut() else { return false };
    let frame = json!({ "id": id, "batch": events }).to_string();
    if ws.send(Message::text(frame)).is_err() {
        *socket = None;
        shared.errors.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    loop {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let answer: Value = serde_json::from_str(&text).unwrap_or_default();
                if answer["type"] == "ack" {
                    return true;
                }
                shared.note_refusal(answer["error"]["code"].as_str().unwrap_or("nack").to_string());
                return false;
            }
            Ok(Message::Close(_)) | Err(_) => {
                *socket = None;
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            Ok(_) => continue,
        }
    }
}
