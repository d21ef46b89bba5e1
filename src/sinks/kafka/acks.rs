//! One batch's acknowledgements, gathered in one place. Every message of a batch
//! carries the same `Arc<BatchAcks>` as its delivery opaque; librdkafka's delivery
//! report (on the producer's polling thread) records the message's partition and
//! offset, or the first error, and the batch's waiter is woken once, when the last
//! message is in. (The alternative, a future and a channel per message, cost an
//! allocation, a wake-up and a poll per message.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::DeliveryResult;
use tokio::sync::Notify;

/// What the brokers answered for one batch's messages.
pub struct BatchAcks {
    /// Messages whose report is still to come, plus one until the batch has been
    /// handed over (so reports arriving during the hand-over cannot finish it early).
    pending: AtomicUsize,
    outcome: Mutex<AckOutcome>,
    all_in: Notify,
}

#[derive(Default)]
pub(super) struct AckOutcome {
    /// partition → the offset after the last message acknowledged there.
    pub(super) log_ends: Vec<(i32, i64)>,
    /// The first refusal reported, if any.
    pub(super) error: Option<KafkaError>,
}

impl BatchAcks {
    /// For a batch of `messages` about to be handed over.
    pub(super) fn new(messages: usize) -> BatchAcks {
        BatchAcks {
            pending: AtomicUsize::new(messages + 1),
            outcome: Mutex::new(AckOutcome::default()),
            all_in: Notify::new(),
        }
    }

    /// One message's delivery report.
    pub(super) fn record(&self, report: &DeliveryResult<'_>) {
        {
            let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
            match report {
                Ok(message) => {
                    let (partition, end) = (message.partition(), message.offset() + 1);
                    match outcome.log_ends.iter_mut().find(|(p, _)| *p == partition) {
                        Some((_, known)) => *known = (*known).max(end),
                        None => outcome.log_ends.push((partition, end)),
                    }
                }
                Err((error, _)) => {
                    outcome.error.get_or_insert_with(|| error.clone());
                }
            }
        }
        self.finish(1);
    }

    /// The hand-over is over; `not_handed_over` of the batch's messages never
    /// reached librdkafka (a send refused part-way) and will have no report.
    pub(super) fn handed_over(&self, not_handed_over: usize) {
        self.finish(not_handed_over + 1);
    }

    fn finish(&self, reports: usize) {
        if self.pending.fetch_sub(reports, Ordering::AcqRel) == reports {
            self.all_in.notify_waiters();
        }
    }

    /// Resolves once every message handed over has its report. Owns its handle, so
    /// the future can outlive the call that handed the batch over.
    pub(super) async fn all_in(self: Arc<Self>) {
        loop {
            let notified = self.all_in.notified();
            tokio::pin!(notified);
            // Registered before the check, so a last report in between still wakes us.
            notified.as_mut().enable();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// What the reports said (call after `all_in`).
    pub(super) fn outcome(&self) -> AckOutcome {
        std::mem::take(&mut *self.outcome.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_waiter_wakes_once_the_last_report_is_in_and_not_before() {
        let acks = Arc::new(BatchAcks::new(3));
        let waiter = tokio::spawn(acks.clone().all_in());
        // A send refused part-way: two handed over, one never was.
        acks.handed_over(1);
        acks.finish(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one report is still to come");
        acks.finish(1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken by the last report")
            .unwrap();
        // Waiting again after the end returns at once.
        tokio::time::timeout(Duration::from_millis(100), acks.clone().all_in())
            .await
            .expect("already complete");
    }

    #[tokio::test]
    async fn reports_arriving_during_the_hand_over_do_not_finish_the_batch() {
        let acks = Arc::new(BatchAcks::new(2));
        acks.finish(2);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), acks.clone().all_in())
                .await
                .is_err(),
            "still being handed over"
        );
        acks.handed_over(0);
        tokio::time::timeout(Duration::from_millis(100), acks.all_in())
            .await
            .expect("complete once handed over");
    }
}
