//! Test harness: runs the real `breakwater` binary on a free loopback port with its
//! own data directory, and reads what it wrote. Shared by every integration test.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use breakwater_test_backends as backends;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    config_path: PathBuf,
    env: Vec<(String, String)>,
    log: Arc<Mutex<String>>,
    _temp: Arc<tempfile::TempDir>,
}

impl Server {
    /// The embedded default (no config) in a fresh data directory.
    pub fn start() -> Server {
        Server::start_with("", &[])
    }

    /// With `config` as the TOML config file and extra environment variables. The
    /// admin endpoints take `ADMIN_TOKEN` unless `config` has an `[admin]` section.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Server {
        Server::start_at(None, config, env)
    }

    /// `start_with`, with the data directory at `data_dir` (e.g. on a `FreezableDisk`).
    pub fn start_in(data_dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        Server::start_at(Some(data_dir), config, env)
    }

    fn start_at(data_dir: Option<&Path>, config: &str, env: &[(&str, &str)]) -> Server {
        let temp = Arc::new(tempfile::tempdir().expect("temp dir"));
        let config_path = temp.path().join("breakwater.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !config.contains("[admin]") {
            env.push(("BREAKWATER_ADMIN__TOKEN".into(), ADMIN_TOKEN.into()));
        }
        let data_dir = data_dir.map_or_else(|| temp.path().join("data"), Path::to_path_buf);
        Server::spawn(data_dir, config_path, env, temp)
    }

    fn spawn(
        data_dir: PathBuf,
        config_path: PathBuf,
        env: Vec<(String, String)>,
        temp: Arc<tempfile::TempDir>,
    ) -> Server {
        let mut command = breakwater_command();
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json", "--data-dir"])
            .arg(&data_dir)
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn breakwater");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_sender, addr_receiver) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(entry) = serde_json::from_str::<Value>(&line) {
                        if entry["message"] == "breakwater listening" {
                            let addr: SocketAddr = entry["addr"].as_str().unwrap().parse().unwrap();
                            let _ = addr_sender.send(addr);
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = match addr_receiver.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("breakwater did not start; log:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child,
            addr,
            data_dir,
            config_path,
            env,
            log,
            _temp: temp,
        }
    }

    /// Starts a new process on the same data directory and configuration.
    pub fn restart(&self) -> Server {
        Server::spawn(
            self.data_dir.clone(),
            self.config_path.clone(),
            self.env.clone(),
            self._temp.clone(),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then wait for exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "breakwater did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Every event line in the file sink, oldest file first.
    pub fn sink_events(&self) -> Vec<Value> {
        read_ndjson_dir(&self.data_dir.join("events"), "events-")
    }

    /// Every record in the rejected store.
    pub fn rejected_records(&self) -> Vec<Value> {
        let dir = self.data_dir.join("rejected");
        let mut records = Vec::new();
        for name in ["rejected.1.ndjson", "rejected.ndjson"] {
            records.extend(read_ndjson(&dir.join(name)));
        }
        records
    }

    pub fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .expect("scrape")
            .text()
            .expect("metrics text")
    }

    /// The value of one sample line (`name{labels}`) on `/metrics`, 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small ext4 file system on a loop device that a test can freeze (`fsfreeze`):
/// every write and fsync to it then blocks, as on a stalled disk, until thawed.
/// Needs root and a free loop device; fails loudly without them.
pub struct FreezableDisk {
    mount: PathBuf,
    _temp: tempfile::TempDir,
}

/// The disk frozen until this is dropped (or `thaw`). Declare it after the
/// `Server` that writes there: a process with a write stuck on a frozen disk cannot
/// be killed, so a failing test must thaw before it drops the server.
pub struct Frozen<'a> {
    disk: &'a FreezableDisk,
    thawed: bool,
}

impl FreezableDisk {
    pub fn new(megabytes: u64) -> FreezableDisk {
        let temp = tempfile::tempdir().expect("temp dir");
        let image = temp.path().join("disk.img");
        let mount = temp.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image).unwrap().set_len(megabytes << 20).unwrap();
        run_or_panic(Command::new("mkfs.ext4").arg("-q").arg(&image));
        run_or_panic(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount));
        FreezableDisk { mount, _temp: temp }
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    pub fn freeze(&self) -> Frozen<'_> {
        run_or_panic(Command::new("fsfreeze").arg("-f").arg(&self.mount));
        Frozen {
            disk: self,
            thawed: false,
        }
    }
}

impl Frozen<'_> {
    pub fn thaw(mut self) {
        self.thaw_now();
    }

    fn thaw_now(&mut self) {
        if !self.thawed {
            self.thawed = true;
            run_or_panic(Command::new("fsfreeze").arg("-u").arg(&self.disk.mount));
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if !self.thawed {
            self.thawed = true;
            let _ = Command::new("fsfreeze").arg("-u").arg(&self.disk.mount).status();
        }
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).status();
        // Lazy: a process still holding a file there lets go when it exits.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn run_or_panic(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} could not run ({e}): this test needs util-linux, e2fsprogs and root"));
    assert!(
        output.status.success(),
        "{command:?} failed (this test needs root and a loop device): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn breakwater_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_breakwater"));
    for (name, _) in std::env::vars() {
        if name.starts_with("BREAKWATER_") {
            command.env_remove(name);
        }
    }
    command
}

pub fn read_ndjson_dir(dir: &Path, prefix: &str) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
        .collect();
    files.sort();
    files.iter().flat_map(|f| read_ndjson(f)).collect()
}

pub fn read_ndjson(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line in {}: {e}: {line}", path.display()))
        })
        .collect()
}

/// The admin token every test server takes (see `Server::start_with`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// `GET` an admin endpoint with the admin token: status and JSON body.
pub fn admin_get(server: &Server, path: &str) -> (u16, Value) {
    status_and_json(client().get(server.url(path)).bearer_auth(ADMIN_TOKEN).send().unwrap())
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// POSTs JSON and returns the status and the JSON body.
pub fn post_json(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let response = client()
        .post(server.url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("request");
    status_and_json(response)
}

/// GETs `path` and returns its JSON body (panics on a transport error or a body
/// that is not JSON).
pub fn get_json(server: &Server, path: &str) -> Value {
    client()
        .get(server.url(path))
        .send()
        .unwrap()
        .json()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub fn status_and_json(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().expect("body");
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"));
    (status, json)
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A valid track event with the given id.
pub fn track(message_id: &str) -> Value {
    serde_json::json!({
        "type": "track",
        "messageId": message_id,
        "userId": "user-1",
        "event": "Order Completed",
        "properties": { "revenue": 12.5 },
    })
}

/// Every messageId in the sink, with how many times it appears.
pub fn id_counts(events: &[Value]) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    for event in events {
        *counts
            .entry(event["messageId"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// Writes a policy file: the embedded default with `edits` (text replacements)
/// applied to the named `[section]`, e.g. `("kafka.spool", "max_bytes", "1048576")`.
pub fn policy_file(dir: &std::path::Path, name: &str, edits: &[(&str, &str, &str)]) -> std::path::PathBuf {
    let mut text = breakwater::policy::EMBEDDED_DEFAULT.to_string();
    for (section, key, value) in edits {
        let header = format!("[{section}]\n");
        let start = text
            .find(&header)
            .unwrap_or_else(|| panic!("no [{section}] in the default policy"))
            + header.len();
        let end = text[start..].find("\n[").map_or(text.len(), |i| start + i);
        let block = &text[start..end];
        let line_start = block
            .lines()
            .find(|line| line.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("no {key} in [{section}]"));
        let replaced = block.replacen(line_start, &format!("{key} = {value}"), 1);
        text.replace_range(start..end, &replaced);
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Makes the disk "full" for one process on cue: its writes past `bytes` in any file
/// fail with EFBIG (RLIMIT_FSIZE), as on a full disk; `None` lifts the limit.
pub fn set_file_size_limit(pid: u32, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit with a valid pid and a pointer to a live rlimit.
    let result = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(result, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Sends `body` to `/v1/batch` from another thread and kills the server (`kill -9`)
/// 1.5 s later, while the request is still unanswered (something downstream hangs);
/// fails if it was answered 200 before the crash.
pub fn send_then_kill9(server: &mut Server, body: &Value) {
    let unanswered = {
        let url = server.url("/v1/batch");
        let body = body.clone();
        std::thread::spawn(move || client().post(url).json(&body).send().map(|r| r.status().as_u16()))
    };
    std::thread::sleep(Duration::from_millis(1_500));
    server.kill9();
    assert!(
        !matches!(unanswered.join().unwrap(), Ok(200)),
        "the request was answered before the crash"
    );
}

/// A policy file whose ClickHouse stack gives up quickly: one attempt of
/// `timeout_ms`, a breaker that opens at the first failure and probes again after
/// `open_ms`.
pub fn quick_clickhouse_policy(dir: &Path, timeout_ms: &str, open_ms: &str) -> PathBuf {
    policy_file(
        dir,
        "fast.toml",
        &[
            ("clickhouse", "timeout_ms", timeout_ms),
            ("clickhouse.retry", "max_attempts", "1"),
            ("clickhouse.circuit_breaker", "consecutive_failures", "1"),
            ("clickhouse.circuit_breaker", "open_ms", open_ms),
        ],
    )
}

/// Random hex that LZ4 finds nothing to shrink in (spool records are compressed),
/// so that these bytes fill the spool in full.
pub fn incompressible(len: usize) -> String {
    let mut text: String = (0..len.div_ceil(32))
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    text.truncate(len);
    text
}

/// Every id in `expected` once in `topic` (read by its `messageId` header), none
/// twice; the failure names the duplicates, the read-back count and the server log.
pub fn assert_each_once_in_kafka(
    kafka: &backends::Kafka,
    topic: &str,
    partitions: i32,
    expected: &[String],
    server: &Server,
) {
    // One more than expected: a second copy is read, not cut off.
    let records = kafka.read_all(topic, partitions, expected.len() + 1);
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for record in &records {
        *counts.entry(record.headers["messageId"].as_str()).or_default() += 1;
    }
    let missing: Vec<_> = expected.iter().filter(|id| !counts.contains_key(id.as_str())).collect();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "missing from Kafka: {missing:?}\n{}", server.log());
    assert!(
        twice.is_empty(),
        "written to Kafka {} times over: {twice:?} (read back: {})\n{}",
        twice.len(),
        server.metric("breakwater_kafka_read_back_found_events_total"),
        server.log()
    );
}

/// An RFC 3339 timestamp field of an event, in Unix milliseconds.
pub fn millis(timestamp: &Value) -> i64 {
    let text = timestamp
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {timestamp}"));
    chrono::DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .timestamp_millis()
}

/// A track event padded with `bytes` of incompressible properties.
pub fn padded_track(message_id: &str, bytes: usize) -> Value {
    let mut event = track(message_id);
    event["properties"]["padding"] = serde_json::json!(incompressible(bytes));
    event
}
