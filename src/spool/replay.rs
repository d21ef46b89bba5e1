//! The replayer: one task per sink drains that sink's spool, oldest first, through
//! the sink's own resilience stack. While the breaker is not closed it sends one
//! record at a time (refused at no cost while open; the half-open probe once the
//! open time is over: the breaker only moves on when a call arrives), then paces
//! itself to the policy's
//! `replay_events_per_second`, so a recovering backend is not stampeded and live
//! traffic keeps its share. Records are deleted only after the sink acknowledged
//! them; a record the sink rejects for good moves to the dead-letter table.
//!
//! For a sink acknowledged on spool the spool is the normal path, not a detour: the
//! replayer then runs unpaced (one round at a time, each as large as what waited,
//! up to `replay_batch_events`), and does not log every drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::watch;
use tower_resilience::circuitbreaker::CircuitState;

use super::{SinkQueue, Spool, StoredBatch};
use crate::config::Acknowledge;
use crate::policy::{LoadedPolicy, SpoolPolicy};
use crate::resilience::ResilientSink;
use crate::telemetry::metric;

/// How long the replayer waits before looking again at an open breaker or an
/// empty queue.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// How the replayer paces its rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Catching up after an outage: to the policy's `replay_events_per_second`.
    Policy,
    /// Delivering behind an ack on spool: as fast as the sink takes the rounds.
    Unpaced,
}

impl Pace {
    pub fn of(acknowledge: Acknowledge) -> Pace {
        match acknowledge {
            Acknowledge::OnDelivery => Pace::Policy,
            Acknowledge::OnSpool => Pace::Unpaced,
        }
    }
}

/// Runs until the process ends.
pub async fn run(
    spool: Arc<Spool>,
    queue: Arc<SinkQueue>,
    sink: ResilientSink,
    policy: watch::Receiver<Arc<LoadedPolicy>>,
    pace: Pace,
) {
    let name = queue.sink;
    // Start and end of a drain are news only when the spool is a detour.
    let log_drains = pace == Pace::Policy;
    let mut draining = false;
    loop {
        // After an I/O error: recount once the file is back, and retry deleting what
        // was delivered (errors are logged by the spool).
        if queue.needs_upkeep() {
            let upkeep_queue = queue.clone();
            let _ = tokio::task::spawn_blocking(move || upkeep_queue.upkeep()).await;
        }
        if queue.events() == 0 {
            if draining && log_drains {
                tracing::info!(sink = name, "spool drained: replay finished");
                draining = false;
            }
            tokio::select! {
                () = queue.appended.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let state = sink.breaker();
        let settings: SpoolPolicy = crate::server::sink_policy(&policy.borrow().policy, name).spool.clone();
        // Not closed: one record, as a probe; closed: a full round.
        let max_records = if state == CircuitState::Closed { usize::MAX } else { 1 };
        let read_queue = queue.clone();
        let records = match tokio::task::spawn_blocking(move || {
            read_queue.read_oldest(settings.replay_batch_events, max_records)
        })
        .await
        {
            Ok(Ok(records)) if !records.is_empty() => records,
            Ok(Ok(_)) => {
                tokio::time::sleep(IDLE_CHECK).await;
                continue;
            }
            Ok(Err(error)) => {
                tracing::error!(sink = name, %error, "cannot read the spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(error) => {
                tracing::error!(sink = name, %error, "spool read task failed");
                continue;
            }
        };
        if !draining && log_drains {
            tracing::info!(sink = name, events = queue.events(), "replay started");
            draining = true;
        }
        let started = Instant::now();
        let events: usize = records.iter().map(|r| r.batch.events.len()).sum();
        let outcomes = join_all(records.iter().map(|record| sink.call(record.batch.clone()))).await;
        let mut done: Vec<&StoredBatch> = Vec::new();
        let mut failed = false;
        for (record, outcome) in records.iter().zip(outcomes) {
            match outcome {
                Ok(()) => done.push(record),
                Err(error) if !error.is_retryable() => {
                    let kept = {
                        let spool = spool.clone();
                        let batch = record.batch.clone();
                        let message = error.to_string();
                        tokio::task::spawn_blocking(move || spool.add_dead_letter(name, &message, &batch)).await
                    };
                    match kept {
                        Ok(Ok(())) => {
                            tracing::warn!(sink = name, %error, events = record.batch.events.len(), "replayed batch rejected: moved to dead letters");
                            done.push(record);
                        }
                        _ => failed = true,
                    }
                }
                Err(_) => failed = true,
            }
        }
        let delivered: u64 = done.iter().map(|r| r.batch.events.len() as u64).sum();
        if !done.is_empty() {
            let remove_queue = queue.clone();
            let keys: Vec<(u64, u64, usize)> = done
                .iter()
                .map(|r| (r.key, r.stored_bytes, r.batch.events.len()))
                .collect();
            let removed = tokio::task::spawn_blocking(move || remove_queue.remove_keys(&keys)).await;
            if !matches!(removed, Ok(Ok(()))) {
                // The queue keeps them out of replay and deletes them later.
                tracing::error!(sink = name, "could not delete replayed records yet");
            }
            metrics::counter!(metric::SPOOL_REPLAYED_EVENTS, "sink" => name).increment(delivered);
        }
        if failed {
            // The breaker sees the failures and opens; wait for it rather than spin.
            tokio::time::sleep(IDLE_CHECK).await;
            continue;
        }
        if pace == Pace::Unpaced {
            continue;
        }
        // Pace: this round may take at most events / rate seconds.
        let budget = Duration::from_secs_f64(events as f64 / settings.replay_events_per_second.max(1) as f64);
        if let Some(rest) = budget.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}
