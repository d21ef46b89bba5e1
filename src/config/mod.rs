//! Server configuration: one TOML file, overridden by `BREAKWATER_*` environment
//! variables, overridden by command-line flags. Owns parsing and validation only;
//! nothing here touches the network or the data directory. The sections live in
//! `server.rs` (listener, limits, dedup, WebSocket, logs), `backends.rs` (file sink,
//! Redis, ClickHouse, Kafka, `Secret`) and `sources.rs` (write keys).
//!
//! Invariant: imports only `event` from the crate.

mod backends;
mod browser;
mod server;
mod sources;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::event::SinkKind;
pub use backends::{
    redact_url, Acknowledge, ClickHouseCompression, ClickHouseConfig, ClickHouseSchema, FileSinkConfig, KafkaConfig,
    KafkaKey, RedisConfig, Secret, INSERT_MARGIN_MS,
};
pub use browser::{BrowserConfig, IpRange};
pub use server::{
    AdminConfig, DedupConfig, LimitsConfig, LogConfig, LogFormat, RejectedStoreConfig, ServerConfig, TlsConfig,
    WebSocketConfig, HELD_PER_BODY_BYTE,
};
pub use sources::{Source, SourceConfig};

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
    /// CORS, client IP and User-Agent recording, trusted proxies.
    pub browser: BrowserConfig,
    /// The `/admin/` endpoints' token.
    pub admin: AdminConfig,
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

/// The first of `values` that is 0, as "must be greater than 0".
fn all_positive(values: &[(&str, u64)]) -> Result<(), ConfigError> {
    match values.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => Err(invalid(*key, "must be greater than 0")),
        None => Ok(()),
    }
}

pub(crate) fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
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
        self.server.validate()?;
        self.limits.validate()?;
        self.dedup.validate()?;
        if self.file_sink.max_file_bytes < 4096 {
            return Err(invalid("file_sink.max_file_bytes", "must be at least 4096"));
        }
        self.validate_backends()?;
        self.websocket.validate()?;
        self.browser.validate()?;
        if !self.file_sink_enabled() && self.clickhouse.is_none() && self.kafka.is_none() {
            return Err(invalid(
                "file_sink.enabled",
                "is false and no other sink ([clickhouse], [kafka]) is configured: events would go nowhere",
            ));
        }
        let smallest_budget = self.limits.max_request_bytes as u64 * HELD_PER_BODY_BYTE;
        if self
            .server
            .memory_budget_bytes
            .is_some_and(|budget| budget < smallest_budget)
        {
            return Err(invalid(
                "server.memory_budget_bytes",
                format!(
                    "must hold at least one largest request: {HELD_PER_BODY_BYTE} × limits.max_request_bytes = {smallest_budget}"
                ),
            ));
        }
        if self.rejected_store.max_bytes < 8192 {
            return Err(invalid("rejected_store.max_bytes", "must be at least 8192"));
        }
        sources::validate(&self.sources)
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        if let Some(redis) = &self.redis {
            redis.validate()?;
        }
        if let Some(clickhouse) = &self.clickhouse {
            clickhouse.validate()?;
        }
        if let Some(kafka) = &self.kafka {
            kafka.validate()?;
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
    pub fn acknowledge(&self, sink: SinkKind) -> Acknowledge {
        match sink {
            SinkKind::ClickHouse => self.clickhouse.as_ref().map(|c| c.acknowledge).unwrap_or_default(),
            SinkKind::Kafka => self.kafka.as_ref().map(|c| c.acknowledge).unwrap_or_default(),
            SinkKind::File => Acknowledge::OnDelivery,
        }
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
