//! Operator endpoints: liveness, readiness and the Prometheus scrape.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
}

/// The process is up and answering; no dependency is consulted.
async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

/// Ready unless shutting down or a sink's last write failed. 503 tells a load
/// balancer to send elsewhere; the body says why.
async fn ready(State(app): State<Arc<AppState>>) -> Response {
    let mut sinks = Map::new();
    let mut ready = !app.shutting_down.load(Ordering::Relaxed);
    for sink in app.pipeline.sinks() {
        let healthy = sink.health.is_healthy();
        ready &= healthy;
        sinks.insert(
            sink.name.to_string(),
            json!({ "healthy": healthy, "lastError": sink.health.last_error() }),
        );
    }
    let mut dependencies = Map::new();
    if let Some(redis) = &app.redis_health {
        // Dedup fails open when Redis is down, so Redis does not decide readiness.
        dependencies.insert(
            "redis".into(),
            json!({ "healthy": redis.is_healthy(), "lastError": redis.last_error() }),
        );
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "shuttingDown": app.shutting_down.load(Ordering::Relaxed),
        "sinks": sinks,
        "dependencies": dependencies,
        "inFlightRequests": app.in_flight.current(),
        "maxInFlightRequests": app.in_flight.max(),
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
