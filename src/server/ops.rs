//! Open operator endpoints: liveness, readiness and the Prometheus scrape (the
//! admin ones, behind the admin token, are in `admin.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::AppState;
use crate::resilience;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
}

/// The process is up and answering; no dependency is consulted.
async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

/// Ready unless shutting down, or a sink's spool is full or cannot write (a failing
/// sink alone does not stop intake: its events are spooled). 503 tells a load balancer to send
/// elsewhere; the body says why, with each sink's breaker and spool.
async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let shutting_down = app.intake.shutting_down.load(Ordering::Relaxed);
    let mut ready = !shutting_down;
    let mut sinks = Map::new();
    for route in app.intake.pipeline.routes() {
        // Counters only: nothing read from the spool file on a runtime thread.
        let stats = route.queue.counters();
        let spool_full = route.queue.is_full();
        let spool_writable = route.queue.is_writable();
        let headroom = stats.max_bytes.saturating_sub(stats.bytes);
        ready &= !spool_full && spool_writable;
        sinks.insert(
            route.kind.name().to_string(),
            json!({
                "healthy": route.health.is_healthy(),
                "lastError": route.health.last_error(),
                "circuitBreaker": resilience::state_name(route.sink.breaker()),
                "spool": stats,
                "spoolHeadroomBytes": headroom,
                "spoolFull": spool_full,
                "spoolWritable": spool_writable,
            }),
        );
    }
    let mut dependencies = Map::new();
    if let Some(redis) = &app.redis_health {
        // Dedup fails open when Redis is down, so Redis does not decide readiness.
        dependencies.insert(
            "redis".into(),
            json!({
                "healthy": redis.is_healthy(),
                "lastError": redis.last_error(),
                "circuitBreaker": app.redis_breaker.as_ref().map(|state| resilience::state_name(state())),
            }),
        );
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "shuttingDown": shutting_down,
        "sinks": sinks,
        "dependencies": dependencies,
        "inFlightRequests": app.intake.in_flight.current(),
        "maxInFlightRequests": app.intake.in_flight.max(),
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI 3.1 document of every route (`openapi.json`, checked against the
/// router by `tests/openapi_document_matches_the_router.rs`).
async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
}
