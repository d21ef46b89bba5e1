//! Destinations for accepted events. Each sink is a tower `Service` taking one
//! batch of NDJSON lines and answering only once the batch is durable there. Sinks
//! know nothing of HTTP, dedup or sources; the pipeline calls them.

pub mod batcher;
pub mod clickhouse;
pub mod file;
pub mod kafka;
pub mod kafka_readback;

use std::future::Future;
use std::sync::Arc;

pub use crate::telemetry::health::DependencyHealth;

use crate::intake::segment::NormalizedEvent;

/// The new (not duplicate) events of one request, all from one source. Each sink
/// encodes them its own way from the JSON and fields normalization produced once.
#[derive(Debug)]
pub struct SinkBatch {
    pub source: Arc<str>,
    pub events: Vec<NormalizedEvent>,
}

impl SinkBatch {
    /// JSON bytes of all events: the size measure batch limits use.
    pub fn json_bytes(&self) -> usize {
        self.events.iter().map(|e| e.json.len()).sum()
    }
}

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
    /// batch cannot succeed.
    #[error("{sink} rejected the batch: {message}")]
    Rejected { sink: &'static str, message: String },
}

impl SinkError {
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
}

/// Any sink, boxed so the pipeline can hold several kinds and tower layers can wrap them.
pub type SinkService = tower::util::BoxCloneSyncService<Arc<SinkBatch>, (), SinkError>;

/// What every sink offers the pipeline. Handles are cheap to clone.
pub trait Sink: Clone + Send + Sync + 'static {
    /// Name for metrics, logs and readiness.
    fn name(&self) -> &'static str;
    fn health(&self) -> Arc<DependencyHealth>;
    /// Resolves once the batch is durable in this sink.
    fn deliver(&self, batch: Arc<SinkBatch>) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Records one delivery outcome: the sink's health (which logs each transition
/// once) and the error metric. Every failure is also logged at debug level.
pub fn record_outcome(sink: &'static str, health: &DependencyHealth, result: &Result<(), SinkError>) {
    match result {
        Ok(()) => health.record_success(sink),
        Err(error) => {
            tracing::debug!(sink, %error, retryable = error.is_retryable(), "sink delivery failed");
            metrics::counter!(crate::telemetry::metric::SINK_ERRORS, "sink" => sink, "kind" => error.kind())
                .increment(1);
            health.record_failure(error);
        }
    }
}

/// A sink as the pipeline sees it: a name for metrics and readiness, a service and
/// its health.
#[derive(Clone)]
pub struct NamedSink {
    pub name: &'static str,
    pub service: SinkService,
    pub health: Arc<DependencyHealth>,
}

impl NamedSink {
    /// Wraps a sink as a boxed tower service, ready for policy layers.
    pub fn from_sink<S: Sink>(sink: S) -> NamedSink {
        let name = sink.name();
        let health = sink.health();
        let service = SinkService::new(tower::service_fn(move |batch: Arc<SinkBatch>| {
            let sink = sink.clone();
            async move { sink.deliver(batch).await }
        }));
        NamedSink { name, service, health }
    }
}
