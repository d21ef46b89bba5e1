//! The file sink: rotating NDJSON files under `<data_dir>/events/`, one normalized
//! event per line, group-committed through the `Batcher` (many waiting requests
//! share one `fdatasync`). File I/O runs on the blocking pool, never on the runtime.
//!
//! Invariants: a request is answered `Ok` only after its bytes are fsynced; a file
//! is never appended to after rotation or restart (every file but the newest is
//! complete); a torn last line left by a crash is cut off at start-up.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use super::batcher::{BatchLimits, Batcher};
use super::{SinkBatch, SinkError};
use crate::config::FileSinkConfig;
use crate::telemetry::metric;

pub const SINK_NAME: &str = "file";
const FILE_PREFIX: &str = "events-";
const FILE_SUFFIX: &str = ".ndjson";

/// An event found in the sink's files at start-up.
pub struct RecoveredEvent<'a> {
    pub source: &'a str,
    pub message_id: &'a str,
    pub received_at_unix_seconds: u64,
}

/// The file sink: its batcher handle (the `Sink`) and the task to await at shutdown.
pub struct FileSink;

impl FileSink {
    /// Repairs the files in `dir`, reports the events of those modified within
    /// `recover_window` to `recovered` (so dedup survives restarts), opens a fresh
    /// file and starts the batcher. Returns the batcher task to await at shutdown.
    pub fn open(
        dir: &Path,
        config: &FileSinkConfig,
        limits: watch::Receiver<BatchLimits>,
        recover_window: Duration,
        mut recovered: impl FnMut(RecoveredEvent<'_>),
    ) -> std::io::Result<(Batcher, tokio::task::JoinHandle<()>)> {
        std::fs::create_dir_all(dir)?;
        let files = list_files(dir)?;
        let mut recovered_count = 0u64;
        for (_, path) in &files {
            repair_torn_tail(path)?;
            let modified = std::fs::metadata(path)?.modified()?;
            let age = SystemTime::now().duration_since(modified).unwrap_or_default();
            if age <= recover_window {
                recovered_count += scan_events(path, &mut recovered)?;
            }
        }
        let next_sequence = files.last().map_or(1, |(sequence, _)| sequence + 1);
        let active = ActiveFile::create(dir, next_sequence)?;
        tracing::info!(
            dir = %dir.display(),
            files = files.len(),
            recovered_events = recovered_count,
            active = %active.path.display(),
            "file sink opened"
        );
        let writer = Arc::new(Mutex::new(Writer {
            dir: dir.to_path_buf(),
            active,
            max_file_bytes: config.max_file_bytes,
        }));
        Ok(Batcher::start(SINK_NAME, limits, move |group| {
            let writer = writer.clone();
            async move {
                tokio::task::spawn_blocking(move || writer.lock().unwrap_or_else(|p| p.into_inner()).commit(&group))
                    .await
                    .unwrap_or_else(|e| {
                        Err(SinkError::Io {
                            sink: SINK_NAME,
                            message: format!("writer task failed: {e}"),
                        })
                    })
            }
        }))
    }
}

struct ActiveFile {
    file: File,
    path: PathBuf,
    sequence: u64,
    bytes: u64,
}

impl ActiveFile {
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

struct Writer {
    dir: PathBuf,
    active: ActiveFile,
    max_file_bytes: u64,
}

impl Writer {
    /// Appends every batch of the group as NDJSON, then one fdatasync. On failure
    /// the file is cut back to where the group started, so no unacknowledged
    /// half-write stays.
    fn commit(&mut self, group: &[Arc<SinkBatch>]) -> Result<(), SinkError> {
        let io_error = |e: std::io::Error| SinkError::Io {
            sink: SINK_NAME,
            message: e.to_string(),
        };
        let size: usize = group.iter().map(|b| b.json_bytes() + b.events.len()).sum();
        let mut payload = Vec::with_capacity(size);
        for event in group.iter().flat_map(|b| &b.events) {
            payload.extend_from_slice(&event.json);
            payload.push(b'\n');
        }
        if self.active.bytes > 0 && self.active.bytes + payload.len() as u64 > self.max_file_bytes {
            self.active = ActiveFile::create(&self.dir, self.active.sequence + 1).map_err(io_error)?;
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
            return Err(io_error(error));
        }
        metrics::histogram!(metric::FILE_SINK_FSYNC_DURATION).record(sync_started.elapsed().as_secs_f64());
        metrics::histogram!(metric::FILE_SINK_REQUESTS_PER_FSYNC).record(group.len() as f64);
        metrics::counter!(metric::FILE_SINK_BYTES).increment(payload.len() as u64);
        self.active.bytes += payload.len() as u64;
        Ok(())
    }
}

/// The sink's files, oldest first, with their sequence numbers.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(sequence) = name
            .to_str()
            .and_then(|n| n.strip_prefix(FILE_PREFIX))
            .and_then(|n| n.strip_suffix(FILE_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        files.push((sequence, entry.path()));
    }
    files.sort();
    Ok(files)
}

/// Cuts a partial last line (a write interrupted by a crash; never acknowledged).
fn repair_torn_tail(path: &Path) -> std::io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(());
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(length - 1))?;
    std::io::Read::read_exact(&mut file, &mut last)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Walk back in chunks to the last newline.
    let mut end = length;
    let mut keep = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let piece = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        std::io::Read::read_exact(&mut file, piece)?;
        if let Some(position) = piece.iter().rposition(|b| *b == b'\n') {
            keep = start + position as u64 + 1;
            break;
        }
        end = start;
    }
    file.set_len(keep)?;
    file.sync_all()?;
    tracing::warn!(file = %path.display(), cut_bytes = length - keep, "cut a torn last line left by a crash");
    Ok(())
}

#[derive(Deserialize)]
struct RecordedIds<'a> {
    #[serde(rename = "messageId", borrow)]
    message_id: std::borrow::Cow<'a, str>,
    #[serde(rename = "sourceName", borrow)]
    source_name: std::borrow::Cow<'a, str>,
    #[serde(rename = "receivedAt", borrow)]
    received_at: std::borrow::Cow<'a, str>,
}

fn scan_events(path: &Path, recovered: &mut impl FnMut(RecoveredEvent<'_>)) -> std::io::Result<u64> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut line = Vec::new();
    let mut count = 0;
    let mut unreadable = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let Ok(ids) = serde_json::from_slice::<RecordedIds>(&line) else {
            unreadable += 1;
            continue;
        };
        let received_at = chrono::DateTime::parse_from_rfc3339(&ids.received_at)
            .map(|t| t.timestamp().max(0) as u64)
            .unwrap_or(0);
        recovered(RecoveredEvent {
            source: &ids.source_name,
            message_id: &ids.message_id,
            received_at_unix_seconds: received_at,
        });
        count += 1;
    }
    if unreadable > 0 {
        tracing::warn!(file = %path.display(), lines = unreadable, "lines without messageId/sourceName/receivedAt were not loaded into dedup");
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::segment::{EventType, NormalizedEvent};

    fn batch(lines: &[&str]) -> Arc<SinkBatch> {
        let events = lines
            .iter()
            .map(|line| NormalizedEvent {
                message_id: String::new(),
                event_type: EventType::Track,
                user_id: None,
                anonymous_id: None,
                event_name: String::new(),
                timestamp_ms: 0,
                received_at_ms: 0,
                json: line.as_bytes().to_vec(),
            })
            .collect();
        Arc::new(SinkBatch {
            source: Arc::from("web"),
            events,
        })
    }

    fn test_limits() -> watch::Receiver<BatchLimits> {
        watch::channel(BatchLimits {
            max_events: usize::MAX,
            max_bytes: 1 << 20,
            linger: Duration::ZERO,
        })
        .1
    }

    fn line(id: &str) -> String {
        format!(
            r#"{{"messageId":"{id}","sourceName":"web","receivedAt":"{}"}}"#,
            crate::intake::segment::format_timestamp(chrono::Utc::now())
        )
    }

    #[tokio::test]
    async fn writes_rotate_and_restart_opens_a_new_file_and_recovers_ids() {
        let dir = tempfile::tempdir().unwrap();
        let config = FileSinkConfig {
            enabled: Some(true),
            max_file_bytes: 4096,
        };
        let (sink, writer) =
            FileSink::open(dir.path(), &config, test_limits(), Duration::from_secs(3600), |_| {}).unwrap();
        let big = "x".repeat(3000);
        for i in 0..3 {
            sink.submit(batch(&[&line(&format!("{i}{big}"))])).await.unwrap();
        }
        drop(sink);
        writer.await.unwrap();
        assert_eq!(
            list_files(dir.path()).unwrap().len(),
            3,
            "each 3 KB line rotates a 4 KB file"
        );

        let mut ids = Vec::new();
        let (sink, writer) = FileSink::open(dir.path(), &config, test_limits(), Duration::from_secs(3600), |e| {
            ids.push(e.message_id.chars().next().unwrap())
        })
        .unwrap();
        drop(sink);
        writer.await.unwrap();
        assert_eq!(ids, ['0', '1', '2']);
        assert_eq!(
            list_files(dir.path()).unwrap().len(),
            4,
            "restart never appends to an old file"
        );
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events-00000001.ndjson");
        std::fs::write(&path, format!("{}\n{{\"messageId\":\"tor", line("a"))).unwrap();
        let mut ids = Vec::new();
        let (sink, writer) = FileSink::open(
            dir.path(),
            &FileSinkConfig::default(),
            test_limits(),
            Duration::from_secs(60),
            |e| ids.push(e.message_id.to_string()),
        )
        .unwrap();
        drop(sink);
        writer.await.unwrap();
        assert_eq!(ids, ["a"]);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
    }
}
