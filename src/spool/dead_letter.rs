//! The dead-letter table: batches a sink rejected for good, kept with the sink's
//! error until an operator requeues or purges them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::record::{decode, encode};
use super::{SinkQueue, Spool, SpoolError};
use crate::clock::now_ms;
use crate::event::{SinkBatch, SinkKind};
use crate::telemetry::metric;

const DEAD_LETTER: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letter");

impl Spool {
    /// Keeps a batch a sink rejected for good, with the sink's error (blocking).
    /// Past the policy's `dead_letters.max_bytes` it is refused (`DeadLettersFull`):
    /// the request fails rather than an acknowledged event being dropped.
    pub fn add_dead_letter(&self, sink: SinkKind, error: &str, batch: &SinkBatch) -> Result<(), SpoolError> {
        let mut value = Vec::new();
        put_str(&mut value, sink.name());
        put_str(&mut value, error);
        value.extend_from_slice(&encode(batch, now_ms()));
        let stored = self.dead_letter_bytes.load(Ordering::SeqCst);
        let max_bytes = self.dead_letter_max_bytes.load(Ordering::SeqCst);
        if stored + value.len() as u64 > max_bytes {
            metrics::counter!(metric::DEAD_LETTER_REFUSED_EVENTS, "sink" => sink.name())
                .increment(batch.events.len() as u64);
            return Err(SpoolError::DeadLettersFull {
                bytes: stored,
                max_bytes,
            });
        }
        self.file.run(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(DEAD_LETTER)?;
                let key = table.last()?.map_or(1, |(k, _)| k.value() + 1);
                table.insert(key, value.as_slice())?;
            }
            Ok(txn.commit()?)
        })?;
        self.dead_letter_bytes.fetch_add(value.len() as u64, Ordering::SeqCst);
        metrics::counter!(metric::DEAD_LETTER_EVENTS, "sink" => sink.name()).increment(batch.events.len() as u64);
        metrics::gauge!(metric::DEAD_LETTER_BYTES).set(self.dead_letter_bytes.load(Ordering::SeqCst) as f64);
        Ok(())
    }

    /// The policy's cap on the dead letters' bytes.
    pub fn set_dead_letter_max_bytes(&self, max_bytes: u64) {
        self.dead_letter_max_bytes.store(max_bytes, Ordering::SeqCst);
    }

    /// Counts the dead letters' bytes from the table (at open, and after a requeue or
    /// purge; blocking).
    pub(super) fn recount_dead_letters(&self) -> Result<(), SpoolError> {
        let bytes = self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(DEAD_LETTER) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(error) => return Err(error.into()),
            };
            let mut bytes = 0u64;
            for entry in table.iter()? {
                bytes += entry?.1.value().len() as u64;
            }
            Ok(bytes)
        })?;
        self.dead_letter_bytes.store(bytes, Ordering::SeqCst);
        metrics::gauge!(metric::DEAD_LETTER_BYTES).set(bytes as f64);
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

    /// One page of dead letters, oldest first: at most `limit` after the key `after`
    /// (from the start when `None`), and the key to ask for the next page after
    /// (`None`: this was the last). Only that page is decoded (blocking).
    pub fn dead_letter_page(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<u64>), SpoolError> {
        let (stored, more) = self.file.run(|db| {
            let txn = db.begin_read()?;
            let table = match txn.open_table(DEAD_LETTER) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), false)),
                Err(error) => return Err(error.into()),
            };
            let start = after.map_or(0, |key| key.saturating_add(1));
            let mut stored = Vec::new();
            let mut more = false;
            for entry in table.range(start..)? {
                let (key, value) = entry?;
                if stored.len() == limit {
                    more = true;
                    break;
                }
                stored.push((key.value(), value.value().to_vec()));
            }
            Ok((stored, more))
        })?;
        let next = more.then(|| stored.last().map(|(key, _)| *key)).flatten();
        let letters = stored
            .iter()
            .map(|(key, value)| DeadLetter::decode(*key, value))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((letters, next))
    }

    /// How many dead-letter records there are, without reading them (blocking).
    pub fn dead_letter_count(&self) -> Result<u64, SpoolError> {
        self.file.run(|db| {
            let txn = db.begin_read()?;
            match txn.open_table(DEAD_LETTER) {
                Ok(table) => Ok(table.len()?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(error) => Err(error.into()),
            }
        })
    }

    /// Moves dead letters back into their sink's queue (all, or those in `keys`);
    /// returns how many events moved.
    pub fn requeue_dead_letters(&self, keys: Option<&[u64]>) -> Result<u64, SpoolError> {
        let letters = self.dead_letters()?;
        let chosen: Vec<(&DeadLetter, Arc<SinkQueue>)> = letters
            .iter()
            .filter(|l| keys.is_none_or(|k| k.contains(&l.key)))
            .filter_map(|l| Some((l, self.queue(SinkKind::from_name(&l.sink)?)?)))
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
        self.recount_dead_letters()?;
        Ok(moved.iter().map(|(_, _, events)| events).sum())
    }

    /// Deletes dead letters (all, or those in `keys`); returns how many records went.
    pub fn purge_dead_letters(&self, keys: Option<&[u64]>) -> Result<u64, SpoolError> {
        let letters = self.dead_letters()?;
        let removed = self.file.run(|db| {
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
        })?;
        self.recount_dead_letters()?;
        Ok(removed)
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

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn take_str(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let text = bytes.get(4..4 + len)?;
    Some((String::from_utf8(text.to_vec()).ok()?, &bytes[4 + len..]))
}
