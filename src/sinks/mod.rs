//! Destinations for accepted events. Each sink is a tower `Service` taking one
//! batch of NDJSON lines and answering only once the batch is durable there. Sinks
//! know nothing of HTTP, dedup or sources; the pipeline calls them.

pub mod batcher;
pub mod clickhouse;
pub mod file;
pub mod kafka;

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

/// A sink as the pipeline sees it: a name for metrics and readiness, a service and
/// its health.
#[derive(Clone)]
pub struct NamedSink {
    pub name: &'static str,
    pub service: SinkService,
    pub health: Arc<DependencyHealth>,
}
