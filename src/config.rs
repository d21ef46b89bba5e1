//! Server configuration: one TOML file, overridden by `BREAKWATER_*` environment
//! variables, overridden by command-line flags. Owns parsing and validation only;
//! nothing here touches the network or the data directory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of every environment variable breakwater reads.
pub const ENV_PREFIX: &str = "BREAKWATER_";

/// `BREAKWATER_WRITE_KEYS="web=KEY1,ios=KEY2"` adds sources without a config file.
pub const WRITE_KEYS_ENV: &str = "BREAKWATER_WRITE_KEYS";

/// The whole configuration. Every field has a default, so an empty file (or no file)
/// is the embedded default: loopback listener, `./data`, local dedup, file sink.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub dedup: DedupConfig,
    pub file_sink: FileSinkConfig,
    pub rejected_store: RejectedStoreConfig,
    pub log: LogConfig,
    pub websocket: WebSocketConfig,
    /// Shared dedup in Redis; absent: dedup stays in-process.
    pub redis: Option<RedisConfig>,
    /// ClickHouse sink; absent: off.
    pub clickhouse: Option<ClickHouseConfig>,
    /// Kafka sink; absent: off.
    pub kafka: Option<KafkaConfig>,
    /// Producers allowed to send, each with its write key. Empty means "open": only
    /// allowed on a loopback listener.
    pub sources: Vec<SourceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Requests being processed at once; beyond this, 503 with `Retry-After`.
    pub max_in_flight_requests: usize,
    /// A client that has not sent its whole body by then gets 408.
    pub body_read_timeout_ms: u64,
    /// Open HTTP connections (WebSocket included) at once; one more is answered
    /// `503 too_many_connections` and closed, so a flood cannot use up every file
    /// descriptor. Keep it below the process's `ulimit -n`.
    pub max_connections: usize,
    /// A client must send each request's headers within this time, and a
    /// keep-alive connection waiting for its next request is closed after it:
    /// slow-header (slowloris) and idle connections give their slot back.
    pub header_read_timeout_ms: u64,
    /// After SIGINT/SIGTERM, how long in-flight requests may take before exit.
    pub shutdown_timeout_ms: u64,
    /// Resilience policy file (reloaded on change); none: the embedded default
    /// (the same as `policies/default.toml`).
    pub policy_file: Option<PathBuf>,
    /// HTTPS (and WSS) on the listener; none: plain HTTP, the loopback default.
    pub tls: Option<TlsConfig>,
}

/// The listener's certificate chain and private key, PEM files, read at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            max_in_flight_requests: 1024,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            shutdown_timeout_ms: 30_000,
            policy_file: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest single event, as sent (JSON bytes). Segment's limit is 32 KB.
    pub max_event_bytes: usize,
    /// Largest request body after decompression. Segment's limit is 500 KB.
    pub max_request_bytes: usize,
    /// Most events in one `/v1/batch` request.
    pub max_batch_events: usize,
    /// Events per second each source (write key) may send; beyond it, `429` with
    /// `Retry-After`. 0 = unlimited. A source's own `events_per_second` overrides it.
    pub source_events_per_second: u64,
    /// Events a source may send at once above its rate; 0 = one second's worth.
    pub source_burst_events: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: 32 * 1024,
            max_request_bytes: 500 * 1024,
            max_batch_events: 2_500,
            source_events_per_second: 0,
            source_burst_events: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// A messageId seen within this window is acknowledged but not written again.
    pub window_seconds: u64,
    /// Most ids remembered; the oldest are forgotten early past this (and counted).
    pub max_entries: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            window_seconds: 24 * 60 * 60,
            max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSinkConfig {
    /// On by default when neither ClickHouse nor Kafka is configured, off otherwise.
    /// (Group-commit size and the rest of its call settings are in the policy.)
    pub enabled: Option<bool>,
    /// Start a new NDJSON file once the active one reaches this size.
    pub max_file_bytes: u64,
}

impl Default for FileSinkConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            max_file_bytes: 128 * 1024 * 1024,
        }
    }
}

/// A secret given inline, through an environment variable, or in a file:
/// `"…"`, `{ value = "…" }`, `{ env = "VAR" }` or `{ file = "/path" }`.
#[derive(Clone, Default)]
pub struct Secret {
    pub value: Option<String>,
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

/// The written forms of a `Secret`. Parsed through an untagged enum so that a
/// mistake is reported without the value: serde's usual "invalid type: string
/// \"…\"" message would print the secret itself.
#[derive(Deserialize)]
#[serde(untagged)]
enum SecretForm {
    Inline(String),
    Table(SecretTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    value: Option<String>,
    env: Option<String>,
    file: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match SecretForm::deserialize(deserializer) {
            Ok(SecretForm::Inline(value)) => Ok(Secret {
                value: Some(value),
                ..Secret::default()
            }),
            Ok(SecretForm::Table(SecretTable { value, env, file })) => Ok(Secret { value, env, file }),
            Err(_) => Err(serde::de::Error::custom(
                "expected a string, or a table with one of value, env, file (the value is not shown)",
            )),
        }
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("env", &self.env)
            .field("file", &self.file)
            .finish()
    }
}

impl Secret {
    /// Reads the secret; `key` names it in errors.
    pub fn resolve(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match (&self.value, &self.env, &self.file) {
            (None, None, None) => Ok(None),
            (Some(value), None, None) => Ok(Some(value.clone())),
            (None, Some(var), None) => std::env::var(var)
                .map(Some)
                .map_err(|_| invalid(key, format!("environment variable {var} is not set"))),
            (None, None, Some(file)) => std::fs::read_to_string(file)
                .map(|text| Some(text.trim().to_string()))
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", file.display()))),
            _ => Err(invalid(key, "give exactly one of value, env, file")),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`. May hold a password: never logged.
    pub url: String,
    /// Connections in the one shared pool.
    pub pool_size: usize,
    /// Every command fails after this (fred's own default is to wait forever).
    pub command_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Keys are `<key_prefix>:<source>:<messageId>`.
    pub key_prefix: String,
    /// How long a delivered id is remembered.
    pub ttl_seconds: u64,
    /// How long an in-flight claim lives if its holder dies before finishing. Must
    /// exceed the longest delivery; a crashed instance's claims free themselves then.
    pub pending_ttl_ms: u64,
    /// How long a request waits for an id another instance has in flight before
    /// answering 503 (the client retries).
    pub pending_wait_ms: u64,
    /// Ids remembered locally in front of Redis (saves a round trip for repeats).
    pub local_cache_entries: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: 4,
            command_timeout_ms: 500,
            connect_timeout_ms: 2_000,
            key_prefix: "breakwater:dedup".into(),
            ttl_seconds: 24 * 60 * 60,
            pending_ttl_ms: 60_000,
            pending_wait_ms: 5_000,
            local_cache_entries: 100_000,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("ttl_seconds", &self.ttl_seconds)
            .finish_non_exhaustive()
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Which ClickHouse table layout to create and write.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClickHouseSchema {
    /// Ask the server its version: 20 and later get `modern`, older get `legacy`.
    #[default]
    Auto,
    /// DateTime64(3), LowCardinality, ZSTD, insert dedup tokens.
    Modern,
    /// For servers older than 20 (e.g. 18.16): DateTime, plain String.
    Legacy,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClickHouseCompression {
    #[default]
    Lz4,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    pub table: String,
    pub user: Option<String>,
    pub password: Secret,
    pub schema: ClickHouseSchema,
    /// Create the database and table when missing (on first use).
    pub create_table: bool,
    /// Whole INSERT deadline.
    pub insert_timeout_ms: u64,
    pub compression: ClickHouseCompression,
    /// When a request counts as durable for this sink (see [`Acknowledge`]).
    pub acknowledge: Acknowledge,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            database: "breakwater".into(),
            table: "events".into(),
            user: None,
            password: Secret::default(),
            schema: ClickHouseSchema::Auto,
            create_table: true,
            insert_timeout_ms: 10_000,
            compression: ClickHouseCompression::Lz4,
            acknowledge: Acknowledge::OnDelivery,
        }
    }
}

/// When a request's events count as durable for one sink. Both honour the contract
/// (a 200 only once every event is delivered or fsynced into the spool); they differ
/// in what the client waits for and in how the sink is written to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Acknowledge {
    /// The request waits for the sink to confirm the write; the spool takes the
    /// events only when the sink cannot (down, breaker open, timed out).
    #[default]
    OnDelivery,
    /// The request waits only for the spool's fsync; the replayer delivers from the
    /// spool behind the ack, unpaced, in rounds of up to `spool.replay_batch_events`
    /// (each waiting up to the sink's `batch.linger_ms` to fill). The
    /// sink gets fewer, larger writes (what ClickHouse wants), and the client's
    /// latency no longer includes the sink's; every event is written to disk first.
    OnSpool,
}

/// What a Kafka message's key is.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaKey {
    /// `userId`, else `anonymousId`: one user's events stay in order on one partition.
    #[default]
    User,
    MessageId,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`.
    pub brokers: String,
    pub topic: String,
    pub key: KafkaKey,
    /// librdkafka `compression.type`: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// librdkafka `message.timeout.ms`: the longest a delivery may take.
    pub message_timeout_ms: u64,
    /// Any other librdkafka setting (e.g. `security.protocol`, `sasl.mechanism`).
    /// These are passed through as given; secrets here are never logged.
    pub librdkafka: std::collections::BTreeMap<String, String>,
    /// When a request counts as durable for this sink (see [`Acknowledge`]).
    pub acknowledge: Acknowledge,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topic: "breakwater-events".into(),
            key: KafkaKey::User,
            compression: "lz4".into(),
            message_timeout_ms: 30_000,
            librdkafka: Default::default(),
            acknowledge: Acknowledge::OnDelivery,
        }
    }
}

/// The WebSocket gateway (`GET /v1/ws`); see docs/websocket.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Open connections at once; past it an upgrade gets 503 with Retry-After.
    pub max_connections: usize,
    /// Frames read but not yet answered, per connection; at the limit the server
    /// stops reading, so TCP pushes back on the client.
    pub max_unacked_frames: usize,
    /// Largest frame (and message); a larger one closes the connection with 1009.
    pub max_frame_bytes: usize,
    /// Frames per second per connection; past it reading is paced. 0 = unlimited.
    pub max_frames_per_second: u32,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout_ms: u64,
    /// How often the server pings.
    pub ping_interval_ms: u64,
    /// A client that does not take an answer within this is disconnected.
    pub write_timeout_ms: u64,
    /// Serve `examples/websocket.html` at `/examples/websocket` (a browser client
    /// for trying the gateway). Off by default.
    pub serve_example_page: bool,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_unacked_frames: 64,
            max_frame_bytes: 500 * 1024,
            max_frames_per_second: 0,
            idle_timeout_ms: 60_000,
            ping_interval_ms: 20_000,
            write_timeout_ms: 30_000,
            serve_example_page: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RejectedStoreConfig {
    /// Disk kept for refused events (two files of half this size each).
    pub max_bytes: u64,
}

impl Default for RejectedStoreConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// One producer. The key may be given inline, read from an environment variable,
/// or read from a file (so it need not sit in the config file).
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub name: String,
    pub write_key: Option<String>,
    pub write_key_env: Option<String>,
    pub write_key_file: Option<PathBuf>,
    /// This source's limit (events per second; 0 = unlimited), instead of
    /// `limits.source_events_per_second`.
    pub events_per_second: Option<u64>,
    /// This source's burst, instead of `limits.source_burst_events`.
    pub burst_events: Option<u64>,
}

impl std::fmt::Debug for SourceConfig {
    // Never print a key, even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("write_key", &self.write_key.as_ref().map(|_| "<redacted>"))
            .field("write_key_env", &self.write_key_env)
            .field("write_key_file", &self.write_key_file)
            .finish()
    }
}

/// A source with its key resolved.
#[derive(Clone)]
pub struct Source {
    pub name: String,
    pub write_key: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What went wrong loading the configuration: always names where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: `{key}`: {why}")]
    Invalid { key: String, why: String },
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

impl Config {
    /// Loads `path` (if any), applies `BREAKWATER_<SECTION>__<KEY>` overrides from
    /// `env`, then validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?,
                format!("in {}", path.display()),
            ),
            None => (String::new(), "(no config file)".to_string()),
        };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        let mut overridden = Vec::new();
        for (name, value) in env {
            if let Some(path) = override_path(&name) {
                set_path(&mut table, &path, parse_env_value(&value));
                overridden.push(name);
            }
        }
        let origin = if overridden.is_empty() {
            origin
        } else {
            format!("{origin} with overrides {}", overridden.join(", "))
        };
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin,
                message: e.message().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations between values that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be greater than 0"));
        }
        if self.server.header_read_timeout_ms == 0 {
            return Err(invalid("server.header_read_timeout_ms", "must be greater than 0"));
        }
        let limits = &self.limits;
        if limits.max_event_bytes == 0 {
            return Err(invalid("limits.max_event_bytes", "must be greater than 0"));
        }
        if limits.max_request_bytes < limits.max_event_bytes {
            return Err(invalid(
                "limits.max_request_bytes",
                format!(
                    "is {} but must be at least limits.max_event_bytes ({})",
                    limits.max_request_bytes, limits.max_event_bytes
                ),
            ));
        }
        if limits.max_batch_events == 0 {
            return Err(invalid("limits.max_batch_events", "must be greater than 0"));
        }
        if self.server.max_in_flight_requests == 0 {
            return Err(invalid("server.max_in_flight_requests", "must be greater than 0"));
        }
        if self.dedup.window_seconds == 0 {
            return Err(invalid("dedup.window_seconds", "must be greater than 0"));
        }
        if self.dedup.max_entries == 0 {
            return Err(invalid("dedup.max_entries", "must be greater than 0"));
        }
        if self.file_sink.max_file_bytes < 4096 {
            return Err(invalid("file_sink.max_file_bytes", "must be at least 4096"));
        }
        self.validate_backends()?;
        let ws = &self.websocket;
        for (key, value) in [
            ("websocket.max_connections", ws.max_connections as u64),
            ("websocket.max_unacked_frames", ws.max_unacked_frames as u64),
            ("websocket.max_frame_bytes", ws.max_frame_bytes as u64),
            ("websocket.idle_timeout_ms", ws.idle_timeout_ms),
            ("websocket.ping_interval_ms", ws.ping_interval_ms),
            ("websocket.write_timeout_ms", ws.write_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if !self.file_sink_enabled() && self.clickhouse.is_none() && self.kafka.is_none() {
            return Err(invalid(
                "file_sink.enabled",
                "is false and no other sink ([clickhouse], [kafka]) is configured: events would go nowhere",
            ));
        }
        if self.rejected_store.max_bytes < 8192 {
            return Err(invalid("rejected_store.max_bytes", "must be at least 8192"));
        }
        let mut names = HashSet::new();
        for (index, source) in self.sources.iter().enumerate() {
            if source.name.trim().is_empty() {
                return Err(invalid(format!("sources[{index}].name"), "must not be empty"));
            }
            if !names.insert(source.name.as_str()) {
                return Err(invalid(
                    format!("sources[{index}].name"),
                    format!("`{}` is used by two sources", source.name),
                ));
            }
            let given = [
                source.write_key.is_some(),
                source.write_key_env.is_some(),
                source.write_key_file.is_some(),
            ];
            if given.iter().filter(|g| **g).count() != 1 {
                return Err(invalid(
                    format!("sources[{index}]"),
                    "give exactly one of write_key, write_key_env, write_key_file",
                ));
            }
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        if let Some(redis) = &self.redis {
            if !(redis.url.starts_with("redis://") || redis.url.starts_with("rediss://")) {
                return Err(invalid("redis.url", "must start with redis:// or rediss://"));
            }
            for (key, value) in [
                ("redis.pool_size", redis.pool_size as u64),
                ("redis.command_timeout_ms", redis.command_timeout_ms),
                ("redis.ttl_seconds", redis.ttl_seconds),
                ("redis.pending_ttl_ms", redis.pending_ttl_ms),
                ("redis.local_cache_entries", redis.local_cache_entries as u64),
            ] {
                if value == 0 {
                    return Err(invalid(key, "must be greater than 0"));
                }
            }
            if redis.key_prefix.is_empty() {
                return Err(invalid("redis.key_prefix", "must not be empty"));
            }
        }
        if let Some(clickhouse) = &self.clickhouse {
            if !(clickhouse.url.starts_with("http://") || clickhouse.url.starts_with("https://")) {
                return Err(invalid(
                    "clickhouse.url",
                    "must be the HTTP interface, e.g. http://127.0.0.1:8123",
                ));
            }
            for (key, name) in [
                ("clickhouse.database", &clickhouse.database),
                ("clickhouse.table", &clickhouse.table),
            ] {
                let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(invalid(
                        key,
                        "must be letters, digits and _ (not starting with a digit)",
                    ));
                }
            }
            clickhouse.password.resolve("clickhouse.password")?;
        }
        if let Some(kafka) = &self.kafka {
            if kafka.brokers.trim().is_empty() {
                return Err(invalid("kafka.brokers", "must list at least one host:port"));
            }
            if kafka.topic.trim().is_empty() {
                return Err(invalid("kafka.topic", "must not be empty"));
            }
            if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&kafka.compression.as_str()) {
                return Err(invalid(
                    "kafka.compression",
                    "must be one of none, gzip, snappy, lz4, zstd",
                ));
            }
        }
        Ok(())
    }

    /// Whether the file sink runs: as configured, else only when no other sink does.
    pub fn file_sink_enabled(&self) -> bool {
        self.file_sink
            .enabled
            .unwrap_or(self.clickhouse.is_none() && self.kafka.is_none())
    }

    /// When a request counts as durable for the named sink (the file sink is
    /// always written before the ack).
    pub fn acknowledge(&self, sink: &str) -> Acknowledge {
        match sink {
            "clickhouse" => self.clickhouse.as_ref().map(|c| c.acknowledge).unwrap_or_default(),
            "kafka" => self.kafka.as_ref().map(|c| c.acknowledge).unwrap_or_default(),
            _ => Acknowledge::OnDelivery,
        }
    }

    /// Resolves every source's key (from the config, an env var or a file), adding
    /// the sources listed in `BREAKWATER_WRITE_KEYS`.
    pub fn resolve_sources(&self, write_keys_env: Option<&str>) -> Result<Vec<Source>, ConfigError> {
        let mut sources = Vec::new();
        for (index, source) in self.sources.iter().enumerate() {
            let key = if let Some(key) = &source.write_key {
                key.clone()
            } else if let Some(var) = &source.write_key_env {
                std::env::var(var).map_err(|_| {
                    invalid(
                        format!("sources[{index}].write_key_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?
            } else if let Some(file) = &source.write_key_file {
                std::fs::read_to_string(file)
                    .map_err(|e| {
                        invalid(
                            format!("sources[{index}].write_key_file"),
                            format!("cannot read {}: {e}", file.display()),
                        )
                    })?
                    .trim()
                    .to_string()
            } else {
                unreachable!("validate() demands exactly one key origin")
            };
            sources.push(Source {
                name: source.name.clone(),
                write_key: key,
            });
        }
        if let Some(list) = write_keys_env {
            for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                let Some((name, key)) = entry.split_once('=') else {
                    return Err(invalid(
                        WRITE_KEYS_ENV,
                        "expected comma-separated name=key pairs, e.g. web=KEY1,ios=KEY2",
                    ));
                };
                sources.push(Source {
                    name: name.trim().to_string(),
                    write_key: key.trim().to_string(),
                });
            }
        }
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for source in &sources {
            if source.name.is_empty() || source.write_key.is_empty() {
                return Err(invalid(
                    format!("source `{}`", source.name),
                    "name and write key must not be empty",
                ));
            }
            if !names.insert(source.name.clone()) {
                return Err(invalid(
                    format!("source `{}`", source.name),
                    "this source name is defined twice",
                ));
            }
            if !keys.insert(source.write_key.clone()) {
                return Err(invalid(
                    format!("source `{}`", source.name),
                    "its write key is also used by another source",
                ));
            }
        }
        Ok(sources)
    }
}

/// `BREAKWATER_LIMITS__MAX_EVENT_BYTES` → `["limits", "max_event_bytes"]`. Variables
/// without a `__` (like `BREAKWATER_LISTEN`) belong to the command line, not here.
fn override_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if !rest.contains("__") {
        return None;
    }
    Some(rest.split("__").map(|part| part.to_ascii_lowercase()).collect())
}

/// An env value is read as a TOML value when it is one (`42`, `true`, `[1,2]`),
/// else as a plain string, so `BREAKWATER_SERVER__DATA_DIR=/var/lib/bw` just works.
fn parse_env_value(value: &str) -> toml::Value {
    format!("value = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, parents) = path.split_last().expect("override_path never returns empty");
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("just made a table");
    }
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("breakwater.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn no_file_gives_the_embedded_default() {
        let config = Config::load(None, Vec::new()).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.data_dir, PathBuf::from("./data"));
        assert_eq!(config.limits.max_event_bytes, 32 * 1024);
        assert_eq!(config.limits.max_request_bytes, 500 * 1024);
        assert!(config.sources.is_empty());
    }

    #[test]
    fn env_overrides_win_over_the_file_and_parse_types() {
        let config = load_str(
            "[limits]\nmax_event_bytes = 1000\n",
            &[
                ("BREAKWATER_LIMITS__MAX_EVENT_BYTES", "2000"),
                ("BREAKWATER_SERVER__DATA_DIR", "/tmp/bw data"),
                ("BREAKWATER_LISTEN", "ignored-here"),
                ("OTHER__THING", "1"),
            ],
        )
        .unwrap();
        assert_eq!(config.limits.max_event_bytes, 2000);
        assert_eq!(config.server.data_dir, PathBuf::from("/tmp/bw data"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_str("[limits]\nmax_evnt_bytes = 1\n", &[]).unwrap_err().to_string();
        assert!(err.contains("max_evnt_bytes"), "{err}");
        assert!(err.contains("breakwater.toml"), "{err}");
    }

    #[test]
    fn relations_between_limits_are_checked() {
        let err = load_str("[limits]\nmax_event_bytes = 2000\nmax_request_bytes = 1000\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("limits.max_request_bytes"), "{err}");
    }

    #[test]
    fn a_secret_is_never_echoed_by_a_config_error() {
        let inline: Config = toml::from_str(
            "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\ndatabase = \"d\"\npassword = \"pw-inline-1\"\n",
        )
        .unwrap();
        let password = inline
            .clickhouse
            .unwrap()
            .password
            .resolve("clickhouse.password")
            .unwrap();
        assert_eq!(password.as_deref(), Some("pw-inline-1"));
        for wrong in [
            "password = 12345678",
            "password = { value = \"pw-wrong-2\", extra = 1 }",
            "password = [\"pw-wrong-3\"]",
        ] {
            let text = format!("[clickhouse]\nurl = \"http://127.0.0.1:8123\"\ndatabase = \"d\"\n{wrong}\n");
            // As `Config::load` reports it: the message, without the source snippet.
            let error = toml::from_str::<Config>(&text).err().unwrap().message().to_string();
            assert!(!error.contains("pw-wrong") && !error.contains("12345678"), "{error}");
            assert!(error.contains("the value is not shown"), "{error}");
        }
    }

    #[test]
    fn sources_resolve_from_inline_env_list_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, "file-key\n").unwrap();
        let text = format!(
            "[[sources]]\nname = \"web\"\nwrite_key = \"inline-key\"\n\
             [[sources]]\nname = \"batch\"\nwrite_key_file = \"{}\"\n",
            key_file.display()
        );
        let config = load_str(&text, &[]).unwrap();
        let sources = config.resolve_sources(Some("ios=env-key")).unwrap();
        let pairs: Vec<_> = sources
            .iter()
            .map(|s| (s.name.as_str(), s.write_key.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [("web", "inline-key"), ("batch", "file-key"), ("ios", "env-key")]
        );
    }

    #[test]
    fn a_key_shared_by_two_sources_is_refused() {
        let config = load_str("[[sources]]\nname = \"web\"\nwrite_key = \"k\"\n", &[]).unwrap();
        let err = config.resolve_sources(Some("ios=k")).unwrap_err().to_string();
        assert!(err.contains("also used"), "{err}");
    }

    #[test]
    fn backends_are_off_until_configured_and_then_validated() {
        let config = Config::load(None, Vec::new()).unwrap();
        assert!(config.redis.is_none() && config.clickhouse.is_none() && config.kafka.is_none());
        assert!(config.file_sink_enabled());
        let config = load_str(
            "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n",
            &[("BREAKWATER_REDIS__URL", "redis://127.0.0.1:6379")],
        )
        .unwrap();
        assert_eq!(config.redis.as_ref().unwrap().ttl_seconds, 86400);
        assert!(
            !config.file_sink_enabled(),
            "other sinks replace the file sink unless asked"
        );
        let err = load_str("[clickhouse]\nurl = \"http://x\"\ntable = \"drop table\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("clickhouse.table"), "{err}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://user:pw@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("redis://:pw@host"), "redis://:***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn debug_output_never_shows_a_key() {
        let config = load_str("[[sources]]\nname = \"web\"\nwrite_key = \"s3cr3t\"\n", &[]).unwrap();
        assert!(!format!("{config:?}").contains("s3cr3t"));
    }
}
