//! Group commit: requests queue their batches; one task takes what is queued (up to
//! an event count and a byte size, waiting at most `linger` after the oldest
//! arrived), makes it durable with one `flush`, and answers every request with the
//! same result. One flush runs at a time; requests arriving meanwhile form the next
//! group, so the group grows with load on its own. Used by the file and ClickHouse
//! sinks and by the spool's append writer, each with its own error type.
//!
//! Invariant: generic machinery: imports only `event`; knows no sink and no spool.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::event::SinkBatch;

/// Bounds of one group.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// How long the oldest queued batch may wait for company. Zero: flush what is
    /// queued right away.
    pub linger: Duration,
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
    pub fn start<F, Fut>(
        name: &'static str,
        limits: watch::Receiver<BatchLimits>,
        mut flush: F,
    ) -> (Batcher<E>, tokio::task::JoinHandle<()>)
    where
        F: FnMut(Vec<Arc<SinkBatch>>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
    {
        let (queue, mut receiver) = mpsc::channel::<Queued<E>>(QUEUE_BATCHES);
        let task = tokio::spawn(async move {
            let mut carried: Option<Queued<E>> = None;
            loop {
                let current = *limits.borrow();
                let Some(group) = next_group(&mut receiver, &mut carried, current).await else {
                    break;
                };
                let (batches, answers): (Vec<_>, Vec<_>) = group.into_iter().map(|q| (q.batch, q.done)).unzip();
                let result = flush(batches).await;
                for answer in answers {
                    // The requester may have gone; the outcome stands all the same.
                    let _ = answer.send(result.clone());
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
