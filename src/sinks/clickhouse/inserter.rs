//! The ClickHouse writer: one client, layout detection and table creation on first
//! use, and one INSERT per group, its RowBinary encoded and sent in chunks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::errors::{classify, ClickHouseError};
use super::row_binary;
use super::schema::{self, Layout};
use crate::config::{ClickHouseCompression, ClickHouseConfig, ClickHouseSchema};
use crate::event::SinkBatch;
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
}

impl Inserter {
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
        })
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

    async fn execute(&self, sql: &str) -> Result<(), ClickHouseError> {
        self.client.query(sql).execute().await.map_err(classify)
    }

    /// One INSERT of every event of the group, encoded and sent in chunks of about
    /// `INSERT_CHUNK_BYTES`: a 100,000-event INSERT is never held encoded whole, and
    /// each chunk reuses memory the last one freed instead of faulting in fresh pages.
    pub async fn insert(&self, group: &[Arc<SinkBatch>]) -> Result<(), ClickHouseError> {
        let layout = self.prepare().await?;
        let events: usize = group.iter().map(|b| b.events.len()).sum();
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
