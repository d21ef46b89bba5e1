//! Each route's memory of the copies it made durable for requests that then failed.
//!
//! One request goes to every sink at once. When one sink's copy is durable (the
//! sink took it, or it is in that sink's spool, or in the dead-letter table) and
//! another sink then fails the request (its copy could not be spooled: 503), the
//! client sends the same request again, and the first sink would get it a second
//! time: written again, or written and replayed from its spool. So each route
//! watches the requests whose copy it made durable (`SinkBatch::when_ended`):
//! settled, nothing is kept; unsettled, their `(source, messageId)`s are
//! remembered, and the resend's copy for that route leaves them out (they are
//! forgotten once that request is settled).
//!
//! The memory is the process's. After a crash it is seeded with what the sink's
//! route is known to hold for requests the crash may have cut off: the file sink's
//! recent lines, and the recent records of the route's spool (a spooled copy is not
//! replayed while its request is unanswered, so it is still there). What Kafka and
//! ClickHouse took directly is in their in-doubt journals. It is bounded (past the
//! bound, events are not remembered; logged), and forgotten 10 minutes after the
//! last event was added.
//!
//! A copy whose local write (its spool append, or its dead letter) outlived the
//! request's deadline is undecided: the request was answered 503, the write goes
//! on, and until it is decided a resend of any of its events is refused
//! (`in_flight_elsewhere`, retried); then its events are remembered (written) or
//! forgotten (not written), so the resend is neither written twice nor lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::budget::BudgetHold;
use crate::event::{EventKeySet, RequestEnd, SinkBatch, SinkKind};
use crate::spool::SpoolError;
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// Events one route made durable for requests that ended unsettled.
pub struct UnsettledCopies {
    events: EventKeySet,
    /// Events of copies whose local write outlived their request, until it is
    /// decided (`decide_later`). Not bounded by a count: each such copy keeps its
    /// request's room in the memory budget until then, and a key costs less than
    /// the event it stands for.
    undecided: EventKeySet,
}

impl UnsettledCopies {
    /// At most this many events are remembered per route.
    pub const MAX_REMEMBERED: usize = 200_000;
    /// Resends come within seconds to minutes (SDK backoff; after a crash, once the
    /// dead process's Redis claims expire): everything is forgotten once nothing was
    /// added for this long, so a memory nobody asks for again stops costing every
    /// request a lookup.
    const KEPT: Duration = Duration::from_secs(600);
}

impl Default for UnsettledCopies {
    fn default() -> Self {
        UnsettledCopies {
            events: EventKeySet::bounded(Self::MAX_REMEMBERED).forgotten_after(Self::KEPT),
            undecided: EventKeySet::bounded(usize::MAX),
        }
    }
}

impl UnsettledCopies {
    /// This route's copy of `batch`: without the events it already made durable for
    /// an unsettled request (`None`: all of them). A copy that is a new batch ends
    /// when `batch` ends (its sink may be waiting for that).
    pub fn copy_for(&self, kind: SinkKind, batch: &Arc<SinkBatch>) -> Option<Arc<SinkBatch>> {
        let (copy, left_out) = self.events.leave_out(batch);
        if left_out > 0 {
            metrics::counter!(metric::SINK_UNSETTLED_LEFT_OUT_EVENTS, "sink" => kind.name()).increment(left_out as u64);
        }
        copy
    }

    /// The route's copy of `batch` is durable: remember its events if the request
    /// ends unsettled, forget them (earlier failures' included) if it is settled.
    pub fn watch(self: &Arc<Self>, kind: SinkKind, batch: &SinkBatch) {
        let copies = self.clone();
        batch.when_ended(Box::new(move |end, batch| match end {
            RequestEnd::Settled => copies.events.remove_batch(batch),
            RequestEnd::Unsettled => copies.remember(kind, batch),
        }));
    }

    /// Events this route's sink is known to hold already from before a restart (the
    /// file sink's recent lines, the recent records of the route's spool): a resend
    /// of a request the crash cut off leaves them out. They are forgotten once such a
    /// resend is settled.
    pub fn seed<'a>(&self, kind: SinkKind, events: impl Iterator<Item = (&'a Arc<str>, &'a str)>) {
        let (added, dropped) = self.events.insert(events);
        tracing::info!(
            sink = kind.name(),
            events = added,
            left_out_by_the_bound = dropped,
            "remembering the events the sink holds from before the restart, for resends"
        );
    }

    /// Whether an earlier copy of any of the batch's events is still being written
    /// (`decide_later`): the request must be refused, to be retried.
    pub fn undecided_in(&self, batch: &SinkBatch) -> bool {
        !self.undecided.is_empty() && self.undecided.known_in(batch).contains(&true)
    }

    /// `copy`'s local write outlived its request, which is answered 503: `write`
    /// goes on by itself. Until it is decided, resends of its events are refused
    /// (`undecided_in`); then they are remembered if it was written (the request
    /// ended unsettled), forgotten if not. `held`, the request's room in the memory
    /// budget, is kept until then: the copy is still in memory.
    pub fn decide_later<W>(self: &Arc<Self>, kind: SinkKind, copy: Arc<SinkBatch>, write: W, held: Arc<BudgetHold>)
    where
        W: Future<Output = Result<(), SpoolError>> + Send + 'static,
    {
        self.undecided.insert_batch(&copy);
        let copies = self.clone();
        tokio::spawn(async move {
            let result = write.await;
            let outcome = match &result {
                Ok(()) => {
                    // Remembered before it stops being undecided: a resend sees one or the other.
                    copies.remember(kind, &copy);
                    "written"
                }
                Err(_) => "not_written",
            };
            copies.undecided.remove_batch(&copy);
            metrics::counter!(metric::SPOOL_WRITES_DECIDED_LATE, "sink" => kind.name(), "outcome" => outcome)
                .increment(1);
            tracing::warn!(
                sink = kind.name(),
                events = copy.events.len(),
                outcome,
                error = result.err().map(|e| e.to_string()),
                "a local write that outlived its request has ended"
            );
            drop(held);
        });
    }

    fn remember(&self, kind: SinkKind, batch: &SinkBatch) {
        let (_, dropped) = self.events.insert_batch(batch);
        if dropped > 0 {
            static FULL: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = FULL.allow() {
                tracing::warn!(
                    sink = kind.name(),
                    events = dropped,
                    suppressed_since_last = suppressed,
                    "too many events made durable for failed requests to remember; their resends may be written twice"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn batch(source: &str, ids: &[&str]) -> Arc<SinkBatch> {
        Arc::new(SinkBatch::fixture(source, ids))
    }

    fn ids(batch: &SinkBatch) -> Vec<&str> {
        batch.events.iter().map(|e| e.message_id.as_str()).collect()
    }

    #[test]
    fn a_failed_requests_resend_leaves_out_what_was_made_durable() {
        let copies = Arc::new(UnsettledCopies::default());
        let kind = SinkKind::ClickHouse;

        let first = batch("web", &["a", "b"]);
        let copy = copies.copy_for(kind, &first).unwrap();
        assert!(Arc::ptr_eq(&copy, &first), "nothing remembered: the batch itself");
        copies.watch(kind, &copy);
        first.end(RequestEnd::Unsettled);

        // The resend, with one more event; another source's "a" is another event.
        let resend = batch("web", &["a", "b", "c"]);
        let copy = copies.copy_for(kind, &resend).unwrap();
        assert_eq!(ids(&copy), ["c"]);
        let other_source = batch("ios", &["a"]);
        assert_eq!(ids(&copies.copy_for(kind, &other_source).unwrap()), ["a"]);
        // All of it durable already: no copy at all.
        assert!(copies.copy_for(kind, &batch("web", &["b"])).is_none());

        // Settled: forgotten.
        copies.watch(kind, &resend);
        resend.end(RequestEnd::Settled);
        assert!(copies.events.is_empty());
    }

    #[test]
    fn a_copy_ends_with_its_request() {
        let copies = Arc::new(UnsettledCopies::default());
        let kind = SinkKind::Kafka;
        let first = batch("web", &["a"]);
        copies.watch(kind, &first);
        first.end(RequestEnd::Unsettled);

        let resend = batch("web", &["a", "b"]);
        let copy = copies.copy_for(kind, &resend).unwrap();
        let seen = Arc::new(Mutex::new(None));
        let seen_by_sink = seen.clone();
        copy.when_ended(Box::new(move |end, _| *seen_by_sink.lock().unwrap() = Some(end)));
        drop(copy);
        resend.end(RequestEnd::Settled);
        assert_eq!(
            *seen.lock().unwrap(),
            Some(RequestEnd::Settled),
            "the sink's hook on the copy ran with the request's end"
        );
    }

    /// A write decided later: while undecided the resend is refused, and the
    /// request's budget is held; then its events are left out if it was written,
    /// and delivered if it was not.
    #[tokio::test]
    async fn an_undecided_write_refuses_resends_until_its_outcome_is_known() {
        use crate::pipeline::budget::MemoryBudget;
        let kind = SinkKind::Kafka;
        let budget = MemoryBudget::new(1 << 20);
        for written in [true, false] {
            let copies = Arc::new(UnsettledCopies::default());
            let copy = batch("web", &["a", "b"]);
            let (decide, outcome) = tokio::sync::oneshot::channel::<Result<(), SpoolError>>();
            let held = Arc::new(budget.try_hold(600 << 10).unwrap());
            copies.decide_later(kind, copy.clone(), async move { outcome.await.unwrap() }, held);
            drop(copy);

            let resend = batch("web", &["b", "c"]);
            assert!(copies.undecided_in(&resend));
            assert!(!copies.undecided_in(&batch("web", &["c"])));
            assert!(!copies.undecided_in(&batch("ios", &["a"])), "another source's a");
            assert!(
                budget.try_hold(600 << 10).is_none(),
                "the undecided copy keeps its budget"
            );

            let result = if written {
                Ok(())
            } else {
                Err(SpoolError::Storage("fsync failed".into()))
            };
            decide.send(result).unwrap();
            for _ in 0..100 {
                if !copies.undecided_in(&resend) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!copies.undecided_in(&resend), "decided");
            assert!(budget.try_hold(600 << 10).is_some(), "the budget is given back");
            let sent = copies.copy_for(kind, &resend).unwrap();
            let expected: &[&str] = if written { &["c"] } else { &["b", "c"] };
            assert_eq!(ids(&sent), expected, "written: {written}");
        }
    }
}
