//! Refused events, kept with their reasons under `<data_dir>/rejected/` so nothing
//! is dropped silently. Bounded: two NDJSON files of half the budget each; when the
//! active one is full it replaces the older one (the discarded bytes are counted).
//! Not fsynced: these events were refused, the client already knows why.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

use super::error::EventRejection;
use crate::telemetry::metric;

pub const ACTIVE_FILE: &str = "rejected.ndjson";
pub const PREVIOUS_FILE: &str = "rejected.1.ndjson";

/// One line of the store.
#[derive(Debug, Serialize)]
pub struct RejectedRecord {
    #[serde(rename = "rejectedAt")]
    pub rejected_at: String,
    pub source: String,
    /// Position in the request's batch (0 for single-event requests).
    pub index: usize,
    pub reason: EventRejection,
    pub event: Value,
}

pub struct RejectedStore {
    files: Mutex<ActiveRejectedFile>,
    max_file_bytes: u64,
}

struct ActiveRejectedFile {
    dir: PathBuf,
    file: File,
    bytes: u64,
}

impl RejectedStore {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<RejectedStore> {
        std::fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(ACTIVE_FILE))?;
        let bytes = file.metadata()?.len();
        Ok(RejectedStore {
            files: Mutex::new(ActiveRejectedFile {
                dir: dir.to_path_buf(),
                file,
                bytes,
            }),
            max_file_bytes: max_bytes / 2,
        })
    }

    /// Appends the records off the async threads. Failures are logged and counted,
    /// never returned: the client's answer does not depend on this store.
    pub async fn record(self: &Arc<Self>, records: Vec<RejectedRecord>) {
        if records.is_empty() {
            return;
        }
        let store = self.clone();
        let count = records.len();
        let written = tokio::task::spawn_blocking(move || store.append(&records)).await;
        match written {
            Ok(Ok(())) => metrics::counter!(metric::REJECTED_STORE_WRITTEN).increment(count as u64),
            Ok(Err(error)) => {
                metrics::counter!(metric::REJECTED_STORE_ERRORS).increment(1);
                tracing::error!(%error, records = count, "could not write to the rejected store");
            }
            Err(error) => {
                metrics::counter!(metric::REJECTED_STORE_ERRORS).increment(1);
                tracing::error!(%error, "rejected store task failed");
            }
        }
    }

    fn append(&self, records: &[RejectedRecord]) -> std::io::Result<()> {
        let mut text = Vec::new();
        for record in records {
            serde_json::to_writer(&mut text, record)?;
            text.push(b'\n');
        }
        let mut active = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if active.bytes > 0 && active.bytes + text.len() as u64 > self.max_file_bytes {
            let previous = active.dir.join(PREVIOUS_FILE);
            let discarded = std::fs::metadata(&previous).map(|m| m.len()).unwrap_or(0);
            std::fs::rename(active.dir.join(ACTIVE_FILE), &previous)?;
            active.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(active.dir.join(ACTIVE_FILE))?;
            active.bytes = 0;
            if discarded > 0 {
                metrics::counter!(metric::REJECTED_STORE_DISCARDED_BYTES).increment(discarded);
                tracing::warn!(bytes = discarded, "rejected store full: discarded its oldest file");
            }
        }
        active.file.write_all(&text)?;
        active.bytes += text.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> RejectedRecord {
        RejectedRecord {
            rejected_at: "2024-01-01T00:00:00.000Z".into(),
            source: "web".into(),
            index: i,
            reason: EventRejection::new("missing_event", "x"),
            event: Value::String("y".repeat(100)),
        }
    }

    #[test]
    fn the_store_stays_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = RejectedStore::open(dir.path(), 8192).unwrap();
        for i in 0..1000 {
            store.append(&[record(i)]).unwrap();
        }
        let total: u64 = [ACTIVE_FILE, PREVIOUS_FILE]
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len())
            .sum();
        assert!(total <= 8192, "{total} bytes");
        let newest = std::fs::read_to_string(dir.path().join(ACTIVE_FILE)).unwrap();
        assert!(newest.contains("\"index\":999"));
    }
}
