//! The HTTP handlers: one per Segment route, each a thin wrapper that checks the
//! content type and a key in the headers, takes an in-flight slot (the body-key
//! budget's while a body carrying the key is read), reads and decompresses the
//! body, and answers with what `ingest_json` made of it.

use std::net::SocketAddr;
use std::time::Instant;

use super::error::IntakeError;
use super::ingest::{ingest_json, Accepted};
use super::{auth, decode, IntakeState, RouteKind};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Transport label on event metrics.
const TRANSPORT: &str = "http";

pub(super) async fn handle(
    app: &IntakeState,
    route: &'static str,
    kind: RouteKind,
    headers: &HeaderMap,
    query_key: Option<String>,
    peer: Option<SocketAddr>,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = accept(app, kind, headers, query_key, peer, body)
        .await
        .map(|accepted| (StatusCode::OK, Json(accepted)).into_response());
    answered(route, started, result)
}

/// The answer to an intake request, counted and (refusals) logged.
pub(super) fn answered(route: &'static str, started: Instant, result: Result<Response, IntakeError>) -> Response {
    let response = match result {
        Ok(response) => response,
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

async fn accept(
    app: &IntakeState,
    kind: RouteKind,
    headers: &HeaderMap,
    query_key: Option<String>,
    peer: Option<SocketAddr>,
    body: Body,
) -> Result<Accepted, IntakeError> {
    decode::check_content_type(headers)?;
    let encoding = decode::content_encoding(headers)?;
    let limits = &app.limits;

    // A key in the headers is checked before anything else: a wrong one takes no
    // slot and no body byte is read.
    // A key in the query (`?writeKey=`, beacons) counts as one in the headers.
    let header_key = auth::write_key_from_headers(headers).or(query_key);
    let early_source = if app.write_keys.is_open() || header_key.is_some() {
        Some(app.write_keys.authenticate(header_key.as_deref())?)
    } else {
        None
    };
    // Room in the memory budget before the first body byte; it goes with the events
    // to the pipeline task and is given back when that ends.
    let held = app
        .budget
        .try_hold(decode::budget_for_body(headers, encoding, limits.max_request_bytes))
        .ok_or(IntakeError::MemoryBudget)?;
    // An authenticated request takes its slot before its body is read; one whose key
    // is in the body (browser SDKs) reads it on a slot of the small body-key budget
    // and takes a main slot only once read.
    let (early_slot, reading) = match early_source {
        Some(_) => (Some(app.in_flight.enter()?), None),
        None => (
            None,
            Some(app.body_key_in_flight.enter_or(IntakeError::BodyKeyOverloaded)?),
        ),
    };
    let raw = decode::read_body(body, limits.max_request_bytes, app.body_read_timeout).await?;
    let _in_flight = match early_slot {
        Some(slot) => slot,
        None => app.in_flight.enter()?,
    };
    drop(reading);
    let json = decode::decompress(raw, encoding, limits.max_request_bytes)?;
    let client = app.browser.client(headers, peer);
    let ingested = ingest_json(app, kind, &json, early_source, &client, TRANSPORT, held).await?;
    Ok(ingested.accepted)
}
