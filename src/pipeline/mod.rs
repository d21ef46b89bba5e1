//! From validated events to durable ones: dedup (in-process, then Redis when
//! configured), one batch per request to every sink at once through its resilience
//! stack, the sink's spool when the sink cannot take it now (or straight to the
//! spool for a sink acknowledged on spool), the dead-letter table when it never
//! will, then the dedup commit. Work runs on its own task, so a client hanging up
//! cannot interrupt it between "durable" and "seen".
//!
//! `deliver.rs` is one batch to every sink, `route.rs` one sink's route and the one
//! dead-letter path, `unsettled.rs` a route's memory of copies made durable for
//! requests that then failed, `replay.rs` the spool's replayer, `assemble.rs` builds sinks,
//! spool and stacks from config and policy, and applies policy reloads to them.
//!
//! Invariant: knows nothing of HTTP; imports the stages (sinks, spool, dedup) and
//! what lies below them, never `intake`, `server` or `cli`.

pub mod assemble;
pub mod budget;
mod deliver;
pub mod replay;
pub mod route;
mod unsettled;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::dedup::redis::{Claim, ClaimOutcome, RedisDedup, RedisDedupError};
use crate::dedup::{DedupKey, LocalDedup, Verdict};
use crate::event::{NormalizedEvent, RequestEnd, SinkBatch, SinkKind};
use crate::sinks::SinkError;
use crate::spool::{Spool, SpoolError};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};
use budget::BudgetHold;
use deliver::deliver_everywhere;
pub use route::SinkRoute;

/// How long a request waits for another one here with the same ids before it is
/// refused (503, to be retried).
const LOCAL_DEDUP_WAIT: Duration = Duration::from_secs(30);

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
    #[error("another request with the same ids is still being delivered here (waited {0:?})")]
    InFlightHere(Duration),
    #[error("an earlier copy of some of these events is still being written to the {0} spool")]
    Undecided(SinkKind),
    #[error("the {sink} spool did not finish writing within {waited:?} (a slow or stalled disk); the write goes on")]
    SpoolSlow { sink: SinkKind, waited: Duration },
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
    /// `held` (the request's room in the memory budget) is kept until the task that
    /// carries the events ends, even when the client has gone.
    pub async fn ingest(
        &self,
        source: Arc<str>,
        events: Vec<NormalizedEvent>,
        held: BudgetHold,
    ) -> Result<Ingested, PipelineError> {
        let dedup = self.dedup.clone();
        let routes = self.routes.clone();
        let spool = self.spool.clone();
        let task = self.tasks.spawn(async move {
            // Shared with a local write that outlives the request (`deliver.rs`).
            let held = Arc::new(held);
            ingest_to_completion(&dedup, &routes, &spool, source, events, &held).await
        });
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
    held: &Arc<BudgetHold>,
) -> Result<Ingested, PipelineError> {
    let total = events.len();
    let keys: Vec<DedupKey> = events
        .iter()
        .map(|event| DedupKey::new(&source, &event.message_id))
        .collect();
    // In-process first: repeats within this instance never reach Redis. Waiting
    // for another request with the same ids holds this one's budget: bounded.
    let reservation = tokio::time::timeout(LOCAL_DEDUP_WAIT, dedup.local.reserve(&keys))
        .await
        .map_err(|_| PipelineError::InFlightHere(LOCAL_DEDUP_WAIT))?;
    let mut is_new: Vec<bool> = reservation.verdicts().iter().map(|v| *v == Verdict::New).collect();
    let claim = dedup.claim_shared(&source, &events, &mut is_new).await?;

    let new_events: Vec<NormalizedEvent> = events
        .into_iter()
        .zip(&is_new)
        .filter_map(|(event, new)| new.then_some(event))
        .collect();
    let accepted = new_events.len();
    let batch = Arc::new(SinkBatch::new(source.clone(), new_events));
    if accepted > 0 {
        if let Err(error) = deliver_everywhere(routes, spool, batch.clone(), held).await {
            // Nothing is committed: the reservation drops, the claims are released,
            // and the client's retry is free to succeed. The batch ends unsettled
            // first, so a sink that has it already knows before the retry comes.
            batch.end(RequestEnd::Unsettled);
            dedup.release_shared(claim.as_ref()).await;
            return Err(error);
        }
    }
    let marked_seen = dedup.commit_shared(claim).await;
    reservation.commit();
    if marked_seen {
        // A crash from here on leaves nothing in doubt: a resend is a duplicate.
        batch.end(RequestEnd::Settled);
    }
    Ok(Ingested {
        accepted,
        duplicates: total - accepted,
    })
}

impl Dedup {
    /// Claims in Redis (when configured) the ids still new after the local check,
    /// marking those another instance delivered as not new. Redis down: fails open.
    async fn claim_shared(
        &self,
        source: &str,
        events: &[NormalizedEvent],
        is_new: &mut [bool],
    ) -> Result<Option<Claim>, PipelineError> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let candidates: Vec<usize> = (0..events.len()).filter(|i| is_new[*i]).collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        let ids: Vec<&str> = candidates.iter().map(|i| events[*i].message_id.as_str()).collect();
        match shared.claim(source, &ids).await {
            Ok((outcomes, claimed)) => {
                for (index, outcome) in candidates.iter().zip(outcomes) {
                    if outcome == ClaimOutcome::Seen {
                        is_new[*index] = false;
                    }
                }
                Ok(Some(claimed))
            }
            Err(error @ RedisDedupError::HeldElsewhere(_)) => Err(PipelineError::InFlightElsewhere(error)),
            Err(error @ (RedisDedupError::Unavailable(_) | RedisDedupError::ClaimsExpired)) => {
                // Availability first: deliver with in-process dedup only. A repeat
                // that another instance already delivered may be written again;
                // ClickHouse collapses it (ReplacingMergeTree on messageId).
                metrics::counter!(metric::DEDUP_FAIL_OPEN).increment(1);
                static FAIL_OPEN: Throttle = Throttle::new(WARN_EVERY);
                if let Some(suppressed) = FAIL_OPEN.allow() {
                    tracing::warn!(%error, suppressed_since_last = suppressed, "shared dedup unavailable: delivering with local dedup only");
                }
                Ok(None)
            }
        }
    }

    /// Frees this request's Redis claims after a failure, so the retry is free.
    async fn release_shared(&self, claim: Option<&Claim>) {
        if let (Some(shared), Some(claim)) = (&self.shared, claim) {
            shared.release(claim).await;
        }
    }

    /// Marks this request's Redis claims delivered; false if that failed.
    async fn commit_shared(&self, claim: Option<Claim>) -> bool {
        let (Some(shared), Some(claim)) = (&self.shared, claim) else {
            return true;
        };
        match shared.commit(claim).await {
            Ok(()) => true,
            Err(error) => {
                // The events are durable; only the shared memory of them is missing.
                // Their claims expire after pending_ttl_ms; a repeat after that is
                // checked by the sinks that keep in-doubt marks (Kafka).
                tracing::warn!(%error, "delivered, but could not mark ids seen in redis");
                false
            }
        }
    }
}
