//! The ClickHouse sink: one `clickhouse::Client` for the process; requests are
//! grouped by the `Batcher` into one RowBinary INSERT per group (bounded by events,
//! bytes and linger), never one per event. The database and table are created on
//! first use, so a server that is down at start-up delays nothing. `inserter.rs` is
//! the writer, `in_doubt.rs` the INSERTs of unknown outcome (looked up before their
//! events are inserted again), `errors.rs` the retry classification, `schema.rs`
//! the two table layouts, `row_binary.rs` our encoder.

mod errors;
mod in_doubt;
mod inserter;
pub mod row_binary;
pub mod schema;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::batcher::{Batcher, GroupOutcome};
use crate::config::ClickHouseConfig;
use crate::event::{SinkBatch, SinkKind};
use crate::policy::BatchPolicy;
use crate::sinks::{batch_limits_of, recorded, Sink, SinkError, SinkHandle};
use crate::telemetry::health::DependencyHealth;
pub use errors::{classify, exception_code, ClickHouseError};
pub use inserter::Inserter;

/// What the ClickHouse sink needs to start.
pub struct ClickHouseSinkSettings<'a> {
    pub config: &'a ClickHouseConfig,
    /// `<data_dir>/clickhouse`: the in-doubt journal (`sinks/journal.rs`).
    pub dir: PathBuf,
}

/// Builds the client and starts the batcher whose flush is one INSERT; connects
/// lazily. INSERTs an earlier process left in doubt are remembered for a lookup.
pub fn start(settings: ClickHouseSinkSettings<'_>, batch: &BatchPolicy) -> Result<SinkHandle, ClickHouseError> {
    let inserter = Arc::new(Inserter::new(settings.config)?.with_journal(&settings.dir)?);
    let (limits_sender, limits) = watch::channel(batch_limits_of(batch));
    let health = Arc::new(DependencyHealth::default());
    let flush_health = health.clone();
    let (batcher, task) = Batcher::start(SinkKind::ClickHouse.name(), limits, move |group| {
        let inserter = inserter.clone();
        let health = flush_health.clone();
        async move {
            let outcome = inserter.insert_group(&group).await;
            if let GroupOutcome::Same(result) = outcome {
                return GroupOutcome::Same(recorded(SinkKind::ClickHouse, &health, result));
            }
            // The server answered (it refused some events): it is up.
            health.record_success(SinkKind::ClickHouse.name());
            outcome
        }
    });
    Ok(
        SinkHandle::new(SinkKind::ClickHouse, ClickHouseSink { batcher }, health)
            .with_task(task)
            .with_batch_limits(limits_sender),
    )
}

/// The running ClickHouse sink: a batcher whose flush is one INSERT.
#[derive(Clone)]
struct ClickHouseSink {
    batcher: Batcher<ClickHouseError>,
}

impl Sink for ClickHouseSink {
    async fn deliver(&self, batch: Arc<SinkBatch>) -> Result<(), SinkError> {
        self.batcher.submit(batch).await.map_err(SinkError::from)
    }
}
