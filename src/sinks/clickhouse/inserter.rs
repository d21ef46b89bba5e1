//! The ClickHouse writer: one client, layout detection and table creation on first
//! use, and one INSERT per group, its RowBinary encoded and sent in chunks.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::errors::{classify, exception_code, ClickHouseError, ROW_RULE_CODES};
use super::in_doubt::{self, InDoubt};
use super::row_binary;
use super::schema::{self, Layout};
use crate::batcher::GroupOutcome;
use crate::config::{ClickHouseCompression, ClickHouseConfig, ClickHouseSchema};
use crate::event::{EventKey, SinkBatch, SinkKind};
use crate::sinks::journal::Journal;
use crate::telemetry::metric;

/// An INSERT's RowBinary is sent in chunks of about this size (each compressed on
/// its own when LZ4 is on); a chunk ends after the row that reaches it.
const INSERT_CHUNK_BYTES: usize = 1 << 20;

/// Everything one INSERT needs; shared by the batcher's flushes.
pub struct Inserter {
    client: clickhouse::Client,
    database: String,
    table: String,
    schema: ClickHouseSchema,
    create_table: bool,
    insert_timeout: Duration,
    /// Layout found (and table created) on first successful use.
    layout: tokio::sync::Mutex<Option<Layout>>,
    /// Events of INSERTs whose outcome is unknown (`in_doubt.rs`).
    in_doubt: InDoubt,
}

impl Inserter {
    /// An inserter whose memory of INSERTs of unknown outcome lives in memory only
    /// (tools, tests); the sink's keeps a journal (`with_journal`).
    pub fn new(config: &ClickHouseConfig) -> Result<Inserter, ClickHouseError> {
        let mut client = clickhouse::Client::default()
            .with_url(&config.url)
            // Type validation needs RowBinaryWithNamesAndTypes, which old servers lack;
            // our RowBinary is tested against the schema instead.
            .with_validation(false)
            .with_compression(match config.compression {
                ClickHouseCompression::Lz4 => clickhouse::Compression::Lz4,
                ClickHouseCompression::None => clickhouse::Compression::None,
            });
        if let Some(user) = &config.user {
            client = client.with_user(user);
        }
        if let Some(password) = config
            .password
            .resolve("clickhouse.password")
            .map_err(|error| ClickHouseError::Config(error.to_string()))?
        {
            client = client.with_password(password);
        }
        Ok(Inserter {
            client,
            database: config.database.clone(),
            table: config.table.clone(),
            schema: config.schema,
            create_table: config.create_table,
            // Resolved from the policy before the sink starts (assemble::resolve_timings);
            // 10 s for an inserter built on its own (tools, tests).
            insert_timeout: Duration::from_millis(config.insert_timeout_ms.unwrap_or(10_000)),
            layout: tokio::sync::Mutex::new(None),
            in_doubt: InDoubt::default(),
        })
    }

    /// Keeps the in-doubt memory in the journal under `dir` too, and remembers what
    /// an earlier process left open there.
    pub fn with_journal(mut self, dir: &Path) -> Result<Inserter, ClickHouseError> {
        let (journal, open) = Journal::open(SinkKind::ClickHouse, dir)
            .map_err(|error| ClickHouseError::Config(format!("in-doubt journal in {}: {error}", dir.display())))?;
        self.in_doubt = InDoubt::with_journal(journal, open);
        Ok(self)
    }

    /// The layout in use, detecting it and creating the table the first time.
    pub async fn prepare(&self) -> Result<Layout, ClickHouseError> {
        let mut prepared = self.layout.lock().await;
        if let Some(layout) = *prepared {
            return Ok(layout);
        }
        let version = self.server_version().await?;
        let layout = match self.schema {
            ClickHouseSchema::Modern => Layout::Modern,
            ClickHouseSchema::Legacy => Layout::Legacy,
            ClickHouseSchema::Auto => Layout::for_server_version(&version),
        };
        if self.create_table {
            self.execute(&schema::create_database(&self.database)).await?;
            self.execute(&schema::create_table(layout, &self.database, &self.table))
                .await?;
        }
        for warning in durability_warnings(&self.durability_settings().await) {
            tracing::warn!("{warning}");
        }
        tracing::info!(
            server_version = version.trim(),
            layout = layout.name(),
            table = format!("{}.{}", self.database, self.table),
            "clickhouse sink ready"
        );
        *prepared = Some(layout);
        Ok(layout)
    }

    async fn server_version(&self) -> Result<String, ClickHouseError> {
        let bytes = self
            .client
            .query("SELECT version()")
            .fetch_bytes("TSV")
            .map_err(classify)?
            .collect()
            .await
            .map_err(classify)?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    /// The server settings that decide what an acknowledged INSERT means (those
    /// this server has; none if it cannot be asked).
    async fn durability_settings(&self) -> HashMap<String, String> {
        let sql = "SELECT name, value FROM system.settings WHERE name IN ('async_insert', 'wait_for_async_insert') \
                   UNION ALL SELECT name, value FROM system.merge_tree_settings WHERE name = 'fsync_after_insert'";
        let answer = async { self.client.query(sql).fetch_bytes("TSV")?.collect().await };
        match answer.await {
            Ok(bytes) => String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|line| line.split_once('\t'))
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
            Err(error) => {
                tracing::debug!(%error, "clickhouse: cannot read its durability settings");
                HashMap::new()
            }
        }
    }

    async fn execute(&self, sql: &str) -> Result<(), ClickHouseError> {
        self.client.query(sql).execute().await.map_err(classify)
    }

    /// One INSERT of every event of the group, encoded and sent in chunks of about
    /// `INSERT_CHUNK_BYTES`: a 100,000-event INSERT is never held encoded whole, and
    /// each chunk reuses memory the last one freed instead of faulting in fresh pages.
    pub async fn insert(&self, group: &[Arc<SinkBatch>]) -> Result<(), ClickHouseError> {
        let layout = self.prepare().await?;
        let found = self.already_written(group).await?;
        let events = group.iter().map(|b| b.events.len()).sum::<usize>() - found.len();
        if events == 0 {
            return Ok(());
        }
        let entries = self.in_doubt.begin(group);
        let result = self.insert_rows(layout, group, &found, events).await;
        match &result {
            Ok(()) => self.in_doubt.inserted(group, entries),
            Err(error) if error.outcome_unknown() => self.in_doubt.unknown(group, entries),
            Err(_) => self.in_doubt.not_written(entries),
        }
        result
    }

    /// One INSERT of the group; if a rule of the table refuses rows of it
    /// (`ROW_RULE_CODES`) and the group holds more than one event, the refused events
    /// are found by inserting halves (`bisect`), so one bad event does not send every
    /// request of its group to the dead-letter store.
    pub async fn insert_group(&self, group: &[Arc<SinkBatch>]) -> GroupOutcome<ClickHouseError> {
        match self.insert(group).await {
            Err(ClickHouseError::Rejected(message))
                if group.iter().map(|b| b.events.len()).sum::<usize>() > 1
                    && exception_code(&message).is_some_and(|code| ROW_RULE_CODES.contains(&code)) =>
            {
                self.bisect(group, message).await
            }
            result => GroupOutcome::Same(result),
        }
    }

    /// Inserts every event of a refused group but those the server refuses on their
    /// own: halves are inserted, a refused half halved again, down to single events.
    /// Each batch is answered `Ok`, `PartlyRejected` (its refused ids; the others
    /// are in the table) or `Rejected` (all of it refused). Any other failure stops
    /// the search: what it had inserted is remembered as in doubt (looked up before
    /// the batches are inserted again), and the failure answers the batches.
    async fn bisect(&self, group: &[Arc<SinkBatch>], message: String) -> GroupOutcome<ClickHouseError> {
        let all: Vec<(usize, usize)> = group
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| (0..batch.events.len()).map(move |e| (b, e)))
            .collect();
        let mut refused: Vec<Vec<String>> = vec![Vec::new(); group.len()];
        let mut pending = halves(all);
        let mut inserts = 0;
        while let Some(part) = pending.pop() {
            let sub = parts_of(group, &part);
            inserts += 1;
            match self.insert(&sub).await {
                Ok(()) => {}
                Err(ClickHouseError::Rejected(_)) if part.len() > 1 => pending.extend(halves(part)),
                Err(ClickHouseError::Rejected(_)) => {
                    let (b, e) = part[0];
                    refused[b].push(group[b].events[e].message_id.clone());
                }
                Err(other) => {
                    self.in_doubt.unknown(group, in_doubt::Entries::none());
                    return GroupOutcome::Same(Err(other));
                }
            }
        }
        let refused_events: usize = refused.iter().map(Vec::len).sum();
        metrics::counter!(metric::CLICKHOUSE_BISECTED_INSERTS).increment(inserts);
        tracing::warn!(
            refused = refused_events,
            of = group.iter().map(|b| b.events.len()).sum::<usize>(),
            inserts,
            %message,
            "clickhouse refused a group: found the refused events by halving; the others are inserted"
        );
        GroupOutcome::PerBatch(
            group
                .iter()
                .zip(refused)
                .map(|(batch, ids)| match ids.len() {
                    0 => Ok(()),
                    n if n == batch.events.len() => Err(ClickHouseError::Rejected(message.clone())),
                    _ => Err(ClickHouseError::PartlyRejected(message.clone(), Arc::new(ids))),
                })
                .collect(),
        )
    }

    /// The group's events of unknown outcome that the table already has (none
    /// asked for when none is in doubt). They are no longer in doubt.
    async fn already_written(&self, group: &[Arc<SinkBatch>]) -> Result<HashSet<EventKey>, ClickHouseError> {
        let doubtful = self.in_doubt.in_group(group);
        if doubtful.is_empty() {
            return Ok(HashSet::new());
        }
        let ids: Vec<&str> = doubtful.iter().map(|(_, id)| id.as_str()).collect();
        let sql = format!(
            "SELECT source_name, message_id FROM `{}`.`{}` WHERE has(?, message_id)",
            self.database, self.table
        );
        let lookup = async {
            self.client
                .query(&sql)
                .bind(&ids)
                .fetch_bytes("JSONEachRow")
                .map_err(classify)?
                .collect()
                .await
                .map_err(classify)
        };
        // Bounded like the INSERT: one flush at a time, so a lookup left hanging on a
        // dead connection would hold every later group behind it.
        let bytes = tokio::time::timeout(self.insert_timeout, lookup).await.map_err(|_| {
            ClickHouseError::Unavailable(format!(
                "the lookup of events of unknown outcome did not finish within {} ms",
                self.insert_timeout.as_millis()
            ))
        })??;
        let in_table: HashSet<(String, String)> = String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).ok()?;
                Some((
                    row["source_name"].as_str()?.to_string(),
                    row["message_id"].as_str()?.to_string(),
                ))
            })
            .collect();
        let found: HashSet<EventKey> = doubtful
            .into_iter()
            .filter(|(source, id)| in_table.contains(&(source.to_string(), id.clone())))
            .collect();
        if !found.is_empty() {
            metrics::counter!(metric::CLICKHOUSE_IN_DOUBT_FOUND_EVENTS).increment(found.len() as u64);
            tracing::info!(
                found = found.len(),
                "clickhouse: events of an INSERT of unknown outcome are in the table; not inserted again"
            );
            self.in_doubt.forget(found.iter());
        }
        Ok(found)
    }

    /// The INSERT itself: every event of the group but those in `skip`.
    async fn insert_rows(
        &self,
        layout: Layout,
        group: &[Arc<SinkBatch>],
        skip: &HashSet<EventKey>,
        events: usize,
    ) -> Result<(), ClickHouseError> {
        let sql = format!(
            "INSERT INTO `{}`.`{}` ({}) FORMAT RowBinary",
            self.database,
            self.table,
            schema::COLUMN_NAMES
        );
        let mut insert = self
            .client
            .insert_formatted_with(sql)
            .with_timeouts(Some(self.insert_timeout), Some(self.insert_timeout));
        if layout == Layout::Modern {
            insert = insert.with_setting("insert_deduplication_token", deduplication_token(group));
        }
        let started = Instant::now();
        let sent = async {
            let mut chunk = Vec::with_capacity(INSERT_CHUNK_BYTES);
            for batch in group {
                for event in &batch.events {
                    if !skip.is_empty() && skip.contains(&(batch.source.clone(), event.message_id.clone())) {
                        continue;
                    }
                    row_binary::encode_row(layout, &batch.source, event, &mut chunk);
                    if chunk.len() >= INSERT_CHUNK_BYTES {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(INSERT_CHUNK_BYTES));
                        insert.send(Bytes::from(full)).await?;
                    }
                }
            }
            if !chunk.is_empty() {
                insert.send(Bytes::from(chunk)).await?;
            }
            insert.end().await
        };
        match tokio::time::timeout(self.insert_timeout, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(classify(error)),
            Err(_) => {
                return Err(ClickHouseError::TimedOut(self.insert_timeout.as_millis()));
            }
        }
        metrics::histogram!(metric::CLICKHOUSE_INSERT_DURATION).record(started.elapsed().as_secs_f64());
        metrics::histogram!(metric::CLICKHOUSE_EVENTS_PER_INSERT).record(events as f64);
        Ok(())
    }
}

/// What the server's settings make of an acknowledged INSERT, where that is less than
/// "on disk": asynchronous inserts answered before they are written, and parts not
/// fsynced (ClickHouse's default). Said as warnings at start-up.
pub fn durability_warnings(settings: &HashMap<String, String>) -> Vec<String> {
    let is = |name: &str, value: &str| settings.get(name).is_some_and(|v| v.trim() == value);
    let mut warnings = Vec::new();
    if is("async_insert", "1") && is("wait_for_async_insert", "0") {
        warnings.push(
            "clickhouse has async_insert = 1 and wait_for_async_insert = 0 for breakwater's user: it answers an INSERT \
             before writing it, so a 200 means the rows are in ClickHouse's insert buffer (a ClickHouse crash loses them)"
                .to_string(),
        );
    }
    if is("fsync_after_insert", "0") {
        warnings.push(
            "clickhouse has fsync_after_insert = 0 (its default): a 200 means the rows are written to the ClickHouse \
             host's page cache, not fsynced; a power cut of that host can lose the last inserts \
             (set it on the table to make them durable; docs/resilience.md)"
                .to_string(),
        );
    }
    warnings
}

/// A list of (batch, event) positions in two halves (the first pushed last, so it is
/// tried first).
fn halves(mut part: Vec<(usize, usize)>) -> Vec<Vec<(usize, usize)>> {
    let second = part.split_off(part.len() / 2);
    vec![second, part]
}

/// The events at `part` as parts of their batches (`SinkBatch::part`: each ends when
/// its batch ends, which the in-doubt journal settles on), one per batch they come
/// from.
fn parts_of(group: &[Arc<SinkBatch>], part: &[(usize, usize)]) -> Vec<Arc<SinkBatch>> {
    let mut by_batch: Vec<(usize, Vec<crate::event::NormalizedEvent>)> = Vec::new();
    for &(b, e) in part {
        match by_batch.last_mut() {
            Some((last, events)) if *last == b => events.push(group[b].events[e].clone()),
            _ => by_batch.push((b, vec![group[b].events[e].clone()])),
        }
    }
    by_batch.into_iter().map(|(b, events)| group[b].part(events)).collect()
}

/// The same events in the same order give the same token, so the server drops a
/// retried INSERT whole.
fn deduplication_token(group: &[Arc<SinkBatch>]) -> String {
    let mut hasher = Sha256::new();
    for batch in group {
        for event in &batch.events {
            hasher.update(batch.source.as_bytes());
            hasher.update([0]);
            hasher.update(event.message_id.as_bytes());
            hasher.update([0]);
        }
    }
    format!("{:x}", hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn settings_that_weaken_an_acknowledged_insert_are_named() {
        assert!(
            durability_warnings(&settings(&[])).is_empty(),
            "an old server has none of them"
        );
        let durable = settings(&[
            ("async_insert", "1"),
            ("wait_for_async_insert", "1"),
            ("fsync_after_insert", "1"),
        ]);
        assert!(durability_warnings(&durable).is_empty());
        let weak = settings(&[
            ("async_insert", "1"),
            ("wait_for_async_insert", "0"),
            ("fsync_after_insert", "0"),
        ]);
        let warnings = durability_warnings(&weak);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("async_insert") && warnings[1].contains("fsync_after_insert"));
    }
}
