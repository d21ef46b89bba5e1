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
//! The memory is the process's (bounded): an INSERT in flight at a `kill -9` is not
//! remembered, and its rows can be written twice (raw), once under `FINAL`.

use std::sync::Arc;

use crate::event::{EventKey, EventKeySet, SinkBatch};
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// At most this many events are remembered; past it, they are not (logged).
const MAX_REMEMBERED: usize = 200_000;

pub struct InDoubt {
    events: EventKeySet,
}

impl Default for InDoubt {
    fn default() -> Self {
        InDoubt {
            events: EventKeySet::bounded(MAX_REMEMBERED),
        }
    }
}

impl InDoubt {
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
    }

    /// Forgets every event of the group (it was inserted).
    pub fn forget_group(&self, group: &[Arc<SinkBatch>]) {
        for batch in group {
            self.events.remove_batch(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(source: &str, ids: &[&str]) -> Arc<SinkBatch> {
        Arc::new(SinkBatch::fixture(source, ids))
    }

    #[test]
    fn events_of_unknown_outcome_are_found_per_source_until_known() {
        let doubt = InDoubt::default();
        assert!(doubt.in_group(&[batch("web", &["a"])]).is_empty());
        doubt.remember(&[batch("web", &["a", "b"])]);
        let group = [batch("web", &["a", "c"]), batch("ios", &["b"])];
        assert_eq!(doubt.in_group(&group), vec![(Arc::from("web"), "a".to_string())]);
        doubt.forget_group(&group);
        assert_eq!(
            doubt.in_group(&[batch("web", &["a", "b"])]).len(),
            1,
            "b is still in doubt"
        );
    }
}
