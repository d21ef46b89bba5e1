//! The crash-safe local spool (redb, `<data_dir>/spool/spool.redb`): one queue per
//! sink for batches the sink could not take, a dead-letter table for batches a sink
//! rejected for good, and a quarantine table for records that fail their checksum.
//!
//! Invariants: an append is answered only after its write transaction committed
//! (fsync; many appends share one commit through the `Batcher`); a record leaves a
//! queue only after its sink acknowledged it (or it was dead-lettered); a corrupt
//! record or file is set aside and counted, never a reason to refuse to start.

pub mod record;
pub mod replay;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use tokio::sync::{watch, Notify};

pub use record::{decode, encode, max_encoded_len, CorruptRecord};

use crate::sinks::batcher::{BatchLimits, Batcher};
use crate::sinks::{SinkBatch, SinkError};
use crate::telemetry::metric;

const DEAD_LETTER: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letter");
/// redb's page cache (its default is 1 GiB): spooled data lives on disk, not in RAM.
const CACHE_BYTES: usize = 64 * 1024 * 1024;
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");

/// The queue table of a sink. Only the sinks breakwater has get one.
fn queue_table(sink: &'static str) -> TableDefinition<'static, u64, &'static [u8]> {
    match sink {
        "clickhouse" => TableDefinition::new("spool.clickhouse"),
        "kafka" => TableDefinition::new("spool.kafka"),
        "file" => TableDefinition::new("spool.file"),
        _ => TableDefinition::new("spool.other"),
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("{sink} spool is full ({bytes} of {max_bytes} bytes)")]
    Full {
        sink: &'static str,
        bytes: u64,
        max_bytes: u64,
    },
    #[error("spool storage error: {0}")]
    Storage(String),
}

fn storage(error: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(error.to_string())
}

/// One stored batch as read back.
pub struct StoredBatch {
    pub key: u64,
    pub created_at_ms: i64,
    pub stored_bytes: u64,
    pub batch: Arc<SinkBatch>,
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

pub struct Spool {
    file: Arc<SpoolFile>,
    queues: Vec<Arc<SinkQueue>>,
}

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
    pub sink: &'static str,
    file: Arc<SpoolFile>,
    /// The file's generation the counters were taken from (see `upkeep`).
    counted_generation: AtomicU64,
    /// Records the sink acknowledged whose deletion failed (a full disk): kept out
    /// of replay, so they are not delivered twice, and deleted with the next removal.
    delivered_not_removed: std::sync::Mutex<Vec<(u64, u64, usize)>>,
    table: TableDefinition<'static, u64, &'static [u8]>,
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
    refusing: std::sync::atomic::AtomicBool,
    next_key: Arc<AtomicU64>,
    /// Woken on every append, so the replayer starts at once.
    pub appended: Notify,
    writer: Batcher,
    writer_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How many bytes one append commit may carry.
const APPEND_GROUP_BYTES: usize = 64 * 1024 * 1024;

impl Spool {
    /// Opens (or creates) the spool under `dir` with a queue for each sink (see
    /// `open_database` for what happens to a file that cannot be read).
    pub fn open(dir: &Path, sinks: &[(&'static str, u64)]) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let file = Arc::new(SpoolFile::open(dir.join("spool.redb"))?);
        let mut queues = Vec::new();
        for &(sink, max_bytes) in sinks {
            queues.push(Arc::new(SinkQueue::open(file.clone(), sink, max_bytes)?));
        }
        Ok(Spool { file, queues })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn queue(&self, sink: &str) -> Option<Arc<SinkQueue>> {
        self.queues.iter().find(|q| q.sink == sink).cloned()
    }

    pub fn queues(&self) -> &[Arc<SinkQueue>] {
        &self.queues
    }

    /// Closes the spool: waits (up to 5 s) for the append writers to finish and
    /// release the database, so it can be opened again at once.
    pub async fn close(self) {
        let writers: Vec<_> = self
            .queues
            .iter()
            .filter_map(|q| q.writer_task.lock().unwrap_or_else(|p| p.into_inner()).take())
            .collect();
        drop(self);
        let _ = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(writers)).await;
    }

    /// Keeps a batch a sink rejected for good, with the sink's error (blocking).
    pub fn add_dead_letter(&self, sink: &str, error: &str, batch: &SinkBatch) -> Result<(), SpoolError> {
        let mut value = Vec::new();
        put_str(&mut value, sink);
        put_str(&mut value, error);
        value.extend_from_slice(&encode(batch, now_ms()));
        self.file.run(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(DEAD_LETTER)?;
                let key = table.last()?.map_or(1, |(k, _)| k.value() + 1);
                table.insert(key, value.as_slice())?;
            }
            Ok(txn.commit()?)
        })?;
        metrics::counter!(metric::DEAD_LETTER_EVENTS, "sink" => sink.to_string()).increment(batch.events.len() as u64);
        Ok(())
    }

    /// Every dead letter: (key, sink, error, created_at_ms, batch).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, SpoolError> {
        let stored = self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(DEAD_LETTER) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(error) => return Err(error.into()),
            };
            let mut stored = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                stored.push((key.value(), value.value().to_vec()));
            }
            Ok(stored)
        })?;
        stored
            .iter()
            .map(|(key, value)| DeadLetter::decode(*key, value))
            .collect()
    }

    /// Moves dead letters back into their sink's queue (all, or those in `keys`);
    /// returns how many events moved.
    pub fn requeue_dead_letters(&self, keys: Option<&[u64]>) -> Result<u64, SpoolError> {
        let letters = self.dead_letters()?;
        let chosen: Vec<(&DeadLetter, Arc<SinkQueue>)> = letters
            .iter()
            .filter(|l| keys.is_none_or(|k| k.contains(&l.key)))
            .filter_map(|l| Some((l, self.queue(&l.sink)?)))
            .collect();
        let moved = self.file.run(|db| {
            let txn = db.begin_write()?;
            let mut moved = Vec::new();
            {
                let mut dead = txn.open_table(DEAD_LETTER)?;
                for (letter, queue) in &chosen {
                    let mut table = txn.open_table(queue.table)?;
                    let key = queue.next_key.fetch_add(1, Ordering::SeqCst);
                    let bytes = encode(&letter.batch, now_ms());
                    table.insert(key, bytes.as_slice())?;
                    dead.remove(letter.key)?;
                    moved.push((queue, bytes.len() as u64, letter.batch.events.len() as u64));
                }
            }
            txn.commit()?;
            Ok(moved)
        })?;
        for (queue, bytes, events) in &moved {
            queue.account_added(*bytes, *events);
        }
        Ok(moved.iter().map(|(_, _, events)| events).sum())
    }

    /// Deletes dead letters (all, or those in `keys`); returns how many records went.
    pub fn purge_dead_letters(&self, keys: Option<&[u64]>) -> Result<u64, SpoolError> {
        let letters = self.dead_letters()?;
        self.file.run(|db| {
            let txn = db.begin_write()?;
            let mut removed = 0;
            {
                let mut dead = txn.open_table(DEAD_LETTER)?;
                for letter in letters.iter().filter(|l| keys.is_none_or(|k| k.contains(&l.key))) {
                    dead.remove(letter.key)?;
                    removed += 1;
                }
            }
            txn.commit()?;
            Ok(removed)
        })
    }

    /// Records set aside because they failed their checksum.
    pub fn quarantined(&self) -> Result<u64, SpoolError> {
        self.file.run(|db| {
            let txn = db.begin_read()?;
            match txn.open_table(QUARANTINE) {
                Ok(table) => Ok(table.len()?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(error) => Err(error.into()),
            }
        })
    }
}

/// A batch a sink refused for good.
#[derive(Debug)]
pub struct DeadLetter {
    pub key: u64,
    pub sink: String,
    pub error: String,
    pub created_at_ms: i64,
    pub batch: SinkBatch,
}

impl DeadLetter {
    fn decode(key: u64, value: &[u8]) -> Result<DeadLetter, SpoolError> {
        let corrupt = || SpoolError::Storage(format!("dead letter {key} is corrupt"));
        let (sink, rest) = take_str(value).ok_or_else(corrupt)?;
        let (error, rest) = take_str(rest).ok_or_else(corrupt)?;
        let (created_at_ms, batch) = decode(rest).map_err(|_| corrupt())?;
        Ok(DeadLetter {
            key,
            sink,
            error,
            created_at_ms,
            batch,
        })
    }
}

impl SinkQueue {
    fn open(file: Arc<SpoolFile>, sink: &'static str, max_bytes: u64) -> Result<SinkQueue, SpoolError> {
        let table = queue_table(sink);
        let counted_generation = file.generation();
        let stored = file.run(|db| scan_queue(db, sink, table))?;
        let Stored {
            bytes,
            events,
            records,
            last_key,
        } = stored;
        let next_key = Arc::new(AtomicU64::new(last_key + 1));
        let bytes = Arc::new(AtomicU64::new(bytes));
        let writer_file = file.clone();
        let writer_keys = next_key.clone();
        let writer_bytes = bytes.clone();
        let limits = BatchLimits {
            max_events: usize::MAX,
            max_bytes: APPEND_GROUP_BYTES,
            linger: Duration::ZERO,
        };
        let (writer, writer_task) = Batcher::start(spool_writer_name(sink), watch::channel(limits).1, move |group| {
            let file = writer_file.clone();
            let keys = writer_keys.clone();
            let bytes = writer_bytes.clone();
            async move {
                tokio::task::spawn_blocking(move || file.run(|db| append_group(db, table, &keys, &group)))
                    .await
                    .unwrap_or_else(|e| Err(SpoolError::Storage(format!("spool writer task failed: {e}"))))
                    .map(|saved| {
                        bytes.fetch_sub(saved, Ordering::SeqCst);
                    })
                    .map_err(|error| SinkError::Io {
                        sink: "spool",
                        message: error.to_string(),
                    })
            }
        });
        if records > 0 {
            let bytes = bytes.load(Ordering::SeqCst);
            tracing::info!(sink, records, events, bytes, "spool holds records from before");
        }
        let queue = SinkQueue {
            sink,
            file,
            counted_generation: AtomicU64::new(counted_generation),
            delivered_not_removed: std::sync::Mutex::new(Vec::new()),
            table,
            bytes,
            events: AtomicU64::new(events),
            records: AtomicU64::new(records),
            max_bytes: AtomicU64::new(max_bytes),
            reserved: AtomicU64::new(0),
            refusing: std::sync::atomic::AtomicBool::new(false),
            next_key,
            appended: Notify::new(),
            writer,
            writer_task: std::sync::Mutex::new(Some(writer_task)),
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
            metrics::counter!(metric::SPOOL_FULL, "sink" => self.sink).increment(1);
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

    /// Durably appends the batch (answered after the commit's fsync).
    pub async fn append(&self, batch: Arc<SinkBatch>) -> Result<(), SpoolError> {
        let room = self.reserve(&batch)?;
        self.append_into(room, batch).await
    }

    /// Durably appends a batch into room held for it (answered after the fsync).
    pub async fn append_into(&self, room: SpoolRoom<'_>, batch: Arc<SinkBatch>) -> Result<(), SpoolError> {
        // Stored before the room is given back, so the bytes are never uncounted.
        let size = room.bytes;
        self.bytes.fetch_add(size, Ordering::SeqCst);
        drop(room);
        let events = batch.events.len() as u64;
        match self.writer.submit(batch).await {
            Ok(()) => {
                self.events.fetch_add(events, Ordering::SeqCst);
                self.records.fetch_add(1, Ordering::SeqCst);
                metrics::counter!(metric::SPOOL_APPENDED_EVENTS, "sink" => self.sink).increment(events);
                self.publish();
                self.appended.notify_one();
                Ok(())
            }
            Err(error) => {
                self.bytes.fetch_sub(size, Ordering::SeqCst);
                Err(storage(error))
            }
        }
    }

    fn account_added(&self, bytes: u64, events: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        self.events.fetch_add(events, Ordering::SeqCst);
        self.records.fetch_add(1, Ordering::SeqCst);
        self.publish();
    }

    /// The oldest records, up to about `max_events` events (at least one record);
    /// records delivered but not yet deleted are left out.
    pub fn read_oldest(&self, max_events: usize, max_records: usize) -> Result<Vec<StoredBatch>, SpoolError> {
        let skipped: Vec<u64> = self.lock_delivered().iter().map(|(key, _, _)| *key).collect();
        self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(self.table)?;
            let mut out = Vec::new();
            let mut events = 0;
            for entry in table.iter()? {
                let (key, value) = entry?;
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
                out.push(StoredBatch {
                    key: key.value(),
                    created_at_ms,
                    stored_bytes,
                    batch: Arc::new(batch),
                });
                if events >= max_events || out.len() >= max_records {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Deletes records whose sink has acknowledged them (one commit, blocking). Each
    /// entry is (key, stored bytes, events). If the deletion fails, the records are
    /// still counted as stored but no longer replayed, and their deletion is tried
    /// again with the next one.
    pub fn remove_keys(&self, done: &[(u64, u64, usize)]) -> Result<(), SpoolError> {
        let mut delivered = self.lock_delivered();
        delivered.extend_from_slice(done);
        if delivered.is_empty() {
            return Ok(());
        }
        self.file.run(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(self.table)?;
                for (key, _, _) in delivered.iter() {
                    table.remove(*key)?;
                }
            }
            Ok(txn.commit()?)
        })?;
        self.refusing.store(false, Ordering::SeqCst);
        for (_, bytes, events) in delivered.drain(..) {
            self.bytes.fetch_sub(bytes, Ordering::SeqCst);
            self.events.fetch_sub(events as u64, Ordering::SeqCst);
            self.records.fetch_sub(1, Ordering::SeqCst);
        }
        drop(delivered);
        self.publish();
        Ok(())
    }

    fn lock_delivered(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64, usize)>> {
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
        let keys: Vec<(u64, u64, usize)> = all
            .iter()
            .map(|s| (s.key, s.stored_bytes, s.batch.events.len()))
            .collect();
        self.remove_keys(&keys)?;
        Ok(keys.iter().map(|(_, _, events)| *events as u64).sum())
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

    pub fn stats(&self) -> QueueStats {
        let oldest_age_seconds = self.read_oldest(1, 1).ok().and_then(|oldest| {
            oldest
                .first()
                .map(|s| (now_ms() - s.created_at_ms).max(0) as f64 / 1000.0)
        });
        QueueStats {
            sink: self.sink,
            events: self.events(),
            records: self.records.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            max_bytes: self.max_bytes.load(Ordering::Relaxed),
            oldest_age_seconds,
        }
    }

    fn publish(&self) {
        metrics::gauge!(metric::SPOOL_EVENTS, "sink" => self.sink).set(self.events() as f64);
        metrics::gauge!(metric::SPOOL_BYTES, "sink" => self.sink).set(self.bytes.load(Ordering::SeqCst) as f64);
    }
}

fn spool_writer_name(sink: &'static str) -> &'static str {
    match sink {
        "clickhouse" => "clickhouse_spool",
        "kafka" => "kafka_spool",
        "file" => "file_spool",
        _ => "spool",
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
    sink: &'static str,
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
            tracing::error!(sink, key, %error, "spool record failed its check: quarantined");
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

/// The spool's redb file, shared by the queues. After one failed write (a full
/// disk, an I/O error) redb refuses every later operation until the database is
/// closed and opened again. `SpoolFile` does that by itself: the failing operation
/// drops the open database, and the next one opens it again once every user of the
/// old one is done (at most one attempt a second), so breakwater recovers when
/// space is back instead of answering 503 until someone restarts it.
struct SpoolFile {
    path: PathBuf,
    state: std::sync::Mutex<FileState>,
    /// Counts reopenings, so each queue knows to recount what is stored.
    generation: AtomicU64,
}

struct FileState {
    open: Option<Arc<Database>>,
    /// The database dropped after an I/O error, until its last user lets go.
    closing: std::sync::Weak<Database>,
    last_attempt: Option<std::time::Instant>,
}

const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

impl SpoolFile {
    fn open(path: PathBuf) -> Result<SpoolFile, SpoolError> {
        let db = open_database(&path)?;
        Ok(SpoolFile {
            path,
            state: std::sync::Mutex::new(FileState {
                open: Some(Arc::new(db)),
                closing: std::sync::Weak::new(),
                last_attempt: None,
            }),
            generation: AtomicU64::new(0),
        })
    }

    /// Runs one operation on the database (blocking). An I/O error closes the
    /// database for reopening; the error is returned either way.
    fn run<T>(&self, op: impl FnOnce(&Database) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        let db = self.database()?;
        let result = op(&db);
        match result {
            Ok(value) => Ok(value),
            Err(error @ (redb::Error::Io(_) | redb::Error::PreviousIo)) => {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.open.as_ref().is_some_and(|open| Arc::ptr_eq(open, &db)) {
                    tracing::error!(%error, spool = %self.path.display(), "spool write failed: closing the file, to reopen it");
                    metrics::counter!(metric::SPOOL_IO_ERRORS).increment(1);
                    state.closing = Arc::downgrade(&db);
                    state.open = None;
                }
                Err(SpoolError::Storage(format!("{error} (the spool file is reopened)")))
            }
            Err(error) => Err(storage(error)),
        }
    }

    fn database(&self) -> Result<Arc<Database>, SpoolError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = &state.open {
            return Ok(db.clone());
        }
        let unavailable =
            |why: &str| SpoolError::Storage(format!("the spool file is closed after an I/O error ({why})"));
        if state.closing.strong_count() > 0 {
            return Err(unavailable("still in use"));
        }
        if state.last_attempt.is_some_and(|at| at.elapsed() < REOPEN_INTERVAL) {
            return Err(unavailable("next attempt within a second"));
        }
        state.last_attempt = Some(std::time::Instant::now());
        match open_database(&self.path) {
            Ok(db) => {
                tracing::warn!(spool = %self.path.display(), "spool file reopened");
                metrics::counter!(metric::SPOOL_REOPENED).increment(1);
                let db = Arc::new(db);
                state.open = Some(db.clone());
                self.generation.fetch_add(1, Ordering::SeqCst);
                Ok(db)
            }
            Err(error) => {
                tracing::error!(%error, "spool file cannot be reopened yet");
                Err(unavailable(&error.to_string()))
            }
        }
    }

    fn is_open(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).open.is_some()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// Opens (or creates) the redb file. A file redb reports as corrupted is moved
/// aside and a fresh one started; any other failure (in use, I/O) is an error:
/// data is never set aside on a guess.
fn open_database(path: &Path) -> Result<Database, SpoolError> {
    match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
        Ok(db) => Ok(db),
        Err(error @ redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))) => {
            let aside = path.with_extension(format!("redb.corrupt-{}", now_ms()));
            tracing::error!(%error, moved_to = %aside.display(), "spool file unreadable: set aside, starting an empty spool");
            metrics::counter!(metric::SPOOL_QUARANTINED).increment(1);
            std::fs::rename(path, &aside).map_err(storage)?;
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(path)
                .map_err(storage)
        }
        Err(error) => Err(SpoolError::Storage(format!("{}: {error}", path.display()))),
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn take_str(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let text = bytes.get(4..4 + len)?;
    Some((String::from_utf8(text.to_vec()).ok()?, &bytes[4 + len..]))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
