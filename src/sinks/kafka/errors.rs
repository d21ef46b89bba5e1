//! The Kafka sink's errors and their retry classification: data the broker will
//! never take as it is (too large, invalid) is rejected for good; everything else
//! (timeouts, leaders moving, brokers down, queue full) is retried.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::event::SinkKind;
use crate::sinks::{ClassifyError, ErrorClass, SinkError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum KafkaSinkError {
    /// The broker refused the message itself.
    #[error("{0}")]
    Rejected(String),
    /// A send or an acknowledgement failed for a reason that may pass.
    #[error("{0}")]
    Unavailable(String),
    #[error("all Kafka brokers are down")]
    BrokersDown,
    /// Reading the topic back (for events of unknown outcome) failed.
    #[error("{0}")]
    ReadBack(String),
    /// The producer could not be created (start-up only).
    #[error("kafka producer: {0}")]
    Producer(String),
    /// The in-doubt journal could not be opened (start-up only).
    #[error("kafka in-doubt journal: {0}")]
    Journal(String),
}

impl ClassifyError for KafkaSinkError {
    fn classify(&self) -> ErrorClass {
        match self {
            KafkaSinkError::Rejected(_) => ErrorClass::Rejected,
            KafkaSinkError::Unavailable(_)
            | KafkaSinkError::BrokersDown
            | KafkaSinkError::ReadBack(_)
            | KafkaSinkError::Producer(_)
            | KafkaSinkError::Journal(_) => ErrorClass::Unavailable,
        }
    }
}

impl From<KafkaSinkError> for SinkError {
    fn from(error: KafkaSinkError) -> Self {
        SinkError::classified(SinkKind::Kafka, &error)
    }
}

/// A retryable error a broker answered with (librdkafka's own errors, such as
/// timeouts, queue full or transport failures, are codes -200..-100). Permanent
/// errors concern one message and say nothing about the producer.
pub(super) fn refused_by_broker(error: &KafkaError) -> bool {
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
pub(super) fn classify(error: KafkaError) -> KafkaSinkError {
    let permanent = error.rdkafka_error_code().is_some_and(|code| PERMANENT.contains(&code));
    if permanent {
        KafkaSinkError::Rejected(error.to_string())
    } else {
        KafkaSinkError::Unavailable(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn oversized_messages_are_permanent_and_timeouts_are_not() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(!SinkError::from(classify(too_big)).is_retryable());
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(SinkError::from(classify(timed_out)).is_retryable());
    }
}
