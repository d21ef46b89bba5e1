//! Assembly of what the pipeline delivers through: every configured sink started,
//! its spool queue, its resilience stack; and the task that applies policy reloads
//! to all of them. The server and the offline `breakwater spool replay` share it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::route::SinkRoute;
use super::unsettled::UnsettledCopies;
use crate::batcher::BatchLimits;
use crate::config::{invalid, Acknowledge, ClickHouseConfig, Config, ConfigError, INSERT_MARGIN_MS};
use crate::dedup::redis::{self, RedisDedup};
use crate::event::SinkKind;
use crate::policy::{CallPolicy, LoadedPolicy, Policy};
use crate::resilience;
use crate::sinks::clickhouse::ClickHouseSinkSettings;
use crate::sinks::file::{FileSinkSettings, RecoveredEvent};
use crate::sinks::kafka::KafkaSinkSettings;
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

/// How far back (by their `receivedAt`) from the newest line the file sink's lines
/// seed its route's memory at start-up: far beyond any request the timing checks
/// allow, so every request a crash cut off is covered.
const RESEND_WINDOW_SECONDS: u64 = 600;

/// Builds every configured sink, its spool queue and its stack. `dedup_refill` sees
/// the events the file sink finds at start-up, but only while the file sink is the
/// only sink: beside ClickHouse or Kafka a line there says nothing of them (a crash
/// between the file's fsync and their writes leaves an event in the file alone, and
/// its retry must reach them). There, when refilling is asked for (the server), the
/// recent lines seed the file route's memory instead: the resend of a request the
/// crash cut off reaches the other sinks, but is not written to the files again.
pub fn build_delivery(
    config: &Config,
    policy: &Policy,
    data_dir: &Path,
    dedup_refill: Option<&mut dyn FnMut(RecoveredEvent<'_>)>,
) -> Result<Delivery, AssembleError> {
    let file_is_the_only_sink = config.clickhouse.is_none() && config.kafka.is_none();
    let seed_routes = dedup_refill.is_some();
    let mut in_files: Vec<(Arc<str>, String, u64)> = Vec::new();
    let mut collect = |event: RecoveredEvent<'_>| {
        in_files.push((
            Arc::from(event.source),
            event.message_id.to_string(),
            event.received_at_unix_seconds,
        ))
    };
    let recovered: Option<&mut dyn FnMut(RecoveredEvent<'_>)> = match dedup_refill {
        Some(refill) if file_is_the_only_sink => Some(refill),
        Some(_) => Some(&mut collect),
        None => None,
    };
    let handles = start_sinks(config, policy, data_dir, recovered)?;
    let queue_sizes: Vec<_> = handles
        .iter()
        .map(|handle| (handle.kind, policy.sink(handle.kind).spool.max_bytes))
        .collect();
    let spool = Arc::new(Spool::open(&data_dir.join("spool"), &queue_sizes)?);
    spool.set_dead_letter_max_bytes(policy.dead_letters.max_bytes);
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
            unsettled: Arc::default(),
            local_write_deadline: Duration::from_millis(config.server.spool_write_timeout_ms),
        });
        delivery.background.extend(handle.tasks);
        if let Some(sender) = handle.batch_limits {
            delivery.batch_limits.push((kind, sender));
        }
    }
    if seed_routes {
        // The spool's records first: fewer, and each one a copy the replay delivers.
        seed_routes_from_spool(&delivery.routes);
        seed_file_route(&delivery.routes, &in_files);
    }
    Ok(delivery)
}

/// Each route remembers the events of its spool's records of the last
/// `RESEND_WINDOW_SECONDS` before the newest one: copies of requests a crash cut off
/// (or that failed just before it), which the replay delivers; a resend of such a
/// request leaves them out of that sink's copy.
fn seed_routes_from_spool(routes: &[SinkRoute]) {
    for route in routes {
        match route
            .queue
            .recent_events(RESEND_WINDOW_SECONDS as i64 * 1000, UnsettledCopies::MAX_REMEMBERED)
        {
            Ok(events) if events.is_empty() => {}
            Ok(events) => route
                .unsettled
                .seed(route.kind, events.iter().map(|(source, id)| (source, id.as_str()))),
            Err(error) => tracing::warn!(
                sink = route.kind.name(),
                %error,
                "cannot read the spool's recent records; resends of requests cut off by the last crash may be written twice"
            ),
        }
    }
}

/// The file route remembers the lines of the last `RESEND_WINDOW_SECONDS` before the
/// newest one (see `build_delivery`).
fn seed_file_route(routes: &[SinkRoute], in_files: &[(Arc<str>, String, u64)]) {
    let (Some(route), Some(newest)) = (
        routes.iter().find(|route| route.kind == SinkKind::File),
        in_files.iter().map(|(_, _, received)| *received).max(),
    ) else {
        return;
    };
    let recent = newest_first(in_files, newest.saturating_sub(RESEND_WINDOW_SECONDS));
    route.unsettled.seed(route.kind, recent.into_iter());
}

/// The lines received at `since` or later, newest first: the memory's bound keeps
/// the newest, those of the requests a crash cut off (a soak at 1 M events found
/// the bound keeping the oldest 200,000 of 364,000 and the crash's 80 written twice).
fn newest_first(in_files: &[(Arc<str>, String, u64)], since: u64) -> Vec<(&Arc<str>, &str)> {
    let mut recent: Vec<&(Arc<str>, String, u64)> =
        in_files.iter().filter(|(_, _, received)| *received >= since).collect();
    recent.sort_by_key(|(_, _, received)| std::cmp::Reverse(*received));
    recent
        .into_iter()
        .map(|(source, id, _)| (source, id.as_str()))
        .collect()
}

/// Starts every configured sink, in `SinkKind::ALL` order.
fn start_sinks(
    config: &Config,
    policy: &Policy,
    data_dir: &Path,
    recovered: Option<&mut dyn FnMut(RecoveredEvent<'_>)>,
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
        let settings = ClickHouseSinkSettings {
            config: settings,
            dir: data_dir.join(SinkKind::ClickHouse.name()),
        };
        let handle =
            clickhouse::start(settings, &policy.clickhouse.batch).map_err(|e| AssembleError::Sink(e.into()))?;
        handles.push(handle);
    }
    if let Some(settings) = &config.kafka {
        let settings = KafkaSinkSettings {
            config: settings,
            dir: data_dir.join(SinkKind::Kafka.name()),
        };
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
        calls.timeout_ms = calls.timeout_ms.max(kafka.effective_message_timeout_ms() + 1_000);
    }
    calls
}

/// Fills in the timings left unset in config that the policy decides: ClickHouse's
/// INSERT deadline (the longest that fits in one attempt). Done once, before the
/// sinks start, so a later policy edit is checked against the deadline in force.
pub fn resolve_timings(config: &mut Config, policy: &Policy) {
    if let Some(clickhouse) = &mut config.clickhouse {
        let batch = &policy.clickhouse.batch;
        clickhouse.insert_timeout_ms.get_or_insert_with(|| {
            ClickHouseConfig::insert_timeout_fitting(policy.clickhouse.timeout_ms, batch.linger_ms)
        });
    }
}

/// The timing relations the guarantees depend on, checked before serving, before a
/// policy edit is applied, and by `config check` / `policy check --config`.
pub fn check_timings(config: &Config, policy: &Policy) -> Result<(), ConfigError> {
    check_insert_fits_an_attempt(config, policy)?;
    check_claims_outlive_requests(config, policy)
}

/// ClickHouse: one attempt must outlast its INSERT (linger, then the INSERT up to
/// `insert_timeout_ms`). An attempt given up on while its INSERT runs on is retried
/// as a second INSERT of the same rows.
fn check_insert_fits_an_attempt(config: &Config, policy: &Policy) -> Result<(), ConfigError> {
    let Some(clickhouse) = &config.clickhouse else {
        return Ok(());
    };
    let attempt_ms = policy.clickhouse.timeout_ms;
    let linger_ms = policy.clickhouse.batch.linger_ms;
    let insert_ms = clickhouse
        .insert_timeout_ms
        .unwrap_or_else(|| ClickHouseConfig::insert_timeout_fitting(attempt_ms, linger_ms));
    if attempt_ms >= linger_ms + insert_ms + INSERT_MARGIN_MS {
        return Ok(());
    }
    Err(invalid(
        "clickhouse.insert_timeout_ms",
        format!(
            "is {insert_ms} ms, but one attempt of the policy's clickhouse.timeout_ms ({attempt_ms} ms) \
             must hold clickhouse.batch.linger_ms ({linger_ms} ms), the INSERT and a {INSERT_MARGIN_MS} ms \
             margin: an attempt given up on while its INSERT runs on would be retried as a second \
             INSERT. Lower clickhouse.insert_timeout_ms to at most {} ms (or leave it unset to fit), \
             or raise the policy's clickhouse.timeout_ms to at least {} ms",
            attempt_ms.saturating_sub(linger_ms + INSERT_MARGIN_MS),
            linger_ms + insert_ms + INSERT_MARGIN_MS
        ),
    ))
}

/// Redis: a request's claims must outlive the longest the request can take (every
/// called sink at once, each with every attempt, backoff and wait of its stack,
/// then its spool write up to `server.spool_write_timeout_ms`, then the Redis
/// commit). A claim that expires first lets a client's retry, or another instance,
/// claim the same ids and deliver them a second time.
fn check_claims_outlive_requests(config: &Config, policy: &Policy) -> Result<(), ConfigError> {
    let Some(redis) = &config.redis else {
        return Ok(());
    };
    let called = SinkKind::ALL.into_iter().filter(|kind| {
        let configured = match kind {
            SinkKind::File => config.file_sink_enabled(),
            SinkKind::ClickHouse => config.clickhouse.is_some(),
            SinkKind::Kafka => config.kafka.is_some(),
        };
        configured && config.acknowledge(*kind) == Acknowledge::OnDelivery
    });
    let slowest = called
        .map(|kind| (kind, resilience::longest_call(&calls_for(config, policy, kind))))
        .max_by_key(|(_, longest)| *longest);
    let Some((kind, sink_ms)) = slowest else {
        return Ok(());
    };
    let spool_ms = Duration::from_millis(config.server.spool_write_timeout_ms);
    let commit_ms = resilience::longest_call(&policy.redis);
    let longest = sink_ms + spool_ms + commit_ms;
    if redis.pending_ttl_ms > longest.as_millis() as u64 {
        return Ok(());
    }
    Err(invalid(
        "redis.pending_ttl_ms",
        format!(
            "is {} ms, but a request can take {} ms with this policy: {kind} up to {} ms \
             (every attempt, backoff and wait of its stack), its spool write up to {} ms \
             (server.spool_write_timeout_ms), then the Redis commit up to {} ms. A claim that \
             expires first lets a retry deliver the same events again: raise it above {} ms, \
             or shorten the policy's {kind}.timeout_ms or {kind}.retry.max_attempts, or server.spool_write_timeout_ms",
            redis.pending_ttl_ms,
            longest.as_millis(),
            sink_ms.as_millis(),
            spool_ms.as_millis(),
            commit_ms.as_millis(),
            longest.as_millis()
        ),
    ))
}

/// Applies each new policy to the running stacks, spool sizes and batch limits,
/// and every second refreshes each breaker's state gauge (from its handle) and the
/// age of each spool's oldest record.
pub struct PolicyApplier {
    pub config: Config,
    pub policy: watch::Receiver<Arc<LoadedPolicy>>,
    pub routes: Vec<SinkRoute>,
    pub spool: Arc<Spool>,
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
        if let Err(error) = check_timings(&self.config, policy) {
            tracing::error!(%error, "policy edit not applied to the running stacks; the previous one stays in force");
            return;
        }
        for route in &self.routes {
            if let Err(error) = route.sink.apply(&calls_for(&self.config, policy, route.kind)) {
                tracing::error!(sink = route.kind.name(), %error, "could not apply the new policy to this sink");
            }
            route.queue.set_max_bytes(policy.sink(route.kind).spool.max_bytes);
        }
        self.spool.set_dead_letter_max_bytes(policy.dead_letters.max_bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClickHouseConfig, KafkaConfig, RedisConfig};

    #[test]
    fn the_file_sinks_lines_seed_the_memory_newest_first() {
        let web: Arc<str> = Arc::from("web");
        let lines = vec![
            (web.clone(), "old".to_string(), 100),
            (web.clone(), "newest".to_string(), 900),
            (web.clone(), "too-old".to_string(), 10),
            (web.clone(), "newer".to_string(), 500),
        ];
        let ids: Vec<&str> = newest_first(&lines, 50).into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids, ["newest", "newer", "old"]);
    }

    #[test]
    fn kafka_attempts_outlast_the_message_timeout_librdkafka_really_uses() {
        let mut kafka = KafkaConfig::default();
        kafka.librdkafka.insert("message.timeout.ms".into(), "90000".into());
        let config = Config {
            kafka: Some(kafka),
            ..Config::default()
        };
        let policy = LoadedPolicy::embedded().policy;
        let calls = calls_for(&config, &policy, SinkKind::Kafka);
        assert!(calls.timeout_ms > 90_000, "{} ms", calls.timeout_ms);
    }

    #[test]
    fn every_shipped_policy_holds_with_the_default_backends() {
        let config = Config {
            redis: Some(RedisConfig::default()),
            clickhouse: Some(ClickHouseConfig::default()),
            kafka: Some(KafkaConfig::default()),
            ..Config::default()
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        for (path, loaded) in crate::policy::check_dir(&dir).unwrap() {
            let policy = loaded.unwrap().policy;
            assert!(
                check_timings(&config, &policy).is_ok(),
                "{}: {:?}",
                path.display(),
                check_timings(&config, &policy)
            );
        }
    }

    #[test]
    fn an_insert_that_can_outlast_its_attempt_is_refused_with_the_keys_named() {
        let mut policy = LoadedPolicy::embedded().policy;
        policy.clickhouse.timeout_ms = 5_000;
        policy.clickhouse.batch.linger_ms = 10;
        let mut config = Config {
            clickhouse: Some(ClickHouseConfig {
                insert_timeout_ms: Some(10_000),
                ..ClickHouseConfig::default()
            }),
            ..Config::default()
        };
        let error = check_timings(&config, &policy).unwrap_err().to_string();
        for key in [
            "clickhouse.insert_timeout_ms",
            "clickhouse.timeout_ms",
            "clickhouse.batch.linger_ms",
        ] {
            assert!(error.contains(key), "{key} not named: {error}");
        }
        assert!(error.contains("at most 4740 ms"), "{error}");

        // Unset, it is resolved to the longest that fits, and holds.
        config.clickhouse.as_mut().unwrap().insert_timeout_ms = None;
        resolve_timings(&mut config, &policy);
        assert_eq!(config.clickhouse.as_ref().unwrap().insert_timeout_ms, Some(4_740));
        assert!(check_timings(&config, &policy).is_ok());

        // A policy edit that shortens the attempt below the deadline in force is refused.
        policy.clickhouse.timeout_ms = 1_000;
        assert!(check_timings(&config, &policy).is_err());
    }

    #[test]
    fn a_sink_acknowledged_on_spool_does_not_count() {
        // Kafka's 64 s would outlast a 10 s claim; acknowledged on spool, a request
        // never waits for Kafka, so only the file sink and the Redis commit count.
        let mut config = Config {
            redis: Some(RedisConfig {
                pending_ttl_ms: 40_000,
                ..RedisConfig::default()
            }),
            kafka: Some(KafkaConfig::default()),
            ..Config::default()
        };
        config.file_sink.enabled = Some(true);
        let policy = LoadedPolicy::embedded().policy;
        let error = check_timings(&config, &policy).unwrap_err().to_string();
        assert!(
            error.contains("redis.pending_ttl_ms") && error.contains(SinkKind::Kafka.name()),
            "{error}"
        );
        config.kafka.as_mut().unwrap().acknowledge = Acknowledge::OnSpool;
        let result = check_timings(&config, &policy);
        assert!(result.is_ok(), "{result:?}");
    }
}
