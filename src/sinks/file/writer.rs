//! The file sink's writer: the active NDJSON file, rotation, and one append plus
//! one `fdatasync` per group. Runs on the blocking pool.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::errors::FileError;
use super::{FILE_PREFIX, FILE_SUFFIX};
use crate::event::SinkBatch;
use crate::telemetry::metric;

pub(super) struct ActiveFile {
    file: File,
    pub(super) path: PathBuf,
    sequence: u64,
    bytes: u64,
}

/// How many taken names a new file skips before giving up.
const NAMES_TRIED: u64 = 1_000;

impl ActiveFile {
    /// Creates the first free file from `sequence` on. A name can be taken without
    /// being a file the sink writes: a rotation whose directory fsync failed leaves
    /// its new, empty file behind. Such a name is skipped (EEXIST), never appended to.
    pub(super) fn create_from(dir: &Path, sequence: u64) -> std::io::Result<ActiveFile> {
        let mut next = sequence;
        loop {
            match Self::create(dir, next) {
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && next < sequence + NAMES_TRIED => {
                    next += 1
                }
                created => return created,
            }
        }
    }

    fn create(dir: &Path, sequence: u64) -> std::io::Result<ActiveFile> {
        let path = dir.join(format!("{FILE_PREFIX}{sequence:08}{FILE_SUFFIX}"));
        let file = OpenOptions::new().append(true).create_new(true).open(&path)?;
        // The new name must survive a crash too.
        File::open(dir)?.sync_all()?;
        Ok(ActiveFile {
            file,
            path,
            sequence,
            bytes: 0,
        })
    }
}

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) active: ActiveFile,
    pub(super) max_file_bytes: u64,
}

impl Writer {
    /// Appends every batch of the group as NDJSON, then one fdatasync. On failure
    /// the file is cut back to where the group started, so no unacknowledged
    /// half-write stays.
    pub(super) fn commit(&mut self, group: &[Arc<SinkBatch>]) -> Result<(), FileError> {
        let size: usize = group.iter().map(|b| b.json_bytes() + b.events.len()).sum();
        let mut payload = Vec::with_capacity(size);
        for event in group.iter().flat_map(|b| &b.events) {
            payload.extend_from_slice(&event.json);
            payload.push(b'\n');
        }
        if self.active.bytes > 0 && self.active.bytes + payload.len() as u64 > self.max_file_bytes {
            self.active = ActiveFile::create_from(&self.dir, self.active.sequence + 1)?;
            metrics::counter!(metric::FILE_SINK_ROTATIONS).increment(1);
            tracing::info!(active = %self.active.path.display(), "file sink rotated");
        }
        let started_at = self.active.bytes;
        let sync_started = Instant::now();
        let result = self
            .active
            .file
            .write_all(&payload)
            .and_then(|()| self.active.file.sync_data());
        if let Err(error) = result {
            // Best effort: if even this fails, start-up repair still cuts a torn tail,
            // and dedup makes the client's retry of whole lines harmless.
            let _ = self.active.file.set_len(started_at);
            let _ = self.active.file.seek(SeekFrom::End(0));
            return Err(error.into());
        }
        metrics::histogram!(metric::FILE_SINK_FSYNC_DURATION).record(sync_started.elapsed().as_secs_f64());
        metrics::histogram!(metric::FILE_SINK_REQUESTS_PER_FSYNC).record(group.len() as f64);
        metrics::counter!(metric::FILE_SINK_BYTES).increment(payload.len() as u64);
        self.active.bytes += payload.len() as u64;
        Ok(())
    }
}
