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
//! replayer then runs unpaced: one round at a time, each waiting up to the sink's
//! batch `linger_ms` for `replay_batch_events` to queue; no drain is logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tower_resilience::circuitbreaker::CircuitState;

use super::budget::MemoryBudget;
use super::route::{dead_letter, SinkRoute};
use crate::config::Acknowledge;
use crate::event::{NormalizedEvent, RequestEnd, SinkBatch, SinkKind};
use crate::policy::{LoadedPolicy, SpoolPolicy};
use crate::sinks::ResilientSink;
use crate::spool::{RecordKey, SinkQueue, Spool, StoredBatch};
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

/// One sink call of a replay round: consecutive records of one source joined into
/// one batch of at most `max_events` events (a record is never split), so a round
/// is a few calls, not one per spooled request.
struct ReplayCall {
    records: Vec<RecordKey>,
    batch: Arc<SinkBatch>,
}

fn join_records(records: Vec<StoredBatch>, max_events: usize) -> Vec<ReplayCall> {
    let mut calls = Vec::new();
    let mut keys: Vec<RecordKey> = Vec::new();
    let mut events: Vec<NormalizedEvent> = Vec::new();
    let mut source: Option<Arc<str>> = None;
    for record in records {
        let count = record.batch.events.len();
        let same_source = source.as_ref() == Some(&record.batch.source);
        if !keys.is_empty() && (!same_source || events.len() + count > max_events) {
            calls.push(ReplayCall {
                records: std::mem::take(&mut keys),
                batch: Arc::new(SinkBatch::new(
                    source.take().expect("a source with every record"),
                    std::mem::take(&mut events),
                )),
            });
        }
        keys.push(record.record_key());
        // The round owns what it read: the events move, they are not copied.
        let (record_source, record_events) = Arc::try_unwrap(record.batch)
            .map(SinkBatch::into_parts)
            .unwrap_or_else(|shared| (shared.source.clone(), shared.events.clone()));
        source.get_or_insert(record_source);
        events.extend(record_events);
    }
    if let Some(source) = source {
        calls.push(ReplayCall {
            records: keys,
            batch: Arc::new(SinkBatch::new(source, events)),
        });
    }
    calls
}

/// Behind an ack on spool: waits up to the sink's batch `linger` for a full round
/// to queue, so the sink gets fewer, larger writes (ClickHouse wants about one
/// INSERT a second, not hundreds).
async fn wait_for_a_full_round(queue: &SinkQueue, round_events: usize, linger: Duration) {
    let deadline = tokio::time::Instant::now() + linger;
    while queue.events() < round_events as u64 {
        if tokio::time::timeout_at(deadline, queue.appended.notified())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// What the policy in force says about one round.
struct RoundSettings {
    spool: SpoolPolicy,
    linger: Duration,
    max_call_events: usize,
}

/// One sink's replayer: drains that sink's spool queue through the sink's stack.
pub struct Replayer {
    spool: Arc<Spool>,
    queue: Arc<SinkQueue>,
    kind: SinkKind,
    sink: ResilientSink,
    /// Read anew every round, so policy edits apply at once.
    policy: watch::Receiver<Arc<LoadedPolicy>>,
    pace: Pace,
    /// Whether a drain is under way (its start and end are logged).
    draining: bool,
    /// Shutdown: the replayer stops before its next round, never in the middle of
    /// one (a round cut off after its sink took the batch would leave the record to
    /// be delivered again at the next start).
    stop: CancellationToken,
    /// Each round holds `ROUND_BYTES` of the memory budget while it runs.
    budget: MemoryBudget,
}

/// The most JSON one replay round reads into memory (it holds that much of the
/// memory budget, waiting for it when intake has it).
const ROUND_BYTES: usize = 16 * 1024 * 1024;

impl Replayer {
    pub fn new(
        spool: Arc<Spool>,
        route: &SinkRoute,
        policy: watch::Receiver<Arc<LoadedPolicy>>,
        budget: MemoryBudget,
        stop: CancellationToken,
    ) -> Replayer {
        Replayer {
            spool,
            budget,
            queue: route.queue.clone(),
            kind: route.kind,
            sink: route.sink.clone(),
            policy,
            pace: Pace::of(route.acknowledge),
            draining: false,
            stop,
        }
    }

    /// Runs until `stop` is cancelled, then returns between rounds.
    pub async fn run(mut self) {
        while !self.stop.is_cancelled() {
            self.upkeep_if_due().await;
            if self.queue.events() == 0 {
                self.wait_for_records().await;
                continue;
            }
            let state = self.sink.breaker();
            let settings = self.settings();
            if self.pace == Pace::Unpaced && state == CircuitState::Closed {
                let full_round =
                    wait_for_a_full_round(&self.queue, settings.spool.replay_batch_events, settings.linger);
                if self.stop.run_until_cancelled(full_round).await.is_none() {
                    return;
                }
            }
            // Not closed: one record, as a probe; closed: a full round.
            let max_records = if state == CircuitState::Closed { usize::MAX } else { 1 };
            let held = self.budget.hold(ROUND_BYTES as u64).await;
            let Some(records) = self.read_round(settings.spool.replay_batch_events, max_records).await else {
                continue;
            };
            self.note_drain_started();
            let started = Instant::now();
            let events: usize = records.iter().map(|r| r.batch.events.len()).sum();
            let delivered = self
                .deliver_round(join_records(records, settings.max_call_events))
                .await;
            drop(held);
            if !delivered {
                // The breaker sees the failures and opens; wait for it rather than spin.
                tokio::time::sleep(IDLE_CHECK).await;
                continue;
            }
            if self.pace == Pace::Policy {
                // This round may take at most events / rate seconds.
                let rate = settings.spool.replay_events_per_second.max(1) as f64;
                if let Some(rest) = Duration::from_secs_f64(events as f64 / rate).checked_sub(started.elapsed()) {
                    self.stop.run_until_cancelled(tokio::time::sleep(rest)).await;
                }
            }
        }
    }

    /// After an I/O error: recount once the file is back, and retry deleting what
    /// was delivered (errors are logged by the spool).
    async fn upkeep_if_due(&self) {
        if self.queue.needs_upkeep() {
            let queue = self.queue.clone();
            let _ = tokio::task::spawn_blocking(move || queue.upkeep()).await;
        }
    }

    /// The queue is empty: log the end of a drain, then wait for an append (or a
    /// second, to look again).
    async fn wait_for_records(&mut self) {
        // Start and end of a drain are news only when the spool is a detour.
        if self.draining && self.pace == Pace::Policy {
            tracing::info!(sink = self.kind.name(), "spool drained: replay finished");
        }
        self.draining = false;
        tokio::select! {
            () = self.queue.appended.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = self.stop.cancelled() => {}
        }
    }

    fn note_drain_started(&mut self) {
        if !self.draining && self.pace == Pace::Policy {
            tracing::info!(sink = self.kind.name(), events = self.queue.events(), "replay started");
        }
        self.draining = true;
    }

    fn settings(&self) -> RoundSettings {
        let current = self.policy.borrow();
        let sink_policy = current.policy.sink(self.kind);
        RoundSettings {
            spool: sink_policy.spool.clone(),
            linger: Duration::from_millis(sink_policy.batch.linger_ms),
            max_call_events: sink_policy.batch.max_events,
        }
    }

    /// The oldest records (on the blocking pool); `None` after waiting a little if
    /// there are none to read or the read failed.
    async fn read_round(&self, max_events: usize, max_records: usize) -> Option<Vec<StoredBatch>> {
        let queue = self.queue.clone();
        let name = self.kind.name();
        match tokio::task::spawn_blocking(move || queue.read_oldest_within(max_events, max_records, ROUND_BYTES)).await
        {
            Ok(Ok(records)) if !records.is_empty() => return Some(records),
            Ok(Ok(_)) => tokio::time::sleep(IDLE_CHECK).await,
            Ok(Err(error)) => {
                tracing::error!(sink = name, %error, "cannot read the spool");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => tracing::error!(sink = name, %error, "spool read task failed"),
        }
        None
    }

    /// Sends a round's calls at once; deletes the records the sink acknowledged (or
    /// that were dead-lettered). False if any call failed and should be retried.
    async fn deliver_round(&self, calls: Vec<ReplayCall>) -> bool {
        let outcomes = join_all(calls.iter().map(|call| self.sink.call(call.batch.clone()))).await;
        let mut done: Vec<RecordKey> = Vec::new();
        let mut failed = false;
        let mut settled_calls = Vec::new();
        for (call, outcome) in calls.iter().zip(outcomes) {
            let settled = match outcome {
                Ok(()) => true,
                Err(error) if !error.is_retryable() => dead_letter(&self.spool, self.kind, &error, call.batch.clone())
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if settled {
                done.extend_from_slice(&call.records);
                settled_calls.push(call);
            } else {
                failed = true;
            }
        }
        if self.remove(done).await {
            // Only now may a sink forget these batches were in flight: a crash
            // before the delete replays them, and the sink must still know. The
            // calls not settled end unsettled as they are dropped.
            for call in settled_calls {
                call.batch.end(RequestEnd::Settled);
            }
        }
        !failed
    }

    /// Deletes delivered records and counts them as replayed; false if the delete
    /// failed (the records may come back after a restart).
    async fn remove(&self, done: Vec<RecordKey>) -> bool {
        if done.is_empty() {
            return true;
        }
        let delivered: u64 = done.iter().map(|record| record.events as u64).sum();
        let queue = self.queue.clone();
        let removed = matches!(
            tokio::task::spawn_blocking(move || queue.remove_keys(&done)).await,
            Ok(Ok(()))
        );
        if !removed {
            // The queue keeps them out of replay and deletes them later.
            tracing::error!(sink = self.kind.name(), "could not delete replayed records yet");
        }
        metrics::counter!(metric::SPOOL_REPLAYED_EVENTS, "sink" => self.kind.name()).increment(delivered);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: u64, source: &str, events: usize) -> StoredBatch {
        StoredBatch {
            key,
            created_at_ms: 0,
            stored_bytes: 10 * key,
            batch: Arc::new(SinkBatch::new(
                Arc::from(source),
                (0..events)
                    .map(|i| NormalizedEvent::fixture(&format!("{key}-{i}"), b"{}"))
                    .collect(),
            )),
        }
    }

    fn shape(calls: &[ReplayCall]) -> Vec<(String, Vec<u64>, Vec<String>)> {
        calls
            .iter()
            .map(|call| {
                (
                    call.batch.source.to_string(),
                    call.records.iter().map(|record| record.key).collect(),
                    call.batch.events.iter().map(|e| e.message_id.clone()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn consecutive_records_of_one_source_are_joined_up_to_the_event_limit_in_order() {
        let records = vec![
            record(1, "a", 2),
            record(2, "a", 1),
            record(3, "b", 1),
            record(4, "a", 2),
            record(5, "a", 2),
        ];
        let calls = join_records(records, 4);
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shape(&calls),
            vec![
                ("a".into(), vec![1, 2], ids(&["1-0", "1-1", "2-0"])),
                ("b".into(), vec![3], ids(&["3-0"])),
                ("a".into(), vec![4, 5], ids(&["4-0", "4-1", "5-0", "5-1"])),
            ]
        );
        assert_eq!(
            calls[0].records,
            vec![
                RecordKey {
                    key: 1,
                    stored_bytes: 10,
                    events: 2
                },
                RecordKey {
                    key: 2,
                    stored_bytes: 20,
                    events: 1
                }
            ],
            "keys for removal"
        );
    }

    #[test]
    fn a_record_larger_than_the_limit_is_one_call_and_never_split() {
        let calls = join_records(vec![record(1, "a", 1), record(2, "a", 5), record(3, "a", 1)], 3);
        let keys: Vec<Vec<u64>> = calls
            .iter()
            .map(|c| c.records.iter().map(|record| record.key).collect())
            .collect();
        assert_eq!(keys, vec![vec![1], vec![2], vec![3]]);
        assert_eq!(calls[1].batch.events.len(), 5);
        assert!(join_records(Vec::new(), 3).is_empty());
    }
}
