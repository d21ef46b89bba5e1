//! Destinations for accepted events. Each sink is a tower `Service` taking one
//! batch of NDJSON lines and answering only once the batch is durable there. Sinks
//! know nothing of HTTP, dedup or sources; the pipeline calls them.

pub mod file;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Events to deliver together: `payload` holds one JSON object per line, each line
/// ending in `\n`.
#[derive(Debug, Clone)]
pub struct SinkBatch {
    pub events: usize,
    pub payload: Bytes,
}

/// A sink failed to make a batch durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("{sink} sink I/O error: {message}")]
    Io { sink: &'static str, message: String },
    #[error("{sink} sink has stopped")]
    Stopped { sink: &'static str },
}

impl SinkError {
    /// Metric label for `breakwater_sink_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Io { .. } => "io",
            SinkError::Stopped { .. } => "stopped",
        }
    }

    /// Whether the same batch may succeed later (the caller answers 503, not 4xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Io { .. } | SinkError::Stopped { .. } => true,
        }
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
    pub health: Arc<SinkHealth>,
}

/// Last known state of a sink, for `/health/ready`.
#[derive(Debug, Default)]
pub struct SinkHealth {
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl SinkHealth {
    pub fn record_success(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("sink recovered");
        }
    }

    pub fn record_failure(&self, error: &SinkError) {
        self.failing.store(true, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
    }

    pub fn is_healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
