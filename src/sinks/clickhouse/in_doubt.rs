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

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::event::SinkBatch;
use crate::telemetry::metric;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

/// At most this many events are remembered; past it, they are not (counted, logged).
const MAX_REMEMBERED: usize = 200_000;

/// An event as dedup knows it: (source, messageId).
pub type EventKey = (Arc<str>, String);

#[derive(Default)]
pub struct InDoubt {
    events: Mutex<HashSet<EventKey>>,
    /// `events.len()`, read without the lock on every INSERT.
    count: AtomicUsize,
}

impl InDoubt {
    /// The group's events of unknown outcome, if any.
    pub fn in_group(&self, group: &[Arc<SinkBatch>]) -> Vec<EventKey> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let events = lock(&self.events);
        keys(group).filter(|key| events.contains(key)).collect()
    }

    /// The group's INSERT may or may not have been written.
    pub fn remember(&self, group: &[Arc<SinkBatch>]) {
        let mut events = lock(&self.events);
        let mut added = 0;
        let mut dropped = 0;
        for key in keys(group) {
            if events.len() >= MAX_REMEMBERED {
                dropped += 1;
            } else if events.insert(key) {
                added += 1;
            }
        }
        self.count.store(events.len(), Ordering::Relaxed);
        metrics::counter!(metric::CLICKHOUSE_IN_DOUBT_EVENTS).increment(added);
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

    /// Their outcome is known now (inserted, or found in the table).
    pub fn forget<'a>(&self, known: impl Iterator<Item = &'a EventKey>) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut events = lock(&self.events);
        for key in known {
            events.remove(key);
        }
        self.count.store(events.len(), Ordering::Relaxed);
    }

    /// Forgets every event of the group (it was inserted).
    pub fn forget_group(&self, group: &[Arc<SinkBatch>]) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let known: Vec<EventKey> = keys(group).collect();
        self.forget(known.iter());
    }
}

fn keys(group: &[Arc<SinkBatch>]) -> impl Iterator<Item = EventKey> + '_ {
    group.iter().flat_map(|batch| {
        batch
            .events
            .iter()
            .map(|e| (batch.source.clone(), e.message_id.clone()))
    })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NormalizedEvent;

    fn batch(source: &str, ids: &[&str]) -> Arc<SinkBatch> {
        let events = ids.iter().map(|id| NormalizedEvent::fixture(id, b"{}")).collect();
        Arc::new(SinkBatch::new(Arc::from(source), events))
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
