//! Intake: the Segment Tracking API over HTTP and the WebSocket gateway. Owns
//! decoding, auth, validation and the client-facing answer; hands valid events to
//! the pipeline and refused ones to the rejected store. Must not write to sinks
//! itself. `state.rs` is what intake holds (its own part of the server's state),
//! `http.rs` the HTTP handlers, `ingest.rs` the one path from JSON bytes to the
//! pipeline (HTTP and WebSocket alike), `segment/` the Segment event parser.
//!
//! Invariant: imports the pipeline and what lies below it, never `server` or `cli`.

pub mod auth;
pub mod browser;
pub mod compact_json;
pub mod decode;
pub mod error;
mod http;
mod pixel;
mod ingest;
pub mod rate_limit;
pub mod rejected_store;
pub mod segment;
mod settings;
mod state;
pub mod websocket;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

use crate::event::EventType;
use browser::Peer;
pub use state::{InFlightGuard, InFlightLimit, IntakeState};

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

/// A preflight is answered by the CORS layer when it carries an `Origin`; one
/// without (not from a browser) gets this empty answer.
async fn preflight() -> axum::http::StatusCode {
    axum::http::StatusCode::NO_CONTENT
}

/// Every intake route, behind the CORS layer (`browser.rs`).
pub fn routes(state: Arc<IntakeState>) -> Router {
    let mut router = Router::new()
        .route("/v1/ws", get(websocket::upgrade))
        .route("/examples/websocket", get(websocket::example_page))
        .route(
            "/v1/projects/{write_key}/settings",
            get(settings::segment).options(preflight),
        )
        .route("/sourceConfig", get(settings::rudderstack).options(preflight))
        .route("/sourceConfig/", get(settings::rudderstack).options(preflight));
    for &(path, kind) in ROUTES {
        router = router.route(
            path,
            post(
                move |State(app): State<Arc<IntakeState>>, Peer(peer): Peer, headers: HeaderMap, body: Body| async move {
                    http::handle(&app, path, kind, &headers, None, peer, body).await
                },
            )
            .options(preflight),
        );
    }
    // RudderStack's browser endpoints: beacons (`navigator.sendBeacon` cannot set
    // headers, so the key is in the query) and pixels (a GET whose query is the event).
    router = router.route(
        "/beacon/v1/batch",
        post(
            |State(app): State<Arc<IntakeState>>,
             Peer(peer): Peer,
             Query(query): Query<auth::WriteKeyQuery>,
             headers: HeaderMap,
             body: Body| async move {
                http::handle(
                    &app,
                    "/beacon/v1/batch",
                    RouteKind::Batch,
                    &headers,
                    query.write_key,
                    peer,
                    body,
                )
                .await
            },
        )
        .options(preflight),
    );
    for (path, _) in pixel::ROUTES {
        router = router.route(path, get(pixel::event).options(preflight));
    }
    router
        .layer(middleware::from_fn_with_state(state.clone(), browser::cors))
        .with_state(state)
}
