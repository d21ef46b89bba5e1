//! What intake holds: its own part of the server's state, built once at start-up
//! and shared by every handler and WebSocket connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::auth::WriteKeys;
use super::browser::BrowserPolicy;
use super::error::IntakeError;
use super::rate_limit::SourceRateLimits;
use super::rejected_store::RejectedStore;
use super::websocket::ConnectionRegistry;
use crate::config::{LimitsConfig, WebSocketConfig};
use crate::pipeline::budget::MemoryBudget;
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
    /// The memory budget every request and frame holds room in until its pipeline
    /// task ends (`pipeline/budget.rs`).
    pub budget: MemoryBudget,
    pub rejected_store: Arc<RejectedStore>,
    pub in_flight: InFlightLimit,
    /// Requests whose write key is in the body, while that body is read (before
    /// the key is known): a small budget of their own, so clients without a valid
    /// key cannot take the main one's slots.
    pub body_key_in_flight: InFlightLimit,
    pub websocket: WebSocketConfig,
    /// CORS, client IP and User-Agent recording (`browser.rs`).
    pub browser: BrowserPolicy,
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
    /// Whether this limit's requests count in `breakwater_requests_in_flight` (the
    /// body-key budget's do not: they are counted again in the main limit).
    metered: bool,
}

/// Held for the duration of one request.
pub struct InFlightGuard<'a>(&'a InFlightLimit);

impl InFlightLimit {
    pub fn new(max: usize) -> Self {
        Self {
            current: AtomicUsize::new(0),
            max,
            metered: true,
        }
    }

    /// A limit not counted in the in-flight gauge.
    pub fn unmetered(max: usize) -> Self {
        Self {
            metered: false,
            ..Self::new(max)
        }
    }

    /// A slot, or `Overloaded` at the limit.
    pub fn enter(&self) -> Result<InFlightGuard<'_>, IntakeError> {
        self.enter_or(IntakeError::Overloaded)
    }

    /// A slot, or `refusal` at the limit.
    pub fn enter_or(&self, refusal: IntakeError) -> Result<InFlightGuard<'_>, IntakeError> {
        let previous = self.current.fetch_add(1, Ordering::AcqRel);
        let guard = InFlightGuard(self);
        if previous >= self.max {
            return Err(refusal);
        }
        if self.metered {
            metrics::gauge!(metric::REQUESTS_IN_FLIGHT).increment(1.0);
        }
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
        if previous <= self.0.max && self.0.metered {
            metrics::gauge!(metric::REQUESTS_IN_FLIGHT).decrement(1.0);
        }
    }
}
