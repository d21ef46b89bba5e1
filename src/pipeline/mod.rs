//! From validated events to durable ones: dedup reservation, one batch per request
//! to every sink, then the dedup commit. Calls `dedup` and `sinks`; knows nothing of
//! HTTP. Work runs on its own task, so a client hanging up mid-request cannot
//! interrupt a write between "durable" and "marked seen".

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::future::join_all;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::dedup::{DedupKey, LocalDedup, Verdict};
use crate::intake::segment::NormalizedEvent;
use crate::sinks::{NamedSink, SinkBatch, SinkError};
use crate::telemetry::metric;

/// What became of a request's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Written to every sink.
    pub accepted: usize,
    /// Already seen (or repeated in the request): acknowledged, not written again.
    pub duplicates: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("pipeline task failed: {0}")]
    TaskFailed(String),
}

pub struct Pipeline {
    dedup: Arc<LocalDedup>,
    sinks: Vec<NamedSink>,
    tasks: TaskTracker,
}

impl Pipeline {
    pub fn new(dedup: Arc<LocalDedup>, sinks: Vec<NamedSink>) -> Self {
        Self {
            dedup,
            sinks,
            tasks: TaskTracker::new(),
        }
    }

    pub fn sinks(&self) -> &[NamedSink] {
        &self.sinks
    }

    /// Makes the events durable in every sink, or fails leaving nothing marked seen.
    pub async fn ingest(
        &self,
        source: Arc<str>,
        events: Vec<NormalizedEvent>,
    ) -> Result<Ingested, PipelineError> {
        let dedup = self.dedup.clone();
        let sinks = self.sinks.clone();
        let task = self
            .tasks
            .spawn(async move { ingest_to_completion(&dedup, &sinks, &source, events).await });
        task.await
            .map_err(|e| PipelineError::TaskFailed(e.to_string()))?
    }

    /// Waits (up to `timeout`) for requests already handed to the pipeline.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_ok()
    }
}

async fn ingest_to_completion(
    dedup: &Arc<LocalDedup>,
    sinks: &[NamedSink],
    source: &str,
    events: Vec<NormalizedEvent>,
) -> Result<Ingested, PipelineError> {
    let keys: Vec<DedupKey> = events
        .iter()
        .map(|event| DedupKey::new(source, &event.message_id))
        .collect();
    let reservation = dedup.reserve(&keys).await;
    let new_bytes: usize = events
        .iter()
        .zip(reservation.verdicts())
        .filter(|(_, verdict)| **verdict == Verdict::New)
        .map(|(event, _)| event.json.len() + 1)
        .sum();
    let mut payload = BytesMut::with_capacity(new_bytes);
    let mut accepted = 0;
    for (event, verdict) in events.iter().zip(reservation.verdicts()) {
        if *verdict == Verdict::New {
            payload.put_slice(&event.json);
            payload.put_u8(b'\n');
            accepted += 1;
        }
    }
    if accepted > 0 {
        let batch = Arc::new(SinkBatch {
            events: accepted,
            payload: payload.freeze(),
        });
        let deliveries = sinks
            .iter()
            .map(|sink| sink.service.clone().oneshot(batch.clone()));
        for (sink, result) in sinks.iter().zip(join_all(deliveries).await) {
            match result {
                Ok(()) => {
                    metrics::counter!(metric::SINK_EVENTS_SENT, "sink" => sink.name)
                        .increment(accepted as u64);
                }
                Err(error) => {
                    // The reservation is dropped uncommitted: the client's retry is free.
                    tracing::warn!(sink = sink.name, %error, events = accepted, "delivery failed");
                    return Err(error.into());
                }
            }
        }
    }
    reservation.commit();
    Ok(Ingested {
        accepted,
        duplicates: events.len() - accepted,
    })
}
