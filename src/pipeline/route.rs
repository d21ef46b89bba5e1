//! One sink as the pipeline uses it (its stack, its spool queue, its health), and
//! the one path by which a batch a sink rejected for good reaches the dead-letter
//! table: live delivery, the replayer and `breakwater spool replay` all use it.

use std::sync::Arc;

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
}

/// Keeps a batch its sink rejected for good in the dead-letter table, with the
/// sink's error (on the blocking pool; the spool commits before it returns).
pub async fn dead_letter(
    spool: &Arc<Spool>,
    sink: SinkKind,
    error: &SinkError,
    batch: Arc<SinkBatch>,
) -> Result<(), SpoolError> {
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
    tokio::task::spawn_blocking(move || spool.add_dead_letter(sink, &message, &batch))
        .await
        .unwrap_or_else(|e| Err(SpoolError::Storage(format!("dead-letter task failed: {e}"))))
}
