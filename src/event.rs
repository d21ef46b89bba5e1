//! The event model every stage shares: the six call types, an event as normalized
//! by intake, one request's batch for the sinks, and the sinks breakwater has.
//!
//! Invariant: `event` imports nothing from the crate; every other module may use it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::Track,
        EventType::Identify,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Identify => "identify",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }

    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// Longest `messageId` accepted; longer ids are refused rather than truncated.
pub const MAX_MESSAGE_ID_CHARS: usize = 256;

/// An event ready for the sinks: the fields sinks index or route on, and the whole
/// normalized event as JSON (one line, no newline), encoded once for every sink.
#[derive(Debug, Clone)]
pub struct NormalizedEvent {
    pub message_id: String,
    pub event_type: EventType,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// The track event's name; empty for other types.
    pub event_name: String,
    /// Clock-skew corrected event time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Server receive time, Unix milliseconds.
    pub received_at_ms: i64,
    pub json: Vec<u8>,
}

impl NormalizedEvent {
    /// The one test fixture: an anonymous track event with the given id and JSON
    /// bytes (used by unit tests, the spool bench and the fuzz targets).
    pub fn fixture(message_id: &str, json: &[u8]) -> NormalizedEvent {
        NormalizedEvent {
            message_id: message_id.to_string(),
            event_type: EventType::Track,
            user_id: None,
            anonymous_id: Some("a".into()),
            event_name: "e".into(),
            timestamp_ms: 0,
            received_at_ms: 0,
            json: json.to_vec(),
        }
    }
}

/// The new (not duplicate) events of one request, all from one source. Each sink
/// encodes them its own way from the JSON and fields normalization produced once.
///
/// A sink that took the batch may need to know how the request behind it ended
/// (Kafka keeps its in-doubt marks until then): it leaves a hook with
/// [`SinkBatch::when_ended`]. The pipeline ends the batch settled once it is
/// durable for every sink and its ids are marked seen (the replayer: once the spool
/// records are deleted), and unsettled when the request fails; a batch dropped
/// before either ends unsettled.
pub struct SinkBatch {
    pub source: Arc<str>,
    pub events: Vec<NormalizedEvent>,
    end_hooks: Mutex<Vec<EndHook>>,
}

/// How the request behind a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEnd {
    /// Durable for every sink and marked seen, or (replayed) its spool records deleted.
    Settled,
    /// Failed, abandoned or cut off by a crash: the batch will be sent again, by its
    /// client or by the replayer.
    Unsettled,
}

/// What a sink does when the request behind a batch ends; it is given the batch.
pub type EndHook = Box<dyn FnOnce(RequestEnd, &SinkBatch) + Send>;

impl std::fmt::Debug for SinkBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkBatch")
            .field("source", &self.source)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Drop for SinkBatch {
    fn drop(&mut self) {
        self.run_end_hooks(RequestEnd::Unsettled);
    }
}

impl SinkBatch {
    pub fn new(source: Arc<str>, events: Vec<NormalizedEvent>) -> SinkBatch {
        SinkBatch {
            source,
            events,
            end_hooks: Mutex::new(Vec::new()),
        }
    }

    /// A new batch of some of this one's events (same source) that ends when this
    /// one ends: a sink given the part may wait for the request's end.
    pub fn part(self: &Arc<Self>, events: Vec<NormalizedEvent>) -> Arc<SinkBatch> {
        let part = Arc::new(SinkBatch::new(self.source.clone(), events));
        let ends_with_it = part.clone();
        self.when_ended(Box::new(move |end, _| ends_with_it.end(end)));
        part
    }

    /// Leaves `hook` to run when the request behind the batch ends.
    pub fn when_ended(&self, hook: EndHook) {
        self.end_hooks.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// The request behind the batch has ended: the hooks left on it run now (once;
    /// dropping the batch later does nothing more).
    pub fn end(&self, how: RequestEnd) {
        self.run_end_hooks(how);
    }

    /// A test batch: one fixture event per id (see [`NormalizedEvent::fixture`]).
    pub fn fixture(source: &str, message_ids: &[&str]) -> SinkBatch {
        let events = message_ids
            .iter()
            .map(|id| NormalizedEvent::fixture(id, b"{}"))
            .collect();
        SinkBatch::new(Arc::from(source), events)
    }

    /// Takes the events and source out (a batch with a `Drop` cannot be moved
    /// apart); hooks left on it run as it is dropped.
    pub fn into_parts(mut self) -> (Arc<str>, Vec<NormalizedEvent>) {
        (
            std::mem::replace(&mut self.source, Arc::from("")),
            std::mem::take(&mut self.events),
        )
    }

    fn run_end_hooks(&self, end: RequestEnd) {
        let hooks = std::mem::take(&mut *self.end_hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for hook in hooks {
            hook(end, self);
        }
    }

    /// JSON bytes of all events: the size measure batch limits use.
    pub fn json_bytes(&self) -> usize {
        self.events.iter().map(|e| e.json.len()).sum()
    }
}

/// An event as dedup knows it: (source, messageId). Another source's event with the
/// same messageId is another event.
pub type EventKey = (Arc<str>, String);

/// A bounded set of events by [`EventKey`], whose emptiness is read without its
/// lock: the memories of events in doubt (a route's copies for failed requests,
/// ClickHouse's INSERTs of unknown outcome, flushes that outlived their caller) are
/// consulted on every request but hold something only after a failure. A set made
/// with `forgotten_after` forgets everything once nothing was added for that long,
/// so a memory nobody asks for again stops costing every request a lookup.
pub struct EventKeySet {
    keys: Mutex<Keys>,
    len: AtomicUsize,
    max: usize,
    forget_after: Option<Duration>,
}

struct Keys {
    /// source → messageIds: looked up with borrowed strings, no key built per event.
    by_source: HashMap<Arc<str>, HashSet<String>>,
    last_added: Instant,
}

impl EventKeySet {
    /// A set that holds at most `max` events.
    pub fn bounded(max: usize) -> EventKeySet {
        EventKeySet {
            keys: Mutex::new(Keys {
                by_source: HashMap::new(),
                last_added: Instant::now(),
            }),
            len: AtomicUsize::new(0),
            max,
            forget_after: None,
        }
    }

    /// The set forgets every event once nothing was added for `idle`.
    pub fn forgotten_after(mut self, idle: Duration) -> EventKeySet {
        self.forget_after = Some(idle);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Relaxed) == 0
    }

    /// For each event of the batch, whether it is in the set.
    pub fn known_in(&self, batch: &SinkBatch) -> Vec<bool> {
        if self.is_empty() {
            return vec![false; batch.events.len()];
        }
        let keys = self.lock();
        let Some(ids) = keys.by_source.get(&*batch.source) else {
            return vec![false; batch.events.len()];
        };
        batch
            .events
            .iter()
            .map(|e| ids.contains(e.message_id.as_str()))
            .collect()
    }

    /// The batch without the events in the set: the batch itself when none is,
    /// `None` when all are, else a part of it (`SinkBatch::part`); and how many were
    /// left out.
    pub fn leave_out(&self, batch: &Arc<SinkBatch>) -> (Option<Arc<SinkBatch>>, usize) {
        if self.is_empty() {
            return (Some(batch.clone()), 0);
        }
        let known = self.known_in(batch);
        let rest: Vec<NormalizedEvent> = batch
            .events
            .iter()
            .zip(&known)
            .filter(|(_, known)| !**known)
            .map(|(event, _)| event.clone())
            .collect();
        let left_out = batch.events.len() - rest.len();
        match (left_out, rest.is_empty()) {
            (0, _) => (Some(batch.clone()), 0),
            (_, true) => (None, left_out),
            (_, false) => (Some(batch.part(rest)), left_out),
        }
    }

    /// Adds events; returns (how many were new, how many the bound left out).
    pub fn insert<'a>(&self, events: impl Iterator<Item = (&'a Arc<str>, &'a str)>) -> (usize, usize) {
        let mut keys = self.lock();
        keys.last_added = Instant::now();
        let (mut added, mut dropped) = (0, 0);
        let mut len = self.len.load(Ordering::Relaxed);
        for (source, id) in events {
            if len >= self.max {
                dropped += 1;
            } else if keys.by_source.entry(source.clone()).or_default().insert(id.to_string()) {
                added += 1;
                len += 1;
            }
        }
        self.len.store(len, Ordering::Relaxed);
        (added, dropped)
    }

    /// Adds the batch's events; returns (how many were new, how many the bound left out).
    pub fn insert_batch(&self, batch: &SinkBatch) -> (usize, usize) {
        self.insert(batch.events.iter().map(|e| (&batch.source, e.message_id.as_str())))
    }

    /// Removes the batch's events.
    pub fn remove_batch(&self, batch: &SinkBatch) {
        self.remove(batch.events.iter().map(|e| (&*batch.source, e.message_id.as_str())));
    }

    /// Removes these events.
    pub fn remove<'a>(&self, known: impl Iterator<Item = (&'a str, &'a str)>) {
        if self.is_empty() {
            return;
        }
        let mut keys = self.lock();
        let mut len = self.len.load(Ordering::Relaxed);
        for (source, id) in known {
            if let Some(ids) = keys.by_source.get_mut(source) {
                if ids.remove(id) {
                    len -= 1;
                }
                if ids.is_empty() {
                    keys.by_source.remove(source);
                }
            }
        }
        self.len.store(len, Ordering::Relaxed);
    }

    /// The keys, forgotten first if the set has been idle past `forget_after`.
    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if self.forget_after.is_some_and(|idle| keys.last_added.elapsed() > idle) && !keys.by_source.is_empty() {
            keys.by_source.clear();
            self.len.store(0, Ordering::Relaxed);
        }
        keys
    }
}

/// The sinks breakwater delivers to. Their names are metric labels, policy
/// sections, spool tables and CLI arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkKind {
    File,
    ClickHouse,
    Kafka,
}

impl SinkKind {
    /// In the order breakwater builds them.
    pub const ALL: [SinkKind; 3] = [SinkKind::File, SinkKind::ClickHouse, SinkKind::Kafka];

    /// The name in metrics, logs, policy sections and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::File => "file",
            SinkKind::ClickHouse => "clickhouse",
            SinkKind::Kafka => "kafka",
        }
    }

    pub fn from_name(name: &str) -> Option<SinkKind> {
        SinkKind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl std::fmt::Display for SinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// RFC 3339 in UTC with milliseconds, as Segment writes them.
pub fn format_timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_names_round_trip() {
        for kind in SinkKind::ALL {
            assert_eq!(SinkKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(SinkKind::from_name("s3"), None);
    }
}
