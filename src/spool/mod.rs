//! The crash-safe local spool (redb, `<data_dir>/spool/spool.redb`): one queue per
//! sink for batches the sink could not take, a dead-letter table for batches a sink
//! rejected for good, and a quarantine table for records that fail their checksum.
//!
//! Invariants: an append is answered only after its write transaction committed
//! (fsync; many appends share one commit through the `Batcher`); a record leaves a
//! queue only after its sink acknowledged it (or it was dead-lettered); a corrupt
//! record or file is set aside and counted, never a reason to refuse to start.
//!
//! `queue.rs` is one sink's queue, `file.rs` the redb file (reopened after an I/O
//! error), `dead_letter.rs` the dead-letter table, `record.rs` the record format.
//! The spool never calls a sink: the pipeline's replayer reads from it.

mod dead_letter;
mod file;
mod queue;
pub mod record;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTableMetadata};

use crate::batcher::BatcherStopped;
use crate::event::SinkKind;
pub use dead_letter::DeadLetter;
use file::SpoolFile;
use queue::QUARANTINE;
pub use queue::{QueueStats, RecordKey, SinkQueue, SpoolRoom, StoredBatch};
pub use record::{decode, encode, max_encoded_len, CorruptRecord};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("{sink} spool is full ({bytes} of {max_bytes} bytes)")]
    Full { sink: SinkKind, bytes: u64, max_bytes: u64 },
    #[error("spool storage error: {0}")]
    Storage(String),
    #[error("the dead-letter store is full ({bytes} of {max_bytes} bytes): requeue or purge some (breakwater dlq …)")]
    DeadLettersFull { bytes: u64, max_bytes: u64 },
}

impl From<BatcherStopped> for SpoolError {
    fn from(_: BatcherStopped) -> Self {
        SpoolError::Storage("the spool's append writer has stopped".into())
    }
}

fn storage(error: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(error.to_string())
}

/// The spool: one redb file, a queue per sink, the dead-letter and quarantine tables.
pub struct Spool {
    file: Arc<SpoolFile>,
    queues: Vec<Arc<SinkQueue>>,
    /// Bytes of the dead letters stored, and the most they may take (policy).
    dead_letter_bytes: AtomicU64,
    dead_letter_max_bytes: AtomicU64,
}

impl Spool {
    /// Opens (or creates) the spool under `dir` with a queue for each sink (see
    /// `open_database` for what happens to a file that cannot be read).
    pub fn open(dir: &Path, sinks: &[(SinkKind, u64)]) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let file = Arc::new(SpoolFile::open(dir.join("spool.redb"))?);
        let mut queues = Vec::new();
        for &(sink, max_bytes) in sinks {
            queues.push(Arc::new(SinkQueue::open(file.clone(), sink, max_bytes)?));
        }
        let spool = Spool {
            file,
            queues,
            dead_letter_bytes: AtomicU64::new(0),
            dead_letter_max_bytes: AtomicU64::new(u64::MAX),
        };
        spool.recount_dead_letters()?;
        Ok(spool)
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    pub fn queue(&self, sink: SinkKind) -> Option<Arc<SinkQueue>> {
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
