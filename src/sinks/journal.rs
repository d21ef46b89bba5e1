//! An in-doubt journal: which batches were handed to a sink and are not yet
//! settled, kept in `<data_dir>/<sink>/in-doubt.journal` so that the sink's memory of
//! writes of unknown outcome outlives the process. Kafka (`kafka/readback.rs`) and
//! ClickHouse (`clickhouse/in_doubt.rs`) keep one each. Before a batch is handed
//! over its `(source, messageIds)` are written (with, for Kafka, each partition's
//! log end); once the request behind it has ended and the write's outcome is known
//! (or, for a write of unknown outcome, once each of its events was found in the
//! sink or written again) the batch is marked settled. At start-up the batches
//! still open are remembered as of unknown outcome, so a client's resend of a
//! request that was unanswered when breakwater died is looked up in the sink before
//! it is written again.
//!
//! The journal is written without fsync: it survives the process (`kill -9`), not a
//! power loss. It is rewritten with only the open batches at start-up and whenever it
//! has grown past `COMPACT_AFTER_BYTES`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::event::SinkKind;
use crate::telemetry::throttle::{Throttle, WARN_EVERY};

const FILE_NAME: &str = "in-doubt.journal";
/// The journal is rewritten with only its open batches past this size.
const COMPACT_AFTER_BYTES: u64 = 64 * 1024 * 1024;

/// One line of the journal, as read.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Sent {
        sent: u64,
        source: String,
        ids: Vec<String>,
        /// Kafka's (partition, log end) pairs (an untagged enum cannot read integer
        /// map keys); none for other sinks.
        #[serde(default)]
        ends: Vec<(i32, i64)>,
    },
    Settled {
        settled: u64,
    },
}

/// A `sent` line as written: borrowed from the batch, so writing it copies no id.
#[derive(Serialize)]
struct SentLine<'a> {
    sent: u64,
    source: &'a str,
    ids: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ends: Vec<(i32, i64)>,
}

/// A batch found open at start-up: handed over, never settled.
pub struct OpenBatch {
    pub number: u64,
    pub source: Arc<str>,
    pub ids: Vec<String>,
    /// Kafka's (partition, log end) pairs when it was sent.
    pub ends: Vec<(i32, i64)>,
}

pub struct Journal {
    sink: SinkKind,
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    next: u64,
    /// Each open batch's `sent` line, kept for compaction.
    open: HashMap<u64, Vec<u8>>,
    written_bytes: u64,
}

impl Journal {
    /// Reads what an earlier process left, rewrites the journal with its open
    /// batches only, and returns them (in the order they were sent).
    pub fn open(sink: SinkKind, dir: &Path) -> std::io::Result<(Journal, Vec<OpenBatch>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let (open_lines, next) = read_open(&path)?;
        let mut batches = Vec::new();
        let mut open = HashMap::new();
        for (number, line) in open_lines {
            if let Ok(Line::Sent { source, ids, ends, .. }) = serde_json::from_slice::<Line>(&line) {
                batches.push(OpenBatch {
                    number,
                    source: Arc::from(source),
                    ids,
                    ends,
                });
                open.insert(number, line);
            }
        }
        batches.sort_unstable_by_key(|batch| batch.number);
        let file = rewrite(&path, &open)?;
        let written_bytes = open.values().map(|line| line.len() as u64).sum();
        let journal = Journal {
            sink,
            path,
            state: Mutex::new(State {
                file,
                next,
                open,
                written_bytes,
            }),
        };
        Ok((journal, batches))
    }

    /// Records a batch about to be handed over; its number, or `None` when the
    /// journal cannot be written (then the batch is produced all the same: a crash
    /// before it is settled may then send it twice; logged).
    pub fn sent<'a>(
        &self,
        source: &str,
        ids: impl Iterator<Item = &'a str>,
        ends: impl Iterator<Item = (i32, i64)>,
    ) -> Option<u64> {
        let mut state = self.lock();
        let number = state.next;
        state.next += 1;
        let line = SentLine {
            sent: number,
            source,
            ids: ids.collect(),
            ends: ends.collect(),
        };
        let mut bytes = serde_json::to_vec(&line).ok()?;
        bytes.push(b'\n');
        if let Err(error) = state.append(&bytes) {
            warn_unwritable(self.sink, &error);
            return None;
        }
        state.open.insert(number, bytes);
        if state.written_bytes > COMPACT_AFTER_BYTES {
            state.compact(self.sink, &self.path);
        }
        Some(number)
    }

    /// Marks a batch settled: nothing of it is in doubt any more.
    pub fn settled(&self, number: u64) {
        let mut state = self.lock();
        if state.open.remove(&number).is_none() {
            return;
        }
        let mut bytes = serde_json::to_vec(&Line::Settled { settled: number }).unwrap_or_default();
        bytes.push(b'\n');
        if let Err(error) = state.append(&bytes) {
            warn_unwritable(self.sink, &error);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.written_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Rewrites the journal with the open batches only.
    fn compact(&mut self, sink: SinkKind, path: &Path) {
        match rewrite(path, &self.open) {
            Ok(file) => {
                self.file = file;
                self.written_bytes = self.open.values().map(|line| line.len() as u64).sum();
            }
            Err(error) => warn_unwritable(sink, &error),
        }
    }
}

/// The `sent` lines never settled (by batch number) and the next free number.
fn read_open(path: &Path) -> std::io::Result<(HashMap<u64, Vec<u8>>, u64)> {
    let mut open = HashMap::new();
    let mut next = 1;
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok((open, next)),
        Err(error) => return Err(error),
    };
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        // A line cut by a crash is not JSON: skipped.
        match serde_json::from_slice::<Line>(&line) {
            Ok(Line::Sent { sent, .. }) => {
                next = next.max(sent + 1);
                let mut kept = line;
                kept.push(b'\n');
                open.insert(sent, kept);
            }
            Ok(Line::Settled { settled }) => {
                open.remove(&settled);
            }
            Err(_) => {}
        }
    }
    Ok((open, next))
}

/// Writes `open` to a new file, renames it over the journal and returns it open
/// for appending.
fn rewrite(path: &Path, open: &HashMap<u64, Vec<u8>>) -> std::io::Result<File> {
    let fresh = path.with_extension("journal.new");
    let mut file = File::create(&fresh)?;
    let mut numbers: Vec<_> = open.keys().copied().collect();
    numbers.sort_unstable();
    for number in numbers {
        file.write_all(&open[&number])?;
    }
    drop(file);
    std::fs::rename(&fresh, path)?;
    OpenOptions::new().append(true).open(path)
}

/// The numbers of the batches open in the journal in `dir`, read without rewriting it
/// (a journal in use there is left as it is).
#[cfg(test)]
pub fn open_numbers(dir: &Path) -> Vec<u64> {
    let (open, _) = read_open(&dir.join(FILE_NAME)).unwrap();
    let mut numbers: Vec<u64> = open.into_keys().collect();
    numbers.sort_unstable();
    numbers
}

fn warn_unwritable(sink: SinkKind, error: &std::io::Error) {
    static UNWRITABLE: Throttle = Throttle::new(WARN_EVERY);
    if let Some(suppressed) = UNWRITABLE.allow() {
        tracing::warn!(sink = sink.name(), %error, suppressed_since_last = suppressed, "the in-doubt journal cannot be written; a crash may then write a batch twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_not_settled_are_found_open_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, open) = Journal::open(SinkKind::Kafka, dir.path()).unwrap();
        assert!(open.is_empty());
        let ends = vec![(0, 10), (1, 7)];
        let first = journal
            .sent("web", ["a", "b"].into_iter(), ends.iter().copied())
            .unwrap();
        let second = journal.sent("ios", ["c"].into_iter(), std::iter::empty()).unwrap();
        journal.settled(first);
        let third = journal.sent("web", ["d"].into_iter(), ends.iter().copied()).unwrap();
        drop(journal);

        let (journal, open) = Journal::open(SinkKind::Kafka, dir.path()).unwrap();
        assert_eq!(open.len(), 2);
        assert_eq!(open[0].number, second);
        assert_eq!((&*open[0].source, open[0].ids.clone()), ("ios", vec!["c".to_string()]));
        assert!(open[0].ends.is_empty(), "a batch sent without log ends");
        assert_eq!((open[1].number, open[1].ends.clone()), (third, ends));
        // Numbers go on after the ones already used.
        assert!(journal.sent("web", ["e"].into_iter(), std::iter::empty()).unwrap() > third);
    }

    #[test]
    fn a_line_cut_by_a_crash_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(SinkKind::ClickHouse, dir.path()).unwrap();
        journal.sent("web", ["a"].into_iter(), std::iter::empty()).unwrap();
        drop(journal);
        let path = dir.path().join(FILE_NAME);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"sent\":9,\"source\":\"we");
        std::fs::write(&path, text).unwrap();
        let (_, open) = Journal::open(SinkKind::ClickHouse, dir.path()).unwrap();
        assert_eq!(open.len(), 1);
    }
}
