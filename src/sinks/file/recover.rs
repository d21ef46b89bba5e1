//! Start-up recovery of the file sink's files: a torn last line left by a crash is
//! cut, and the events of recent files are reported (so dedup survives restarts).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{FILE_PREFIX, FILE_SUFFIX};

/// An event found in the sink's files at start-up.
pub struct RecoveredEvent<'a> {
    pub source: &'a str,
    pub message_id: &'a str,
    pub received_at_unix_seconds: u64,
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
pub(super) fn repair_torn_tail(path: &Path) -> std::io::Result<()> {
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

/// Reports the events of one file. The file is made durable first: a crash can
/// leave whole lines written but never fsynced (never acknowledged either), and
/// dedup must not trust a line the disk may not hold.
pub(super) fn scan_events(path: &Path, recovered: &mut dyn FnMut(RecoveredEvent<'_>)) -> std::io::Result<u64> {
    let file = File::open(path)?;
    file.sync_data()?;
    let mut reader = BufReader::new(file);
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
