//! Broker loss seen at once: librdkafka's callbacks turn AllBrokersDown into a flag
//! that sends read (failing fast); while it is up, what is queued is purged and a
//! metadata probe runs until a broker answers. The same context hands each message's
//! delivery report to its batch's tally (`acks.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, PurgeConfig};
use tokio::sync::watch;

use super::acks::BatchAcks;
use super::producer::{KafkaProducer, ProducerSlot};
use super::readback::UnknownOutcomes;
use crate::telemetry::health::DependencyHealth;
use crate::telemetry::metric;

/// How often a down producer checks whether a broker answers again.
const RECOVERY_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether all brokers are down, shared by librdkafka's callbacks, the sends and the
/// recovery probe.
pub(super) struct BrokerState {
    pub(super) down: AtomicBool,
    pub(super) changed: watch::Sender<bool>,
}

/// Receives librdkafka's callbacks; turns AllBrokersDown into a flag sends can read.
pub struct BrokerWatch {
    state: Arc<BrokerState>,
    /// librdkafka repeats connection errors every few milliseconds while a broker is
    /// down; at most one warning per `LOG_EVERY` reaches the log.
    last_warning: std::sync::Mutex<Option<std::time::Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl BrokerState {
    fn set_down(&self, down: bool) {
        if self.down.swap(down, Ordering::SeqCst) != down {
            metrics::gauge!(metric::KAFKA_ALL_BROKERS_DOWN).set(if down { 1.0 } else { 0.0 });
            if down {
                tracing::warn!("kafka: all brokers are down; failing sends fast until one answers");
            } else {
                tracing::info!("kafka: brokers reachable again");
            }
            self.changed.send_replace(down);
        }
    }
}

impl ClientContext for BrokerWatch {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                *last = Some(std::time::Instant::now());
                let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
                tracing::warn!(facility, suppressed_since_last = suppressed, "librdkafka: {message}")
            }
            _ => tracing::debug!(facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "other".into());
        metrics::counter!(metric::KAFKA_CLIENT_ERRORS, "code" => code).increment(1);
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.state.set_down(true);
        } else {
            tracing::debug!(%error, reason, "kafka client error");
        }
    }
}

/// Each message's delivery report goes to its batch's acknowledgements.
impl ProducerContext for BrokerWatch {
    type DeliveryOpaque = Arc<BatchAcks>;

    fn delivery(&self, report: &DeliveryResult<'_>, batch: Arc<BatchAcks>) {
        batch.record(report);
    }
}

impl BrokerWatch {
    pub(super) fn new(state: Arc<BrokerState>) -> BrokerWatch {
        BrokerWatch {
            state,
            last_warning: std::sync::Mutex::new(None),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// While brokers are down: purge what is still queued (it was or will be answered
/// as failed, so it must not be delivered later), then probe until one answers.
pub(super) async fn watch_brokers(
    slot: Arc<ProducerSlot>,
    state: Arc<BrokerState>,
    topic: Arc<str>,
    mut down: watch::Receiver<bool>,
    health: Arc<DependencyHealth>,
    outcomes: Arc<UnknownOutcomes>,
) {
    // Warm-up: learn the topic's partitions and leaders now, so the first requests
    // do not pay for it. A broker that is down at start-up delays nothing.
    let warm = slot.current();
    let warm_topic = topic.clone();
    let warm_outcomes = outcomes.clone();
    let reachable = tokio::task::spawn_blocking(move || learn_log_ends(&warm, &warm_topic, &warm_outcomes))
        .await
        .unwrap_or(false);
    if !reachable {
        tracing::warn!(topic = %topic, "kafka not reachable at start-up; deliveries fail until it is");
    }
    loop {
        if down.wait_for(|down| *down).await.is_err() {
            return;
        }
        health.record_failure(&"all Kafka brokers are down");
        slot.current().purge(PurgeConfig::default().queue());
        loop {
            tokio::time::sleep(RECOVERY_PROBE_INTERVAL).await;
            let probe = slot.current();
            let probe_topic = topic.clone();
            let answered = tokio::task::spawn_blocking(move || {
                probe
                    .client()
                    .fetch_metadata(Some(&probe_topic), Duration::from_secs(2))
                    .map(|metadata| !metadata.brokers().is_empty())
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if answered {
                state.set_down(false);
                let (producer, topic, outcomes) = (slot.current(), topic.clone(), outcomes.clone());
                let _ = tokio::task::spawn_blocking(move || learn_log_ends(&producer, &topic, &outcomes)).await;
                break;
            }
        }
    }
}

/// Learns where each partition's log ends (the high watermarks), the floor for
/// reading back events sent from now on; false if the brokers did not answer.
/// Blocking.
pub(super) fn learn_log_ends(producer: &KafkaProducer, topic: &str, outcomes: &UnknownOutcomes) -> bool {
    let timeout = Duration::from_secs(5);
    let Ok(metadata) = producer.client().fetch_metadata(Some(topic), timeout) else {
        return false;
    };
    let replicas = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|partition| partition.replicas().len())
        .min();
    if let Some(warning) = replicas.and_then(|replicas| single_copy_warning(topic, replicas)) {
        warn_once(&warning);
    }
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        if let Ok((_, high)) = producer.client().fetch_watermarks(topic, partition.id(), timeout) {
            outcomes.advance(partition.id(), high);
        }
    }
    true
}

/// What "delivered" means when a partition of the topic has one replica: Kafka
/// acknowledged a message its one broker has (in its page cache with the brokers'
/// default `log.flush.*`), not a copy on a second machine. `None` with replicas.
pub(super) fn single_copy_warning(topic: &str, replicas: usize) -> Option<String> {
    (replicas < 2).then(|| {
        format!(
            "kafka topic {topic:?} has a partition with {replicas} replica: a 200 means one broker has the event \
             (acks=all waits for in-sync replicas, and there is no other); a lost broker disk loses it \
             (docs/resilience.md, \"What a 200 means\")"
        )
    })
}

/// Said once per process (the warm-up runs again after every broker outage).
fn warn_once(warning: &str) {
    static SAID: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if SAID.set(()).is_ok() {
        tracing::warn!("{warning}");
    }
}
