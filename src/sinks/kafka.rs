//! The Kafka sink: exactly one idempotent `FutureProducer` (acks=all) for the
//! process. Each event is one message: key `userId` (else `anonymousId`) so a user's
//! events keep their order, value the normalized JSON, headers `source`, `type`,
//! `messageId`. A request is answered only once every message is acknowledged.
//!
//! Broker loss is seen at once: librdkafka's error callback reports AllBrokersDown;
//! from then on sends fail fast and messages still queued are purged (so nothing
//! answered with an error is delivered later), until a metadata probe succeeds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use tokio::sync::watch;

use super::{record_outcome, DependencyHealth, Sink, SinkBatch, SinkError};
use crate::config::{KafkaConfig, KafkaKey};
use crate::policy::BatchPolicy;
use crate::telemetry::metric;

pub const SINK_NAME: &str = "kafka";
/// How often a down producer checks whether a broker answers again.
const RECOVERY_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether all brokers are down, shared by librdkafka's callbacks, the sends and the
/// recovery probe.
struct BrokerState {
    down: AtomicBool,
    changed: watch::Sender<bool>,
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

/// Handle to the Kafka sink; cheap to clone.
#[derive(Clone)]
pub struct KafkaSink {
    producer: Arc<FutureProducer<BrokerWatch>>,
    topic: Arc<str>,
    key: KafkaKey,
    down: watch::Receiver<bool>,
    health: Arc<DependencyHealth>,
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

impl KafkaSink {
    /// Creates the one producer of the process (it connects in the background) and
    /// the task that notices brokers coming back.
    pub fn start(config: &KafkaConfig, batch: &BatchPolicy) -> Result<KafkaSink, String> {
        let (changed, down) = watch::channel(false);
        let state = Arc::new(BrokerState {
            down: AtomicBool::new(false),
            changed,
        });
        let context = BrokerWatch {
            state: state.clone(),
            last_warning: std::sync::Mutex::new(None),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        };
        let mut client_config = ClientConfig::new();
        for (key, value) in producer_settings(config, batch) {
            client_config.set(key, value);
        }
        let producer: FutureProducer<BrokerWatch> = client_config
            .create_with_context(context)
            .map_err(|e| format!("kafka producer: {e}"))?;
        metrics::gauge!(metric::KAFKA_ALL_BROKERS_DOWN).set(0.0);
        let sink = KafkaSink {
            producer: Arc::new(producer),
            topic: Arc::from(config.topic.as_str()),
            key: config.key,
            down,
            health: Arc::new(DependencyHealth::default()),
        };
        tokio::spawn(watch_brokers(
            sink.producer.clone(),
            state,
            sink.topic.clone(),
            sink.down.clone(),
            sink.health.clone(),
        ));
        Ok(sink)
    }

    fn brokers_down(&self) -> SinkError {
        SinkError::Unavailable {
            sink: SINK_NAME,
            message: "all Kafka brokers are down".into(),
        }
    }

    /// Produces every event and waits for every acknowledgement.
    async fn produce(&self, batch: Arc<SinkBatch>) -> Result<(), SinkError> {
        if *self.down.borrow() {
            return Err(self.brokers_down());
        }
        let mut deliveries = Vec::with_capacity(batch.events.len());
        for event in &batch.events {
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "source",
                    value: Some(batch.source.as_bytes()),
                })
                .insert(Header {
                    key: "type",
                    value: Some(event.event_type.as_str()),
                })
                .insert(Header {
                    key: "messageId",
                    value: Some(event.message_id.as_str()),
                });
            let key = match self.key {
                KafkaKey::User => event.user_id.as_deref().or(event.anonymous_id.as_deref()),
                KafkaKey::MessageId => Some(event.message_id.as_str()),
                KafkaKey::None => None,
            };
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
                .payload(&event.json)
                .headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((error, _)) => return Err(classify(error)),
            }
        }
        let mut down = self.down.clone();
        let acknowledged = join_all(deliveries);
        let result = tokio::select! {
            results = acknowledged => results.into_iter().try_for_each(|result| match result {
                Ok(Ok(_delivery)) => Ok(()),
                Ok(Err((error, _message))) => Err(classify(error)),
                Err(_cancelled) => Err(SinkError::Stopped { sink: SINK_NAME }),
            }),
            _ = down.wait_for(|down| *down) => Err(self.brokers_down()),
        };
        result
    }
}

/// While brokers are down: purge what is still queued (it was or will be answered
/// as failed, so it must not be delivered later), then probe until one answers.
async fn watch_brokers(
    producer: Arc<FutureProducer<BrokerWatch>>,
    state: Arc<BrokerState>,
    topic: Arc<str>,
    mut down: watch::Receiver<bool>,
    health: Arc<DependencyHealth>,
) {
    // Warm-up: learn the topic's partitions and leaders now, so the first requests
    // do not pay for it. A broker that is down at start-up delays nothing.
    let warm = producer.clone();
    let warm_topic = topic.clone();
    let reachable = tokio::task::spawn_blocking(move || {
        warm.client()
            .fetch_metadata(Some(&warm_topic), Duration::from_secs(5))
            .is_ok()
    })
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
        producer.purge(PurgeConfig::default().queue());
        loop {
            tokio::time::sleep(RECOVERY_PROBE_INTERVAL).await;
            let probe = producer.clone();
            let topic = topic.clone();
            let answered = tokio::task::spawn_blocking(move || {
                probe
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_secs(2))
                    .map(|metadata| !metadata.brokers().is_empty())
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if answered {
                state.set_down(false);
                break;
            }
        }
    }
}

/// Data the broker will never take as it is (too large, invalid) is permanent;
/// everything else (timeouts, leaders moving, brokers down, queue full) is not.
fn classify(error: KafkaError) -> SinkError {
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    );
    if permanent {
        SinkError::Rejected {
            sink: SINK_NAME,
            message: error.to_string(),
        }
    } else {
        SinkError::Unavailable {
            sink: SINK_NAME,
            message: error.to_string(),
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        SINK_NAME
    }

    fn health(&self) -> Arc<DependencyHealth> {
        self.health.clone()
    }

    fn deliver(&self, batch: Arc<SinkBatch>) -> impl std::future::Future<Output = Result<(), SinkError>> + Send {
        let sink = self.clone();
        async move {
            let result = sink.produce(batch).await;
            record_outcome(SINK_NAME, &sink.health, &result);
            result
        }
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
    }

    #[test]
    fn oversized_messages_are_permanent_and_timeouts_are_not() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(!classify(too_big).is_retryable());
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(classify(timed_out).is_retryable());
    }
}
