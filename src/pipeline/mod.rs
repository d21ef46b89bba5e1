//! From validated events to durable ones: dedup (in-process, then Redis when
//! configured), one batch per request to every sink at once through its resilience
//! stack, the sink's spool when the sink cannot take it now (or straight to the
//! spool for a sink acknowledged on spool), the dead-letter table when it never
//! will, then the dedup commit. Calls `dedup`, `resilience`, `spool`;
//! knows nothing of HTTP. Work runs on its own task, so a client hanging up cannot
//! interrupt it between "durable" and "seen".

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_util::task::TaskTracker;

use crate::config::Acknowledge;
use crate::dedup::redis::{ClaimOutcome, RedisDedup, RedisDedupError};
use crate::dedup::{DedupKey, LocalDedup, Verdict};
use crate::intake::segment::NormalizedEvent;
use crate::resilience::ResilientSink;
use crate::sinks::{DependencyHealth, SinkBatch, SinkError};
use crate::spool::{SinkQueue, Spool, SpoolError, SpoolRoom};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

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
    #[error(transparent)]
    SpoolFull(SpoolError),
    #[error(transparent)]
    Spool(SpoolError),
    #[error("pipeline task failed: {0}")]
    TaskFailed(String),
}

/// Dedup stages shared by every request.
struct Dedup {
    local: Arc<LocalDedup>,
    shared: Option<Arc<RedisDedup>>,
}

/// One sink as the pipeline uses it: its resilience stack, its spool queue, and the
/// health of the sink itself (behind the stack).
#[derive(Clone)]
pub struct SinkRoute {
    pub sink: ResilientSink,
    /// Whether a request waits for the sink or only for the sink's spool.
    pub acknowledge: Acknowledge,
    pub queue: Arc<SinkQueue>,
    pub health: Arc<DependencyHealth>,
}

/// Where one sink's copy of a request ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Spooled,
    DeadLettered,
}

pub struct Pipeline {
    dedup: Arc<Dedup>,
    routes: Vec<SinkRoute>,
    spool: Arc<Spool>,
    tasks: TaskTracker,
}

impl Pipeline {
    pub fn new(
        local: Arc<LocalDedup>,
        shared: Option<Arc<RedisDedup>>,
        routes: Vec<SinkRoute>,
        spool: Arc<Spool>,
    ) -> Self {
        Self {
            dedup: Arc::new(Dedup { local, shared }),
            routes,
            spool,
            tasks: TaskTracker::new(),
        }
    }

    pub fn routes(&self) -> &[SinkRoute] {
        &self.routes
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// Makes the events durable in every sink, or fails leaving nothing marked seen.
    pub async fn ingest(&self, source: Arc<str>, events: Vec<NormalizedEvent>) -> Result<Ingested, PipelineError> {
        let dedup = self.dedup.clone();
        let routes = self.routes.clone();
        let spool = self.spool.clone();
        let task = self
            .tasks
            .spawn(async move { ingest_to_completion(&dedup, &routes, &spool, source, events).await });
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
    routes: &[SinkRoute],
    spool: &Arc<Spool>,
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
                    static FAIL_OPEN: Throttle = Throttle::new(WARN_EVERY);
                    if let Some(suppressed) = FAIL_OPEN.allow() {
                        tracing::warn!(%error, suppressed_since_last = suppressed, "shared dedup unavailable: delivering with local dedup only");
                    }
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
        if let Err(error) = deliver_everywhere(routes, spool, batch).await {
            // Nothing is committed: the reservation drops, the claims are released,
            // and the client's retry is free to succeed.
            if let (Some(shared), Some(claim)) = (&dedup.shared, &claim) {
                shared.release(claim).await;
            }
            return Err(error);
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

/// Makes the batch durable for every sink at once: spooled for a sink acknowledged
/// on spool; otherwise delivered through the sink's
/// stack, or else in that sink's spool (retryable failure, open breaker, timeout),
/// or in the dead-letter table (the sink rejected the data for good). A full spool
/// is found before any sink is called (room is held in every spool up front); after
/// that, it fails only if a spool write itself fails.
async fn deliver_everywhere(
    routes: &[SinkRoute],
    spool: &Arc<Spool>,
    batch: Arc<SinkBatch>,
) -> Result<(), PipelineError> {
    let events = batch.events.len() as u64;
    // Room in every spool first: if one is full, no sink sees the batch, so the
    // client's retry cannot make a second copy where the first one landed.
    let mut rooms = Vec::with_capacity(routes.len());
    for route in routes {
        rooms.push(route.queue.reserve(&batch).map_err(PipelineError::SpoolFull)?);
    }
    let deliveries = routes.iter().zip(rooms).map(|(route, room)| {
        let batch = batch.clone();
        async move {
            if route.acknowledge == Acknowledge::OnSpool {
                // The replayer delivers it from there, behind the ack.
                return spool_into(route, room, batch).await;
            }
            let started = Instant::now();
            let result = route.sink.call(batch.clone()).await;
            metrics::histogram!(metric::SINK_DELIVERY_DURATION, "sink" => route.sink.name)
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => Ok(Outcome::Delivered),
                Err(error) if error.is_retryable() => {
                    tracing::debug!(sink = route.sink.name, %error, events, "sink unavailable: spooling");
                    spool_into(route, room, batch).await
                }
                Err(error) => {
                    static REJECTED: Throttle = Throttle::new(WARN_EVERY);
                    if let Some(suppressed) = REJECTED.allow() {
                        tracing::warn!(sink = route.sink.name, %error, events, suppressed_since_last = suppressed, "sink rejected the batch: dead-lettering");
                    }
                    let spool = spool.clone();
                    let name = route.sink.name;
                    let message = error.to_string();
                    tokio::task::spawn_blocking(move || spool.add_dead_letter(name, &message, &batch))
                        .await
                        .map_err(|e| PipelineError::TaskFailed(e.to_string()))?
                        .map(|()| Outcome::DeadLettered)
                        .map_err(PipelineError::Spool)
                }
            }
        }
    });
    let mut first_error = None;
    for (route, outcome) in routes.iter().zip(join_all(deliveries).await) {
        match outcome {
            Ok(Outcome::Delivered) => {
                metrics::counter!(metric::SINK_EVENTS_SENT, "sink" => route.sink.name).increment(events)
            }
            Ok(Outcome::Spooled | Outcome::DeadLettered) => {}
            Err(error) => {
                tracing::debug!(sink = route.sink.name, %error, events, "not durable for this sink");
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The sink's copy into its spool, in the room held for it.
async fn spool_into(route: &SinkRoute, room: SpoolRoom<'_>, batch: Arc<SinkBatch>) -> Result<Outcome, PipelineError> {
    route
        .queue
        .append_into(room, batch)
        .await
        .map(|()| Outcome::Spooled)
        .map_err(PipelineError::Spool)
}
