//! The one path from JSON bytes to durable events, the same for every transport:
//! parse, find the source (pre-authenticated, or by the body's `writeKey`), admit
//! it past its rate limit, validate and normalize each event on its own, keep the
//! refusals, and hand the rest to the pipeline.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::browser::Client;
use super::error::{IntakeError, RejectedEvent};
use super::rejected_store::RejectedRecord;
use super::segment::{self, ParsedRequest, ReceivedEvent, Refused, RequestContext};
use super::{IntakeState, RouteKind};
use crate::event::{format_timestamp, NormalizedEvent};
use crate::pipeline::budget::BudgetHold;
use crate::pipeline::PipelineError;
use crate::spool::SpoolError;
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// The 200 body. Segment clients need only the status; `rejected` lists the batch
/// items refused on their own, `duplicates` how many were already seen.
#[derive(Debug, Serialize)]
pub(crate) struct Accepted {
    pub success: bool,
    #[serde(skip_serializing_if = "is_zero")]
    pub duplicates: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedEvent>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A request's outcome with the ids of its accepted events (for WebSocket acks).
pub(crate) struct IngestedRequest {
    pub accepted: Accepted,
    pub message_ids: Vec<String>,
}

/// Every event of a request after validation: the good ones, and each refusal as
/// the client is told of it and as the rejected store keeps it.
struct Normalized {
    events: Vec<NormalizedEvent>,
    rejected: Vec<RejectedEvent>,
    records: Vec<RejectedRecord>,
}

pub(crate) async fn ingest_json(
    app: &IntakeState,
    kind: RouteKind,
    json: &[u8],
    authenticated: Option<Arc<str>>,
    client: &Client,
    transport: &'static str,
    held: BudgetHold,
) -> Result<IngestedRequest, IntakeError> {
    let received_at = Utc::now();
    let (parsed, route_type) = match kind {
        RouteKind::Single(event_type) => (segment::parse_single(json, &app.limits)?, Some(event_type)),
        RouteKind::Event => (segment::parse_single(json, &app.limits)?, None),
        RouteKind::Batch => (segment::parse_batch(json, &app.limits)?, None),
    };
    let source = match authenticated {
        Some(source) => source,
        None => app.write_keys.authenticate(parsed.write_key.as_deref())?,
    };
    app.browser.check_origin(&source, client)?;
    admit(app, &source, parsed.events.len())?;
    let ParsedRequest {
        events: items,
        sent_at,
        context,
        ..
    } = parsed;
    let client_fields = app.browser.client_fields(&source, client);
    let request = RequestContext {
        route_type,
        sent_at,
        context: context.as_ref(),
        received_at,
        source: &source,
        client_fields: &client_fields,
    };
    let Normalized {
        events,
        mut rejected,
        records,
    } = normalize_all(items, &request, received_at);
    count_events(&source, transport, "rejected", rejected.len());
    app.rejected_store.record(records).await;
    if events.is_empty() {
        return Err(match kind {
            RouteKind::Single(_) | RouteKind::Event => IntakeError::InvalidEvent(rejected.swap_remove(0).reason),
            RouteKind::Batch => IntakeError::InvalidBatch(rejected),
        });
    }

    let message_ids: Vec<String> = events.iter().map(|e| e.message_id.clone()).collect();
    let ingested = app
        .pipeline
        .ingest(source.clone(), events, held)
        .await
        .map_err(refusal_for)?;
    count_events(&source, transport, "accepted", ingested.accepted);
    count_events(&source, transport, "duplicate", ingested.duplicates);
    Ok(IngestedRequest {
        accepted: Accepted {
            success: true,
            duplicates: ingested.duplicates,
            rejected,
        },
        message_ids,
    })
}

/// The source's rate limit: refused with 429 past it, before any backend work.
fn admit(app: &IntakeState, source: &Arc<str>, events: usize) -> Result<(), IntakeError> {
    let Err(over) = app.source_rate_limits.admit(source, events) else {
        return Ok(());
    };
    metrics::counter!(metric::REQUESTS_RATE_LIMITED, "source" => source.to_string()).increment(1);
    Err(IntakeError::RateLimited {
        source_name: source.to_string(),
        per_second: over.rate.per_second as u64,
        retry_after_seconds: over.retry_after.as_secs_f64().ceil().max(1.0) as u64,
    })
}

/// Validates and normalizes each event on its own, so one bad event never sinks
/// the others.
fn normalize_all(
    items: Vec<Result<ReceivedEvent<'_>, Refused>>,
    request: &RequestContext<'_>,
    received_at: DateTime<Utc>,
) -> Normalized {
    let mut normalized = Normalized {
        events: Vec::with_capacity(items.len()),
        rejected: Vec::new(),
        records: Vec::new(),
    };
    for (index, item) in items.into_iter().enumerate() {
        match item.and_then(|event| segment::normalize(event, request)) {
            Ok(event) => normalized.events.push(event),
            Err(refused) => {
                metrics::counter!(metric::EVENTS_REJECTED, "source" => request.source.to_string(), "reason" => refused.reason.code)
                    .increment(1);
                normalized.rejected.push(RejectedEvent {
                    index,
                    reason: refused.reason.clone(),
                });
                normalized.records.push(RejectedRecord {
                    rejected_at: format_timestamp(received_at),
                    source: request.source.to_string(),
                    index,
                    reason: refused.reason,
                    event: refused.event,
                });
            }
        }
    }
    normalized
}

/// What the client is told when the pipeline could not make the events durable
/// (each cause logged at most once per interval).
fn refusal_for(error: PipelineError) -> IntakeError {
    match error {
        PipelineError::InFlightElsewhere(_) | PipelineError::InFlightHere(_) | PipelineError::Undecided(_) => {
            IntakeError::InFlightElsewhere
        }
        PipelineError::SpoolSlow { sink, waited } => {
            static SLOW: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = SLOW.allow() {
                tracing::warn!(
                    sink = sink.name(),
                    ?waited,
                    suppressed_since_last = suppressed,
                    "spool write past its deadline (slow disk?): refusing the request; the write goes on"
                );
            }
            IntakeError::SpoolSlow
        }
        PipelineError::SpoolFull(full) => {
            static FULL: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = FULL.allow() {
                tracing::warn!(%full, suppressed_since_last = suppressed, "spool full: refusing requests");
            }
            IntakeError::SpoolFull
        }
        PipelineError::Spool(full @ SpoolError::DeadLettersFull { .. }) => {
            static FULL: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = FULL.allow() {
                tracing::error!(%full, suppressed_since_last = suppressed, "dead-letter store full: refusing requests a sink rejects");
            }
            IntakeError::DeadLettersFull
        }
        PipelineError::Spool(error) => {
            static UNWRITABLE: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = UNWRITABLE.allow() {
                tracing::warn!(%error, suppressed_since_last = suppressed, "spool cannot write: refusing requests");
            }
            IntakeError::SpoolUnavailable
        }
        error => {
            static NOT_DURABLE: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = NOT_DURABLE.allow() {
                tracing::warn!(%error, suppressed_since_last = suppressed, "events not made durable");
            }
            IntakeError::SinkUnavailable
        }
    }
}

fn count_events(source: &str, transport: &'static str, outcome: &'static str, count: usize) {
    if count > 0 {
        metrics::counter!(metric::EVENTS, "source" => source.to_string(), "transport" => transport, "outcome" => outcome)
            .increment(count as u64);
    }
}
