//! Destinations for accepted events. Every sink has the same shape: a folder with
//! `mod.rs` (its public `start`, taking the sink's settings and its batch policy and
//! returning one `SinkHandle`), the writer or service that does the I/O, and
//! `errors.rs` (the sink's own error type, its retry classification through
//! `ClassifyError::classify`, and its conversion into `SinkError`). `journal.rs` is not
//! a sink: the in-doubt journal Kafka and ClickHouse each keep.
//!
//! Invariant: sinks know nothing of HTTP, dedup, the spool or sources beyond the
//! batch's source name; they import only `event`, `config`, `policy`, `telemetry`,
//! `resilience`, `batcher` and `clock`.

pub mod clickhouse;
pub mod file;
pub mod journal;
pub mod kafka;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::batcher::BatchLimits;
use crate::event::{SinkBatch, SinkKind};
use crate::policy::BatchPolicy;
use crate::resilience::{CallError, Resilient};
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::metric;

/// A sink failed to make a batch durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("{sink} sink I/O error: {message}")]
    Io { sink: &'static str, message: String },
    #[error("{sink} sink has stopped")]
    Stopped { sink: &'static str },
    /// The backend could not be reached or was too busy; the same batch may succeed later.
    #[error("{sink} unavailable: {message}")]
    Unavailable { sink: &'static str, message: String },
    /// The sink's circuit breaker is open: the call was not made.
    #[error("{sink} circuit breaker is open")]
    CircuitOpen { sink: &'static str },
    /// The backend refused the data itself (schema, type, syntax); retrying the same
    /// batch cannot succeed. `only`: the messageIds of the batch's events it refused,
    /// when it took the others (they are delivered); `None`: all of them.
    #[error("{sink} rejected the batch: {message}")]
    Rejected {
        sink: &'static str,
        message: String,
        only: Option<Arc<Vec<String>>>,
    },
}

impl SinkError {
    /// Every `kind()` label, for pre-registering the error metric's series.
    pub const KINDS: [&'static str; 5] = ["io", "stopped", "unavailable", "circuit_open", "rejected"];

    /// Metric label for `breakwater_sink_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io { .. } => "io",
            SinkError::Stopped { .. } => "stopped",
            SinkError::Unavailable { .. } => "unavailable",
            SinkError::CircuitOpen { .. } => "circuit_open",
            SinkError::Rejected { .. } => "rejected",
        }
    }

    /// Whether the same batch may succeed later.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SinkError::Rejected { .. })
    }

    /// A sink's own error as the pipeline sees it, by its classification.
    pub fn classified(sink: SinkKind, error: &(impl ClassifyError + ?Sized)) -> SinkError {
        let sink = sink.name();
        let message = error.to_string();
        match error.classify() {
            ErrorClass::Io => SinkError::Io { sink, message },
            ErrorClass::Stopped => SinkError::Stopped { sink },
            ErrorClass::Unavailable => SinkError::Unavailable { sink, message },
            ErrorClass::Rejected => SinkError::Rejected {
                sink,
                message,
                only: None,
            },
        }
    }
}

/// What a sink's failure means for the batch: the one retry classification each
/// sink's `errors.rs` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Local I/O failed (disk); the same batch may succeed later.
    Io,
    /// The sink's task has ended; retry after a restart.
    Stopped,
    /// The backend could not be reached or was busy; retry later.
    Unavailable,
    /// The backend refused the data itself; give up (dead letter).
    Rejected,
}

/// A sink's own error type: it says whether the batch may succeed later.
pub trait ClassifyError: std::fmt::Display {
    fn classify(&self) -> ErrorClass;
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

/// Any sink, boxed so the pipeline can hold several kinds and tower layers can wrap them.
pub type SinkService = tower::util::BoxCloneSyncService<Arc<SinkBatch>, (), SinkError>;

/// A sink behind its resilience stack.
pub type ResilientSink = Resilient<Arc<SinkBatch>, (), SinkError>;

/// What every sink offers: resolves once the batch is durable in the sink.
pub trait Sink: Clone + Send + Sync + 'static {
    fn deliver(&self, batch: Arc<SinkBatch>) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// A started sink, the one thing every sink's `start` returns.
pub struct SinkHandle {
    pub kind: SinkKind,
    /// The sink as a boxed tower service, ready for policy layers.
    pub service: SinkService,
    /// The sink's own health (behind any stack), for readiness.
    pub health: Arc<DependencyHealth>,
    /// Tasks the sink runs, to await at shutdown (none is left untracked).
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Where policy reloads send new batch limits, for a sink that batches itself.
    pub batch_limits: Option<watch::Sender<BatchLimits>>,
}

impl SinkHandle {
    /// Wraps a sink as a boxed tower service.
    pub fn new<S: Sink>(kind: SinkKind, sink: S, health: Arc<DependencyHealth>) -> SinkHandle {
        let service = SinkService::new(tower::service_fn(move |batch: Arc<SinkBatch>| {
            let sink = sink.clone();
            async move { sink.deliver(batch).await }
        }));
        SinkHandle {
            kind,
            service,
            health,
            tasks: Vec::new(),
            batch_limits: None,
        }
    }

    pub fn with_task(mut self, task: tokio::task::JoinHandle<()>) -> SinkHandle {
        self.tasks.push(task);
        self
    }

    pub fn with_batch_limits(mut self, sender: watch::Sender<BatchLimits>) -> SinkHandle {
        self.batch_limits = Some(sender);
        self
    }
}

/// The batcher's limits from a sink's batch policy.
pub fn batch_limits_of(batch: &BatchPolicy) -> BatchLimits {
    BatchLimits {
        max_events: batch.max_events,
        max_bytes: batch.max_bytes,
        linger: Duration::from_millis(batch.linger_ms),
    }
}

/// A sink's own result, recorded (`record_outcome`) and handed back: what a
/// batcher's flush returns.
pub fn recorded<E>(sink: SinkKind, health: &DependencyHealth, result: Result<(), E>) -> Result<(), E>
where
    E: Clone,
    SinkError: From<E>,
{
    record_outcome(sink, health, &result.clone().map_err(SinkError::from));
    result
}

/// Records one delivery outcome: the sink's health (which logs each transition
/// once) and the error metric. Every failure is also logged at debug level.
pub fn record_outcome(sink: SinkKind, health: &DependencyHealth, result: &Result<(), SinkError>) {
    let sink = sink.name();
    match result {
        Ok(()) => health.record_success(sink),
        Err(error) => {
            tracing::debug!(sink, %error, retryable = error.is_retryable(), "sink delivery failed");
            metrics::counter!(metric::SINK_ERRORS, "sink" => sink, "kind" => error.kind()).increment(1);
            health.record_failure(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CallPolicy, LoadedPolicy};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower_resilience::circuitbreaker::CircuitState;

    fn batch() -> Arc<SinkBatch> {
        Arc::new(SinkBatch::new(Arc::from("web"), Vec::new()))
    }

    /// A sink that fails its first `failures` calls with `error`, then succeeds.
    fn flaky(failures: usize, error: SinkError) -> (SinkService, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let service = SinkService::new(tower::service_fn(move |_batch: Arc<SinkBatch>| {
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
            only: None,
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
        let slow = SinkService::new(tower::service_fn(|_batch: Arc<SinkBatch>| async {
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
