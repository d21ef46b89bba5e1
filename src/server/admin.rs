//! The admin endpoints (`/admin/*`): the policy in force, the spool, and dead
//! letters (which hold event contents). Every request needs the admin token
//! (`Authorization: Bearer <admin.token>`); without a token configured they are
//! closed. A write key is not an admin token. `/metrics` and `/health/*` stay open
//! (`ops.rs`): scrapers and load balancers need them, and they show counts and
//! states, no event.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::spool::DeadLetter;

/// At most this many dead letters per page (`?limit=`); 50 when not asked.
const MAX_PAGE: usize = 500;
const DEFAULT_PAGE: usize = 50;

/// The admin token, kept as its SHA-256 digest and compared in constant time.
pub struct AdminToken([u8; 32]);

impl AdminToken {
    pub fn new(token: &str) -> AdminToken {
        AdminToken(Sha256::digest(token.as_bytes()).into())
    }

    fn admits(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(self.0.ct_eq(&presented))
    }
}

pub fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/policy", get(policy))
        .route("/admin/spool", get(spool))
        .route("/admin/dead-letters", get(dead_letters))
        .route_layer(middleware::from_fn_with_state(state, require_admin_token))
}

/// 401 unless the request carries the configured admin token.
async fn require_admin_token(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match (&app.admin_token, presented) {
        (None, _) => unauthorized(
            "admin_disabled",
            "the admin endpoints are closed: no admin token is configured (admin.token, or BREAKWATER_ADMIN__TOKEN)",
        ),
        (Some(_), None) => unauthorized(
            "admin_token_required",
            "send the admin token as `Authorization: Bearer <token>`",
        ),
        (Some(token), Some(presented)) if !token.admits(presented) => {
            unauthorized("admin_token_invalid", "the admin token does not match")
        }
        _ => next.run(request).await,
    }
}

/// The error body every endpoint uses (`{"error": {...}, "code", "message"}`).
fn unauthorized(code: &'static str, message: &str) -> Response {
    let body = json!({
        "error": { "code": code, "message": message, "retryable": false },
        "code": code,
        "message": message,
    });
    let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"breakwater-admin\""),
    );
    response
}

/// The policy in force: version label, content hash and file.
async fn policy(State(app): State<Arc<AppState>>) -> Json<Value> {
    let loaded = app.policy.borrow().clone();
    Json(json!({
        "version": loaded.policy.version,
        "hash": loaded.hash,
        "file": loaded.path.as_ref().map(|p| p.display().to_string()),
        "policy": loaded.policy,
    }))
}

/// Spool queues and how many dead-letter and quarantined records there are (read
/// on the blocking pool; dead letters are counted, not decoded).
async fn spool(State(app): State<Arc<AppState>>) -> Response {
    let spool = app.intake.pipeline.spool().clone();
    let counts = tokio::task::spawn_blocking(move || {
        let queues: Vec<_> = spool.queues().iter().map(|q| q.stats()).collect();
        let dead_letters = spool.dead_letter_count().unwrap_or(0);
        let quarantined = spool.quarantined().unwrap_or(0);
        json!({ "queues": queues, "deadLetterRecords": dead_letters, "quarantinedRecords": quarantined })
    })
    .await;
    match counts {
        Ok(body) => Json(body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    /// The `next` of the previous page.
    after: Option<u64>,
    limit: Option<usize>,
}

/// One page of dead letters, oldest first: `?after=<next of the last page>&limit=N`.
async fn dead_letters(State(app): State<Arc<AppState>>, Query(page): Query<PageQuery>) -> Response {
    let limit = page.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let spool = app.intake.pipeline.spool().clone();
    let read = tokio::task::spawn_blocking(move || spool.dead_letter_page(page.after, limit)).await;
    match read {
        Ok(Ok((letters, next))) => Json(json!({
            "deadLetters": letters.iter().map(letter_json).collect::<Vec<_>>(),
            "next": next,
        }))
        .into_response(),
        Ok(Err(error)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "code": "spool_unavailable", "message": error.to_string() })),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn letter_json(letter: &DeadLetter) -> Value {
    json!({
        "key": letter.key,
        "sink": letter.sink,
        "error": letter.error,
        "createdAtMs": letter.created_at_ms,
        "source": &*letter.batch.source,
        "events": letter.batch.events.len(),
        "messageIds": letter.batch.events.iter().map(|e| e.message_id.as_str()).collect::<Vec<_>>(),
    })
}
