//! The state every handler shares, built once at start-up, and the router.

use std::sync::Arc;

use axum::http::Uri;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use super::admin::AdminToken;
use super::{admin, ops};
use crate::intake::error::IntakeError;
use crate::intake::IntakeState;
use crate::policy::LoadedPolicy;
use crate::resilience;
use crate::telemetry::health::DependencyHealth;

/// Everything the server's handlers share: intake's own part, and what the
/// operator endpoints read.
pub struct AppState {
    /// Intake's state: keys, limits, the pipeline, WebSocket connections.
    pub intake: Arc<IntakeState>,
    /// Present when dedup is shared through Redis.
    pub redis_health: Option<Arc<DependencyHealth>>,
    /// Reads the Redis breaker's state, when dedup is shared through Redis.
    pub redis_breaker: Option<resilience::BreakerState>,
    /// The resilience policy in force.
    pub policy: watch::Receiver<Arc<LoadedPolicy>>,
    pub metrics: PrometheusHandle,
    /// The `/admin/*` token; none: those endpoints are closed.
    pub admin_token: Option<AdminToken>,
}

/// The whole HTTP surface: intake routes, ops endpoints, JSON 404/405.
pub fn router(state: Arc<AppState>) -> Router {
    crate::intake::routes(state.intake.clone())
        .merge(ops::routes().with_state(state.clone()))
        .merge(admin::routes(state.clone()).with_state(state))
        .fallback(|uri: Uri| async move {
            tracing::debug!(%uri, "no such endpoint");
            IntakeError::NotFound
        })
        .method_not_allowed_fallback(|| async { IntakeError::MethodNotAllowed })
}
