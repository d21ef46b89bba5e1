//! HTTP intake: the Segment Tracking API routes and their handlers. Owns decoding,
//! auth, validation and the client-facing answer; hands valid events to the
//! pipeline and refused ones to the rejected store. Must not write to sinks itself.

pub mod auth;
pub mod compact_json;
pub mod decode;
pub mod error;
pub mod rate_limit;
pub mod rejected_store;
pub mod segment;
pub mod websocket;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use crate::pipeline::PipelineError;
use crate::server::AppState;
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};
use error::{IntakeError, RejectedEvent};
use rejected_store::RejectedRecord;
use segment::{EventType, RequestContext};

/// Transport label on event metrics.
const TRANSPORT: &str = "http";

/// What a route (or a WebSocket frame) carries.
#[derive(Debug, Clone, Copy)]
pub enum RouteKind {
    /// One event of a fixed type (`/v1/track`, `/v1/t`, …).
    Single(EventType),
    /// One event whose `type` field says what it is (a WebSocket frame).
    Event,
    /// `{"batch": [...]}` (`/v1/batch`, `/v1/import`, `/v1/b`).
    Batch,
}

/// Every Segment route, with the browser SDK's one-letter short paths.
const ROUTES: &[(&str, RouteKind)] = &[
    ("/v1/track", RouteKind::Single(EventType::Track)),
    ("/v1/identify", RouteKind::Single(EventType::Identify)),
    ("/v1/page", RouteKind::Single(EventType::Page)),
    ("/v1/screen", RouteKind::Single(EventType::Screen)),
    ("/v1/group", RouteKind::Single(EventType::Group)),
    ("/v1/alias", RouteKind::Single(EventType::Alias)),
    ("/v1/batch", RouteKind::Batch),
    ("/v1/import", RouteKind::Batch),
    ("/v1/t", RouteKind::Single(EventType::Track)),
    ("/v1/i", RouteKind::Single(EventType::Identify)),
    ("/v1/p", RouteKind::Single(EventType::Page)),
    ("/v1/s", RouteKind::Single(EventType::Screen)),
    ("/v1/g", RouteKind::Single(EventType::Group)),
    ("/v1/a", RouteKind::Single(EventType::Alias)),
    ("/v1/b", RouteKind::Batch),
];

pub fn routes() -> Router<Arc<AppState>> {
    let mut router = Router::new()
        .route("/v1/ws", get(websocket::upgrade))
        .route("/examples/websocket", get(websocket::example_page));
    for &(path, kind) in ROUTES {
        router = router.route(
            path,
            post(
                move |State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body| async move {
                    handle(&app, path, kind, &headers, body).await
                },
            ),
        );
    }
    router
}

/// The 200 body. Segment clients need only the status; `rejected` lists the batch
/// items refused on their own, `duplicates` how many were already seen.
#[derive(Debug, Serialize)]
pub(crate) struct Accepted {
    pub success: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub duplicates: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedEvent>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

async fn handle(app: &AppState, route: &'static str, kind: RouteKind, headers: &HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = match accept(app, kind, headers, body).await {
        Ok(accepted) => (StatusCode::OK, Json(accepted)).into_response(),
        Err(error) => {
            metrics::counter!(metric::REQUESTS_REFUSED, "reason" => error.code()).increment(1);
            if error.status().is_server_error() {
                static REFUSED: Throttle = Throttle::new(WARN_EVERY);
                if let Some(suppressed) = REFUSED.allow() {
                    tracing::warn!(
                        route,
                        code = error.code(),
                        suppressed_since_last = suppressed,
                        "request refused: {error}"
                    );
                }
            } else {
                tracing::debug!(route, code = error.code(), "request refused: {error}");
            }
            error.into_response()
        }
    };
    metrics::counter!(metric::HTTP_REQUESTS, "route" => route, "status" => response.status().as_str().to_owned())
        .increment(1);
    metrics::histogram!(metric::HTTP_REQUEST_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

async fn accept(app: &AppState, kind: RouteKind, headers: &HeaderMap, body: Body) -> Result<Accepted, IntakeError> {
    let _in_flight = app.in_flight.enter()?;
    decode::check_content_type(headers)?;
    let encoding = decode::content_encoding(headers)?;
    let limits = &app.limits;

    // A key in the headers is checked before reading the body; a key in the body
    // (browser SDK) only after.
    let header_key = auth::write_key_from_headers(headers);
    let early_source = if app.write_keys.is_open() || header_key.is_some() {
        Some(app.write_keys.authenticate(header_key.as_deref())?)
    } else {
        None
    };

    let raw = decode::read_body(body, limits.max_request_bytes, app.body_read_timeout).await?;
    let json = decode::decompress(raw, encoding, limits.max_request_bytes)?;
    let ingested = ingest_json(app, kind, &json, early_source, TRANSPORT).await?;
    Ok(ingested.accepted)
}

/// A request's outcome with the ids of its accepted events (for WebSocket acks).
pub(crate) struct IngestedRequest {
    pub accepted: Accepted,
    pub message_ids: Vec<String>,
}

/// From JSON bytes to durable events, the same for every transport: parse, find the
/// source (pre-authenticated, or by the body's `writeKey`), validate and normalize
/// each event, keep refusals, and hand the rest to the pipeline.
pub(crate) async fn ingest_json(
    app: &AppState,
    kind: RouteKind,
    json: &[u8],
    authenticated: Option<Arc<str>>,
    transport: &'static str,
) -> Result<IngestedRequest, IntakeError> {
    let limits = &app.limits;
    let received_at = chrono::Utc::now();
    let (parsed, route_type) = match kind {
        RouteKind::Single(event_type) => (segment::parse_single(json, limits)?, Some(event_type)),
        RouteKind::Event => (segment::parse_single(json, limits)?, None),
        RouteKind::Batch => (segment::parse_batch(json, limits)?, None),
    };
    let source = match authenticated {
        Some(source) => source,
        None => app.write_keys.authenticate(parsed.write_key.as_deref())?,
    };
    if let Err(over) = app.source_rate_limits.admit(&source, parsed.events.len()) {
        metrics::counter!(metric::REQUESTS_RATE_LIMITED, "source" => source.to_string()).increment(1);
        return Err(IntakeError::RateLimited {
            source_name: source.to_string(),
            per_second: over.rate.per_second as u64,
            retry_after_seconds: over.retry_after.as_secs_f64().ceil().max(1.0) as u64,
        });
    }

    let request = RequestContext {
        route_type,
        sent_at: parsed.sent_at,
        context: parsed.context.as_ref(),
        received_at,
        source: &source,
    };
    let mut events = Vec::with_capacity(parsed.events.len());
    let mut rejected = Vec::new();
    let mut records = Vec::new();
    for (index, item) in parsed.events.into_iter().enumerate() {
        match item.and_then(|event| segment::normalize(event, &request)) {
            Ok(event) => events.push(event),
            Err(refused) => {
                metrics::counter!(metric::EVENTS_REJECTED, "source" => source.to_string(), "reason" => refused.reason.code)
                    .increment(1);
                rejected.push(RejectedEvent {
                    index,
                    reason: refused.reason.clone(),
                });
                records.push(RejectedRecord {
                    rejected_at: segment::format_timestamp(received_at),
                    source: source.to_string(),
                    index,
                    reason: refused.reason,
                    event: refused.event,
                });
            }
        }
    }
    count_events(&source, transport, "rejected", rejected.len());
    app.rejected_store.record(records).await;
    if events.is_empty() {
        return Err(match kind {
            RouteKind::Single(_) | RouteKind::Event => IntakeError::InvalidEvent(rejected.swap_remove(0).reason),
            RouteKind::Batch => IntakeError::InvalidBatch(rejected),
        });
    }

    let message_ids: Vec<String> = events.iter().map(|e| e.message_id.clone()).collect();
    let ingested = app
        .pipeline
        .ingest(source.clone(), events)
        .await
        .map_err(|error| match error {
            PipelineError::InFlightElsewhere(_) => IntakeError::InFlightElsewhere,
            PipelineError::SpoolFull(full) => {
                static FULL: Throttle = Throttle::new(WARN_EVERY);
                if let Some(suppressed) = FULL.allow() {
                    tracing::warn!(%full, suppressed_since_last = suppressed, "spool full: refusing requests");
                }
                IntakeError::SpoolFull
            }
            PipelineError::Spool(error) => {
                static UNWRITABLE: Throttle = Throttle::new(WARN_EVERY);
                if let Some(suppressed) = UNWRITABLE.allow() {
                    tracing::warn!(%error, suppressed_since_last = suppressed, "spool cannot write: refusing requests");
                }
                IntakeError::SpoolUnavailable
            }
            error => {
                static NOT_DURABLE: Throttle = Throttle::new(WARN_EVERY);
                if let Some(suppressed) = NOT_DURABLE.allow() {
                    tracing::warn!(%error, suppressed_since_last = suppressed, "events not made durable");
                }
                IntakeError::SinkUnavailable
            }
        })?;
    count_events(&source, transport, "accepted", ingested.accepted);
    count_events(&source, transport, "duplicate", ingested.duplicates);
    Ok(IngestedRequest {
        accepted: Accepted {
            success: true,
            duplicates: ingested.duplicates,
            rejected,
        },
        message_ids,
    })
}

fn count_events(source: &str, transport: &'static str, outcome: &'static str, count: usize) {
    if count > 0 {
        metrics::counter!(metric::EVENTS, "source" => source.to_string(), "transport" => transport, "outcome" => outcome)
            .increment(count as u64);
    }
}
