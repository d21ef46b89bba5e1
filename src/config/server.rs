//! The listener, request limits, dedup window, WebSocket gateway, rejected store
//! and log sections.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{all_positive, invalid, ConfigError, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Requests being processed at once; beyond this, 503 with `Retry-After`.
    pub max_in_flight_requests: usize,
    /// Memory, in bytes, for everything requests, WebSocket frames and replay rounds
    /// hold until their pipeline task ends; past it, `503 memory_budget` (a
    /// retryable nack on WebSocket). None: a quarter of the machine's memory,
    /// between 256 MiB and 4 GiB (`pipeline/budget.rs`).
    pub memory_budget_bytes: Option<u64>,
    /// Requests whose write key is in the body (browser SDKs), while their body is
    /// read and before the key is known: a budget of their own, so they cannot take
    /// the slots of authenticated requests; beyond it, `503 overloaded_body_key`.
    pub max_body_key_requests: usize,
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
    /// How long a request waits for a spool append or a dead-letter write (normally
    /// one fsync shared with other requests). Past it, `503 spool_slow`: the write
    /// goes on, and until its outcome is known a resend of those events gets
    /// `503 in_flight_elsewhere`; the request's memory budget is held until then.
    pub spool_write_timeout_ms: u64,
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
            max_body_key_requests: 64,
            memory_budget_bytes: None,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            spool_write_timeout_ms: 10_000,
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
    /// A connection not authenticated at the upgrade must send its `hello` within
    /// this long, or it is closed (1008): answering pings does not keep it.
    pub hello_timeout_ms: u64,
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
            hello_timeout_ms: 10_000,
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

/// The operator endpoints under `/admin/` (the policy in force, the spool, dead
/// letters: they reveal event contents). Each request needs
/// `Authorization: Bearer <token>`; without a token configured they are closed.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `"…"`, `{ env = "VAR" }` or `{ file = "/path" }`; at least 16 characters.
    pub token: Secret,
}

impl AdminConfig {
    /// The token, if one is configured; an unreadable or too short one is an error.
    pub fn resolve_token(&self) -> Result<Option<String>, ConfigError> {
        let token = self.token.resolve("admin.token")?;
        match token {
            Some(token) if token.chars().count() < MIN_ADMIN_TOKEN_CHARS => Err(invalid(
                "admin.token",
                format!("must be at least {MIN_ADMIN_TOKEN_CHARS} characters (a random one: `openssl rand -hex 24`)"),
            )),
            token => Ok(token),
        }
    }
}

const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// Bytes of the memory budget a request holds per body byte: the body, its
/// decompressed JSON and the normalized events are alive together for a while
/// (about 2.2× for 400-byte track events; 3 leaves room). `pipeline/budget.rs`.
pub const HELD_PER_BODY_BYTE: u64 = 3;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("server.max_connections", self.max_connections as u64),
            ("server.header_read_timeout_ms", self.header_read_timeout_ms),
            ("server.max_in_flight_requests", self.max_in_flight_requests as u64),
            ("server.max_body_key_requests", self.max_body_key_requests as u64),
            ("server.spool_write_timeout_ms", self.spool_write_timeout_ms),
        ])
    }
}

impl LimitsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("limits.max_event_bytes", self.max_event_bytes as u64),
            ("limits.max_batch_events", self.max_batch_events as u64),
        ])?;
        if self.max_request_bytes < self.max_event_bytes {
            return Err(invalid(
                "limits.max_request_bytes",
                format!(
                    "is {} but must be at least limits.max_event_bytes ({})",
                    self.max_request_bytes, self.max_event_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl DedupConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("dedup.window_seconds", self.window_seconds),
            ("dedup.max_entries", self.max_entries as u64),
        ])
    }
}

impl WebSocketConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        all_positive(&[
            ("websocket.max_connections", self.max_connections as u64),
            ("websocket.max_unacked_frames", self.max_unacked_frames as u64),
            ("websocket.max_frame_bytes", self.max_frame_bytes as u64),
            ("websocket.idle_timeout_ms", self.idle_timeout_ms),
            ("websocket.hello_timeout_ms", self.hello_timeout_ms),
            ("websocket.ping_interval_ms", self.ping_interval_ms),
            ("websocket.write_timeout_ms", self.write_timeout_ms),
        ])
    }
}
