//! What intake holds: its own part of the server's state, built once at start-up
//! and shared by every handler and WebSocket connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::auth::WriteKeys;
use super::error::IntakeError;
use super::rate_limit::SourceRateLimits;
use super::rejected_store::RejectedStore;
use super::websocket::ConnectionRegistry;
use crate::config::{LimitsConfig, WebSocketConfig};
use crate::pipeline::Pipeline;
use crate::telemetry::metric;

/// Everything intake's handlers share.
pub struct IntakeState {
    pub limits: LimitsConfig,
    /// A client that has not sent its whole body by then gets 408.
    pub body_read_timeout: Duration,
    pub write_keys: WriteKeys,
    pub source_rate_limits: SourceRateLimits,
    /// Where valid events go; also read by readiness and `/admin/spool`.
    pub pipeline: Pipeline,
    pub rejected_store: Arc<RejectedStore>,
    pub in_flight: InFlightLimit,
    pub websocket: WebSocketConfig,
    /// Live WebSocket connections.
    pub websockets: Arc<ConnectionRegistry>,
    /// Set once a stop signal arrived: new WebSocket upgrades are refused and
    /// readiness turns 503.
    pub shutting_down: AtomicBool,
}

/// Caps requests processed at once; past the cap a request is refused with 503
/// straight away rather than queued (queues hide overload until memory runs out).
pub struct InFlightLimit {
    current: AtomicUsize,
    max: usize,
}

/// Held for the duration of one request.
pub struct InFlightGuard<'a>(&'a InFlightLimit);

impl InFlightLimit {
    pub fn new(max: usize) -> Self {
        Self {
            current: AtomicUsize::new(0),
            max,
        }
    }

    pub fn enter(&self) -> Result<InFlightGuard<'_>, IntakeError> {
        let previous = self.current.fetch_add(1, Ordering::AcqRel);
        let guard = InFlightGuard(self);
        if previous >= self.max {
            return Err(IntakeError::Overloaded);
        }
        metrics::gauge!(metric::REQUESTS_IN_FLIGHT).increment(1.0);
        Ok(guard)
    }

    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed).min(self.max)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let previous = self.0.current.fetch_sub(1, Ordering::AcqRel);
        if previous <= self.0.max {
            metrics::gauge!(metric::REQUESTS_IN_FLIGHT).decrement(1.0);
        }
    }
}
