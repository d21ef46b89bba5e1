//! The layers of a dependency's stack, outermost first:
//!
//!   rate limit → bulkhead → circuit breaker → retry → per-attempt timeout → inner
//!
//! One function per concern; `build_stack` puts them together.

use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::TpsBudget;
use tower::{Layer, ServiceExt};
use tower_resilience::bulkhead::{BulkheadLayer, BulkheadServiceError};
use tower_resilience::circuitbreaker::{CircuitBreakerError, CircuitBreakerLayer, CircuitState, SlidingWindowType};
use tower_resilience::ratelimiter::{RateLimiterLayer, RateLimiterServiceError};

use super::retry::call_with_retries;
use super::{breaker_state, state_name, state_value, BreakerState, Built, CallError, CallService, RATE_LIMIT_WAIT};
use crate::policy::{BreakerPolicy, BulkheadPolicy, CallPolicy, RateLimitPolicy, RetryPolicy, Trip};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// Builds the stack around `inner` and returns it with its breaker's state reader.
pub fn build_stack<Req, Res, E>(
    name: &'static str,
    inner: CallService<Req, Res, E>,
    calls: &CallPolicy,
) -> Result<Built<Req, Res, E>, String>
where
    Req: Clone + Send + Sync + 'static,
    Res: Send + 'static,
    E: CallError,
{
    let timed = with_timeout(name, inner, Duration::from_millis(calls.timeout_ms));
    let retried = with_retries(name, timed, &calls.retry);
    let (broken, state) = with_breaker(name, retried, &calls.circuit_breaker)?;
    let limited = with_admission(name, broken, &calls.bulkhead, &calls.rate_limit)?;
    metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => name).set(0.0);
    Ok((limited, state))
}

/// Innermost: one attempt, bounded in time.
fn with_timeout<Req, Res, E>(
    name: &'static str,
    inner: CallService<Req, Res, E>,
    after: Duration,
) -> CallService<Req, Res, E>
where
    Req: Send + 'static,
    Res: Send + 'static,
    E: CallError,
{
    CallService::new(tower::service_fn(move |request: Req| {
        let inner = inner.clone();
        async move {
            match tokio::time::timeout(after, inner.oneshot(request)).await {
                Ok(result) => result,
                Err(_) => Err(E::timed_out(name, after)),
            }
        }
    }))
}

/// Retry with exponential backoff, full jitter and a budget.
fn with_retries<Req, Res, E>(
    name: &'static str,
    timed: CallService<Req, Res, E>,
    retry: &RetryPolicy,
) -> CallService<Req, Res, E>
where
    Req: Clone + Send + Sync + 'static,
    Res: Send + 'static,
    E: CallError,
{
    let retry = retry.clone();
    let budget = Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        1,
        retry.budget_percent as f32 / 100.0,
    ));
    CallService::new(tower::service_fn(move |request: Req| {
        let timed = timed.clone();
        let retry = retry.clone();
        let budget = budget.clone();
        async move { call_with_retries(name, &timed, request, &retry, &budget).await }
    }))
}

/// Circuit breaker: only retryable failures count; every transition is exported
/// and logged.
fn with_breaker<Req, Res, E>(
    name: &'static str,
    retried: CallService<Req, Res, E>,
    breaker: &BreakerPolicy,
) -> Result<(CallService<Req, Res, E>, BreakerState), String>
where
    Req: Clone + Send + Sync + 'static,
    Res: Send + 'static,
    E: CallError,
{
    let mut builder = CircuitBreakerLayer::builder()
        .name(name)
        .wait_duration_in_open(Duration::from_millis(breaker.open_ms))
        .permitted_calls_in_half_open(breaker.half_open_probes as usize);
    builder = match breaker.trip {
        Trip::Consecutive => builder.consecutive_failures(breaker.consecutive_failures as usize),
        Trip::FailureRate => builder
            .failure_rate_threshold(breaker.failure_rate_percent as f64 / 100.0)
            .sliding_window_type(SlidingWindowType::TimeBased)
            .sliding_window_duration(Duration::from_secs(breaker.window_seconds))
            .minimum_number_of_calls(breaker.minimum_calls as usize),
    };
    let failed_probes = Throttle::new(WARN_EVERY);
    let (layer, handle) = builder
        .on_state_transition(move |from, to| {
            metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => name).set(state_value(to));
            metrics::counter!(metric::CIRCUIT_BREAKER_TRANSITIONS, "dependency" => name, "to" => state_name(to))
                .increment(1);
            log_breaker_transition(name, from, to, &failed_probes);
        })
        .failure_classifier(|result: &Result<Res, E>| matches!(result, Err(error) if error.is_retryable()))
        .build_with_handle()
        .map_err(|e| format!("{name} circuit breaker: {e}"))?;
    let broken = CallService::new(layer.layer(retried).map_err(move |error| match error {
        CircuitBreakerError::OpenCircuit => E::circuit_open(name),
        CircuitBreakerError::Inner(inner) => inner,
    }));
    Ok((broken, breaker_state(handle)))
}

/// Admission: a bulkhead (at most N calls in flight; waiting longer than
/// `max_wait_ms` fails) inside a rate limit (at most N calls per second; no permit
/// within a second fails). Each is off when set to 0; a refused call fails (and
/// spools), counted by what refused it.
fn with_admission<Req, Res, E>(
    name: &'static str,
    broken: CallService<Req, Res, E>,
    bulkhead: &BulkheadPolicy,
    rate_limit: &RateLimitPolicy,
) -> Result<CallService<Req, Res, E>, String>
where
    Req: Send + 'static,
    Res: Send + 'static,
    E: CallError,
{
    let mut service = broken;
    if bulkhead.max_concurrent > 0 {
        let layer = BulkheadLayer::builder()
            .name(name)
            .max_concurrent_calls(bulkhead.max_concurrent as usize)
            .max_wait_duration(Duration::from_millis(bulkhead.max_wait_ms))
            .build()
            .map_err(|e| format!("{name} bulkhead: {e}"))?;
        service = CallService::new(layer.layer(service).map_err(move |error| match error {
            BulkheadServiceError::Inner(inner) => inner,
            BulkheadServiceError::Bulkhead(reason) => shed(name, "bulkhead", reason.to_string()),
        }));
    }
    if rate_limit.calls_per_second > 0 {
        let layer = RateLimiterLayer::builder()
            .name(name)
            .limit_for_period(rate_limit.calls_per_second as usize)
            .refresh_period(Duration::from_secs(1))
            .timeout_duration(RATE_LIMIT_WAIT)
            .build()
            .map_err(|e| format!("{name} rate limit: {e}"))?;
        service = CallService::new(layer.layer(service).map_err(move |error| match error {
            RateLimiterServiceError::Inner(inner) => inner,
            RateLimiterServiceError::RateLimited => shed(name, "rate_limit", "rate limit: no permit within 1 s".into()),
        }));
    }
    Ok(service)
}

/// A call refused by the rate limit or the bulkhead (`by`), counted.
fn shed<E: CallError>(name: &'static str, by: &'static str, why: String) -> E {
    metrics::counter!(metric::CALLS_SHED, "dependency" => name, "by" => by).increment(1);
    E::shed(name, why)
}

/// An outage begins (closed → open) and ends (→ closed) with one line each. In
/// between, every failed half-open probe reopens the breaker once per `open_ms`; those
/// lines are throttled to one per `WARN_EVERY`, with the count left out.
fn log_breaker_transition(name: &'static str, from: CircuitState, to: CircuitState, failed_probes: &Throttle) {
    match (from, to) {
        (CircuitState::HalfOpen, CircuitState::Open) => {
            if let Some(suppressed) = failed_probes.allow() {
                tracing::warn!(
                    dependency = name,
                    failed_probes_since_last = suppressed + 1,
                    "circuit breaker still open: half-open probes failing"
                )
            }
        }
        (_, CircuitState::Open) => {
            tracing::warn!(dependency = name, from = state_name(from), "circuit breaker opened")
        }
        (_, CircuitState::Closed) => {
            tracing::info!(dependency = name, from = state_name(from), "circuit breaker closed")
        }
        _ => tracing::debug!(
            dependency = name,
            from = state_name(from),
            to = state_name(to),
            "circuit breaker transition"
        ),
    }
}
