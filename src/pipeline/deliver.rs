//! One request's batch to every sink at once: room held in every spool first, then
//! each sink's copy delivered through its stack, or else spooled (retryable
//! failure, open breaker, timeout), or dead-lettered (rejected for good).

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;

use super::route::{dead_letter, SinkRoute};
use super::PipelineError;
use crate::config::Acknowledge;
use crate::event::SinkBatch;
use crate::spool::{Spool, SpoolRoom};
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
/// called (room is held in every spool up front); after that, it fails only if a
/// spool write itself fails.
pub(super) async fn deliver_everywhere(
    routes: &[SinkRoute],
    spool: &Arc<Spool>,
    batch: Arc<SinkBatch>,
) -> Result<(), PipelineError> {
    // Room in every spool first: if one is full, no sink sees the batch, so the
    // client's retry cannot make a second copy where the first one landed.
    let mut rooms = Vec::with_capacity(routes.len());
    for route in routes {
        rooms.push(route.queue.reserve(&batch).map_err(PipelineError::SpoolFull)?);
    }
    let deliveries = routes
        .iter()
        .zip(rooms)
        .map(|(route, room)| deliver_one(route, spool, room, batch.clone()));
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
) -> Result<Outcome, PipelineError> {
    // The resend of a failed request: what this route made durable then is left out.
    let Some(copy) = route.unsettled.copy_for(route.kind, &batch) else {
        return Ok(Outcome::AlreadyDurable);
    };
    let outcome = deliver_copy(route, spool, room, copy).await?;
    route.unsettled.watch(route.kind, &batch);
    Ok(outcome)
}

/// One sink's copy, delivered, spooled or dead-lettered.
async fn deliver_copy(
    route: &SinkRoute,
    spool: &Arc<Spool>,
    room: SpoolRoom<'_>,
    batch: Arc<SinkBatch>,
) -> Result<Outcome, PipelineError> {
    if route.acknowledge == Acknowledge::OnSpool {
        return spool_into(route, room, batch).await;
    }
    let started = Instant::now();
    let result = route.sink.call(batch.clone()).await;
    metrics::histogram!(metric::SINK_DELIVERY_DURATION, "sink" => route.kind.name())
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => Ok(Outcome::Delivered),
        Err(error) if error.is_retryable() => {
            tracing::debug!(sink = route.kind.name(), %error, events = batch.events.len(), "sink unavailable: spooling");
            spool_into(route, room, batch).await
        }
        Err(error) => dead_letter(spool, route.kind, &error, batch)
            .await
            .map(|()| Outcome::DeadLettered)
            .map_err(PipelineError::Spool),
    }
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
