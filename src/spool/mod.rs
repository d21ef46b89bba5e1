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

pub use record::{decode, encode, encoded_len, CorruptRecord};

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
    db: Arc<Database>,
    path: PathBuf,
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
    db: Arc<Database>,
    table: TableDefinition<'static, u64, &'static [u8]>,
    bytes: AtomicU64,
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
    /// Opens (or creates) the spool under `dir` with a queue for each sink. A file
    /// redb reports as corrupted is moved aside and a fresh one started; any other
    /// failure (in use, I/O) is an error: data is never set aside on a guess.
    pub fn open(dir: &Path, sinks: &[(&'static str, u64)]) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let path = dir.join("spool.redb");
        let db = match Database::builder().set_cache_size(CACHE_BYTES).create(&path) {
            Ok(db) => db,
            Err(error @ redb::DatabaseError::Storage(redb::StorageError::Corrupted(_))) => {
                let aside = dir.join(format!("spool.redb.corrupt-{}", now_ms()));
                tracing::error!(%error, moved_to = %aside.display(), "spool file unreadable: set aside, starting an empty spool");
                metrics::counter!(metric::SPOOL_QUARANTINED).increment(1);
                std::fs::rename(&path, &aside).map_err(storage)?;
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .create(&path)
                    .map_err(storage)?
            }
            Err(error) => return Err(SpoolError::Storage(format!("{}: {error}", path.display()))),
        };
        let db = Arc::new(db);
        let mut queues = Vec::new();
        for &(sink, max_bytes) in sinks {
            queues.push(Arc::new(SinkQueue::open(db.clone(), sink, max_bytes)?));
        }
        Ok(Spool { db, path, queues })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(DEAD_LETTER).map_err(storage)?;
            let key = table.last().map_err(storage)?.map_or(1, |(k, _)| k.value() + 1);
            table.insert(key, value.as_slice()).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        metrics::counter!(metric::DEAD_LETTER_EVENTS, "sink" => sink.to_string()).increment(batch.events.len() as u64);
        Ok(())
    }

    /// Every dead letter: (key, sink, error, created_at_ms, batch).
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, SpoolError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(DEAD_LETTER) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(storage(error)),
        };
        let mut letters = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            letters.push(DeadLetter::decode(key.value(), value.value())?);
        }
        Ok(letters)
    }

    /// Moves dead letters back into their sink's queue (all, or those in `keys`);
    /// returns how many events moved.
    pub fn requeue_dead_letters(&self, keys: Option<&[u64]>) -> Result<u64, SpoolError> {
        let letters = self.dead_letters()?;
        let mut moved = 0;
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut dead = txn.open_table(DEAD_LETTER).map_err(storage)?;
            for letter in letters.iter().filter(|l| keys.is_none_or(|k| k.contains(&l.key))) {
                let Some(queue) = self.queue(&letter.sink) else {
                    continue;
                };
                let mut table = txn.open_table(queue.table).map_err(storage)?;
                let key = queue.next_key.fetch_add(1, Ordering::SeqCst);
                let bytes = encode(&letter.batch, now_ms());
                table.insert(key, bytes.as_slice()).map_err(storage)?;
                dead.remove(letter.key).map_err(storage)?;
                queue.account_added(bytes.len() as u64, letter.batch.events.len() as u64);
                moved += letter.batch.events.len() as u64;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(moved)
    }

    /// Deletes dead letters (all, or those in `keys`); returns how many records went.
    pub fn purge_dead_letters(&self, keys: Option<&[u64]>) -> Result<u64, SpoolError> {
        let letters = self.dead_letters()?;
        let txn = self.db.begin_write().map_err(storage)?;
        let mut removed = 0;
        {
            let mut dead = txn.open_table(DEAD_LETTER).map_err(storage)?;
            for letter in letters.iter().filter(|l| keys.is_none_or(|k| k.contains(&l.key))) {
                dead.remove(letter.key).map_err(storage)?;
                removed += 1;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(removed)
    }

    /// Records set aside because they failed their checksum.
    pub fn quarantined(&self) -> Result<u64, SpoolError> {
        let txn = self.db.begin_read().map_err(storage)?;
        match txn.open_table(QUARANTINE) {
            Ok(table) => table.len().map_err(storage),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(error) => Err(storage(error)),
        }
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
    fn open(db: Arc<Database>, sink: &'static str, max_bytes: u64) -> Result<SinkQueue, SpoolError> {
        let table = queue_table(sink);
        let (mut bytes, mut events, mut records, mut last_key) = (0u64, 0u64, 0u64, 0u64);
        let mut corrupt = Vec::new();
        {
            let txn = db.begin_write().map_err(storage)?;
            {
                let queue = txn.open_table(table).map_err(storage)?;
                for entry in queue.iter().map_err(storage)? {
                    let (key, value) = entry.map_err(storage)?;
                    last_key = last_key.max(key.value());
                    match decode(value.value()) {
                        Ok((_, batch)) => {
                            bytes += value.value().len() as u64;
                            events += batch.events.len() as u64;
                            records += 1;
                        }
                        Err(error) => corrupt.push((key.value(), value.value().to_vec(), error)),
                    }
                }
            }
            if !corrupt.is_empty() {
                let mut queue = txn.open_table(table).map_err(storage)?;
                let mut quarantine = txn.open_table(QUARANTINE).map_err(storage)?;
                for (key, value, error) in &corrupt {
                    tracing::error!(sink, key, %error, "spool record failed its check: quarantined");
                    let q_key = quarantine.last().map_err(storage)?.map_or(1, |(k, _)| k.value() + 1);
                    quarantine.insert(q_key, value.as_slice()).map_err(storage)?;
                    queue.remove(*key).map_err(storage)?;
                }
                metrics::counter!(metric::SPOOL_QUARANTINED).increment(corrupt.len() as u64);
            }
            txn.commit().map_err(storage)?;
        }
        let next_key = Arc::new(AtomicU64::new(last_key + 1));
        let writer_db = db.clone();
        let writer_keys = next_key.clone();
        let limits = BatchLimits {
            max_events: usize::MAX,
            max_bytes: APPEND_GROUP_BYTES,
            linger: Duration::ZERO,
        };
        let (writer, writer_task) = Batcher::start(spool_writer_name(sink), watch::channel(limits).1, move |group| {
            let db = writer_db.clone();
            let keys = writer_keys.clone();
            async move {
                tokio::task::spawn_blocking(move || append_group(&db, table, &keys, &group))
                    .await
                    .unwrap_or_else(|e| Err(format!("spool writer task failed: {e}")))
                    .map_err(|message| SinkError::Io { sink: "spool", message })
            }
        });
        if records > 0 {
            tracing::info!(sink, records, events, bytes, "spool holds records from before");
        }
        let queue = SinkQueue {
            sink,
            db,
            table,
            bytes: AtomicU64::new(bytes),
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
        let size = encoded_len(batch) as u64;
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

    /// The oldest records, up to about `max_events` events (at least one record).
    pub fn read_oldest(&self, max_events: usize, max_records: usize) -> Result<Vec<StoredBatch>, SpoolError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(self.table).map_err(storage)?;
        let mut out = Vec::new();
        let mut events = 0;
        for entry in table.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
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
    }

    /// Deletes records whose sink has acknowledged them (one commit). Each entry
    /// is (key, stored bytes, events).
    pub fn remove_keys(&self, done: &[(u64, u64, usize)]) -> Result<(), SpoolError> {
        if done.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(self.table).map_err(storage)?;
            for (key, _, _) in done {
                table.remove(*key).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        self.refusing.store(false, Ordering::SeqCst);
        for (_, bytes, events) in done {
            self.bytes.fetch_sub(*bytes, Ordering::SeqCst);
            self.events.fetch_sub(*events as u64, Ordering::SeqCst);
            self.records.fetch_sub(1, Ordering::SeqCst);
        }
        self.publish();
        Ok(())
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

fn append_group(
    db: &Database,
    table: TableDefinition<'static, u64, &'static [u8]>,
    keys: &AtomicU64,
    group: &[Arc<SinkBatch>],
) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut queue = txn.open_table(table).map_err(|e| e.to_string())?;
        let created = now_ms();
        for batch in group {
            let key = keys.fetch_add(1, Ordering::SeqCst);
            queue
                .insert(key, encode(batch, created).as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
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
