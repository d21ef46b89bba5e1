//! The WebSocket gateway (`GET /v1/ws`): persistent connections carrying the same
//! events as HTTP, under the same contract: a frame's ack is sent only once its
//! events are durable. Owns the protocol (docs/websocket.md), per-connection flow
//! control and limits, and the registry of live connections; hands frames to the
//! same `ingest_json` as HTTP. `connection.rs` serves one connection.
//!
//! Invariants: a connection is in the registry exactly while its task runs (an RAII
//! guard removes it on every exit path); at most `max_unacked_frames` frames are in
//! flight per connection, and the reader does not read while that many are.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

mod connection;

use super::browser::{Client, Peer};
use super::error::IntakeError;
use super::ingest::ingest_json;
use super::{auth, IntakeState, RouteKind};
use crate::pipeline::budget::HELD_PER_BODY_BYTE;
use crate::telemetry::metric;
use connection::serve_connection;

/// Transport label on event metrics.
const TRANSPORT: &str = "websocket";

/// Close codes (RFC 6455), as documented in docs/websocket.md.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// The live connections, and the signal that tells them to wind down.
pub struct ConnectionRegistry {
    live: Mutex<HashSet<u64>>,
    next_id: AtomicU64,
    max: usize,
    shutdown: watch::Sender<bool>,
    emptied: Notify,
}

/// Keeps a connection registered; dropping it (on any exit) unregisters it.
pub struct ConnectionGuard {
    registry: Arc<ConnectionRegistry>,
    id: u64,
}

impl ConnectionRegistry {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            live: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            max,
            shutdown: watch::channel(false).0,
            emptied: Notify::new(),
        })
    }

    /// Registers a connection, or `None` at the limit.
    fn register(self: &Arc<Self>) -> Option<ConnectionGuard> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.len() >= self.max {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        live.insert(id);
        metrics::gauge!(metric::WS_CONNECTIONS).set(live.len() as f64);
        Some(ConnectionGuard {
            registry: self.clone(),
            id,
        })
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells every connection to stop reading, answer what it has, and close (1001).
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until every connection has closed, at most `timeout`.
    pub async fn wait_until_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.is_empty();
            }
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut live = self.registry.live.lock().unwrap_or_else(|p| p.into_inner());
        live.remove(&self.id);
        metrics::gauge!(metric::WS_CONNECTIONS).set(live.len() as f64);
        if live.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

#[derive(Deserialize)]
pub struct UpgradeQuery {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

/// `GET /v1/ws`: authenticates what it can before the upgrade (HTTP Basic or
/// `?writeKey=`), refuses past the connection limit, then hands the socket over.
pub async fn upgrade(
    State(app): State<Arc<IntakeState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Query(query): Query<UpgradeQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let presented = auth::write_key_from_headers(&headers).or(query.write_key);
    let source = if app.write_keys.is_open() || presented.is_some() {
        match app.write_keys.authenticate(presented.as_deref()) {
            Ok(source) => Some(source),
            Err(error) => {
                metrics::counter!(metric::WS_REFUSED, "reason" => error.code()).increment(1);
                return error.into_response();
            }
        }
    } else {
        // No key yet: the first frame must be a `hello` carrying it.
        None
    };
    if app.shutting_down.load(Ordering::Relaxed) {
        metrics::counter!(metric::WS_REFUSED, "reason" => "shutting_down").increment(1);
        return IntakeError::ShuttingDown.into_response();
    }
    let Some(guard) = app.websockets.register() else {
        metrics::counter!(metric::WS_REFUSED, "reason" => "too_many_connections").increment(1);
        return IntakeError::TooManyConnections.into_response();
    };
    let settings = app.websocket.clone();
    // The IP and User-Agent go into `context` as on HTTP; the upgrade's `Origin` is
    // not checked against the source here (docs/websocket.md).
    let client = Arc::new(Client {
        origin: None,
        ..app.browser.client(&headers, peer)
    });
    upgrade
        .max_message_size(settings.max_frame_bytes)
        .max_frame_size(settings.max_frame_bytes)
        // tungstenite's defaults (128 KiB each, the read one allocated at once) cost
        // ~130 KiB per idle connection: 1.5 GB at 10,000. Frames larger than these
        // are still read whole; the buffers only set the read and flush steps.
        .read_buffer_size(CONNECTION_BUFFER_BYTES)
        .write_buffer_size(CONNECTION_BUFFER_BYTES)
        .on_upgrade(move |socket| serve_connection(app, socket, source, client, guard))
}

/// Read buffer and write-flush threshold of each WebSocket connection.
const CONNECTION_BUFFER_BYTES: usize = 8 * 1024;

/// The browser example (`examples/websocket.html`), when enabled in the config.
pub async fn example_page(State(app): State<Arc<IntakeState>>) -> Response {
    if !app.websocket.serve_example_page {
        return IntakeError::NotFound.into_response();
    }
    axum::response::Html(include_str!("../../../examples/websocket.html")).into_response()
}

/// Why a connection ended (the `reason` label, and what the client is told).
#[derive(Debug, Clone, Copy)]
pub(super) enum Ending {
    ClientClosed,
    ClientGone,
    Idle,
    ShuttingDown,
    TooBig,
    Binary,
    Unauthorized,
    /// No `hello` within `hello_timeout_ms` of the upgrade.
    NoHello,
    WriteStalled,
}

impl Ending {
    pub(super) fn label(self) -> &'static str {
        match self {
            Ending::ClientClosed => "client_closed",
            Ending::ClientGone => "client_gone",
            Ending::Idle => "idle_timeout",
            Ending::ShuttingDown => "shutdown",
            Ending::TooBig => "frame_too_large",
            Ending::Binary => "binary_frame",
            Ending::Unauthorized => "unauthorized",
            Ending::NoHello => "hello_timeout",
            Ending::WriteStalled => "write_stalled",
        }
    }

    /// The close frame to send, if the client is still there to receive one.
    pub(super) fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::ClientClosed | Ending::ClientGone | Ending::WriteStalled => return None,
            Ending::Idle => (close_code::NORMAL, "idle timeout"),
            Ending::ShuttingDown => (close_code::GOING_AWAY, "server shutting down"),
            Ending::TooBig => (close_code::TOO_BIG, "frame too large"),
            Ending::Binary => (close_code::UNSUPPORTED_DATA, "text frames only"),
            Ending::Unauthorized => (close_code::POLICY_VIOLATION, "missing or invalid write key"),
            Ending::NoHello => (close_code::POLICY_VIOLATION, "no hello with a write key in time"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    }
}

/// A `hello` frame's write key, authenticated.
pub(super) fn hello(app: &IntakeState, text: &str) -> Result<Arc<str>, IntakeError> {
    #[derive(Deserialize)]
    struct Hello {
        #[serde(rename = "type")]
        kind: String,
        #[serde(rename = "writeKey")]
        write_key: Option<String>,
    }
    let hello: Hello = serde_json::from_str(text).map_err(|_| IntakeError::MissingWriteKey)?;
    if hello.kind != "hello" {
        return Err(IntakeError::MissingWriteKey);
    }
    app.write_keys.authenticate(hello.write_key.as_deref())
}

/// A frame's `id` (echoed in its answer; null when absent or unreadable) and
/// whether it is a batch (`{"batch": [...]}`) or one event. Never fails: a frame
/// that is not JSON is read as one event, whose parsing then reports why.
pub fn frame_head(text: &str) -> (Value, RouteKind) {
    #[derive(Deserialize)]
    struct Head {
        id: Option<Value>,
        batch: Option<serde::de::IgnoredAny>,
    }
    let head = serde_json::from_str::<Head>(text).ok();
    let id = head.as_ref().and_then(|h| h.id.clone()).unwrap_or(Value::Null);
    let kind = match head.as_ref().map(|h| h.batch.is_some()) {
        Some(true) => RouteKind::Batch,
        _ => RouteKind::Event,
    };
    (id, kind)
}

/// Ingests one frame and builds its answer: `ack` once durable, else `nack`.
pub(super) async fn answer_frame(app: &IntakeState, text: &str, source: Arc<str>, client: &Client) -> Message {
    let (id, kind) = frame_head(text);
    let ingested = match app.budget.try_hold(text.len() as u64 * HELD_PER_BODY_BYTE) {
        Some(held) => ingest_json(app, kind, text.as_bytes(), Some(source), client, TRANSPORT, held).await,
        None => {
            metrics::counter!(metric::REQUESTS_REFUSED, "reason" => IntakeError::MemoryBudget.code()).increment(1);
            Err(IntakeError::MemoryBudget)
        }
    };
    let answer = match ingested {
        Ok(ingested) => {
            metrics::counter!(metric::WS_FRAMES, "outcome" => "ack").increment(1);
            json!({
                "type": "ack",
                "id": id,
                "messageIds": ingested.message_ids,
                "duplicates": ingested.accepted.duplicates,
                "rejected": ingested.accepted.rejected,
            })
        }
        Err(error) => {
            metrics::counter!(metric::WS_FRAMES, "outcome" => "nack").increment(1);
            let rejected = match &error {
                IntakeError::InvalidBatch(rejected) => json!(rejected),
                IntakeError::InvalidEvent(reason) => {
                    json!([{ "index": 0, "code": reason.code, "message": reason.message }])
                }
                _ => json!([]),
            };
            json!({
                "type": "nack",
                "id": id,
                "retryable": error.is_retryable(),
                "error": { "code": error.code(), "message": error.to_string() },
                "rejected": rejected,
            })
        }
    };
    json_message(&answer)
}

pub(super) fn json_message(value: &Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}
