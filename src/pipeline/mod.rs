//! From validated events to durable ones: dedup (in-process, then Redis when
//! configured), one batch per request to every sink at once, then the dedup commit.
//! Calls `dedup` and `sinks`; knows nothing of HTTP. Work runs on its own task, so a
//! client hanging up mid-request cannot interrupt it between "durable" and "seen".

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::dedup::redis::{ClaimOutcome, RedisDedup, RedisDedupError};
use crate::dedup::{DedupKey, LocalDedup, Verdict};
use crate::intake::segment::NormalizedEvent;
use crate::sinks::{NamedSink, SinkBatch, SinkError};
use crate::telemetry::metric;

/// What became of a request's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingested {
    /// Delivered to every sink.
    pub accepted: usize,
    /// Already seen (or repeated in the request): acknowledged, not written again.
    pub duplicates: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    InFlightElsewhere(RedisDedupError),
    #[error("pipeline task failed: {0}")]
    TaskFailed(String),
}

/// Dedup stages shared by every request.
struct Dedup {
    local: Arc<LocalDedup>,
    shared: Option<Arc<RedisDedup>>,
}

pub struct Pipeline {
    dedup: Arc<Dedup>,
    sinks: Vec<NamedSink>,
    tasks: TaskTracker,
}

impl Pipeline {
    pub fn new(local: Arc<LocalDedup>, shared: Option<Arc<RedisDedup>>, sinks: Vec<NamedSink>) -> Self {
        Self {
            dedup: Arc::new(Dedup { local, shared }),
            sinks,
            tasks: TaskTracker::new(),
        }
    }

    pub fn sinks(&self) -> &[NamedSink] {
        &self.sinks
    }

    /// Makes the events durable in every sink, or fails leaving nothing marked seen.
    pub async fn ingest(&self, source: Arc<str>, events: Vec<NormalizedEvent>) -> Result<Ingested, PipelineError> {
        let dedup = self.dedup.clone();
        let sinks = self.sinks.clone();
        let task = self
            .tasks
            .spawn(async move { ingest_to_completion(&dedup, &sinks, source, events).await });
        task.await.map_err(|e| PipelineError::TaskFailed(e.to_string()))?
    }

    /// Waits (up to `timeout`) for requests already handed to the pipeline.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(timeout, self.tasks.wait()).await.is_ok()
    }
}

async fn ingest_to_completion(
    dedup: &Dedup,
    sinks: &[NamedSink],
    source: Arc<str>,
    events: Vec<NormalizedEvent>,
) -> Result<Ingested, PipelineError> {
    let total = events.len();
    let keys: Vec<DedupKey> = events
        .iter()
        .map(|event| DedupKey::new(&source, &event.message_id))
        .collect();
    // In-process first: repeats within this instance never reach Redis.
    let reservation = dedup.local.reserve(&keys).await;
    let mut is_new: Vec<bool> = reservation.verdicts().iter().map(|v| *v == Verdict::New).collect();

    let mut claim = None;
    if let Some(shared) = &dedup.shared {
        let candidates: Vec<usize> = (0..total).filter(|i| is_new[*i]).collect();
        if !candidates.is_empty() {
            let ids: Vec<&str> = candidates.iter().map(|i| events[*i].message_id.as_str()).collect();
            match shared.claim(&source, &ids).await {
                Ok((outcomes, claimed)) => {
                    for (index, outcome) in candidates.iter().zip(outcomes) {
                        if outcome == ClaimOutcome::Seen {
                            is_new[*index] = false;
                        }
                    }
                    claim = Some(claimed);
                }
                Err(error @ RedisDedupError::HeldElsewhere(_)) => return Err(PipelineError::InFlightElsewhere(error)),
                Err(error @ RedisDedupError::Unavailable(_)) => {
                    // Availability first: deliver with in-process dedup only. A repeat
                    // that another instance already delivered may be written again;
                    // ClickHouse collapses it (ReplacingMergeTree on messageId).
                    metrics::counter!(metric::DEDUP_FAIL_OPEN).increment(1);
                    tracing::warn!(%error, "shared dedup unavailable: delivering with local dedup only");
                }
            }
        }
    }

    let new_events: Vec<NormalizedEvent> = events
        .into_iter()
        .zip(&is_new)
        .filter_map(|(event, new)| new.then_some(event))
        .collect();
    let accepted = new_events.len();
    if accepted > 0 {
        let batch = Arc::new(SinkBatch {
            source: source.clone(),
            events: new_events,
        });
        if let Err(error) = deliver_everywhere(sinks, batch).await {
            // Nothing is committed: the reservation drops, the claims are released,
            // and the client's retry is free to succeed.
            if let (Some(shared), Some(claim)) = (&dedup.shared, &claim) {
                shared.release(claim).await;
            }
            return Err(error.into());
        }
    }
    if let (Some(shared), Some(claim)) = (&dedup.shared, claim) {
        if let Err(error) = shared.commit(claim).await {
            // The events are durable; only the shared memory of them is missing. Their
            // claims expire after pending_ttl_ms, after which a repeat is delivered again.
            tracing::warn!(%error, "delivered, but could not mark ids seen in redis");
        }
    }
    reservation.commit();
    Ok(Ingested {
        accepted,
        duplicates: total - accepted,
    })
}

/// Sends the batch to every sink at once; succeeds only if all of them did.
async fn deliver_everywhere(sinks: &[NamedSink], batch: Arc<SinkBatch>) -> Result<(), SinkError> {
    let events = batch.events.len() as u64;
    let deliveries = sinks.iter().map(|sink| {
        let batch = batch.clone();
        async move {
            let started = Instant::now();
            let result = sink.service.clone().oneshot(batch).await;
            metrics::histogram!(metric::SINK_DELIVERY_DURATION, "sink" => sink.name)
                .record(started.elapsed().as_secs_f64());
            result
        }
    });
    let mut first_error = None;
    for (sink, result) in sinks.iter().zip(join_all(deliveries).await) {
        match result {
            Ok(()) => metrics::counter!(metric::SINK_EVENTS_SENT, "sink" => sink.name).increment(events),
            Err(error) => {
                // Sinks log their own health transitions; per request this is detail.
                tracing::debug!(sink = sink.name, %error, events, "delivery failed");
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
