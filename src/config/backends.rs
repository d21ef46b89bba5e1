//! The sink and backend sections: the file sink, Redis, ClickHouse and Kafka, and
//! `Secret` (a value given inline, through an environment variable, or in a file).

use std::path::PathBuf;

use serde::Deserialize;

use super::{all_positive, invalid, ConfigError};

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
    /// exceed the longest a request can take with the policy (checked at start-up);
    /// a crashed instance's claims free themselves then.
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
            pending_ttl_ms: 120_000,
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
    /// Whole INSERT deadline. It must end inside one attempt of the policy's
    /// `clickhouse.timeout_ms` (after `clickhouse.batch.linger_ms` and
    /// [`INSERT_MARGIN_MS`]): an attempt given up on while its INSERT runs on would
    /// be retried as a second INSERT. Unset: the longest that fits, resolved from the
    /// policy at start-up (`pipeline::assemble::resolve_timings`).
    pub insert_timeout_ms: Option<u64>,
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
            insert_timeout_ms: None,
            compression: ClickHouseCompression::Lz4,
            acknowledge: Acknowledge::OnDelivery,
        }
    }
}

/// Room left in one ClickHouse attempt beside its linger and its INSERT: encoding
/// the group, scheduling, the HTTP exchange around the INSERT.
pub const INSERT_MARGIN_MS: u64 = 250;

impl ClickHouseConfig {
    /// The INSERT deadline when none is set: what fits in one attempt of
    /// `attempt_ms` after a linger of `linger_ms` (at least 1 ms; a policy that
    /// leaves no room is refused by the timing check).
    pub fn insert_timeout_fitting(attempt_ms: u64, linger_ms: u64) -> u64 {
        attempt_ms.saturating_sub(linger_ms + INSERT_MARGIN_MS).max(1)
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

impl RedisConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
            return Err(invalid("redis.url", "must start with redis:// or rediss://"));
        }
        all_positive(&[
            ("redis.pool_size", self.pool_size as u64),
            ("redis.command_timeout_ms", self.command_timeout_ms),
            ("redis.ttl_seconds", self.ttl_seconds),
            ("redis.pending_ttl_ms", self.pending_ttl_ms),
            ("redis.local_cache_entries", self.local_cache_entries as u64),
        ])?;
        if self.key_prefix.is_empty() {
            return Err(invalid("redis.key_prefix", "must not be empty"));
        }
        Ok(())
    }
}

impl ClickHouseConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(invalid(
                "clickhouse.url",
                "must be the HTTP interface, e.g. http://127.0.0.1:8123",
            ));
        }
        for (key, name) in [
            ("clickhouse.database", &self.database),
            ("clickhouse.table", &self.table),
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
        self.password.resolve("clickhouse.password")?;
        Ok(())
    }
}

impl KafkaConfig {
    /// The delivery timeout librdkafka really uses: `message.timeout.ms` (or its alias
    /// `delivery.timeout.ms`) from `[kafka.librdkafka]` when given there, else
    /// `message_timeout_ms`.
    pub fn effective_message_timeout_ms(&self) -> u64 {
        ["message.timeout.ms", "delivery.timeout.ms"]
            .iter()
            .find_map(|key| self.librdkafka.get(*key)?.trim().parse().ok())
            .unwrap_or(self.message_timeout_ms)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must list at least one host:port"));
        }
        if self.topic.trim().is_empty() {
            return Err(invalid("kafka.topic", "must not be empty"));
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.compression.as_str()) {
            return Err(invalid(
                "kafka.compression",
                "must be one of none, gzip, snappy, lz4, zstd",
            ));
        }
        Ok(())
    }
}
