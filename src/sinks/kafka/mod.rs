//! The Kafka sink: exactly one idempotent producer (acks=all) for the
//! process. Each event is one message: key `userId` (else `anonymousId`) so a user's
//! events keep their order, value the normalized JSON, headers `source`, `type`,
//! `messageId`. A request is answered only once every message is acknowledged.
//!
//! Broker loss is seen at once: librdkafka's error callback reports AllBrokersDown;
//! from then on sends fail fast and messages still queued are purged (so nothing
//! answered with an error is delivered later), until a metadata probe succeeds.
//!
//! A producer can also get stuck while the brokers answer: librdkafka may declare
//! the idempotent producer fatally failed, or a broker that lost its producer state
//! in a crash may refuse every batch from our producer id (tansu answers
//! UNKNOWN_SERVER_ERROR after being killed right after our first produce). Then the
//! producer is renewed: a new one (with a new producer id) replaces it, and the old
//! one is purged and dropped. Nothing is lost: every refused batch was answered as
//! failed and sits in the spool.
//!
//! `producer.rs` holds the producer slot and its renewal, `broker_watch.rs` the
//! broker-loss flag and probe, `produce.rs` one batch's send, `acks.rs` its
//! delivery reports, `readback.rs` the
//! read-back of events of unknown outcome, `errors.rs` the retry classification.

mod acks;
mod broker_watch;
mod errors;
mod produce;
mod producer;
pub mod readback;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rdkafka::config::ClientConfig;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{KafkaConfig, KafkaKey};
use crate::event::{SinkBatch, SinkKind};
use crate::policy::BatchPolicy;
use crate::sinks::journal::Journal;
use crate::sinks::{record_outcome, Sink, SinkError, SinkHandle};
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::metric;
use broker_watch::{watch_brokers, BrokerState};
pub use errors::KafkaSinkError;
use producer::{renew_stuck_producer, ProducerSlot};
use readback::UnknownOutcomes;

/// Handle to the Kafka sink; cheap to clone.
#[derive(Clone)]
pub struct KafkaSink {
    slot: Arc<ProducerSlot>,
    topic: Arc<str>,
    key: KafkaKey,
    down: watch::Receiver<bool>,
    health: Arc<DependencyHealth>,
    /// Events whose delivery failed after librdkafka had them (readback.rs).
    outcomes: Arc<UnknownOutcomes>,
    /// How a read-back consumer reaches the brokers.
    read_back_connection: Arc<ClientConfig>,
    /// Stops the sink's background tasks once the last handle is dropped.
    _tasks: Arc<DropGuard>,
}

/// librdkafka settings breakwater chooses (batching from the policy, read at
/// start-up); `kafka.librdkafka` entries override them.
pub fn producer_settings(config: &KafkaConfig, batch: &BatchPolicy) -> BTreeMap<String, String> {
    let mut settings: BTreeMap<String, String> = [
        ("bootstrap.servers", config.brokers.clone()),
        ("client.id", "breakwater".to_string()),
        ("enable.idempotence", "true".to_string()),
        ("acks", "all".to_string()),
        ("compression.type", config.compression.clone()),
        ("linger.ms", batch.linger_ms.to_string()),
        ("batch.size", batch.max_bytes.min(i32::MAX as usize).to_string()),
        ("batch.num.messages", batch.max_events.min(1_000_000).to_string()),
        ("message.timeout.ms", config.message_timeout_ms.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    settings.extend(config.librdkafka.clone());
    settings
}

/// Settings in `kafka.librdkafka` that weaken what a 200 means for Kafka, each said
/// as a warning at start-up: `acks` other than `all` (a leader's copy only), and the
/// idempotent producer turned off (a retried send can land twice).
pub fn durability_warnings(settings: &BTreeMap<String, String>) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(acks) = settings.get("acks").filter(|acks| !matches!(acks.trim(), "all" | "-1")) {
        warnings.push(format!(
            "kafka.librdkafka sets acks = {acks:?}: a 200 then means the partition leader has the event, not its in-sync replicas"
        ));
    }
    if settings
        .get("enable.idempotence")
        .is_some_and(|on| on.trim() == "false")
    {
        warnings.push(
            "kafka.librdkafka sets enable.idempotence = false: librdkafka's own retries can then write a message twice"
                .into(),
        );
    }
    warnings
}

/// What the Kafka sink needs to start.
pub struct KafkaSinkSettings<'a> {
    pub config: &'a KafkaConfig,
    /// `<data_dir>/kafka`: the in-doubt journal (`sinks/journal.rs`).
    pub dir: PathBuf,
}

/// Creates the one producer of the process (it connects in the background), the
/// task that notices brokers coming back and the one that renews a stuck producer;
/// batches an earlier process left in doubt are remembered for a read-back.
pub fn start(settings: KafkaSinkSettings<'_>, batch: &BatchPolicy) -> Result<SinkHandle, KafkaSinkError> {
    let config = settings.config;
    let (journal, open) = Journal::open(SinkKind::Kafka, &settings.dir)
        .map_err(|error| KafkaSinkError::Journal(format!("{}: {error}", settings.dir.display())))?;
    if !open.is_empty() {
        tracing::warn!(
            batches = open.len(),
            events = open.iter().map(|b| b.ids.len()).sum::<usize>(),
            "kafka: batches were in doubt when the last process ended; they are read back before they are sent again"
        );
    }
    let (changed, down) = watch::channel(false);
    let state = Arc::new(BrokerState {
        down: AtomicBool::new(false),
        changed,
    });
    let mut client_config = ClientConfig::new();
    let settings = producer_settings(config, batch);
    for warning in durability_warnings(&settings) {
        tracing::warn!("{warning}");
    }
    for (key, value) in settings {
        client_config.set(key, value);
    }
    let read_back_connection = Arc::new(readback::connection_settings(&client_config));
    let slot = ProducerSlot::create(client_config, state.clone())?;
    metrics::gauge!(metric::KAFKA_ALL_BROKERS_DOWN).set(0.0);
    // At 0 from the start, so alerts on their increase see the first one.
    for counter in [
        metric::KAFKA_UNKNOWN_OUTCOME_EVENTS,
        metric::KAFKA_READ_BACK_FOUND_EVENTS,
        metric::KAFKA_READ_BACK_UNVERIFIED_EVENTS,
    ] {
        metrics::counter!(counter).increment(0);
    }
    let stop = CancellationToken::new();
    let sink = KafkaSink {
        slot: Arc::new(slot),
        topic: Arc::from(config.topic.as_str()),
        key: config.key,
        down,
        health: Arc::new(DependencyHealth::default()),
        outcomes: Arc::new(UnknownOutcomes::with_journal(journal, open)),
        read_back_connection,
        _tasks: Arc::new(stop.clone().drop_guard()),
    };
    let renewer = renew_stuck_producer(sink.slot.clone(), sink.down.clone());
    let watcher = watch_brokers(
        sink.slot.clone(),
        state,
        sink.topic.clone(),
        sink.down.clone(),
        sink.health.clone(),
        sink.outcomes.clone(),
    );
    let health = sink.health.clone();
    Ok(SinkHandle::new(SinkKind::Kafka, sink, health)
        .with_task(spawn_until(stop.clone(), renewer))
        .with_task(spawn_until(stop, watcher)))
}

/// Runs `work` until it ends or the sink's last handle is dropped.
fn spawn_until(
    stop: CancellationToken,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let _ = stop.run_until_cancelled_owned(work).await;
    })
}

impl Sink for KafkaSink {
    async fn deliver(&self, batch: Arc<SinkBatch>) -> Result<(), SinkError> {
        let result = self.produce(batch).await.map_err(SinkError::from);
        record_outcome(SinkKind::Kafka, &self.health, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_idempotent_acks_all_and_overridable() {
        let mut config = KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            ..KafkaConfig::default()
        };
        config.librdkafka.insert("linger.ms".into(), "50".into());
        let batch = crate::policy::LoadedPolicy::embedded().policy.kafka.batch;
        let settings = producer_settings(&config, &batch);
        assert_eq!(settings["enable.idempotence"], "true");
        assert_eq!(settings["acks"], "all");
        assert_eq!(settings["compression.type"], "lz4");
        assert_eq!(settings["linger.ms"], "50");
        assert!(durability_warnings(&settings).is_empty());

        config.librdkafka.insert("acks".into(), "1".into());
        config.librdkafka.insert("enable.idempotence".into(), "false".into());
        let warnings = durability_warnings(&producer_settings(&config, &batch));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("acks = \"1\""), "{warnings:?}");
    }

    #[test]
    fn a_topic_with_one_replica_is_said_to_keep_one_copy() {
        assert!(broker_watch::single_copy_warning("events", 3).is_none());
        let warning = broker_watch::single_copy_warning("events", 1).unwrap();
        assert!(
            warning.contains("1 replica") && warning.contains("one broker"),
            "{warning}"
        );
    }
}
