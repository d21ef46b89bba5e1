//! Producing one batch: every event one message, sent through the current producer,
//! answered once every message is acknowledged. Events handed over whose outcome
//! is unknown when the call ends are remembered (`InDoubt`), and a later batch
//! holding any of them is first checked against the topic (`readback.rs`).
//!
//! A batch Kafka acknowledged stays in doubt until the request behind it ends
//! (`SinkBatch::when_ended`): until then its journal entry stays open, so a crash in
//! between is read back after the restart. However it ends, the entry is closed
//! then: a resend of a request another sink failed is left out of Kafka's copy by
//! the route's memory (`pipeline/unsettled.rs`), so it never reaches this sink.
//!
//! A call that gives up on messages librdkafka still holds (a send refused part-way
//! through a batch, the brokers lost) leaves their acknowledgements watched: a
//! read-back waits until none is queued, so a copy landing late is found.

use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::acks::BatchAcks;
use super::errors::{classify, refused_by_broker, KafkaSinkError};
use super::readback::{self, LogEnds, ReadBackError, UnknownOutcomes};
use super::KafkaSink;
use crate::config::KafkaKey;
use crate::event::{EndHook, NormalizedEvent, SinkBatch};
use crate::telemetry::metric;

/// How long a read-back waits for an abandoned call's messages to leave librdkafka
/// before the batch is left for a later attempt (they leave within the message
/// timeout).
const QUEUED_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Events handed to librdkafka for one batch; unless the batch is settled as
/// delivered, dropping this remembers them as of unknown outcome (whatever ended the
/// call: an error, brokers lost, or the call abandoned by a timeout).
struct InDoubt<'a> {
    outcomes: &'a UnknownOutcomes,
    batch: &'a SinkBatch,
    handed_over: usize,
    log_ends: Arc<LogEnds>,
    /// The batch's number in the journal, written before anything was handed over.
    journal_batch: Option<u64>,
    settled: bool,
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if self.handed_over == 0 {
            self.outcomes.journal_settled(self.journal_batch);
            return;
        }
        let ids = self.batch.events[..self.handed_over]
            .iter()
            .map(|e| e.message_id.as_str());
        metrics::counter!(metric::KAFKA_UNKNOWN_OUTCOME_EVENTS).increment(self.handed_over as u64);
        remember(
            self.outcomes,
            &self.batch.source,
            ids,
            &self.log_ends,
            self.journal_batch,
        );
    }
}

/// Remembers events that may be in the topic; warns about those the memory bound
/// left out.
fn remember<'a>(
    outcomes: &UnknownOutcomes,
    source: &Arc<str>,
    ids: impl Iterator<Item = &'a str>,
    log_ends: &Arc<LogEnds>,
    journal_batch: Option<u64>,
) {
    let unremembered = outcomes.remember(source, ids, log_ends, journal_batch);
    if unremembered > 0 {
        metrics::counter!(metric::KAFKA_READ_BACK_UNVERIFIED_EVENTS).increment(unremembered as u64);
        tracing::warn!(
            events = unremembered,
            "kafka: too many events of unknown outcome to remember; these may be written twice on replay"
        );
    }
}

/// What becomes of a batch written to the topic once the request behind it ends,
/// settled or not: its events, and those an earlier attempt left in doubt that this
/// batch wrote or found, are no longer in doubt, and its journal entry is closed.
/// (An unsettled request's resend is left out of Kafka's copy by its route.)
fn when_request_ends(outcomes: Arc<UnknownOutcomes>, journal_batch: Option<u64>) -> EndHook {
    Box::new(move |_end, batch| {
        outcomes.forget(&batch.source, batch.events.iter().map(|e| e.message_id.as_str()));
        outcomes.journal_settled(journal_batch);
    })
}

impl KafkaSink {
    /// Produces every event and waits for every acknowledgement. A batch holding
    /// events of unknown outcome is first checked against the topic.
    pub(super) async fn produce(&self, batch: Arc<SinkBatch>) -> Result<(), KafkaSinkError> {
        if *self.down.borrow() {
            return Err(KafkaSinkError::BrokersDown);
        }
        let requested = batch;
        let batch = match self.outcomes.unknown_in(&requested) {
            None => requested.clone(),
            Some((ids, start)) => match self.leave_out_written(requested.clone(), ids, start).await? {
                Some(rest) => rest,
                None => {
                    let hook = when_request_ends(self.outcomes.clone(), None);
                    requested.when_ended(hook);
                    return Ok(());
                }
            },
        };
        let log_ends = self.outcomes.log_ends();
        let mut in_doubt = InDoubt {
            outcomes: &self.outcomes,
            batch: &batch,
            handed_over: 0,
            journal_batch: self.outcomes.journal_sent(&batch, &log_ends),
            log_ends,
            settled: false,
        };
        let acks = Arc::new(BatchAcks::new(batch.events.len()));
        if let Err(error) = self.hand_over(&batch, &acks, &mut in_doubt) {
            // Refused part-way (a full queue): those handed over may still land.
            self.outcomes.hold_while_queued(in_doubt.handed_over, acks.all_in());
            return Err(error);
        }
        let messages = in_doubt.handed_over;
        let mut acknowledged = Box::pin(acks.clone().all_in());
        let mut down = self.down.clone();
        tokio::select! {
            () = &mut acknowledged => {
                self.settle(&acks)?;
                in_doubt.settled = true;
                let hook = when_request_ends(self.outcomes.clone(), in_doubt.journal_batch);
                requested.when_ended(hook);
                Ok(())
            }
            _ = down.wait_for(|down| *down) => {
                // Answered at once, but the messages stay queued until they time out
                // or the brokers come back.
                self.outcomes.hold_while_queued(messages, acknowledged);
                Err(KafkaSinkError::BrokersDown)
            }
        }
    }

    /// Hands every event to librdkafka, each reporting to `acks`; counts each one
    /// handed over in `in_doubt`. Refused part-way: the error (those handed over
    /// still report to `acks`).
    fn hand_over(
        &self,
        batch: &SinkBatch,
        acks: &Arc<BatchAcks>,
        in_doubt: &mut InDoubt<'_>,
    ) -> Result<(), KafkaSinkError> {
        let producer = self.slot.current();
        for event in &batch.events {
            if let Err((error, _record)) = producer.send(self.record(&batch.source, event, acks.clone())) {
                acks.handed_over(batch.events.len() - in_doubt.handed_over);
                return Err(classify(error));
            }
            in_doubt.handed_over += 1;
        }
        acks.handed_over(0);
        Ok(())
    }

    /// One event as a message: key `userId` (else `anonymousId`) by default, value
    /// the normalized JSON, headers `source`, `type`, `messageId`.
    fn record<'a>(
        &'a self,
        source: &'a str,
        event: &'a NormalizedEvent,
        acks: Arc<BatchAcks>,
    ) -> BaseRecord<'a, str, [u8], Arc<BatchAcks>> {
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "source",
                value: Some(source.as_bytes()),
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
        let record = BaseRecord::with_opaque_to(&self.topic, acks)
            .payload(&event.json[..])
            .headers(headers);
        match key {
            Some(key) => record.key(key),
            None => record,
        }
    }

    /// Reads the batch's acknowledgements: on success moves the read-back floor past
    /// what was written; a refusal is returned.
    fn settle(&self, acks: &BatchAcks) -> Result<(), KafkaSinkError> {
        let outcome = acks.outcome();
        if let Some(error) = outcome.error {
            if refused_by_broker(&error) {
                self.slot.note_refused();
            }
            return Err(classify(error));
        }
        for (partition, end) in outcome.log_ends {
            self.outcomes.advance(partition, end);
        }
        self.slot.note_delivered();
        Ok(())
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
    ) -> Result<Option<Arc<SinkBatch>>, KafkaSinkError> {
        // Copies an abandoned call left queued in librdkafka would land after the
        // read-back looked: wait for them, or leave the batch for later.
        if !self.outcomes.wait_until_none_queued(QUEUED_WAIT).await {
            return Err(KafkaSinkError::ReadBack(
                "messages of an earlier attempt are still queued in the producer".into(),
            ));
        }
        let connection = self.read_back_connection.clone();
        let topic = self.topic.clone();
        let source = batch.source.clone();
        let (outcome, ids) = tokio::task::spawn_blocking(move || {
            let outcome = readback::read_back(&connection, &topic, &start, &source, &ids);
            (outcome, ids)
        })
        .await
        .map_err(|error| KafkaSinkError::ReadBack(format!("read-back task failed: {error}")))?;
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
                // Found: no longer unknown, but still in doubt until the request
                // ends (the hook left on the requested batch forgets them then).
                let rest: Vec<_> = batch
                    .events
                    .iter()
                    .filter(|e| !found.contains(&e.message_id))
                    .cloned()
                    .collect();
                Ok((!rest.is_empty()).then(|| Arc::new(SinkBatch::new(batch.source.clone(), rest))))
            }
            Err(error @ ReadBackError::TooFar(_)) => {
                tracing::warn!(%error, events = ids.len(), "kafka: replaying events of unknown outcome unverified; they may be written twice");
                metrics::counter!(metric::KAFKA_READ_BACK_UNVERIFIED_EVENTS).increment(ids.len() as u64);
                self.outcomes.forget(&batch.source, ids.iter().map(String::as_str));
                Ok(Some(batch))
            }
            Err(error @ ReadBackError::Failed(_)) => Err(KafkaSinkError::ReadBack(error.to_string())),
        }
    }
}
