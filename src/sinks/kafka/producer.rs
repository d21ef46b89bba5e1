//! The producer slot: exactly one idempotent producer in use at a time, and its
//! renewal when it is stuck (declared fatal by librdkafka, or refused by reachable
//! brokers throughout `RENEW_AFTER_REFUSED_FOR`).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{Producer, PurgeConfig, ThreadedProducer};
use tokio::sync::watch;

use super::broker_watch::{BrokerState, BrokerWatch};
use super::errors::KafkaSinkError;
use crate::telemetry::metric;

/// How often the producer is checked for being stuck (fatal, or refused throughout).
const STUCK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A producer whose every delivery the (reachable) brokers refused for this long is
/// renewed. Long enough that a leader election or a broker restart does not count.
const RENEW_AFTER_REFUSED_FOR: Duration = Duration::from_secs(10);

/// A producer whose delivery reports go to each batch's `BatchAcks` (`acks.rs`),
/// polled by its own thread.
pub(super) type KafkaProducer = ThreadedProducer<BrokerWatch>;

/// The producer in use and what is needed to replace it. Each delivery takes the
/// current one (a read lock per batch, not per event).
pub(super) struct ProducerSlot {
    current: RwLock<Arc<KafkaProducer>>,
    settings: ClientConfig,
    state: Arc<BrokerState>,
    /// Since when every delivery has been refused by a broker; `None` after any success.
    refused_since: Mutex<Option<Instant>>,
}

impl ProducerSlot {
    pub(super) fn create(settings: ClientConfig, state: Arc<BrokerState>) -> Result<ProducerSlot, KafkaSinkError> {
        let producer = Self::new_producer(&settings, &state)?;
        Ok(ProducerSlot {
            current: RwLock::new(Arc::new(producer)),
            settings,
            state,
            refused_since: Mutex::new(None),
        })
    }

    fn new_producer(settings: &ClientConfig, state: &Arc<BrokerState>) -> Result<KafkaProducer, KafkaSinkError> {
        settings
            .create_with_context(BrokerWatch::new(state.clone()))
            .map_err(|e| KafkaSinkError::Producer(e.to_string()))
    }

    pub(super) fn current(&self) -> Arc<KafkaProducer> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn note_delivered(&self) {
        *self.refused_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(super) fn note_refused(&self) {
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
    pub(super) fn stuck(&self, brokers_down: bool) -> Option<(&'static str, String)> {
        renewal_reason(self.current().client().fatal_error(), brokers_down, self.refused_for())
    }

    /// Puts a new producer in place; the old one is purged and dropped off the
    /// runtime (dropping flushes for up to 500 ms).
    pub(super) fn renew(&self, reason: &'static str, detail: &str) {
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
pub(super) async fn renew_stuck_producer(slot: Arc<ProducerSlot>, down: watch::Receiver<bool>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
