//! The spool's redb file and its reopening after an I/O error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::Database;

use super::{storage, SpoolError};
use crate::clock::now_ms;
use crate::telemetry::metric;

/// redb's page cache (its default is 1 GiB): spooled data lives on disk, not in RAM.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The spool's redb file, shared by the queues. After one failed write redb refuses
/// every later operation until the database is closed and opened again.
///
/// When the disk was full (`ENOSPC`, `EDQUOT`, `EFBIG`), the write was refused before
/// anything reached the page cache, and `SpoolFile` reopens by itself: the failing
/// operation drops the open database, and the next one opens it again once every
/// user of the old one is done (at most one attempt a second), so breakwater recovers
/// when space is back instead of answering 503 until someone restarts it.
///
/// Any other I/O error (`EIO` from an fsync above all) may have left pages in the
/// page cache that never reached the disk and never will: reopening would read them
/// as written, and later commits, built on them, could be lost in a power cut. The
/// file is then not reopened: appends are refused (`503 spool_unavailable`),
/// readiness says why, and an operator restarts breakwater once the disk is checked.
pub(super) struct SpoolFile {
    pub(super) path: PathBuf,
    state: std::sync::Mutex<FileState>,
    /// Counts reopenings, so each queue knows to recount what is stored.
    generation: AtomicU64,
}

struct FileState {
    open: Option<Arc<Database>>,
    /// The database dropped after an I/O error, until its last user lets go.
    closing: std::sync::Weak<Database>,
    last_attempt: Option<std::time::Instant>,
    /// Set by an I/O error other than a full disk: never reopened (see above).
    failed_for_good: Option<String>,
}

/// Whether the spool file may be reopened after this error: only a full disk (the
/// write was refused; nothing is left in the page cache that the disk lacks).
fn reopening_is_safe(error: &redb::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EFBIG: i32 = 27;
    const EDQUOT: i32 = 122;
    match error {
        redb::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::FileTooLarge
                || matches!(io.raw_os_error(), Some(ENOSPC | EFBIG | EDQUOT))
        }
        // Only after an error of this same database, which decided already.
        _ => true,
    }
}

const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

impl SpoolFile {
    pub(super) fn open(path: PathBuf) -> Result<SpoolFile, SpoolError> {
        let db = open_database(&path)?;
        Ok(SpoolFile {
            path,
            state: std::sync::Mutex::new(FileState {
                open: Some(Arc::new(db)),
                closing: std::sync::Weak::new(),
                last_attempt: None,
                failed_for_good: None,
            }),
            generation: AtomicU64::new(0),
        })
    }

    /// Runs one operation on the database (blocking). An I/O error closes the
    /// database for reopening; the error is returned either way.
    pub(super) fn run<T>(&self, op: impl FnOnce(&Database) -> Result<T, redb::Error>) -> Result<T, SpoolError> {
        crate::threads::debug_assert_blocking_allowed("a spool (redb) operation");
        let db = self.database()?;
        let result = op(&db);
        match result {
            Ok(value) => Ok(value),
            Err(error @ (redb::Error::Io(_) | redb::Error::PreviousIo)) => {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.open.as_ref().is_some_and(|open| Arc::ptr_eq(open, &db)) {
                    metrics::counter!(metric::SPOOL_IO_ERRORS).increment(1);
                    state.closing = Arc::downgrade(&db);
                    state.open = None;
                    if reopening_is_safe(&error) {
                        tracing::error!(%error, spool = %self.path.display(), "spool write failed (disk full): closing the file, to reopen it");
                    } else {
                        tracing::error!(%error, spool = %self.path.display(), "spool write failed: the file is not reopened (its pages may not be on disk); check the disk, then restart breakwater");
                        state.failed_for_good = Some(error.to_string());
                    }
                }
                match &state.failed_for_good {
                    Some(why) => Err(SpoolError::Storage(format!(
                        "{why} (the spool file is not reopened after this error: check the disk, then restart)"
                    ))),
                    None => Err(SpoolError::Storage(format!("{error} (the spool file is reopened)"))),
                }
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
        if let Some(why) = &state.failed_for_good {
            return Err(SpoolError::Storage(format!(
                "the spool file is closed for good after an I/O error ({why}): check the disk, then restart breakwater"
            )));
        }
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

    pub(super) fn is_open(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).open.is_some()
    }

    pub(super) fn generation(&self) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(errno: i32) -> redb::Error {
        redb::Error::Io(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn a_full_disk_is_reopened_but_an_fsync_error_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = SpoolFile::open(dir.path().join("spool.redb")).unwrap();
        // ENOSPC: closed, reopened by the next operation.
        assert!(file.run(|_| Err::<(), _>(io_error(28))).is_err());
        assert!(!file.is_open());
        file.run(|_| Ok(())).unwrap();
        assert!(file.is_open());
        assert_eq!(file.generation(), 1);

        // EIO (what a failed fsync reports): never reopened.
        let error = file.run(|_| Err::<(), _>(io_error(5))).unwrap_err().to_string();
        assert!(error.contains("not reopened"), "{error}");
        std::thread::sleep(REOPEN_INTERVAL);
        let error = file.run(|_| Ok(())).unwrap_err().to_string();
        assert!(
            error.contains("closed for good") && error.contains("restart"),
            "{error}"
        );
        assert!(!file.is_open());
    }
}
