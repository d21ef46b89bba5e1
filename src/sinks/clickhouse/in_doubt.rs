//! INSERTs whose outcome breakwater does not know, and the lookup before their
//! events are inserted again.
//!
//! An INSERT that timed out on our side, or whose connection was lost after it
//! began, may still have been written: ClickHouse reads the whole body from its
//! socket and commits it even when nobody is left to read its answer (a frozen
//! server does so when it wakes). The batch was answered from the spool, and
//! inserting it again would put its rows in the table twice (one row under `FINAL`,
//! two in the raw table). So the events of such an INSERT are remembered, and
//! before a group holding any of them is inserted, the table is asked which of them
//! it has; those are left out.
//!
//! The memory is bounded, and it outlives the process through the in-doubt journal
//! (`sinks/journal.rs`, `<data_dir>/clickhouse/in-doubt.journal`): each batch of a
//! group is written there before its INSERT, and settled once the request behind it
//! has ended with the INSERT's outcome known. So after a `kill -9` the batches of an
//! INSERT in flight, and those inserted for requests the crash left unanswered, are
//! in doubt, and the client's resend is looked up before it is inserted again. The
//! entries of an INSERT of unknown outcome (and those found open at start-up) are
//! settled once nothing is in doubt any more.

use std::sync::{Arc, Mutex};

use crate::event::{EventKey, EventKeySet, SinkBatch};
use crate::sinks::journal::{Journal, OpenBatch};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// At most this many events are remembered; past it, they are not (logged).
const MAX_REMEMBERED: usize = 200_000;

pub struct InDoubt {
    events: EventKeySet,
    /// None for an inserter without a data directory (tools, unit tests).
    journal: Option<Arc<Journal>>,
    /// Journal entries kept open while anything is in doubt: those of INSERTs of
    /// unknown outcome, and those an earlier process left open.
    open_while_in_doubt: Mutex<Vec<u64>>,
}

impl Default for InDoubt {
    fn default() -> Self {
        InDoubt {
            events: EventKeySet::bounded(MAX_REMEMBERED),
            journal: None,
            open_while_in_doubt: Mutex::new(Vec::new()),
        }
    }
}

/// A group's entries in the journal (one per batch, in the group's order).
pub struct Entries(Vec<Option<u64>>);

impl Entries {
    /// No entries (a group remembered as in doubt without its own journal lines).
    pub fn none() -> Entries {
        Entries(Vec::new())
    }
}

impl InDoubt {
    /// With a journal, and what an earlier process left open in it remembered as
    /// of unknown outcome.
    pub fn with_journal(journal: Journal, open: Vec<OpenBatch>) -> InDoubt {
        let in_doubt = InDoubt {
            journal: Some(Arc::new(journal)),
            ..InDoubt::default()
        };
        if !open.is_empty() {
            tracing::warn!(
                batches = open.len(),
                events = open.iter().map(|b| b.ids.len()).sum::<usize>(),
                "clickhouse: INSERTs were in doubt when the last process ended; their events are looked up before they are inserted again"
            );
        }
        for batch in &open {
            let (added, _) = in_doubt
                .events
                .insert(batch.ids.iter().map(|id| (&batch.source, id.as_str())));
            metrics::counter!(metric::CLICKHOUSE_IN_DOUBT_EVENTS).increment(added as u64);
        }
        in_doubt.lock_open().extend(open.iter().map(|batch| batch.number));
        in_doubt.settle_if_nothing_in_doubt();
        in_doubt
    }

    /// Writes the group's batches to the journal before their INSERT.
    pub fn begin(&self, group: &[Arc<SinkBatch>]) -> Entries {
        let Some(journal) = &self.journal else {
            return Entries(Vec::new());
        };
        Entries(
            group
                .iter()
                .map(|batch| {
                    let ids = batch.events.iter().map(|e| e.message_id.as_str());
                    journal.sent(&batch.source, ids, std::iter::empty())
                })
                .collect(),
        )
    }

    /// The group was inserted: nothing of it is in doubt now, and each batch's entry
    /// is settled once its request has ended (a crash before that leaves the resend
    /// to be looked up).
    pub fn inserted(&self, group: &[Arc<SinkBatch>], entries: Entries) {
        for batch in group {
            self.events.remove_batch(batch);
        }
        self.settle_if_nothing_in_doubt();
        let Some(journal) = &self.journal else { return };
        for (batch, number) in group.iter().zip(entries.0) {
            if let Some(number) = number {
                let journal = journal.clone();
                batch.when_ended(Box::new(move |_, _| journal.settled(number)));
            }
        }
    }

    /// The group was refused and not written: its entries are settled.
    pub fn not_written(&self, entries: Entries) {
        if let Some(journal) = &self.journal {
            entries
                .0
                .into_iter()
                .flatten()
                .for_each(|number| journal.settled(number));
        }
    }

    /// The group's INSERT may or may not have been written: its events are in
    /// doubt, and its entries stay open while anything is.
    pub fn unknown(&self, group: &[Arc<SinkBatch>], entries: Entries) {
        self.remember(group);
        self.lock_open().extend(entries.0.into_iter().flatten());
    }

    /// The group's events of unknown outcome, if any.
    pub fn in_group(&self, group: &[Arc<SinkBatch>]) -> Vec<EventKey> {
        if self.events.is_empty() {
            return Vec::new();
        }
        let mut doubtful = Vec::new();
        for batch in group {
            let known = self.events.known_in(batch);
            let in_doubt = batch.events.iter().zip(known).filter(|(_, known)| *known);
            doubtful.extend(in_doubt.map(|(event, _)| (batch.source.clone(), event.message_id.clone())));
        }
        doubtful
    }

    /// The group's INSERT may or may not have been written.
    pub fn remember(&self, group: &[Arc<SinkBatch>]) {
        let (mut added, mut dropped) = (0, 0);
        for batch in group {
            let (new, left_out) = self.events.insert_batch(batch);
            added += new;
            dropped += left_out;
        }
        metrics::counter!(metric::CLICKHOUSE_IN_DOUBT_EVENTS).increment(added as u64);
        if dropped > 0 {
            static FULL: Throttle = Throttle::new(WARN_EVERY);
            if let Some(suppressed) = FULL.allow() {
                tracing::warn!(
                    events = dropped,
                    suppressed_since_last = suppressed,
                    "clickhouse: too many events of unknown outcome to remember; they may be inserted twice (raw rows)"
                );
            }
        }
    }

    /// Their outcome is known now (found in the table).
    pub fn forget<'a>(&self, known: impl Iterator<Item = &'a EventKey>) {
        self.events.remove(known.map(|(source, id)| (&**source, id.as_str())));
        self.settle_if_nothing_in_doubt();
    }

    /// Nothing in doubt: the entries kept open for it are settled.
    fn settle_if_nothing_in_doubt(&self) {
        let Some(journal) = &self.journal else { return };
        if !self.events.is_empty() {
            return;
        }
        let open = std::mem::take(&mut *self.lock_open());
        open.into_iter().for_each(|number| journal.settled(number));
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.open_while_in_doubt.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SinkKind;
    use crate::sinks::journal::open_numbers;

    fn batch(source: &str, ids: &[&str]) -> Arc<SinkBatch> {
        Arc::new(SinkBatch::fixture(source, ids))
    }

    #[test]
    fn events_of_unknown_outcome_are_found_per_source_until_known() {
        let doubt = InDoubt::default();
        assert!(doubt.in_group(&[batch("web", &["a"])]).is_empty());
        doubt.unknown(&[batch("web", &["a", "b"])], Entries(Vec::new()));
        let group = [batch("web", &["a", "c"]), batch("ios", &["b"])];
        assert_eq!(doubt.in_group(&group), vec![(Arc::from("web"), "a".to_string())]);
        doubt.inserted(&group, Entries(Vec::new()));
        assert_eq!(
            doubt.in_group(&[batch("web", &["a", "b"])]).len(),
            1,
            "b is still in doubt"
        );
    }

    #[test]
    fn the_journal_keeps_what_a_crash_would_leave_in_doubt() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(SinkKind::ClickHouse, dir.path()).unwrap();
        let doubt = InDoubt::with_journal(journal, Vec::new());

        // Inserted, its request not ended yet: open; ended: settled.
        let inserted = batch("web", &["a"]);
        let entries = doubt.begin(std::slice::from_ref(&inserted));
        doubt.inserted(std::slice::from_ref(&inserted), entries);
        assert_eq!(open_numbers(dir.path()).len(), 1);
        inserted.end(crate::event::RequestEnd::Settled);
        assert!(open_numbers(dir.path()).is_empty());

        // Refused for good: settled at once. Unknown outcome: open while in doubt.
        let refused = [batch("web", &["b"])];
        doubt.not_written(doubt.begin(&refused));
        let unknown = [batch("web", &["c"])];
        doubt.unknown(&unknown, doubt.begin(&unknown));
        assert_eq!(open_numbers(dir.path()).len(), 1);

        // A restart remembers it; found in the table, it is settled.
        drop(doubt);
        let (journal, open) = Journal::open(SinkKind::ClickHouse, dir.path()).unwrap();
        let doubt = InDoubt::with_journal(journal, open);
        let found = doubt.in_group(&[batch("web", &["c", "d"])]);
        assert_eq!(found, vec![(Arc::from("web"), "c".to_string())]);
        doubt.forget(found.iter());
        assert!(open_numbers(dir.path()).is_empty());
    }
}
