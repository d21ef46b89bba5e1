//! Kafka batches whose outcome breakwater does not know, and reading the topic back
//! before such a batch is sent again.
//!
//! A message handed to librdkafka whose delivery then failed (timed out, purged,
//! brokers lost, the call abandoned) may still have been written: the broker can
//! write a batch and never answer (it crashed, or it was frozen and read the request
//! later). The request was answered from the spool, and replaying the batch as new
//! messages would put it in the topic twice. So the sink remembers those messageIds
//! with, per partition, an offset below which they cannot be (the log end when they
//! were sent). Before a batch holding any of them is sent again, the topic is read
//! from there to its end and the events already in it are left out.
//!
//! The batches handed over and not yet acknowledged are also in the in-doubt
//! journal (`sinks/journal.rs`), so a breakwater crash does not forget them.
//!
//! What this does not cover: a batch Kafka acknowledged before a breakwater crash
//! whose request was not answered or whose spool record was not yet deleted (it is
//! settled in the journal at the ack), and a frozen broker that reads the old
//! request only after the read-back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::event::{EventKey, SinkBatch};
use crate::sinks::journal::{Journal, OpenBatch};

/// Where each partition's log ended, as far as the sink knows: anything sent from
/// now on lands at or after these offsets.
pub type LogEnds = HashMap<i32, i64>;

/// At most this many messageIds are remembered; past it, new unknown outcomes are
/// not recorded (counted as unverified) rather than memory growing.
const MAX_REMEMBERED: usize = 200_000;
/// A read-back that would scan more messages than this is not done: the batch is
/// sent unverified (counted) rather than replay stalling on a huge scan.
const MAX_READ_BACK_MESSAGES: i64 = 2_000_000;
/// A read-back gives up (the batch stays in the spool) after this long without
/// progress.
const READ_BACK_IDLE_LIMIT: Duration = Duration::from_secs(15);

#[derive(Default)]
pub struct UnknownOutcomes {
    /// Messages of abandoned calls still queued in librdkafka (see
    /// `hold_while_queued`); a read-back waits for none to be left.
    still_queued: AtomicUsize,
    queue_emptied: tokio::sync::Notify,
    log_ends: Mutex<LogEnds>,
    remembered: Mutex<Remembered>,
    count: AtomicUsize,
    /// Where the batches in doubt are kept across restarts (`sinks/journal.rs`); none in
    /// unit tests.
    journal: Option<Journal>,
}

#[derive(Default)]
struct Remembered {
    /// (source, messageId) → the log ends when it was sent, and its journal batch.
    /// Dedup is per source, so is doubt: another source's event with the same
    /// messageId is another event.
    events: HashMap<EventKey, (Arc<LogEnds>, Option<u64>)>,
    /// Journal batch → how many of its events are still remembered; at 0 the
    /// batch is settled in the journal.
    open_per_batch: HashMap<u64, usize>,
}

impl UnknownOutcomes {
    /// With a journal, and the batches an earlier process left open in it
    /// remembered as of unknown outcome.
    pub fn with_journal(journal: Journal, open: Vec<OpenBatch>) -> UnknownOutcomes {
        let outcomes = UnknownOutcomes {
            journal: Some(journal),
            ..UnknownOutcomes::default()
        };
        for batch in open {
            let ids = batch.ids.iter().map(String::as_str);
            let ends: LogEnds = batch.ends.iter().copied().collect();
            outcomes.remember(&batch.source, ids, &Arc::new(ends), Some(batch.number));
        }
        outcomes
    }

    /// Writes a batch about to be handed over to the journal; its number there.
    pub fn journal_sent(&self, batch: &SinkBatch, ends: &LogEnds) -> Option<u64> {
        let journal = self.journal.as_ref()?;
        let ids = batch.events.iter().map(|e| e.message_id.as_str());
        journal.sent(&batch.source, ids, ends.iter().map(|(p, o)| (*p, *o)))
    }

    /// Marks a journal batch settled (all of it delivered, or nothing handed over).
    pub fn journal_settled(&self, number: Option<u64>) {
        if let (Some(journal), Some(number)) = (&self.journal, number) {
            journal.settled(number);
        }
    }

    /// A call gave up on messages librdkafka still holds (a send refused part-way
    /// through a batch, the brokers lost): they may still land, until their
    /// acknowledgements (`pending`) resolve, within the message timeout. Until then
    /// a read-back would not see them, and the events would be sent again.
    pub fn hold_while_queued<F>(self: &Arc<Self>, messages: usize, pending: F)
    where
        F: std::future::Future + Send + 'static,
    {
        self.still_queued.fetch_add(messages, Ordering::SeqCst);
        let outcomes = self.clone();
        tokio::spawn(async move {
            pending.await;
            outcomes.still_queued.fetch_sub(messages, Ordering::SeqCst);
            outcomes.queue_emptied.notify_waiters();
        });
    }

    /// Waits (up to `limit`) until no message of an abandoned call is queued in
    /// librdkafka; false if some still are.
    pub async fn wait_until_none_queued(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let emptied = self.queue_emptied.notified();
            if self.still_queued.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.still_queued.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// The log ends now, to keep with a batch being sent.
    pub fn log_ends(&self) -> Arc<LogEnds> {
        Arc::new(lock(&self.log_ends).clone())
    }

    /// Learns where a partition's log ends, from the watermarks or from delivery
    /// reports (`next_offset` = a delivered offset + 1).
    pub fn advance(&self, partition: i32, next_offset: i64) {
        let mut ends = lock(&self.log_ends);
        let end = ends.entry(partition).or_insert(next_offset);
        *end = (*end).max(next_offset);
    }

    /// Remembers that these events may or may not be in the topic. Returns how many
    /// could not be remembered (the memory bound).
    pub fn remember<'a>(
        &self,
        source: &Arc<str>,
        message_ids: impl Iterator<Item = &'a str>,
        sent_at: &Arc<LogEnds>,
        journal_batch: Option<u64>,
    ) -> usize {
        let mut remembered = lock(&self.remembered);
        let mut dropped = 0;
        let mut kept = 0;
        for id in message_ids {
            let key = (source.clone(), id.to_string());
            // An id already remembered keeps its earlier log ends.
            if remembered.events.contains_key(&key) {
                continue;
            }
            if remembered.events.len() >= MAX_REMEMBERED {
                dropped += 1;
                continue;
            }
            remembered.events.insert(key, (sent_at.clone(), journal_batch));
            kept += 1;
        }
        match journal_batch {
            Some(number) if kept > 0 => *remembered.open_per_batch.entry(number).or_default() += kept,
            // Nothing of it is in doubt here: the journal need not keep it.
            _ => self.journal_settled(journal_batch),
        }
        self.count.store(remembered.events.len(), Ordering::Relaxed);
        dropped
    }

    /// If any event of the batch has an unknown outcome: their ids and, per
    /// partition, where to start reading.
    pub fn unknown_in(&self, batch: &SinkBatch) -> Option<(HashSet<String>, LogEnds)> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let remembered = lock(&self.remembered);
        let mut ids = HashSet::new();
        let mut log_ends: Vec<&Arc<LogEnds>> = Vec::new();
        for event in &batch.events {
            if let Some((sent_at, _)) = remembered.events.get(&(batch.source.clone(), event.message_id.clone())) {
                ids.insert(event.message_id.clone());
                if !log_ends.iter().any(|seen| Arc::ptr_eq(seen, sent_at)) {
                    log_ends.push(sent_at);
                }
            }
        }
        if ids.is_empty() {
            return None;
        }
        // The earliest end of each partition; a partition one of them did not know
        // is left out, so it is read from its beginning.
        let mut start = LogEnds::new();
        if let Some((first, rest)) = log_ends.split_first() {
            for (partition, offset) in first.iter() {
                let earliest = rest
                    .iter()
                    .map(|ends| ends.get(partition).copied())
                    .try_fold(*offset, |min, end| end.map(|end| min.min(end)));
                if let Some(earliest) = earliest {
                    start.insert(*partition, earliest);
                }
            }
        }
        Some((ids, start))
    }

    /// Forgets ids whose outcome is now known (delivered, or found in the topic).
    pub fn forget<'a>(&self, source: &Arc<str>, message_ids: impl Iterator<Item = &'a str>) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut remembered = lock(&self.remembered);
        let Remembered { events, open_per_batch } = &mut *remembered;
        for id in message_ids {
            let Some((_, Some(number))) = events.remove(&(source.clone(), id.to_string())) else {
                continue;
            };
            if let Some(open) = open_per_batch.get_mut(&number) {
                *open -= 1;
                if *open == 0 {
                    open_per_batch.remove(&number);
                    self.journal_settled(Some(number));
                }
            }
        }
        self.count.store(events.len(), Ordering::Relaxed);
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum ReadBackError {
    #[error("the read-back would scan {0} messages (limit {MAX_READ_BACK_MESSAGES})")]
    TooFar(i64),
    #[error("cannot read the topic back: {0}")]
    Failed(String),
}

/// Reads `topic` from `start` (per partition; a partition missing there from its
/// beginning) to its current end and returns which of `wanted` are in it, by the
/// `messageId` header. Blocking.
pub fn read_back(
    connection: &ClientConfig,
    topic: &str,
    start: &LogEnds,
    source: &str,
    wanted: &HashSet<String>,
) -> Result<HashSet<String>, ReadBackError> {
    let mut config = connection.clone();
    config
        .set("group.id", "breakwater-read-back")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Everything up to the high watermark: another producer's open transaction
        // holds the last stable offset back, and breakwater writes no transactions
        // (so none of its events can sit in an aborted one).
        .set("isolation.level", "read_uncommitted");
    let consumer: BaseConsumer = config.create().map_err(|e| failed("consumer", e))?;
    let ReadPlan {
        assignment,
        mut last_offsets,
        to_scan,
    } = plan(&consumer, topic, start)?;
    if to_scan > MAX_READ_BACK_MESSAGES {
        return Err(ReadBackError::TooFar(to_scan));
    }
    let mut found = HashSet::new();
    if last_offsets.is_empty() {
        return Ok(found);
    }
    consumer.assign(&assignment).map_err(|e| failed("assign", e))?;
    let mut last_progress = Instant::now();
    // Partitions read up to their last offset, done at the next empty poll.
    let mut reached: HashSet<i32> = HashSet::new();
    while !last_offsets.is_empty() {
        if last_progress.elapsed() > READ_BACK_IDLE_LIMIT {
            return Err(ReadBackError::Failed(format!(
                "no progress for {} s",
                READ_BACK_IDLE_LIMIT.as_secs()
            )));
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => {
                // Nothing more to read now. A partition is done once its last
                // offset was read (the rest of that record batch came with it: a
                // broker may report the high watermark inside its last batch, as
                // tansu 0.6 does), or once the consumer's position has passed it (a
                // log that ends in transaction markers, never delivered as messages).
                for partition in reached.drain() {
                    last_offsets.remove(&partition);
                }
                drop_partitions_read_to_the_end(&consumer, &mut last_offsets);
                continue;
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "kafka read-back: transient error");
                continue;
            }
            Some(Ok(message)) => message,
        };
        last_progress = Instant::now();
        if let Some(id) = message.headers().and_then(|headers| wanted_id(headers, source, wanted)) {
            found.insert(id.to_string());
        }
        if last_offsets
            .get(&message.partition())
            .is_some_and(|last| message.offset() >= *last)
        {
            reached.insert(message.partition());
        }
    }
    Ok(found)
}

/// Drops from `last_offsets` the partitions whose position is past their last offset.
fn drop_partitions_read_to_the_end(consumer: &BaseConsumer, last_offsets: &mut HashMap<i32, i64>) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    for element in positions.elements() {
        if let Offset::Offset(position) = element.offset() {
            if last_offsets
                .get(&element.partition())
                .is_some_and(|last| position > *last)
            {
                last_offsets.remove(&element.partition());
            }
        }
    }
}

fn failed(what: &str, error: rdkafka::error::KafkaError) -> ReadBackError {
    ReadBackError::Failed(format!("{what}: {error}"))
}

/// What one read-back reads: where each partition starts, and its last offset.
struct ReadPlan {
    assignment: TopicPartitionList,
    /// partition → the last offset to read.
    last_offsets: HashMap<i32, i64>,
    /// Messages to read in all.
    to_scan: i64,
}

/// Finds each partition's range to read: from its remembered log end (or its low
/// watermark) to its high watermark.
fn plan(consumer: &BaseConsumer, topic: &str, start: &LogEnds) -> Result<ReadPlan, ReadBackError> {
    let timeout = Duration::from_secs(5);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| failed("metadata", e))?;
    let mut plan = ReadPlan {
        assignment: TopicPartitionList::new(),
        last_offsets: HashMap::new(),
        to_scan: 0,
    };
    for partition in metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
    {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| failed("watermarks", e))?;
        let from = start.get(&partition).copied().unwrap_or(low).max(low);
        if from < high {
            plan.assignment
                .add_partition_offset(topic, partition, Offset::Offset(from))
                .map_err(|e| failed("assignment", e))?;
            plan.last_offsets.insert(partition, high - 1);
            plan.to_scan += high - from;
        }
    }
    Ok(plan)
}

/// A message's `messageId`, if it is one of `wanted` from `source`.
fn wanted_id<'h>(headers: &'h impl Headers, source: &str, wanted: &HashSet<String>) -> Option<&'h str> {
    let header = |key: &str| {
        headers
            .iter()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    if header("source") != Some(source) {
        return None;
    }
    header("messageId").filter(|id| wanted.contains(*id))
}

/// The settings a read-back consumer needs from the producer's: where the brokers
/// are and how to reach them (security, SASL, TLS), nothing producer-only.
pub fn connection_settings(producer: &ClientConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in producer.config_map() {
        let wanted = key == "bootstrap.servers"
            || key == "client.id"
            || key.starts_with("security.")
            || key.starts_with("sasl.")
            || key.starts_with("ssl.");
        if wanted {
            config.set(key, value);
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_back_waits_for_messages_an_abandoned_call_left_queued() {
        let outcomes = Arc::new(UnknownOutcomes::default());
        assert!(outcomes.wait_until_none_queued(Duration::ZERO).await);
        let (acknowledge, acknowledged) = tokio::sync::oneshot::channel::<()>();
        outcomes.hold_while_queued(3, async move {
            let _ = acknowledged.await;
        });
        assert!(!outcomes.wait_until_none_queued(Duration::from_millis(50)).await);
        acknowledge.send(()).unwrap();
        assert!(outcomes.wait_until_none_queued(Duration::from_secs(1)).await);
    }

    fn batch(ids: &[&str]) -> SinkBatch {
        batch_of("s", ids)
    }

    fn batch_of(source: &str, ids: &[&str]) -> SinkBatch {
        SinkBatch::fixture(source, ids)
    }

    #[test]
    fn remembered_ids_are_found_with_the_earliest_log_ends() {
        let outcomes = UnknownOutcomes::default();
        assert!(outcomes.unknown_in(&batch(&["a"])).is_none());
        outcomes.advance(0, 10);
        let first = outcomes.log_ends();
        outcomes.advance(0, 25);
        outcomes.advance(1, 7);
        let second = outcomes.log_ends();
        outcomes.remember(&Arc::from("s"), ["a", "b"].into_iter(), &first, None);
        outcomes.remember(&Arc::from("s"), ["c"].into_iter(), &second, None);

        let (ids, start) = outcomes.unknown_in(&batch(&["a", "c", "x"])).unwrap();
        assert_eq!(ids, HashSet::from(["a".to_string(), "c".to_string()]));
        assert_eq!(start.get(&0), Some(&10), "the earliest end of partition 0");
        assert_eq!(
            start.get(&1),
            None,
            "partition 1 was unknown when a was sent: read from its start"
        );
        let (_, start) = outcomes.unknown_in(&batch(&["c"])).unwrap();
        assert_eq!((start.get(&0), start.get(&1)), (Some(&25), Some(&7)));

        outcomes.forget(&Arc::from("s"), ["a", "b", "c"].into_iter());
        assert_eq!(outcomes.remembered(), 0);
        assert!(outcomes.unknown_in(&batch(&["a", "c"])).is_none());
    }

    #[test]
    fn an_id_is_in_doubt_only_for_the_source_that_sent_it() {
        // Dedup is per (source, messageId): source b's "42" is another event.
        let outcomes = UnknownOutcomes::default();
        outcomes.remember(&Arc::from("a"), ["42"].into_iter(), &outcomes.log_ends(), None);
        assert!(outcomes.unknown_in(&batch_of("b", &["42"])).is_none());
        assert!(outcomes.unknown_in(&batch_of("a", &["42"])).is_some());
        outcomes.forget(&Arc::from("b"), ["42"].into_iter());
        assert!(
            outcomes.unknown_in(&batch_of("a", &["42"])).is_some(),
            "b's delivery says nothing of a's"
        );
    }

    #[test]
    fn the_read_back_finds_an_id_only_in_messages_of_its_source() {
        use rdkafka::message::{Header, OwnedHeaders};
        let message = |source: &str, id: &str| {
            OwnedHeaders::new()
                .insert(Header {
                    key: "source",
                    value: Some(source),
                })
                .insert(Header {
                    key: "messageId",
                    value: Some(id),
                })
        };
        let wanted = HashSet::from(["42".to_string()]);
        assert_eq!(wanted_id(&message("a", "42"), "a", &wanted), Some("42"));
        assert_eq!(wanted_id(&message("b", "42"), "a", &wanted), None);
        assert_eq!(wanted_id(&message("a", "43"), "a", &wanted), None);
    }

    #[test]
    fn log_ends_only_move_forward() {
        let outcomes = UnknownOutcomes::default();
        outcomes.advance(3, 100);
        outcomes.advance(3, 40);
        assert_eq!(outcomes.log_ends().get(&3), Some(&100));
    }
}
