//! One sink as the pipeline uses it (its stack, its spool queue, its health), and
//! the one path by which a batch a sink rejected for good reaches the dead-letter
//! table: live delivery, the replayer and `breakwater spool replay` all use it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::unsettled::UnsettledCopies;
use crate::config::Acknowledge;
use crate::event::{SinkBatch, SinkKind};
use crate::sinks::{ResilientSink, SinkError};
use crate::spool::{SinkQueue, Spool, SpoolError};
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// One sink as the pipeline uses it: its resilience stack, its spool queue, and the
/// health of the sink itself (behind the stack).
#[derive(Clone)]
pub struct SinkRoute {
    pub kind: SinkKind,
    pub sink: ResilientSink,
    /// Whether a request waits for the sink or only for the sink's spool.
    pub acknowledge: Acknowledge,
    pub queue: Arc<SinkQueue>,
    pub health: Arc<DependencyHealth>,
    /// What this route made durable for requests that then failed, left out of
    /// their resends (`unsettled.rs`).
    pub unsettled: Arc<UnsettledCopies>,
    /// How long a request waits for its copy's spool append or dead letter
    /// (`server.spool_write_timeout_ms`); past it, 503 (`deliver.rs`).
    pub local_write_deadline: Duration,
}

/// Keeps a batch its sink rejected for good in the dead-letter table, with the
/// sink's error (on the blocking pool; the spool commits before it answers). The
/// future owns what it needs, so a caller may stop waiting and leave it running.
pub fn dead_letter(
    spool: &Arc<Spool>,
    sink: SinkKind,
    error: &SinkError,
    batch: Arc<SinkBatch>,
) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
    static REJECTED: Throttle = Throttle::new(WARN_EVERY);
    if let Some(suppressed) = REJECTED.allow() {
        tracing::warn!(
            sink = sink.name(),
            %error,
            events = batch.events.len(),
            suppressed_since_last = suppressed,
            "sink rejected the batch: dead-lettering"
        );
    }
    // Only the events the sink refused, when it took the others.
    let batch = match error {
        SinkError::Rejected { only: Some(ids), .. } => {
            let refused: Vec<_> = batch
                .events
                .iter()
                .filter(|event| ids.contains(&event.message_id))
                .cloned()
                .collect();
            Arc::new(SinkBatch::new(batch.source.clone(), refused))
        }
        _ => batch,
    };
    let spool = spool.clone();
    let message = error.to_string();
    let write = tokio::task::spawn_blocking(move || spool.add_dead_letter(sink, &message, &batch));
    async move {
        write
            .await
            .unwrap_or_else(|e| Err(SpoolError::Storage(format!("dead-letter task failed: {e}"))))
    }
}
