//! One sink's queue in the spool: room held before delivery, appends group-committed
//! through a `Batcher` (one fsync for many), reads oldest first, deletions after the
//! sink acknowledged, and the counters behind the spool's metrics.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use tokio::sync::{watch, Notify};

use super::file::SpoolFile;
use super::record::{decode, encode, max_encoded_len};
use super::SpoolError;
use crate::batcher::{BatchLimits, Batcher};
use crate::clock::now_ms;
use crate::event::{EventKey, SinkBatch, SinkKind};
use crate::telemetry::metric;

pub(super) const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The queue table of a sink.
fn queue_table(sink: SinkKind) -> TableDefinition<'static, u64, &'static [u8]> {
    match sink {
        SinkKind::ClickHouse => TableDefinition::new("spool.clickhouse"),
        SinkKind::Kafka => TableDefinition::new("spool.kafka"),
        SinkKind::File => TableDefinition::new("spool.file"),
    }
}

/// One stored batch as read back.
pub struct StoredBatch {
    pub key: u64,
    pub created_at_ms: i64,
    pub stored_bytes: u64,
    pub batch: Arc<SinkBatch>,
}

impl StoredBatch {
    /// What `SinkQueue::remove_keys` needs to delete this record.
    pub fn record_key(&self) -> RecordKey {
        RecordKey {
            key: self.key,
            stored_bytes: self.stored_bytes,
            events: self.batch.events.len(),
        }
    }
}

/// A stored record as its deletion needs it: its key, and what it counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordKey {
    pub key: u64,
    pub stored_bytes: u64,
    pub events: usize,
}

/// Counters of one sink's queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    pub sink: &'static str,
    pub events: u64,
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
}

/// How many bytes one append commit may carry.
const APPEND_GROUP_BYTES: usize = 64 * 1024 * 1024;

/// Room held in one sink's spool for one batch (`SinkQueue::reserve`); dropping it
/// gives the room back.
pub struct SpoolRoom<'a> {
    queue: &'a SinkQueue,
    bytes: u64,
}

impl Drop for SpoolRoom<'_> {
    fn drop(&mut self) {
        self.queue.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// One sink's queue.
pub struct SinkQueue {
    pub sink: SinkKind,
    file: Arc<SpoolFile>,
    /// The file's generation the counters were taken from (see `upkeep`).
    counted_generation: AtomicU64,
    /// Records the sink acknowledged whose deletion failed (a full disk): kept out
    /// of replay, so they are not delivered twice, and deleted with the next removal.
    delivered_not_removed: Mutex<Vec<RecordKey>>,
    pub(super) table: TableDefinition<'static, u64, &'static [u8]>,
    /// Bytes of the stored records. An append counts the room it held (its plain
    /// size); the writer gives back what compression saved once the record is written.
    bytes: Arc<AtomicU64>,
    events: AtomicU64,
    records: AtomicU64,
    max_bytes: AtomicU64,
    /// Room held for batches being delivered (see `reserve`), counted against
    /// `max_bytes` with what is stored.
    reserved: AtomicU64,
    /// Set when an append was refused for room; cleared when records leave.
    refusing: AtomicBool,
    pub(super) next_key: Arc<AtomicU64>,
    /// Woken on every append (and when a request whose copy was appended ends), so
    /// the replayer starts at once.
    pub appended: Arc<Notify>,
    /// Requests still unanswered whose copy was appended: the key the queue was at
    /// when each appended (its record's key is at least that), counted. See
    /// `append_into`.
    unanswered: Arc<Mutex<BTreeMap<u64, usize>>>,
    /// The oldest record's age when `stats` last read it.
    last_oldest_age: Mutex<Option<f64>>,
    writer: Batcher<SpoolError>,
    pub(super) writer_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SinkQueue {
    pub(super) fn open(file: Arc<SpoolFile>, sink: SinkKind, max_bytes: u64) -> Result<SinkQueue, SpoolError> {
        let table = queue_table(sink);
        let counted_generation = file.generation();
        let stored = file.run(|db| scan_queue(db, sink, table))?;
        if stored.records > 0 {
            let Stored {
                records, events, bytes, ..
            } = stored;
            tracing::info!(
                sink = sink.name(),
                records,
                events,
                bytes,
                "spool holds records from before"
            );
        }
        let next_key = Arc::new(AtomicU64::new(stored.last_key + 1));
        let bytes = Arc::new(AtomicU64::new(stored.bytes));
        let (writer, writer_task) = start_writer(sink, file.clone(), table, next_key.clone(), bytes.clone());
        let queue = SinkQueue {
            sink,
            file,
            counted_generation: AtomicU64::new(counted_generation),
            delivered_not_removed: Mutex::new(Vec::new()),
            table,
            bytes,
            events: AtomicU64::new(stored.events),
            records: AtomicU64::new(stored.records),
            max_bytes: AtomicU64::new(max_bytes),
            reserved: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            next_key,
            appended: Arc::new(Notify::new()),
            unanswered: Arc::default(),
            last_oldest_age: Mutex::new(None),
            writer,
            writer_task: Mutex::new(Some(writer_task)),
        };
        queue.publish();
        Ok(queue)
    }

    /// Holds room for `batch`, so that appending it later cannot fail for lack of
    /// room. The pipeline holds room in every sink's spool before any sink sees a
    /// batch: a request refused because a spool is full (503) was then delivered
    /// nowhere, and its retry cannot duplicate what a healthy sink already took.
    pub fn reserve(&self, batch: &SinkBatch) -> Result<SpoolRoom<'_>, SpoolError> {
        let size = max_encoded_len(batch) as u64;
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        let held = self.reserved.fetch_add(size, Ordering::SeqCst);
        let stored = self.bytes.load(Ordering::SeqCst);
        if stored + held + size > max_bytes {
            self.reserved.fetch_sub(size, Ordering::SeqCst);
            self.refusing.store(true, Ordering::SeqCst);
            metrics::counter!(metric::SPOOL_FULL, "sink" => self.sink.name()).increment(1);
            return Err(SpoolError::Full {
                sink: self.sink,
                bytes: stored,
                max_bytes,
            });
        }
        Ok(SpoolRoom {
            queue: self,
            bytes: size,
        })
    }

    /// Durably appends the batch (answered after the commit's fsync), for replay at
    /// once: a batch no request waits on (tools, tests).
    pub async fn append(self: &Arc<Self>, batch: Arc<SinkBatch>) -> Result<(), SpoolError> {
        let room = self.reserve(&batch)?;
        self.store(room, batch).await
    }

    /// Durably appends a request's batch into room held for it: the future answers
    /// after the fsync. It owns what it needs (`'static`), so a caller that stops
    /// waiting for it (a deadline) can hand it to a task that learns its outcome:
    /// once queued, an append cannot be called back.
    ///
    /// The record is not replayed until the request behind the batch has ended
    /// (`SinkBatch::when_ended`): delivered by the replayer while its request waits
    /// for another sink, then a crash before the answer, and nothing would tell the
    /// client's resend that this sink has it. (Once ended, the route's memory and,
    /// after a crash, the spool's recent records tell it; see `recent_events`.)
    pub fn append_into(
        self: &Arc<Self>,
        room: SpoolRoom<'_>,
        batch: Arc<SinkBatch>,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        self.hold_replay_until_answered(&batch);
        self.store(room, batch)
    }

    fn store(
        self: &Arc<Self>,
        room: SpoolRoom<'_>,
        batch: Arc<SinkBatch>,
    ) -> impl Future<Output = Result<(), SpoolError>> + Send + 'static {
        // Stored before the room is given back, so the bytes are never uncounted.
        let size = room.bytes;
        self.bytes.fetch_add(size, Ordering::SeqCst);
        drop(room);
        let queue = self.clone();
        async move {
            let events = batch.events.len() as u64;
            match queue.writer.submit(batch).await {
                Ok(()) => {
                    queue.events.fetch_add(events, Ordering::SeqCst);
                    queue.records.fetch_add(1, Ordering::SeqCst);
                    metrics::counter!(metric::SPOOL_APPENDED_EVENTS, "sink" => queue.sink.name()).increment(events);
                    queue.publish();
                    queue.appended.notify_one();
                    Ok(())
                }
                Err(error) => {
                    count_off(&queue.bytes, size);
                    Err(error)
                }
            }
        }
    }

    fn hold_replay_until_answered(&self, batch: &SinkBatch) {
        let from_key = self.next_key.load(Ordering::SeqCst);
        *lock(&self.unanswered).entry(from_key).or_default() += 1;
        let unanswered = self.unanswered.clone();
        let appended = self.appended.clone();
        batch.when_ended(Box::new(move |_, _| {
            let mut held = lock(&unanswered);
            if let Some(count) = held.get_mut(&from_key) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&from_key);
                }
            }
            drop(held);
            appended.notify_one();
        }));
    }

    /// The first key the replayer must not read yet (see `append_into`).
    fn replay_below(&self) -> u64 {
        lock(&self.unanswered).keys().next().copied().unwrap_or(u64::MAX)
    }

    /// The events of the newest records, from the newest back to those stored
    /// `window_ms` before it, at most about `max_events`: at start-up, the copies
    /// the requests a crash cut off (and those that failed just before) may have
    /// left here. The client's resend of such a request leaves them out of this
    /// sink's copy (the replay delivers them).
    pub fn recent_events(&self, window_ms: i64, max_events: usize) -> Result<Vec<EventKey>, SpoolError> {
        self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(self.table)?;
            let mut out = Vec::new();
            let mut since = None;
            for entry in table.iter()?.rev() {
                let (_, value) = entry?;
                let Ok((created_at_ms, batch)) = decode(value.value()) else {
                    continue;
                };
                let since = *since.get_or_insert(created_at_ms - window_ms);
                if created_at_ms < since || out.len() >= max_events {
                    break;
                }
                let (source, events) = batch.into_parts();
                out.extend(events.into_iter().map(|event| (source.clone(), event.message_id)));
            }
            Ok(out)
        })
    }

    pub(super) fn account_added(&self, bytes: u64, events: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        self.events.fetch_add(events, Ordering::SeqCst);
        self.records.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }

    /// The oldest records, up to about `max_events` events (at least one record);
    /// records delivered but not yet deleted are left out, and so are those of
    /// requests still unanswered and everything after them (`append_into`).
    pub fn read_oldest(&self, max_events: usize, max_records: usize) -> Result<Vec<StoredBatch>, SpoolError> {
        self.read_oldest_within(max_events, max_records, usize::MAX)
    }

    /// `read_oldest`, also stopping once the events read hold about `max_bytes` of
    /// JSON (a replay round's share of the memory budget; at least one record).
    pub fn read_oldest_within(
        &self,
        max_events: usize,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, SpoolError> {
        let skipped: Vec<u64> = self.lock_delivered().iter().map(|record| record.key).collect();
        let below = self.replay_below();
        self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(self.table)?;
            let mut out = Vec::new();
            let (mut events, mut bytes) = (0, 0);
            for entry in table.iter()? {
                let (key, value) = entry?;
                if key.value() >= below {
                    break;
                }
                if skipped.contains(&key.value()) {
                    continue;
                }
                let stored_bytes = value.value().len() as u64;
                let Ok((created_at_ms, batch)) = decode(value.value()) else {
                    // Checked at open; a record damaged since is skipped here and
                    // quarantined at the next start.
                    continue;
                };
                events += batch.events.len();
                bytes += batch.json_bytes();
                out.push(StoredBatch {
                    key: key.value(),
                    created_at_ms,
                    stored_bytes,
                    batch: Arc::new(batch),
                });
                if events >= max_events || out.len() >= max_records || bytes >= max_bytes {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Deletes records whose sink has acknowledged them (one commit, blocking). Each
    /// If the deletion fails, the records are
    /// still counted as stored but no longer replayed, and their deletion is tried
    /// again with the next one.
    pub fn remove_keys(&self, done: &[RecordKey]) -> Result<(), SpoolError> {
        let mut delivered = self.lock_delivered();
        delivered.extend_from_slice(done);
        if delivered.is_empty() {
            return Ok(());
        }
        self.file.run(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(self.table)?;
                for record in delivered.iter() {
                    table.remove(record.key)?;
                }
            }
            Ok(txn.commit()?)
        })?;
        self.refusing.store(false, Ordering::SeqCst);
        for record in delivered.drain(..) {
            count_off(&self.bytes, record.stored_bytes);
            count_off(&self.events, record.events as u64);
            count_off(&self.records, 1);
        }
        drop(delivered);
        self.publish();
        Ok(())
    }

    fn lock_delivered(&self) -> MutexGuard<'_, Vec<RecordKey>> {
        self.delivered_not_removed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `upkeep` has anything to do: the spool file was reopened since the
    /// counters were taken, or delivered records still wait for their deletion.
    /// Cheap, for the replayer to ask every round.
    pub fn needs_upkeep(&self) -> bool {
        self.counted_generation.load(Ordering::SeqCst) != self.file.generation() || !self.lock_delivered().is_empty()
    }

    /// The repairs an I/O error leaves (blocking): after the spool file was
    /// reopened (see `SpoolFile`), counts again what the queue holds, since a commit
    /// that failed may still have reached the disk; then retries deleting records
    /// that were delivered but could not be deleted.
    pub fn upkeep(&self) -> Result<(), SpoolError> {
        let generation = self.file.generation();
        if self.counted_generation.load(Ordering::SeqCst) != generation {
            let stored = self.file.run(|db| scan_queue(db, self.sink, self.table))?;
            self.counted_generation.store(generation, Ordering::SeqCst);
            self.bytes.store(stored.bytes, Ordering::SeqCst);
            self.events.store(stored.events, Ordering::SeqCst);
            self.records.store(stored.records, Ordering::SeqCst);
            self.next_key.fetch_max(stored.last_key + 1, Ordering::SeqCst);
            self.publish();
        }
        self.remove_keys(&[])
    }

    /// Deletes every record of this queue; returns the events dropped.
    pub fn purge(&self) -> Result<u64, SpoolError> {
        let all = self.read_oldest(usize::MAX, usize::MAX)?;
        let keys: Vec<RecordKey> = all.iter().map(StoredBatch::record_key).collect();
        self.remove_keys(&keys)?;
        Ok(keys.iter().map(|record| record.events as u64).sum())
    }

    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    pub fn events(&self) -> u64 {
        self.events.load(Ordering::SeqCst)
    }

    /// False while the spool file is closed after an I/O error (see `SpoolFile`).
    pub fn is_writable(&self) -> bool {
        self.file.is_open()
    }

    /// Full: it refused an append for room and nothing has left since.
    pub fn is_full(&self) -> bool {
        self.refusing.load(Ordering::SeqCst)
            || self.bytes.load(Ordering::Relaxed) >= self.max_bytes.load(Ordering::Relaxed)
    }

    /// The counters and the oldest record's age, read from the file (blocking);
    /// the age is kept for `counters`.
    pub fn stats(&self) -> QueueStats {
        let oldest_age_seconds = self
            .oldest_created_at_ms()
            .ok()
            .flatten()
            .map(|created_at_ms| (now_ms() - created_at_ms).max(0) as f64 / 1000.0);
        *lock(&self.last_oldest_age) = oldest_age_seconds;
        QueueStats {
            oldest_age_seconds,
            ..self.counters()
        }
    }

    /// The counters, and the oldest record's age as last read by `stats` (the
    /// spool gauges' refresh reads it every few seconds); reads nothing from the file, so
    /// it is fit for an async handler (readiness).
    pub fn counters(&self) -> QueueStats {
        QueueStats {
            sink: self.sink.name(),
            events: self.events(),
            records: self.records.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            max_bytes: self.max_bytes.load(Ordering::Relaxed),
            oldest_age_seconds: *lock(&self.last_oldest_age),
        }
    }

    fn oldest_created_at_ms(&self) -> Result<Option<i64>, SpoolError> {
        self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(self.table)?;
            for entry in table.iter()? {
                let (_, value) = entry?;
                if let Ok((created_at_ms, _)) = decode(value.value()) {
                    return Ok(Some(created_at_ms));
                }
            }
            Ok(None)
        })
    }

    fn publish(&self) {
        metrics::gauge!(metric::SPOOL_EVENTS, "sink" => self.sink.name()).set(self.events() as f64);
        metrics::gauge!(metric::SPOOL_BYTES, "sink" => self.sink.name()).set(self.bytes.load(Ordering::SeqCst) as f64);
    }
}

/// The queue's append writer: each group of appends is one write transaction (one
/// fsync); what compression saved against the room held is given back to `bytes`.
fn start_writer(
    sink: SinkKind,
    file: Arc<SpoolFile>,
    table: TableDefinition<'static, u64, &'static [u8]>,
    keys: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) -> (Batcher<SpoolError>, tokio::task::JoinHandle<()>) {
    let limits = BatchLimits {
        max_events: usize::MAX,
        max_bytes: APPEND_GROUP_BYTES,
        linger: Duration::ZERO,
    };
    Batcher::start(spool_writer_name(sink), watch::channel(limits).1, move |group| {
        let file = file.clone();
        let keys = keys.clone();
        let bytes = bytes.clone();
        async move {
            let saved = tokio::task::spawn_blocking(move || file.run(|db| append_group(db, table, &keys, &group)))
                .await
                .unwrap_or_else(|e| Err(SpoolError::Storage(format!("spool writer task failed: {e}"))))?;
            count_off(&bytes, saved);
            Ok(())
        }
    })
}

/// Takes `amount` off a counter, never below zero. After a full-disk episode a
/// counter can be off (a commit that reported failure yet reached the disk is
/// counted off on failure and again when deleted); wrapping below zero would leave
/// the queue full until a restart. `upkeep` recounts after the file is reopened.
fn count_off(counter: &AtomicU64, amount: u64) {
    let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
        Some(now.saturating_sub(amount))
    });
}

fn spool_writer_name(sink: SinkKind) -> &'static str {
    match sink {
        SinkKind::ClickHouse => "clickhouse_spool",
        SinkKind::Kafka => "kafka_spool",
        SinkKind::File => "file_spool",
    }
}

/// Writes the group in one commit. Returns the bytes compression saved against the
/// room the appends held.
fn append_group(
    db: &Database,
    table: TableDefinition<'static, u64, &'static [u8]>,
    keys: &AtomicU64,
    group: &[Arc<SinkBatch>],
) -> Result<u64, redb::Error> {
    let txn = db.begin_write()?;
    let mut saved = 0;
    {
        let mut queue = txn.open_table(table)?;
        let created = now_ms();
        for batch in group {
            let key = keys.fetch_add(1, Ordering::SeqCst);
            let record = encode(batch, created);
            saved += (max_encoded_len(batch) - record.len()) as u64;
            queue.insert(key, record.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(saved)
}

/// What one queue holds.
struct Stored {
    bytes: u64,
    events: u64,
    records: u64,
    last_key: u64,
}

/// Counts a queue's records, moving any that fail their check to quarantine.
fn scan_queue(
    db: &Database,
    sink: SinkKind,
    table: TableDefinition<'static, u64, &'static [u8]>,
) -> Result<Stored, redb::Error> {
    let mut stored = Stored {
        bytes: 0,
        events: 0,
        records: 0,
        last_key: 0,
    };
    let mut corrupt = Vec::new();
    let txn = db.begin_write()?;
    {
        let queue = txn.open_table(table)?;
        for entry in queue.iter()? {
            let (key, value) = entry?;
            stored.last_key = stored.last_key.max(key.value());
            match decode(value.value()) {
                Ok((_, batch)) => {
                    stored.bytes += value.value().len() as u64;
                    stored.events += batch.events.len() as u64;
                    stored.records += 1;
                }
                Err(error) => corrupt.push((key.value(), value.value().to_vec(), error)),
            }
        }
    }
    if !corrupt.is_empty() {
        let mut queue = txn.open_table(table)?;
        let mut quarantine = txn.open_table(QUARANTINE)?;
        for (key, value, error) in &corrupt {
            tracing::error!(sink = sink.name(), key, %error, "spool record failed its check: quarantined");
            let q_key = quarantine.last()?.map_or(1, |(k, _)| k.value() + 1);
            quarantine.insert(q_key, value.as_slice())?;
            queue.remove(*key)?;
        }
        metrics::counter!(metric::SPOOL_QUARANTINED).increment(corrupt.len() as u64);
    }
    // Committed even when nothing changed: the first scan creates the table.
    txn.commit()?;
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use crate::event::{RequestEnd, SinkBatch, SinkKind};
    use crate::spool::Spool;
    use std::sync::Arc;

    fn keys(events: &[crate::event::EventKey]) -> Vec<(&str, &str)> {
        events.iter().map(|(source, id)| (&**source, id.as_str())).collect()
    }

    #[tokio::test]
    async fn a_record_is_replayed_only_once_its_request_has_ended() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), &[(SinkKind::Kafka, 1 << 20)]).unwrap();
        let queue = spool.queue(SinkKind::Kafka).unwrap();
        let answered = Arc::new(SinkBatch::fixture("web", &["a"]));
        queue
            .append_into(queue.reserve(&answered).unwrap(), answered.clone())
            .await
            .unwrap();
        answered.end(RequestEnd::Settled);
        let waiting = Arc::new(SinkBatch::fixture("web", &["b"]));
        queue
            .append_into(queue.reserve(&waiting).unwrap(), waiting.clone())
            .await
            .unwrap();
        let after = Arc::new(SinkBatch::fixture("ios", &["c"]));
        queue
            .append_into(queue.reserve(&after).unwrap(), after.clone())
            .await
            .unwrap();
        after.end(RequestEnd::Settled);

        let ready = |queue: &super::SinkQueue| -> Vec<String> {
            let records = queue.read_oldest(100, 100).unwrap();
            records.iter().map(|r| r.batch.events[0].message_id.clone()).collect()
        };
        assert_eq!(ready(&queue), ["a"], "nothing from the unanswered request on");
        waiting.end(RequestEnd::Unsettled);
        assert_eq!(ready(&queue), ["a", "b", "c"]);

        // The newest records' events, newest first, for the route's memory.
        let recent = queue.recent_events(60_000, 10).unwrap();
        assert_eq!(keys(&recent), [("ios", "c"), ("web", "b"), ("web", "a")]);
        assert_eq!(queue.recent_events(60_000, 1).unwrap().len(), 1);
    }
}
