//! Assembly of what the pipeline delivers through: every configured sink started,
//! its spool queue, its resilience stack; and the task that applies policy reloads
//! to all of them. The server and the offline `breakwater spool replay` share it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::route::SinkRoute;
use crate::batcher::BatchLimits;
use crate::config::{Config, ConfigError};
use crate::dedup::redis::{self, RedisDedup};
use crate::event::SinkKind;
use crate::policy::{CallPolicy, LoadedPolicy, Policy};
use crate::resilience;
use crate::sinks::file::{FileSinkSettings, RecoveredEvent};
use crate::sinks::{batch_limits_of, clickhouse, file, kafka, ResilientSink, SinkError, SinkHandle};
use crate::spool::{Spool, SpoolError};
use crate::telemetry::metric;

/// Why the sinks, spool or stacks could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("cannot open the file sink under {dir}: {error}")]
    FileSink { dir: String, error: String },
    #[error("{0}")]
    Sink(SinkError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("{0}")]
    Stack(String),
}

/// The sinks, each behind its resilience stack, with their spool: what the server
/// delivers through, and what the offline `spool replay` drains with.
pub struct Delivery {
    pub routes: Vec<SinkRoute>,
    pub spool: Arc<Spool>,
    /// Sink tasks to await at shutdown.
    pub background: Vec<tokio::task::JoinHandle<()>>,
    /// Where policy reloads send new batch limits.
    pub batch_limits: Vec<(SinkKind, watch::Sender<BatchLimits>)>,
}

/// Builds every configured sink, its spool queue and its stack. `recovered` sees the
/// events the file sink finds at start-up (for dedup).
pub fn build_delivery(
    config: &Config,
    policy: &Policy,
    data_dir: &Path,
    mut recovered: impl FnMut(RecoveredEvent<'_>),
) -> Result<Delivery, AssembleError> {
    let handles = start_sinks(config, policy, data_dir, &mut recovered)?;
    let queue_sizes: Vec<_> = handles
        .iter()
        .map(|handle| (handle.kind, policy.sink(handle.kind).spool.max_bytes))
        .collect();
    let spool = Arc::new(Spool::open(&data_dir.join("spool"), &queue_sizes)?);
    let mut delivery = Delivery {
        routes: Vec::new(),
        spool,
        background: Vec::new(),
        batch_limits: Vec::new(),
    };
    for handle in handles {
        let kind = handle.kind;
        let sink = ResilientSink::new(kind.name(), handle.service, &calls_for(config, policy, kind))
            .map_err(AssembleError::Stack)?;
        let queue = delivery.spool.queue(kind).expect("a queue per sink");
        delivery.routes.push(SinkRoute {
            kind,
            sink,
            acknowledge: config.acknowledge(kind),
            queue,
            health: handle.health,
        });
        delivery.background.extend(handle.tasks);
        if let Some(sender) = handle.batch_limits {
            delivery.batch_limits.push((kind, sender));
        }
    }
    Ok(delivery)
}

/// Starts every configured sink, in `SinkKind::ALL` order.
fn start_sinks(
    config: &Config,
    policy: &Policy,
    data_dir: &Path,
    recovered: &mut dyn FnMut(RecoveredEvent<'_>),
) -> Result<Vec<SinkHandle>, AssembleError> {
    let mut handles = Vec::new();
    if config.file_sink_enabled() {
        let dir = data_dir.join("events");
        let settings = FileSinkSettings {
            dir: dir.clone(),
            config: &config.file_sink,
            recover_window: Duration::from_secs(config.dedup.window_seconds),
            recovered,
        };
        let handle = file::start(settings, &policy.file.batch).map_err(|error| AssembleError::FileSink {
            dir: dir.display().to_string(),
            error: error.to_string(),
        })?;
        handles.push(handle);
    }
    if let Some(settings) = &config.clickhouse {
        let handle =
            clickhouse::start(settings, &policy.clickhouse.batch).map_err(|e| AssembleError::Sink(e.into()))?;
        handles.push(handle);
    }
    if let Some(settings) = &config.kafka {
        let handle = kafka::start(settings, &policy.kafka.batch).map_err(|e| AssembleError::Sink(e.into()))?;
        handles.push(handle);
    }
    Ok(handles)
}

/// A sink's call policy. Kafka's per-attempt timeout is never shorter than the
/// producer's own message timeout: a message given up on by us but still queued in
/// librdkafka would otherwise be delivered behind the spool's back.
pub fn calls_for(config: &Config, policy: &Policy, sink: SinkKind) -> CallPolicy {
    let mut calls = policy.sink(sink).calls();
    if let (Some(kafka), SinkKind::Kafka) = (&config.kafka, sink) {
        calls.timeout_ms = calls.timeout_ms.max(kafka.message_timeout_ms + 1_000);
    }
    calls
}

/// Applies each new policy to the running stacks, spool sizes and batch limits,
/// and every second refreshes each breaker's state gauge (from its handle) and the
/// age of each spool's oldest record.
pub struct PolicyApplier {
    pub config: Config,
    pub policy: watch::Receiver<Arc<LoadedPolicy>>,
    pub routes: Vec<SinkRoute>,
    pub redis: Option<Arc<RedisDedup>>,
    pub batch_limits: Vec<(SinkKind, watch::Sender<BatchLimits>)>,
}

impl PolicyApplier {
    /// Runs until the policy channel closes (or the task is aborted at shutdown).
    pub async fn run(mut self) {
        let mut refresh = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                changed = self.policy.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let current = self.policy.borrow_and_update().clone();
                    self.apply(&current.policy);
                }
                _ = refresh.tick() => self.refresh_gauges().await,
            }
        }
    }

    fn apply(&self, policy: &Policy) {
        for route in &self.routes {
            if let Err(error) = route.sink.apply(&calls_for(&self.config, policy, route.kind)) {
                tracing::error!(sink = route.kind.name(), %error, "could not apply the new policy to this sink");
            }
            route.queue.set_max_bytes(policy.sink(route.kind).spool.max_bytes);
        }
        for (kind, sender) in &self.batch_limits {
            sender.send_replace(batch_limits_of(&policy.sink(*kind).batch));
        }
        if let Some(redis) = &self.redis {
            if let Err(error) = redis.apply(&policy.redis) {
                tracing::error!(%error, "could not apply the new policy to redis");
            }
        }
    }

    async fn refresh_gauges(&self) {
        for route in &self.routes {
            metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => route.kind.name())
                .set(resilience::state_value(route.sink.breaker()));
        }
        let queues: Vec<_> = self.routes.iter().map(|route| route.queue.clone()).collect();
        let ages = tokio::task::spawn_blocking(move || {
            queues
                .iter()
                .map(|q| (q.sink, q.stats().oldest_age_seconds.unwrap_or(0.0)))
                .collect::<Vec<_>>()
        });
        if let Ok(ages) = ages.await {
            for (sink, age) in ages {
                metrics::gauge!(metric::SPOOL_OLDEST_AGE, "sink" => sink.name()).set(age);
            }
        }
        if let Some(redis) = &self.redis {
            metrics::gauge!(metric::CIRCUIT_BREAKER_STATE, "dependency" => redis::DEPENDENCY_NAME)
                .set(resilience::state_value(redis.breaker()));
        }
    }
}
