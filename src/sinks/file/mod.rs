//! The file sink: rotating NDJSON files under `<data_dir>/events/`, one normalized
//! event per line, group-committed through the `Batcher` (many waiting requests
//! share one `fdatasync`). File I/O runs on the blocking pool, never on the runtime.
//! `writer.rs` appends and rotates, `recover.rs` repairs and reads back at start-up,
//! `errors.rs` classifies failures.
//!
//! Invariants: a request is answered `Ok` only after its bytes are fsynced; a file
//! is never appended to after rotation or restart (every file but the newest is
//! complete); a torn last line left by a crash is cut off at start-up.

mod errors;
mod recover;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::batcher::{BatchLimits, Batcher};
use crate::config::FileSinkConfig;
use crate::event::{SinkBatch, SinkKind};
use crate::policy::BatchPolicy;
use crate::sinks::{batch_limits_of, recorded, Sink, SinkError, SinkHandle};
use crate::telemetry::health::DependencyHealth;
pub use errors::FileError;
pub use recover::{list_files, RecoveredEvent};
use recover::{repair_torn_tail, scan_events};
use writer::{ActiveFile, Writer};

const FILE_PREFIX: &str = "events-";
const FILE_SUFFIX: &str = ".ndjson";

/// What the file sink needs to start.
pub struct FileSinkSettings<'a, 'r> {
    /// `<data_dir>/events`.
    pub dir: PathBuf,
    pub config: &'a FileSinkConfig,
    /// Events in files modified within this window are reported to `recovered`.
    pub recover_window: Duration,
    /// Sees each event found at start-up (dedup refills itself from them); `None`:
    /// the files are repaired but not read.
    pub recovered: Option<&'r mut dyn FnMut(RecoveredEvent<'_>)>,
}

/// Repairs the files, reports the recent events, opens a fresh file and starts the
/// group-commit writer.
pub fn start(settings: FileSinkSettings<'_, '_>, batch: &BatchPolicy) -> Result<SinkHandle, FileError> {
    let (limits_sender, limits) = watch::channel(batch_limits_of(batch));
    let (sink, task) = FileSink::open(
        &settings.dir,
        settings.config,
        limits,
        settings.recover_window,
        settings.recovered,
    )?;
    let health = sink.health.clone();
    Ok(SinkHandle::new(SinkKind::File, sink, health)
        .with_task(task)
        .with_batch_limits(limits_sender))
}

/// The running file sink: its group-commit writer and its health.
#[derive(Clone)]
pub struct FileSink {
    batcher: Batcher<FileError>,
    health: Arc<DependencyHealth>,
}

impl Sink for FileSink {
    async fn deliver(&self, batch: Arc<SinkBatch>) -> Result<(), SinkError> {
        self.batcher.submit(batch).await.map_err(SinkError::from)
    }
}

impl FileSink {
    /// Repairs the files in `dir`, reports the events of those modified within
    /// `recover_window` to `recovered` (so dedup survives restarts), opens a fresh
    /// file and starts the batcher. Returns the batcher task to await at shutdown.
    pub fn open(
        dir: &Path,
        config: &FileSinkConfig,
        limits: watch::Receiver<BatchLimits>,
        recover_window: Duration,
        mut recovered: Option<&mut dyn FnMut(RecoveredEvent<'_>)>,
    ) -> Result<(FileSink, tokio::task::JoinHandle<()>), FileError> {
        std::fs::create_dir_all(dir)?;
        let files = list_files(dir)?;
        let mut recovered_count = 0u64;
        for (_, path) in &files {
            repair_torn_tail(path)?;
            let Some(recovered) = recovered.as_deref_mut() else {
                continue;
            };
            let modified = std::fs::metadata(path)?.modified()?;
            let age = SystemTime::now().duration_since(modified).unwrap_or_default();
            if age <= recover_window {
                recovered_count += scan_events(path, recovered)?;
            }
        }
        let next_sequence = files.last().map_or(1, |(sequence, _)| sequence + 1);
        let active = ActiveFile::create_from(dir, next_sequence)?;
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
        let health = Arc::new(DependencyHealth::default());
        let flush_health = health.clone();
        let (batcher, task) = Batcher::start(SinkKind::File.name(), limits, move |group| {
            let writer = writer.clone();
            let health = flush_health.clone();
            async move {
                let result = tokio::task::spawn_blocking(move || {
                    writer.lock().unwrap_or_else(|p| p.into_inner()).commit(&group)
                })
                .await
                .unwrap_or_else(|e| Err(FileError::WriterTask(e.to_string())));
                recorded(SinkKind::File, &health, result)
            }
        });
        Ok((FileSink { batcher, health }, task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NormalizedEvent;
    use crate::sinks::Sink;

    fn batch(lines: &[&str]) -> Arc<SinkBatch> {
        let events = lines
            .iter()
            .map(|line| NormalizedEvent::fixture("", line.as_bytes()))
            .collect();
        Arc::new(SinkBatch::new(Arc::from("web"), events))
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
            crate::event::format_timestamp(chrono::Utc::now())
        )
    }

    /// 4 KB files, so each of `write_three_big_lines`' 3 KB lines rotates one.
    fn small_files() -> FileSinkConfig {
        FileSinkConfig {
            enabled: Some(true),
            max_file_bytes: 4096,
        }
    }

    /// Writes three 3 KB lines whose ids start with 0, 1 and 2; the last step
    /// (`before_writing`) runs once the sink is open.
    async fn write_three_big_lines(dir: &Path, before_writing: impl FnOnce()) {
        let (sink, writer) =
            FileSink::open(dir, &small_files(), test_limits(), Duration::from_secs(3600), None).unwrap();
        before_writing();
        let big = "x".repeat(3000);
        for i in 0..3 {
            let delivered = sink.deliver(batch(&[&line(&format!("{i}{big}"))])).await;
            assert!(delivered.is_ok(), "write {i}: {delivered:?}");
        }
        drop(sink);
        writer.await.unwrap();
    }

    /// Opens the sink again and returns the first letter of every id it recovers.
    async fn recovered_id_initials(dir: &Path) -> Vec<char> {
        let mut ids = Vec::new();
        let (sink, writer) = FileSink::open(
            dir,
            &small_files(),
            test_limits(),
            Duration::from_secs(3600),
            Some(&mut |e| ids.push(e.message_id.chars().next().unwrap())),
        )
        .unwrap();
        drop(sink);
        writer.await.unwrap();
        ids
    }

    #[tokio::test]
    async fn writes_rotate_and_restart_opens_a_new_file_and_recovers_ids() {
        let dir = tempfile::tempdir().unwrap();
        write_three_big_lines(dir.path(), || {}).await;
        assert_eq!(
            list_files(dir.path()).unwrap().len(),
            3,
            "each 3 KB line rotates a 4 KB file"
        );
        assert_eq!(recovered_id_initials(dir.path()).await, ['0', '1', '2']);
        assert_eq!(
            list_files(dir.path()).unwrap().len(),
            4,
            "restart never appends to an old file"
        );
    }

    #[tokio::test]
    async fn a_name_left_taken_by_a_failed_rotation_is_skipped() {
        // A rotation whose directory fsync failed leaves its new file behind; the
        // next rotation must not trip over that name (EEXIST) for ever.
        let dir = tempfile::tempdir().unwrap();
        write_three_big_lines(dir.path(), || {
            std::fs::write(dir.path().join("events-00000002.ndjson"), b"").unwrap()
        })
        .await;
        assert_eq!(recovered_id_initials(dir.path()).await, ['0', '1', '2']);
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
            Some(&mut |e| ids.push(e.message_id.to_string())),
        )
        .unwrap();
        drop(sink);
        writer.await.unwrap();
        assert_eq!(ids, ["a"]);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
    }
}
