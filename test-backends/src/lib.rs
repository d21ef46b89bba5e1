//! Real backends for integration tests: redis-server, clickhouse-server and tansu
//! (a Kafka-protocol broker), each on free loopback ports with its own temp dir,
//! killed when dropped. A missing binary fails the test loudly with how to get it.
//! One crate, so the integration tests and the chaos runner start backends the
//! same way (the tests through `tests/support`, the runner as a dependency).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const INSTALL_HINT: &str = "run ./scripts/test.sh once: it installs redis-server, clickhouse-server and tansu";

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn require(binary: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), home_cargo_bin()])
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| panic!("`{binary}` is not installed; {INSTALL_HINT}"))
}

fn home_cargo_bin() -> PathBuf {
    std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin"))
        .unwrap_or_default()
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not become ready within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn signal(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// --- Redis -----------------------------------------------------------------------

pub struct Redis {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Redis::spawn(dir.path(), port);
        let redis = Redis { child, port, dir };
        redis.wait_ready();
        redis
    }

    fn spawn(dir: &Path, port: u16) -> Child {
        Command::new(require("redis-server"))
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server")
    }

    fn wait_ready(&self) {
        wait_until("redis-server", Duration::from_secs(10), || {
            self.command(&["PING"]).trim() == "+PONG"
        });
    }

    /// SIGKILL; everything in it is gone (no persistence in tests).
    pub fn kill9(&mut self) {
        stop(&mut self.child);
        wait_until("redis port to close", Duration::from_secs(10), || !port_open(self.port));
    }

    /// A fresh, empty Redis on the same port.
    pub fn restart(&mut self) {
        self.child = Redis::spawn(self.dir.path(), self.port);
        self.wait_ready();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one inline command and returns the raw reply (enough for tests).
    pub fn command(&self, args: &[&str]) -> String {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        if stream.write_all(request.as_bytes()).is_err() {
            return String::new();
        }
        let mut reply = vec![0u8; 64 * 1024];
        let read = stream.read(&mut reply).unwrap_or(0);
        String::from_utf8_lossy(&reply[..read]).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

// --- ClickHouse ------------------------------------------------------------------

pub struct ClickHouse {
    child: Child,
    pub http_port: u16,
    tcp_port: u16,
    interserver_port: u16,
    dir: tempfile::TempDir,
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        ClickHouse::start_at(free_port())
    }

    /// On a given HTTP port (e.g. one breakwater was already told about).
    pub fn start_at(http_port: u16) -> ClickHouse {
        let dir = tempfile::tempdir().unwrap();
        let (tcp_port, interserver_port) = (free_port(), free_port());
        let child = ClickHouse::spawn(dir.path(), http_port, tcp_port, interserver_port);
        let clickhouse = ClickHouse {
            child,
            http_port,
            tcp_port,
            interserver_port,
            dir,
        };
        clickhouse.wait_ready();
        clickhouse
    }

    fn spawn(dir: &Path, http_port: u16, tcp_port: u16, interserver_port: u16) -> Child {
        let path = |name: &str| {
            let sub = dir.join(name);
            std::fs::create_dir_all(&sub).unwrap();
            format!("{}/", sub.display())
        };
        Command::new(require("clickhouse-server"))
            .arg("--config-file=/etc/clickhouse-server/config.xml")
            .arg("--")
            .arg(format!("--path={}", path("data")))
            .arg(format!("--tmp_path={}", path("tmp")))
            .arg(format!("--user_files_path={}", path("user_files")))
            .arg(format!("--format_schema_path={}", path("format_schemas")))
            .arg(format!("--logger.log={}/server.log", dir.display()))
            .arg(format!("--logger.errorlog={}/server.err", dir.display()))
            .arg(format!("--http_port={http_port}"))
            .arg(format!("--tcp_port={tcp_port}"))
            .arg(format!("--interserver_http_port={interserver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clickhouse-server")
    }

    fn wait_ready(&self) {
        wait_until("clickhouse-server", Duration::from_secs(60), || {
            self.try_query("SELECT 1").is_ok_and(|r| r.trim() == "1")
        });
    }

    /// SIGSTOP: the server hangs with its connections open.
    pub fn freeze(&self) {
        signal(self.child.id(), libc::SIGSTOP);
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&self) {
        signal(self.child.id(), libc::SIGCONT);
    }

    /// SIGKILL and wait for the HTTP port to close.
    pub fn kill9(&mut self) {
        stop(&mut self.child);
        wait_until("clickhouse port to close", Duration::from_secs(30), || {
            !port_open(self.http_port)
        });
    }

    /// Starts again on the same ports and data.
    pub fn restart(&mut self) {
        self.child = ClickHouse::spawn(self.dir.path(), self.http_port, self.tcp_port, self.interserver_port);
        self.wait_ready();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn try_query(&self, sql: &str) -> Result<String, String> {
        let response = reqwest::blocking::Client::new()
            .post(self.url())
            .body(sql.to_string())
            .timeout(Duration::from_secs(30))
            .send()
            .map_err(|e| e.to_string())?;
        let ok = response.status().is_success();
        let text = response.text().map_err(|e| e.to_string())?;
        if ok {
            Ok(text)
        } else {
            Err(text)
        }
    }

    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|e| panic!("clickhouse query failed: {sql}\n{e}"))
    }

    /// Rows as JSON objects (`FORMAT JSONEachRow`).
    pub fn rows(&self, sql: &str) -> Vec<serde_json::Value> {
        self.query(&format!("{sql} FORMAT JSONEachRow"))
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    pub fn count(&self, table: &str) -> u64 {
        self.query(&format!("SELECT count() FROM {table}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until the table exists and holds `expected` rows (or panics).
    pub fn wait_for_count(&self, table: &str, expected: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let count = self
                .try_query(&format!("SELECT count() FROM {table}"))
                .ok()
                .and_then(|c| c.trim().parse::<u64>().ok());
            if count == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{table}: expected {expected} rows, found {count:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

// --- Kafka (tansu) ---------------------------------------------------------------

pub struct Kafka {
    child: Child,
    pub port: u16,
    storage: &'static str,
    dir: tempfile::TempDir,
}

/// One message read back from a topic.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub key: Option<String>,
    pub payload: serde_json::Value,
    pub headers: BTreeMap<String, String>,
}

impl KafkaRecord {
    /// A payload that is not JSON is kept as a string, for the test to report.
    fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> KafkaRecord {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let bytes = message.payload().unwrap_or_default();
        KafkaRecord {
            partition: message.partition(),
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: serde_json::from_slice(bytes)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())),
            headers,
        }
    }
}

impl Kafka {
    /// In-memory storage: fast, gone when the broker stops.
    pub fn start() -> Kafka {
        Kafka::start_with("memory://tansu/")
    }

    /// SQLite storage in the broker's own temp dir: survives `kill -9` and restart.
    pub fn start_persistent() -> Kafka {
        Kafka::start_with("sqlite://tansu.db")
    }

    fn start_with(storage: &'static str) -> Kafka {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Kafka::spawn(dir.path(), port, storage);
        Kafka {
            child,
            port,
            storage,
            dir,
        }
    }

    fn spawn(dir: &Path, port: u16, storage: &str) -> Child {
        let listener = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(require("tansu"))
            .current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .args(["--storage-engine", storage])
            .stdout(Stdio::null())
            .stderr(Kafka::log_file(dir))
            .spawn()
            .expect("start tansu");
        wait_until("tansu", Duration::from_secs(30), || port_open(port));
        if let Some(file) = storage.strip_prefix("sqlite://") {
            Kafka::index_headers(&dir.join(file));
        }
        child
    }

    /// tansu 0.6.0's sqlite schema has no index on `header`, and it fetches each
    /// record's headers with a query that then scans every header row: reading
    /// 24,000 records with 3 headers each never finished. The index its foreign key
    /// implies makes it 1.4–5.7 s. It changes speed only, not what is stored.
    fn index_headers(db: &Path) {
        let output = Command::new(require("python3"))
            .args([
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=30); \
                 c.execute('create index if not exists header_record on header (topition, offset_id)'); c.commit()",
            ])
            .arg(db)
            .output()
            .expect("run python3");
        assert!(
            output.status.success(),
            "indexing tansu's header table failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The broker's log, kept across restarts (the chaos runner copies it into its report).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// The broker's first panic, as `"message" at crate/src/file.rs:line:col`. tansu
    /// 0.6.0 on sqlite can panic after a kill -9 that lands just after a producer's
    /// first batch (docs/chaos.md); tests name that instead of timing out vaguely.
    pub fn broker_panic(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.log_path()).ok()?;
        let mut lines = text.lines();
        let line = lines.find(|line| line.contains("panicked at "))?;
        let place = line.split("panicked at ").nth(1).unwrap_or("").trim_end_matches(':');
        // crate-version/src/file.rs:line:column, without the registry path before it
        let parts: Vec<&str> = place.rsplit('/').take(3).collect();
        let place = parts.into_iter().rev().collect::<Vec<_>>().join("/");
        Some(format!("\"{}\" at {place}", lines.next().unwrap_or("").trim()))
    }

    /// How many times the broker has panicked so far (its log is kept across restarts).
    pub fn panic_count(&self) -> usize {
        std::fs::read_to_string(self.log_path())
            .map(|text| text.matches("panicked at ").count())
            .unwrap_or(0)
    }

    /// The rule for tansu's known panic after a kill -9 (docs/chaos.md, "tansu"):
    /// when the broker has panicked more often than `restarts_so_far`, it is killed
    /// and started again, and the panic is returned so the caller can say so. A
    /// caller bounds how many such restarts it allows and fails naming tansu.
    pub fn restart_after_new_panic(&mut self, restarts_so_far: usize) -> Option<String> {
        if self.panic_count() <= restarts_so_far {
            return None;
        }
        let panic = self.broker_panic().unwrap_or_default();
        self.kill9();
        self.restart();
        Some(panic)
    }

    fn log_file(dir: &Path) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("tansu.log"))
            .expect("open tansu.log")
    }

    /// SIGKILL the broker and wait for its port to close.
    pub fn kill9(&mut self) {
        stop(&mut self.child);
        wait_until("tansu port to close", Duration::from_secs(30), || !port_open(self.port));
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) {
        self.child = Kafka::spawn(self.dir.path(), self.port, self.storage);
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let output = Command::new(require("tansu"))
            .args(["topic", "create", topic, "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .args(["--partitions", &partitions.to_string()])
            .output()
            .expect("run tansu topic create");
        assert!(
            output.status.success(),
            "tansu topic create failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Reads every partition from the start (assign, not subscribe: consumer groups
    /// are unreliable on this broker) until `expected` records arrived.
    pub fn read_all(&self, topic: &str, partitions: i32, expected: usize) -> Vec<KafkaRecord> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "breakwater-tests")
            .set("enable.auto.commit", "false")
            // As a downstream consumer reads: committed data only.
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).expect("assign");
        let mut records = Vec::new();
        // On a large topic the first fetch is slow (tansu on sqlite: ~2 s at 200k
        // records, ~5 s at 600k), then records stream. So wait for progress, not for
        // a fixed time: give up once nothing arrived for `idle_limit`.
        let idle_limit = Duration::from_secs(30) + Duration::from_millis(expected as u64 / 10);
        let mut last_progress = Instant::now();
        while records.len() < expected && last_progress.elapsed() < idle_limit {
            // Transient errors (a broker just restarted) are retried until then.
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                records.push(KafkaRecord::from_message(&message));
                last_progress = Instant::now();
            }
        }
        // Anything past `expected` would be a duplicate: give it a moment to show up.
        let settle = Instant::now() + Duration::from_millis(500);
        while Instant::now() < settle {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                records.push(KafkaRecord::from_message(&message));
            }
        }
        records
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

// --- Prometheus ------------------------------------------------------------------

pub struct Prometheus {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (host:port) every second.
    pub fn start(target: std::net::SocketAddr) -> Prometheus {
        let binary = require("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: breakwater\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, port, _dir: dir };
        wait_until("prometheus", Duration::from_secs(30), || {
            reqwest::blocking::get(format!("http://127.0.0.1:{port}/-/ready")).is_ok_and(|r| r.status().is_success())
        });
        prometheus
    }

    /// An instant query's result vector (panics on a query error).
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let response: serde_json::Value = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&[("query", expr)])
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(response["status"], "success", "query failed: {expr}: {response}");
        response["data"]["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
