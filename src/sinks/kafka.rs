//! The Kafka sink: exactly one idempotent `FutureProducer` (acks=all) for the
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use tokio::sync::watch;

use super::kafka_readback::{self, LogEnds, ReadBackError, UnknownOutcomes};
use super::{record_outcome, DependencyHealth, Sink, SinkBatch, SinkError};
use crate::config::{KafkaConfig, KafkaKey};
use crate::policy::BatchPolicy;
use crate::telemetry::metric;

pub const SINK_NAME: &str = "kafka";
/// How often a down producer checks whether a broker answers again.
const RECOVERY_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the producer is checked for being stuck (fatal, or refused throughout).
const STUCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A producer whose every delivery the (reachable) brokers refused for this long is
/// renewed. Long enough that a leader election or a broker restart does not count.
const RENEW_AFTER_REFUSED_FOR: Duration = Duration::from_secs(10);

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

impl BrokerWatch {
    fn new(state: Arc<BrokerState>) -> BrokerWatch {
        BrokerWatch {
            state,
            last_warning: std::sync::Mutex::new(None),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

type KafkaProducer = FutureProducer<BrokerWatch>;

/// The producer in use and what is needed to replace it. Each delivery takes the
/// current one (a read lock per batch, not per event).
struct ProducerSlot {
    current: RwLock<Arc<KafkaProducer>>,
    settings: ClientConfig,
    state: Arc<BrokerState>,
    /// Since when every delivery has been refused by a broker; `None` after any success.
    refused_since: Mutex<Option<Instant>>,
}

impl ProducerSlot {
    fn create(settings: ClientConfig, state: Arc<BrokerState>) -> Result<ProducerSlot, String> {
        let producer = Self::new_producer(&settings, &state)?;
        Ok(ProducerSlot {
            current: RwLock::new(Arc::new(producer)),
            settings,
            state,
            refused_since: Mutex::new(None),
        })
    }

    fn new_producer(settings: &ClientConfig, state: &Arc<BrokerState>) -> Result<KafkaProducer, String> {
        settings
            .create_with_context(BrokerWatch::new(state.clone()))
            .map_err(|e| format!("kafka producer: {e}"))
    }

    fn current(&self) -> Arc<KafkaProducer> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn note_delivered(&self) {
        *self.refused_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn note_refused(&self) {
        self.refused_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
    }

    fn refused_for(&self) -> Duration {
        self.refused_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// Why the current producer should be replaced, if it should.
    fn stuck(&self, brokers_down: bool) -> Option<(&'static str, String)> {
        renewal_reason(self.current().client().fatal_error(), brokers_down, self.refused_for())
    }

    /// Puts a new producer in place; the old one is purged and dropped off the
    /// runtime (dropping flushes for up to 500 ms).
    fn renew(&self, reason: &'static str, detail: &str) {
        let fresh = match Self::new_producer(&self.settings, &self.state) {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::error!(%error, "kafka: cannot create a new producer; keeping the stuck one");
                return;
            }
        };
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(fresh),
        );
        self.note_delivered();
        metrics::counter!(metric::KAFKA_PRODUCER_RENEWALS, "reason" => reason).increment(1);
        tracing::warn!(
            reason = detail,
            "kafka: producer renewed (new producer id); refused batches replay from the spool"
        );
        tokio::task::spawn_blocking(move || {
            old.purge(PurgeConfig::default().queue().inflight());
            drop(old);
        });
    }
}

/// Handle to the Kafka sink; cheap to clone.
#[derive(Clone)]
pub struct KafkaSink {
    slot: Arc<ProducerSlot>,
    topic: Arc<str>,
    key: KafkaKey,
    down: watch::Receiver<bool>,
    health: Arc<DependencyHealth>,
    /// Events whose delivery failed after librdkafka had them (kafka_readback.rs).
    outcomes: Arc<UnknownOutcomes>,
    /// How a read-back consumer reaches the brokers.
    read_back_connection: Arc<ClientConfig>,
}

/// Events handed to librdkafka for one batch; unless the batch is settled as
/// delivered, dropping this remembers them as of unknown outcome (whatever ended the
/// call: an error, brokers lost, or the call abandoned by a timeout).
struct InDoubt<'a> {
    outcomes: &'a UnknownOutcomes,
    batch: &'a SinkBatch,
    handed_over: usize,
    log_ends: Arc<LogEnds>,
    settled: bool,
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.settled || self.handed_over == 0 {
            return;
        }
        let ids = self.batch.events[..self.handed_over]
            .iter()
            .map(|e| e.message_id.as_str());
        let unremembered = self.outcomes.remember(ids, &self.log_ends);
        metrics::counter!(metric::KAFKA_UNKNOWN_OUTCOME_EVENTS).increment(self.handed_over as u64);
        if unremembered > 0 {
            metrics::counter!(metric::KAFKA_READ_BACK_UNVERIFIED_EVENTS).increment(unremembered as u64);
            tracing::warn!(
                events = unremembered,
                "kafka: too many events of unknown outcome to remember; these may be written twice on replay"
            );
        }
    }
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
        let mut client_config = ClientConfig::new();
        for (key, value) in producer_settings(config, batch) {
            client_config.set(key, value);
        }
        let read_back_connection = Arc::new(kafka_readback::connection_settings(&client_config));
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
        let sink = KafkaSink {
            slot: Arc::new(slot),
            topic: Arc::from(config.topic.as_str()),
            key: config.key,
            down,
            health: Arc::new(DependencyHealth::default()),
            outcomes: Arc::new(UnknownOutcomes::default()),
            read_back_connection,
        };
        tokio::spawn(renew_stuck_producer(sink.slot.clone(), sink.down.clone()));
        tokio::spawn(watch_brokers(
            sink.slot.clone(),
            state,
            sink.topic.clone(),
            sink.down.clone(),
            sink.health.clone(),
            sink.outcomes.clone(),
        ));
        Ok(sink)
    }

    fn brokers_down(&self) -> SinkError {
        SinkError::Unavailable {
            sink: SINK_NAME,
            message: "all Kafka brokers are down".into(),
        }
    }

    /// Produces every event and waits for every acknowledgement. A batch holding
    /// events of unknown outcome is first checked against the topic.
    async fn produce(&self, batch: Arc<SinkBatch>) -> Result<(), SinkError> {
        if *self.down.borrow() {
            return Err(self.brokers_down());
        }
        let batch = match self.outcomes.unknown_in(&batch) {
            None => batch,
            Some((ids, start)) => match self.leave_out_written(batch, ids, start).await? {
                Some(rest) => rest,
                None => return Ok(()),
            },
        };
        let producer = self.slot.current();
        let mut in_doubt = InDoubt {
            outcomes: &self.outcomes,
            batch: &batch,
            handed_over: 0,
            log_ends: self.outcomes.log_ends(),
            settled: false,
        };
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
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    in_doubt.handed_over += 1;
                }
                Err((error, _)) => return Err(classify(error)),
            }
        }
        let mut down = self.down.clone();
        let acknowledged = join_all(deliveries);
        tokio::select! {
            results = acknowledged => {
                // partition → the offset after the last one delivered there.
                let mut log_ends: Vec<(i32, i64)> = Vec::new();
                for result in results {
                    match result {
                        Ok(Ok(delivery)) => match log_ends.iter_mut().find(|(p, _)| *p == delivery.partition) {
                            Some((_, end)) => *end = (*end).max(delivery.offset + 1),
                            None => log_ends.push((delivery.partition, delivery.offset + 1)),
                        },
                        Ok(Err((error, _message))) => {
                            if refused_by_broker(&error) {
                                self.slot.note_refused();
                            }
                            return Err(classify(error));
                        }
                        Err(_cancelled) => return Err(SinkError::Stopped { sink: SINK_NAME }),
                    }
                }
                for (partition, end) in log_ends {
                    self.outcomes.advance(partition, end);
                }
                in_doubt.settled = true;
                self.outcomes.forget(batch.events.iter().map(|e| e.message_id.as_str()));
                self.slot.note_delivered();
                Ok(())
            }
            _ = down.wait_for(|down| *down) => Err(self.brokers_down()),
        }
    }

    /// Reads the topic back for events of unknown outcome and returns the batch
    /// without those already there (`None`: all were). A read-back that fails leaves
    /// the batch in the spool (a retryable error); one that would scan too much is
    /// skipped, and the batch sent as it is.
    async fn leave_out_written(
        &self,
        batch: Arc<SinkBatch>,
        ids: std::collections::HashSet<String>,
        start: LogEnds,
    ) -> Result<Option<Arc<SinkBatch>>, SinkError> {
        let connection = self.read_back_connection.clone();
        let topic = self.topic.clone();
        let (outcome, ids) = tokio::task::spawn_blocking(move || {
            let outcome = kafka_readback::read_back(&connection, &topic, &start, &ids);
            (outcome, ids)
        })
        .await
        .map_err(|error| SinkError::Unavailable {
            sink: SINK_NAME,
            message: format!("read-back task failed: {error}"),
        })?;
        match outcome {
            Ok(found) => {
                metrics::counter!(metric::KAFKA_READ_BACK_FOUND_EVENTS).increment(found.len() as u64);
                if found.is_empty() {
                    return Ok(Some(batch));
                }
                tracing::info!(
                    found = found.len(),
                    of_unknown_outcome = ids.len(),
                    "kafka: events of unknown outcome are already in the topic; left out of the replay"
                );
                self.outcomes.forget(found.iter().map(String::as_str));
                let rest: Vec<_> = batch
                    .events
                    .iter()
                    .filter(|e| !found.contains(&e.message_id))
                    .cloned()
                    .collect();
                Ok((!rest.is_empty()).then(|| {
                    Arc::new(SinkBatch {
                        source: batch.source.clone(),
                        events: rest,
                    })
                }))
            }
            Err(error @ ReadBackError::TooFar(_)) => {
                tracing::warn!(%error, events = ids.len(), "kafka: replaying events of unknown outcome unverified; they may be written twice");
                metrics::counter!(metric::KAFKA_READ_BACK_UNVERIFIED_EVENTS).increment(ids.len() as u64);
                self.outcomes.forget(ids.iter().map(String::as_str));
                Ok(Some(batch))
            }
            Err(error @ ReadBackError::Failed(_)) => Err(SinkError::Unavailable {
                sink: SINK_NAME,
                message: error.to_string(),
            }),
        }
    }
}

/// While brokers are down: purge what is still queued (it was or will be answered
/// as failed, so it must not be delivered later), then probe until one answers.
async fn watch_brokers(
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
fn learn_log_ends(producer: &KafkaProducer, topic: &str, outcomes: &UnknownOutcomes) -> bool {
    let timeout = Duration::from_secs(5);
    let Ok(metadata) = producer.client().fetch_metadata(Some(topic), timeout) else {
        return false;
    };
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        if let Ok((_, high)) = producer.client().fetch_watermarks(topic, partition.id(), timeout) {
            outcomes.advance(partition.id(), high);
        }
    }
    true
}

/// Whether a producer must be replaced, and why: librdkafka declared it fatally
/// failed (it will never send again), or the brokers answer but have refused every
/// delivery for `RENEW_AFTER_REFUSED_FOR`. While all brokers are down, refusals are
/// not the producer's fault.
fn renewal_reason(
    fatal_error: Option<(RDKafkaErrorCode, String)>,
    brokers_down: bool,
    refused_for: Duration,
) -> Option<(&'static str, String)> {
    if let Some((code, reason)) = fatal_error {
        return Some(("fatal", format!("librdkafka fatal error {code:?}: {reason}")));
    }
    (!brokers_down && refused_for >= RENEW_AFTER_REFUSED_FOR).then(|| {
        (
            "refused",
            format!("the brokers refused every delivery for {} s", refused_for.as_secs()),
        )
    })
}

/// Checks every `STUCK_CHECK_INTERVAL` whether the producer must be renewed.
async fn renew_stuck_producer(slot: Arc<ProducerSlot>, down: watch::Receiver<bool>) {
    loop {
        tokio::time::sleep(STUCK_CHECK_INTERVAL).await;
        if down.has_changed().is_err() {
            return; // the sink is gone
        }
        if let Some((reason, detail)) = slot.stuck(*down.borrow()) {
            slot.renew(reason, &detail);
        }
    }
}

/// A retryable error a broker answered with (librdkafka's own errors, such as
/// timeouts, queue full or transport failures, are codes -200..-100). Permanent
/// errors concern one message and say nothing about the producer.
fn refused_by_broker(error: &KafkaError) -> bool {
    error
        .rdkafka_error_code()
        .is_some_and(|code| code as i32 > RDKafkaErrorCode::End as i32 && !PERMANENT.contains(&code))
}

/// Errors that concern the data, not the producer: the broker will never take it.
const PERMANENT: [RDKafkaErrorCode; 4] = [
    RDKafkaErrorCode::MessageSizeTooLarge,
    RDKafkaErrorCode::InvalidMessage,
    RDKafkaErrorCode::InvalidMessageSize,
    RDKafkaErrorCode::InvalidRecord,
];

/// Data the broker will never take as it is (too large, invalid) is permanent;
/// everything else (timeouts, leaders moving, brokers down, queue full) is not.
fn classify(error: KafkaError) -> SinkError {
    let permanent = error.rdkafka_error_code().is_some_and(|code| PERMANENT.contains(&code));
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
    fn only_retryable_broker_answers_count_as_refusals() {
        let broker_unknown = KafkaError::MessageProduction(RDKafkaErrorCode::Unknown);
        assert!(refused_by_broker(&broker_unknown));
        let out_of_order = KafkaError::MessageProduction(RDKafkaErrorCode::OutOfOrderSequenceNumber);
        assert!(refused_by_broker(&out_of_order));
        // librdkafka's own errors say nothing about what the broker thinks of us.
        for local in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::PurgeQueue,
        ] {
            assert!(!refused_by_broker(&KafkaError::MessageProduction(local)), "{local:?}");
        }
        // A message too large is that message's problem, not the producer's.
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(!refused_by_broker(&too_big));
    }

    #[test]
    fn a_producer_is_renewed_when_fatal_or_refused_throughout_while_brokers_answer() {
        let fatal = Some((RDKafkaErrorCode::OutOfOrderSequenceNumber, "gap".to_string()));
        assert_eq!(renewal_reason(fatal.clone(), false, Duration::ZERO).unwrap().0, "fatal");
        assert_eq!(renewal_reason(fatal, true, Duration::ZERO).unwrap().0, "fatal");
        let long = RENEW_AFTER_REFUSED_FOR;
        assert_eq!(renewal_reason(None, false, long).unwrap().0, "refused");
        assert!(
            renewal_reason(None, true, long).is_none(),
            "brokers down: not the producer's fault"
        );
        assert!(renewal_reason(None, false, long - Duration::from_millis(1)).is_none());
        assert!(renewal_reason(None, false, Duration::ZERO).is_none());
    }

    #[test]
    fn oversized_messages_are_permanent_and_timeouts_are_not() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(!classify(too_big).is_retryable());
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(classify(timed_out).is_retryable());
    }
}
