//! Group commit: requests queue their batches; one task takes what is queued (up to
//! an event count and a byte size, waiting at most `linger` after the oldest
//! arrived), makes it durable with one `flush`, and answers every request with the
//! same result. One flush runs at a time; requests arriving meanwhile form the next
//! group, so the group grows with load on its own. A requester that gave up (its
//! attempt timed out) before its group was flushed is left out of it; one that
//! gave up while the flush ran has its events remembered, and the next copy of them
//! (the retry, or the replay of what it spooled) is not written again. Used by the file and ClickHouse
//! sinks and by the spool's append writer, each with its own error type.
//!
//! Invariant: generic machinery: imports only `event`; knows no sink and no spool.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::event::{EventKeySet, SinkBatch};

/// Bounds of one group.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// How long the oldest queued batch may wait for company. Zero: flush what is
    /// queued right away.
    pub linger: Duration,
}

/// What a flush made of its group: one result for every batch, or one per batch in
/// the group's order (a sink that found which of them the backend refused).
pub enum GroupOutcome<E> {
    Same(Result<(), E>),
    PerBatch(Vec<Result<(), E>>),
}

impl<E> From<Result<(), E>> for GroupOutcome<E> {
    fn from(result: Result<(), E>) -> Self {
        GroupOutcome::Same(result)
    }
}

impl<E: Clone> GroupOutcome<E> {
    /// The result for the group's `index`th batch.
    fn for_batch(&self, index: usize) -> Result<(), E> {
        match self {
            GroupOutcome::Same(result) => result.clone(),
            GroupOutcome::PerBatch(results) => results.get(index).cloned().unwrap_or(Ok(())),
        }
    }
}

/// The batcher's task has ended, so a batch could not be queued or answered. Each
/// user's error type says what that means for it (`From<BatcherStopped>`).
#[derive(Debug, Clone, Copy)]
pub struct BatcherStopped;

struct Queued<E> {
    batch: Arc<SinkBatch>,
    arrived: Instant,
    done: oneshot::Sender<Result<(), E>>,
}

impl<E> Queued<E> {
    fn events(&self) -> usize {
        self.batch.events.len()
    }
}

/// Handle to a running batcher; cheap to clone. The task ends when every handle is
/// dropped, after answering everything queued.
pub struct Batcher<E> {
    queue: mpsc::Sender<Queued<E>>,
}

impl<E> Clone for Batcher<E> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

/// Batches queued per batcher before submitters wait.
const QUEUE_BATCHES: usize = 4096;

impl<E> Batcher<E>
where
    E: Clone + Send + From<BatcherStopped> + 'static,
{
    /// Starts the batching task. `flush` receives each group in arrival order.
    /// `limits` may change while running (policy reload); each group reads them anew.
    pub fn start<F, Fut, O>(
        name: &'static str,
        limits: watch::Receiver<BatchLimits>,
        mut flush: F,
    ) -> (Batcher<E>, tokio::task::JoinHandle<()>)
    where
        F: FnMut(Vec<Arc<SinkBatch>>) -> Fut + Send + 'static,
        Fut: Future<Output = O> + Send,
        O: Into<GroupOutcome<E>>,
    {
        let (queue, mut receiver) = mpsc::channel::<Queued<E>>(QUEUE_BATCHES);
        let task = tokio::spawn(async move {
            let mut carried: Option<Queued<E>> = None;
            let written_late = WrittenLate::default();
            loop {
                let current = *limits.borrow();
                let Some(group) = next_group(&mut receiver, &mut carried, current).await else {
                    break;
                };
                let (to_write, answers): (Vec<_>, Vec<_>) = group
                    .into_iter()
                    .map(|queued| (written_late.left_out_of(&queued.batch), queued.done))
                    .unzip();
                let batches: Vec<Arc<SinkBatch>> = to_write.iter().flatten().cloned().collect();
                let outcome = if batches.is_empty() {
                    GroupOutcome::Same(Ok(()))
                } else {
                    flush(batches).await.into()
                };
                let mut flushed = 0;
                for (written, answer) in to_write.into_iter().zip(answers) {
                    let result = match &written {
                        Some(_) => {
                            flushed += 1;
                            outcome.for_batch(flushed - 1)
                        }
                        None => Ok(()),
                    };
                    // The requester may have gone (its attempt timed out while this
                    // flush ran): the outcome stands all the same, and what was
                    // written is remembered for its retry or its spooled copy.
                    let written_ok = result.is_ok();
                    if answer.send(result).is_err() && written_ok {
                        if let Some(written) = written {
                            written_late.remember(name, &written);
                        }
                    }
                }
            }
            tracing::debug!(batcher = name, "batcher stopped");
        });
        (Batcher { queue }, task)
    }

    /// Queues the batch and resolves with the result of the flush that carried it.
    pub async fn submit(&self, batch: Arc<SinkBatch>) -> Result<(), E> {
        let (done, answer) = oneshot::channel();
        let queued = Queued {
            batch,
            arrived: Instant::now(),
            done,
        };
        self.queue.send(queued).await.map_err(|_| E::from(BatcherStopped))?;
        answer.await.map_err(|_| E::from(BatcherStopped))?
    }
}

/// Events a flush wrote after their requester had gone (its attempt timed out while
/// the flush ran): the next copy of them, the retry or the replay of what the
/// requester spooled instead, is not written again. Bounded, and forgotten an hour
/// after the last was added, far beyond any retry or replay of a running server.
struct WrittenLate {
    events: EventKeySet,
}

const MAX_WRITTEN_LATE: usize = 100_000;
const WRITTEN_LATE_KEPT: Duration = Duration::from_secs(3600);

impl Default for WrittenLate {
    fn default() -> Self {
        WrittenLate {
            events: EventKeySet::bounded(MAX_WRITTEN_LATE).forgotten_after(WRITTEN_LATE_KEPT),
        }
    }
}

impl WrittenLate {
    /// The batch without the events written late (`None`: nothing left to write).
    fn left_out_of(&self, batch: &Arc<SinkBatch>) -> Option<Arc<SinkBatch>> {
        let (rest, left_out) = self.events.leave_out(batch);
        if left_out > 0 {
            tracing::info!(
                events = left_out,
                "written by an earlier flush after its caller had given up: not written again"
            );
        }
        rest
    }

    fn remember(&self, name: &'static str, batch: &SinkBatch) {
        let (_, dropped) = self.events.insert_batch(batch);
        tracing::warn!(
            batcher = name,
            events = batch.events.len(),
            left_out_by_the_bound = dropped,
            "a flush finished after its caller had given up (its attempt timed out); its events are left out of later copies"
        );
    }
}

/// The next group to flush: the carried-over batch or the next one to arrive, then
/// whatever joins it within the limits. `None` once every handle is gone.
async fn next_group<E>(
    receiver: &mut mpsc::Receiver<Queued<E>>,
    carried: &mut Option<Queued<E>>,
    limits: BatchLimits,
) -> Option<Vec<Queued<E>>> {
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => receiver.recv().await?,
        };
        let deadline = first.arrived + limits.linger;
        let mut events = first.events();
        let mut bytes = first.batch.json_bytes();
        let mut group = vec![first];
        while events < limits.max_events && bytes < limits.max_bytes {
            let next = match receiver.try_recv() {
                Ok(next) => next,
                Err(_) if limits.linger.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(deadline, receiver.recv()).await {
                    Ok(Some(next)) => next,
                    Ok(None) | Err(_) => break,
                },
            };
            let next_bytes = next.batch.json_bytes();
            if events + next.events() > limits.max_events || bytes + next_bytes > limits.max_bytes {
                // Too big to join: it starts the next group.
                *carried = Some(next);
                break;
            }
            events += next.events();
            bytes += next_bytes;
            group.push(next);
        }
        // A caller that gave up (its timeout fired) has already moved on, e.g. to
        // the spool: do not send its events behind its back.
        group.retain(|queued| !queued.done.is_closed());
        if !group.is_empty() {
            return Some(group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NormalizedEvent;
    use std::sync::Mutex;

    fn batch(events: usize) -> Arc<SinkBatch> {
        let event = NormalizedEvent::fixture("m", &[b'x'; 10]);
        Arc::new(SinkBatch::new(Arc::from("web"), vec![event; events]))
    }

    #[derive(Debug, Clone, PartialEq)]
    enum TestError {
        Down,
        Stopped,
    }

    impl From<BatcherStopped> for TestError {
        fn from(_: BatcherStopped) -> Self {
            TestError::Stopped
        }
    }

    fn recording_batcher(limits: BatchLimits) -> (Batcher<TestError>, Arc<Mutex<Vec<usize>>>) {
        let groups = Arc::new(Mutex::new(Vec::new()));
        let seen = groups.clone();
        let (batcher, _task) = Batcher::start("test", watch::channel(limits).1, move |group| {
            seen.lock().unwrap().push(group.iter().map(|b| b.events.len()).sum());
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(())
            }
        });
        (batcher, groups)
    }

    #[tokio::test]
    async fn concurrent_submissions_share_flushes_within_the_event_bound() {
        let limits = BatchLimits {
            max_events: 25,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(5),
        };
        let (batcher, groups) = recording_batcher(limits);
        let submissions: Vec<_> = (0..20)
            .map(|_| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.submit(batch(5)).await })
            })
            .collect();
        for submission in submissions {
            submission.await.unwrap().unwrap();
        }
        let groups = groups.lock().unwrap().clone();
        assert_eq!(groups.iter().sum::<usize>(), 100);
        assert!(groups.len() < 20, "flushes were shared: {groups:?}");
        assert!(groups.iter().all(|g| *g <= 25), "{groups:?}");
    }

    #[tokio::test]
    async fn a_failed_flush_fails_every_request_in_it() {
        let limits = BatchLimits {
            max_events: 100,
            max_bytes: 1 << 20,
            linger: Duration::from_millis(20),
        };
        let (batcher, _task) = Batcher::start("test", watch::channel(limits).1, |_| async { Err(TestError::Down) });
        let (a, b) = tokio::join!(batcher.submit(batch(1)), batcher.submit(batch(1)));
        assert_eq!((a, b), (Err(TestError::Down), Err(TestError::Down)));
        assert_ne!(TestError::Down, TestError::Stopped);
    }

    #[tokio::test]
    async fn an_oversized_batch_still_goes_through_alone() {
        let limits = BatchLimits {
            max_events: 3,
            max_bytes: 1 << 20,
            linger: Duration::ZERO,
        };
        let (batcher, groups) = recording_batcher(limits);
        batcher.submit(batch(10)).await.unwrap();
        assert_eq!(*groups.lock().unwrap(), [10]);
    }
}

#[cfg(test)]
mod late_tests {
    use super::*;
    use std::sync::Mutex;

    /// A flush slower than the caller's attempt: the caller gives up while it runs,
    /// and its retry (the same batch) and a later copy of the same events (its spooled
    /// copy, replayed) must not be written again (issue 19 e).
    #[tokio::test]
    async fn a_flush_that_outlived_its_caller_is_not_written_again_by_the_retry() {
        let limits = BatchLimits {
            max_events: 100,
            max_bytes: 1 << 20,
            linger: Duration::ZERO,
        };
        let written: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = written.clone();
        let (batcher, _task) = Batcher::<BatcherStopped>::start("test", watch::channel(limits).1, move |group| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                for batch in &group {
                    seen.lock()
                        .unwrap()
                        .extend(batch.events.iter().map(|e| e.message_id.clone()));
                }
                Ok(())
            }
        });
        let batch = Arc::new(SinkBatch::fixture("web", &["a", "b"]));
        let attempt = tokio::time::timeout(Duration::from_millis(50), batcher.submit(batch.clone())).await;
        assert!(attempt.is_err(), "the attempt timed out while its flush ran");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The retry of the same batch: answered, nothing written again.
        batcher.submit(batch.clone()).await.unwrap();
        // A copy with one more event (another request's): only that one is written.
        batcher
            .submit(Arc::new(SinkBatch::fixture("web", &["a", "c"])))
            .await
            .unwrap();
        assert_eq!(*written.lock().unwrap(), ["a", "b", "c"]);
    }
}
