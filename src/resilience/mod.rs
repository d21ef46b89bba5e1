//! Tower stacks built from a `CallPolicy`, the same for live traffic and replay:
//!
//!   rate limit → bulkhead → circuit breaker → retry (backoff, full jitter, budget)
//!   → per-attempt timeout → the sink
//!
//! Rate limit, bulkhead and breaker are tower-resilience's; retry and timeout are
//! small services here. Only retryable errors are retried or counted by the breaker.
//! Generic over the call (sinks take batches, Redis takes dedup commands), so every
//! dependency gets the same stack. Owns no I/O of its own; calls only what it wraps.
//! `stack.rs` builds the layers (one function each), `retry.rs` is the retry loop.
//!
//! Invariant: generic machinery: no sink, spool or Redis code; imports only
//! `policy`, `telemetry` and `clock`.

mod retry;
mod stack;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::ServiceExt;
use tower_resilience::circuitbreaker::{CircuitBreakerHandle, CircuitState};

use crate::policy::CallPolicy;
use crate::telemetry::metric;
pub use stack::build_stack;

/// What the stack needs to know about a dependency's errors.
pub trait CallError: std::fmt::Display + Send + Sync + 'static {
    /// May the same call succeed later? Only these are retried and counted by the breaker.
    fn is_retryable(&self) -> bool;
    fn timed_out(dependency: &'static str, after: Duration) -> Self;
    fn circuit_open(dependency: &'static str) -> Self;
    /// Refused by the rate limit or the bulkhead.
    fn shed(dependency: &'static str, why: String) -> Self;
}

/// How long a call waits for a rate-limit permit before it fails (and spools).
pub const RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);

/// The longest one call through a stack built from `calls` can take: the rate
/// limit's wait for a permit, the bulkhead's wait, every attempt to its timeout and
/// the backoff before each retry (jitter only shortens it).
pub fn longest_call(calls: &CallPolicy) -> Duration {
    let rate_limit_wait = if calls.rate_limit.calls_per_second > 0 {
        RATE_LIMIT_WAIT.as_millis() as u64
    } else {
        0
    };
    let bulkhead_wait = if calls.bulkhead.max_concurrent > 0 {
        calls.bulkhead.max_wait_ms
    } else {
        0
    };
    let attempts = calls.retry.max_attempts.max(1);
    let backoffs: Duration = (1..attempts).map(|retry| calls.retry.backoff(retry)).sum();
    Duration::from_millis(rate_limit_wait + bulkhead_wait + u64::from(attempts) * calls.timeout_ms) + backoffs
}

/// A dependency's call, boxed.
pub type CallService<Req, Res, E> = BoxCloneSyncService<Req, Res, E>;

/// Breaker state as exported: 0 closed, 1 open, 2 half-open.
pub fn state_value(state: CircuitState) -> f64 {
    match state {
        CircuitState::Closed => 0.0,
        CircuitState::Open => 1.0,
        CircuitState::HalfOpen => 2.0,
    }
}

pub fn state_name(state: CircuitState) -> &'static str {
    match state {
        CircuitState::Closed => "closed",
        CircuitState::Open => "open",
        CircuitState::HalfOpen => "half_open",
    }
}

/// Reads a breaker's state; type-erased over the classifier.
pub type BreakerState = Arc<dyn Fn() -> CircuitState + Send + Sync>;

pub(crate) fn breaker_state<C: Send + Sync + 'static>(handle: CircuitBreakerHandle<C>) -> BreakerState {
    Arc::new(move || handle.state())
}

/// A built stack with its breaker's state reader.
pub type Built<Req, Res, E> = (CallService<Req, Res, E>, BreakerState);

/// A dependency wrapped in its policy stack; the stack is rebuilt when the policy
/// changes, and callers always use the latest.
pub struct Resilient<Req, Res, E> {
    pub name: &'static str,
    inner: CallService<Req, Res, E>,
    current: Arc<RwLock<Built<Req, Res, E>>>,
}

impl<Req, Res, E> Clone for Resilient<Req, Res, E> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            inner: self.inner.clone(),
            current: self.current.clone(),
        }
    }
}

impl<Req, Res, E> Resilient<Req, Res, E>
where
    Req: Clone + Send + Sync + 'static,
    Res: Send + 'static,
    E: CallError,
{
    pub fn new(name: &'static str, inner: CallService<Req, Res, E>, calls: &CallPolicy) -> Result<Self, String> {
        let built = build_stack(name, inner.clone(), calls)?;
        Ok(Resilient {
            name,
            inner,
            current: Arc::new(RwLock::new(built)),
        })
    }

    /// Replaces the stack with one built from `calls`. The new breaker starts closed.
    pub fn apply(&self, calls: &CallPolicy) -> Result<(), String> {
        let built = build_stack(self.name, self.inner.clone(), calls)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = built;
        metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => self.name).set(0.0);
        Ok(())
    }

    /// One call through the whole stack.
    pub async fn call(&self, request: Req) -> Result<Res, E> {
        let service = self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        service.oneshot(request).await
    }

    pub fn breaker(&self) -> CircuitState {
        (self.current.read().unwrap_or_else(|p| p.into_inner()).1)()
    }
}
