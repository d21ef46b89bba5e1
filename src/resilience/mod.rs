//! Tower stacks built from a `CallPolicy`, the same for live traffic and replay:
//!
//!   rate limit → bulkhead → circuit breaker → retry (backoff, full jitter, budget)
//!   → per-attempt timeout → the sink
//!
//! Rate limit, bulkhead and breaker are tower-resilience's; retry and timeout are
//! small services here. Only retryable errors are retried or counted by the breaker.
//! Generic over the call (sinks take batches, Redis takes dedup commands), so every
//! dependency gets the same stack. Owns no I/O of its own; calls only what it wraps.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, ServiceExt};
use tower_resilience::bulkhead::{BulkheadLayer, BulkheadServiceError};
use tower_resilience::circuitbreaker::{CircuitBreakerError, CircuitBreakerHandle, CircuitBreakerLayer, CircuitState};
use tower_resilience::ratelimiter::{RateLimiterLayer, RateLimiterServiceError};

use tower::util::BoxCloneSyncService;

use crate::policy::{CallPolicy, Jitter, RetryPolicy, Trip};
use crate::sinks::{SinkBatch, SinkError};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// What the stack needs to know about a dependency's errors.
pub trait CallError: std::fmt::Display + Send + Sync + 'static {
    /// May the same call succeed later? Only these are retried and counted by the breaker.
    fn is_retryable(&self) -> bool;
    fn timed_out(dependency: &'static str, after: Duration) -> Self;
    fn circuit_open(dependency: &'static str) -> Self;
    /// Refused by the rate limit or the bulkhead.
    fn shed(dependency: &'static str, why: String) -> Self;
}

impl CallError for SinkError {
    fn is_retryable(&self) -> bool {
        SinkError::is_retryable(self)
    }
    fn timed_out(sink: &'static str, after: Duration) -> Self {
        SinkError::Unavailable {
            sink,
            message: format!("no answer within {} ms", after.as_millis()),
        }
    }
    fn circuit_open(sink: &'static str) -> Self {
        SinkError::CircuitOpen { sink }
    }
    fn shed(sink: &'static str, message: String) -> Self {
        SinkError::Unavailable { sink, message }
    }
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

fn breaker_state<C: Send + Sync + 'static>(handle: CircuitBreakerHandle<C>) -> BreakerState {
    Arc::new(move || handle.state())
}

/// A built stack with its breaker's state reader.
type Built<Req, Res, E> = (CallService<Req, Res, E>, BreakerState);

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

/// A sink behind its stack.
pub type ResilientSink = Resilient<Arc<SinkBatch>, (), SinkError>;

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
    // Innermost: one attempt, bounded in time.
    let attempt_timeout = Duration::from_millis(calls.timeout_ms);
    let timed = CallService::new(tower::service_fn(move |request: Req| {
        let inner = inner.clone();
        async move {
            match tokio::time::timeout(attempt_timeout, inner.oneshot(request)).await {
                Ok(result) => result,
                Err(_) => Err(E::timed_out(name, attempt_timeout)),
            }
        }
    }));

    // Retry with exponential backoff, full jitter and a budget.
    let retry = calls.retry.clone();
    let budget = Arc::new(TpsBudget::new(
        Duration::from_secs(10),
        1,
        retry.budget_percent as f32 / 100.0,
    ));
    let retried = CallService::new(tower::service_fn(move |request: Req| {
        let timed = timed.clone();
        let retry = retry.clone();
        let budget = budget.clone();
        async move { call_with_retries(name, &timed, request, &retry, &budget).await }
    }));

    // Circuit breaker: only retryable failures count.
    let breaker = &calls.circuit_breaker;
    let mut builder = CircuitBreakerLayer::builder()
        .name(name)
        .wait_duration_in_open(Duration::from_millis(breaker.open_ms))
        .permitted_calls_in_half_open(breaker.half_open_probes as usize);
    builder = match breaker.trip {
        Trip::Consecutive => builder.consecutive_failures(breaker.consecutive_failures as usize),
        Trip::FailureRate => builder
            .failure_rate_threshold(breaker.failure_rate_percent as f64 / 100.0)
            .sliding_window_type(tower_resilience::circuitbreaker::SlidingWindowType::TimeBased)
            .sliding_window_duration(Duration::from_secs(breaker.window_seconds))
            .minimum_number_of_calls(breaker.minimum_calls as usize),
    };
    let failed_probes = Throttle::new(WARN_EVERY);
    let (breaker_layer, handle) = builder
        .on_state_transition(move |from, to| {
            metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => name).set(state_value(to));
            metrics::counter!(metric::CIRCUIT_BREAKER_TRANSITIONS, "dependency" => name, "to" => state_name(to))
                .increment(1);
            log_breaker_transition(name, from, to, &failed_probes);
        })
        .failure_classifier(|result: &Result<Res, E>| matches!(result, Err(error) if error.is_retryable()))
        .build_with_handle()
        .map_err(|e| format!("{name} circuit breaker: {e}"))?;
    let state = breaker_state(handle);
    let broken = CallService::new(breaker_layer.layer(retried).map_err(move |error| match error {
        CircuitBreakerError::OpenCircuit => E::circuit_open(name),
        CircuitBreakerError::Inner(inner) => inner,
    }));

    // Bulkhead: at most N calls in flight; waiting longer than max_wait fails (and spools).
    let bulkheaded = if calls.bulkhead.max_concurrent > 0 {
        let layer = BulkheadLayer::builder()
            .name(name)
            .max_concurrent_calls(calls.bulkhead.max_concurrent as usize)
            .max_wait_duration(Duration::from_millis(calls.bulkhead.max_wait_ms))
            .build()
            .map_err(|e| format!("{name} bulkhead: {e}"))?;
        CallService::new(layer.layer(broken).map_err(move |error| match error {
            BulkheadServiceError::Inner(inner) => inner,
            BulkheadServiceError::Bulkhead(reason) => {
                metrics::counter!(metric::CALLS_SHED, "dependency" => name, "by" => "bulkhead").increment(1);
                E::shed(name, reason.to_string())
            }
        }))
    } else {
        broken
    };

    // Rate limit: at most N calls per second; a call that cannot get a permit within
    // a second fails (and spools).
    let limited = if calls.rate_limit.calls_per_second > 0 {
        let layer = RateLimiterLayer::builder()
            .name(name)
            .limit_for_period(calls.rate_limit.calls_per_second as usize)
            .refresh_period(Duration::from_secs(1))
            .timeout_duration(Duration::from_secs(1))
            .build()
            .map_err(|e| format!("{name} rate limit: {e}"))?;
        CallService::new(layer.layer(bulkheaded).map_err(move |error| match error {
            RateLimiterServiceError::Inner(inner) => inner,
            RateLimiterServiceError::RateLimited => {
                metrics::counter!(metric::CALLS_SHED, "dependency" => name, "by" => "rate_limit").increment(1);
                E::shed(name, "rate limit: no permit within 1 s".into())
            }
        }))
    } else {
        bulkheaded
    };
    metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => name).set(0.0);
    Ok((limited, state))
}

async fn call_with_retries<Req, Res, E>(
    name: &'static str,
    service: &CallService<Req, Res, E>,
    request: Req,
    retry: &RetryPolicy,
    budget: &TpsBudget,
) -> Result<Res, E>
where
    Req: Clone + Send + 'static,
    E: CallError,
{
    budget.deposit();
    let mut attempt = 1;
    loop {
        let result = service.clone().oneshot(request.clone()).await;
        let error = match result {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        if !error.is_retryable() || attempt >= retry.max_attempts || !budget.withdraw() {
            return Err(error);
        }
        let backoff = retry.backoff(attempt);
        let sleep = match retry.jitter {
            Jitter::Full => Duration::from_millis(random_below(backoff.as_millis() as u64 + 1)),
            Jitter::None => backoff,
        };
        metrics::counter!(metric::RETRIES, "dependency" => name).increment(1);
        tracing::debug!(dependency = name, attempt, %error, sleep_ms = sleep.as_millis() as u64, "retrying");
        tokio::time::sleep(sleep).await;
        attempt += 1;
    }
}

/// A pseudo-random number below `bound`, for jitter (not for anything secret).
pub fn random_below(bound: u64) -> u64 {
    (uuid::Uuid::new_v4().as_u128() as u64) % bound.max(1)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LoadedPolicy;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn batch() -> Arc<SinkBatch> {
        Arc::new(SinkBatch {
            source: Arc::from("web"),
            events: Vec::new(),
        })
    }

    /// A sink that fails its first `failures` calls with `error`, then succeeds.
    fn flaky(failures: usize, error: SinkError) -> (crate::sinks::SinkService, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let service = crate::sinks::SinkService::new(tower::service_fn(move |_batch: Arc<SinkBatch>| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let error = error.clone();
            async move {
                if n < failures {
                    Err(error)
                } else {
                    Ok(())
                }
            }
        }));
        (service, calls)
    }

    fn policy() -> CallPolicy {
        let mut calls = LoadedPolicy::embedded().policy.clickhouse.calls();
        calls.retry.initial_backoff_ms = 1;
        calls.retry.max_backoff_ms = 2;
        calls.retry.budget_percent = 1000;
        calls
    }

    fn unavailable() -> SinkError {
        SinkError::Unavailable {
            sink: "test",
            message: "down".into(),
        }
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_up_to_max_attempts() {
        let (inner, calls) = flaky(2, unavailable());
        let sink = ResilientSink::new("t1", inner, &policy()).unwrap();
        sink.call(batch()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried_and_do_not_trip_the_breaker() {
        let rejected = SinkError::Rejected {
            sink: "test",
            message: "type mismatch".into(),
        };
        let (inner, calls) = flaky(100, rejected);
        let sink = ResilientSink::new("t2", inner, &policy()).unwrap();
        for _ in 0..10 {
            assert!(!sink.call(batch()).await.unwrap_err().is_retryable());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 10, "one attempt each");
        assert_eq!(sink.breaker(), CircuitState::Closed);
    }

    #[tokio::test]
    async fn the_breaker_opens_after_consecutive_failures_and_then_fails_fast() {
        let (inner, calls) = flaky(usize::MAX, unavailable());
        let mut calls_policy = policy();
        calls_policy.retry.max_attempts = 1;
        calls_policy.circuit_breaker.consecutive_failures = 3;
        let sink = ResilientSink::new("t3", inner, &calls_policy).unwrap();
        for _ in 0..3 {
            sink.call(batch()).await.unwrap_err();
        }
        assert_eq!(sink.breaker(), CircuitState::Open);
        let error = sink.call(batch()).await.unwrap_err();
        assert_eq!(error.kind(), "circuit_open");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "an open breaker does not call the sink"
        );
    }

    #[tokio::test]
    async fn a_slow_attempt_times_out_as_retryable() {
        let slow = crate::sinks::SinkService::new(tower::service_fn(|_batch: Arc<SinkBatch>| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<(), SinkError>(())
        }));
        let mut calls_policy = policy();
        calls_policy.timeout_ms = 20;
        calls_policy.retry.max_attempts = 1;
        let error = ResilientSink::new("t4", slow, &calls_policy)
            .unwrap()
            .call(batch())
            .await
            .unwrap_err();
        assert!(
            error.is_retryable() && error.to_string().contains("no answer within 20 ms"),
            "{error}"
        );
    }
}
