//! One request's batch to every sink at once: room held in every spool first, then
//! each sink's copy delivered through its stack, or else spooled (retryable
//! failure, open breaker, timeout), or dead-lettered (rejected for good). A local
//! write (spool or dead letters) that outlives the route's deadline fails the
//! request and goes on by itself, its outcome decided later (`unsettled.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;

use super::budget::BudgetHold;
use super::route::{dead_letter, SinkRoute};
use super::PipelineError;
use crate::config::Acknowledge;
use crate::event::SinkBatch;
use crate::spool::{Spool, SpoolError, SpoolRoom};
use crate::telemetry::metric;

/// Where one sink's copy of a request ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Made durable for this sink by an earlier, failed request (`unsettled.rs`).
    AlreadyDurable,
    Delivered,
    Spooled,
    DeadLettered,
}

/// Makes the batch durable for every sink at once: spooled for a sink acknowledged
/// on spool; otherwise delivered through the sink's stack, or else in that sink's
/// spool, or in the dead-letter table. A full spool is found before any sink is
/// called (room is held in every spool up front), and so is an earlier copy of
/// these events still being written; after that, it fails only if a spool write
/// itself fails or outlives its deadline. `held` is the request's room in the
/// memory budget.
pub(super) async fn deliver_everywhere(
    routes: &[SinkRoute],
    spool: &Arc<Spool>,
    batch: Arc<SinkBatch>,
    held: &Arc<BudgetHold>,
) -> Result<(), PipelineError> {
    if let Some(route) = routes.iter().find(|route| route.unsettled.undecided_in(&batch)) {
        return Err(PipelineError::Undecided(route.kind));
    }
    // Room in every spool first: if one is full, no sink sees the batch, so the
    // client's retry cannot make a second copy where the first one landed.
    let mut rooms = Vec::with_capacity(routes.len());
    for route in routes {
        rooms.push(route.queue.reserve(&batch).map_err(PipelineError::SpoolFull)?);
    }
    let deliveries = routes
        .iter()
        .zip(rooms)
        .map(|(route, room)| deliver_one(route, spool, room, batch.clone(), held));
    let events = batch.events.len() as u64;
    let mut first_error = None;
    for (route, outcome) in routes.iter().zip(join_all(deliveries).await) {
        match outcome {
            Ok(Outcome::Delivered) => {
                metrics::counter!(metric::SINK_EVENTS_SENT, "sink" => route.kind.name()).increment(events)
            }
            Ok(Outcome::AlreadyDurable | Outcome::Spooled | Outcome::DeadLettered) => {}
            Err(error) => {
                tracing::debug!(sink = route.kind.name(), %error, events, "not durable for this sink");
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One sink's copy: straight to its spool when acknowledged on spool (the replayer
/// delivers it from there), else through its stack with the spool and the
/// dead-letter table behind.
async fn deliver_one(
    route: &SinkRoute,
    spool: &Arc<Spool>,
    room: SpoolRoom<'_>,
    batch: Arc<SinkBatch>,
    held: &Arc<BudgetHold>,
) -> Result<Outcome, PipelineError> {
    // The resend of a failed request: what this route made durable then is left out.
    let Some(copy) = route.unsettled.copy_for(route.kind, &batch) else {
        return Ok(Outcome::AlreadyDurable);
    };
    let outcome = deliver_copy(route, spool, room, copy, held).await?;
    route.unsettled.watch(route.kind, &batch);
    Ok(outcome)
}

/// One sink's copy, delivered, spooled or dead-lettered.
async fn deliver_copy(
    route: &SinkRoute,
    spool: &Arc<Spool>,
    room: SpoolRoom<'_>,
    batch: Arc<SinkBatch>,
    held: &Arc<BudgetHold>,
) -> Result<Outcome, PipelineError> {
    if route.acknowledge == Acknowledge::OnSpool {
        let append = route.queue.append_into(room, batch.clone());
        return write_locally(route, batch, append, held, Outcome::Spooled).await;
    }
    let started = Instant::now();
    let result = route.sink.call(batch.clone()).await;
    metrics::histogram!(metric::SINK_DELIVERY_DURATION, "sink" => route.kind.name())
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => Ok(Outcome::Delivered),
        Err(error) if error.is_retryable() => {
            tracing::debug!(sink = route.kind.name(), %error, events = batch.events.len(), "sink unavailable: spooling");
            let append = route.queue.append_into(room, batch.clone());
            write_locally(route, batch, append, held, Outcome::Spooled).await
        }
        Err(error) => {
            let letter = dead_letter(spool, route.kind, &error, batch.clone());
            write_locally(route, batch, letter, held, Outcome::DeadLettered).await
        }
    }
}

/// Waits for the copy's local write (spool append or dead letter) up to the route's
/// deadline. Past it the request fails (503), and the write, which cannot be called
/// back once queued, goes on: the route decides its outcome later, keeping the
/// request's budget until then (`UnsettledCopies::decide_later`).
async fn write_locally<W>(
    route: &SinkRoute,
    copy: Arc<SinkBatch>,
    write: W,
    held: &Arc<BudgetHold>,
    written: Outcome,
) -> Result<Outcome, PipelineError>
where
    W: Future<Output = Result<(), SpoolError>> + Send + 'static,
{
    let mut write = Box::pin(write);
    match tokio::time::timeout(route.local_write_deadline, &mut write).await {
        Ok(result) => result.map(|()| written).map_err(PipelineError::Spool),
        Err(_) => {
            metrics::counter!(metric::SPOOL_WRITES_PAST_DEADLINE, "sink" => route.kind.name()).increment(1);
            route.unsettled.decide_later(route.kind, copy, write, held.clone());
            Err(PipelineError::SpoolSlow {
                sink: route.kind,
                waited: route.local_write_deadline,
            })
        }
    }
}
