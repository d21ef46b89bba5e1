//! Splitting a request body into events: a single event, or `{"batch": [...]}`
//! whose items are parsed one by one, so one bad item never sinks the others.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::super::error::{EventRejection, IntakeError};
use super::received::FieldKind;
use super::timestamps::parse_timestamp;
use super::{ParsedRequest, ReceivedEvent, Refused};
use crate::config::LimitsConfig;

/// Bytes of a refused non-object item kept for the rejected store.
pub(super) const REFUSED_EXCERPT_BYTES: usize = 1024;

pub(super) fn refused_text(reason: EventRejection, text: &str) -> Refused {
    let mut end = text.len().min(REFUSED_EXCERPT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Refused {
        reason,
        event: Value::String(text[..end].to_string()),
    }
}

/// Parses a single-event body (`/v1/track` and friends).
pub fn parse_single<'a>(body: &'a [u8], limits: &LimitsConfig) -> Result<ParsedRequest<'a>, IntakeError> {
    if body.len() > limits.max_event_bytes {
        return Err(IntakeError::EventTooLarge {
            limit: limits.max_event_bytes,
        });
    }
    let text = std::str::from_utf8(body).map_err(|e| IntakeError::InvalidJson(format!("body is not UTF-8: {e}")))?;
    let mut event = ReceivedEvent::parse(text).map_err(|error| match error.classify() {
        // Not an object; but a syntax error anywhere in the body says more.
        serde_json::error::Category::Data => match serde_json::from_str::<Value>(text) {
            Ok(_) => IntakeError::InvalidBody(String::new()),
            Err(error) => json_error(error),
        },
        _ => json_error(error),
    })?;
    let write_key = take_write_key(&mut event)?;
    Ok(ParsedRequest {
        write_key,
        sent_at: None,
        context: None,
        events: vec![Ok(event)],
    })
}

#[derive(Deserialize)]
pub(super) struct BatchEnvelope<'a> {
    #[serde(borrow)]
    pub(super) batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "writeKey")]
    pub(super) write_key: Option<Value>,
    #[serde(rename = "sentAt")]
    pub(super) sent_at: Option<Value>,
    pub(super) context: Option<Value>,
}

/// Parses `{"batch":[…], "sentAt":…, "context":…, "writeKey":…}`. The common shape
/// is read in one pass (`one_pass.rs`); any other body, or one with anything to
/// refuse, is split into raw items first and each item parsed on its own.
pub fn parse_batch<'a>(body: &'a [u8], limits: &LimitsConfig) -> Result<ParsedRequest<'a>, IntakeError> {
    match super::one_pass::common_batch(body, limits) {
        Some(parsed) => Ok(parsed),
        None => split_batch(body, limits),
    }
}

/// Any batch body: split into raw items, then each item parsed on its own.
pub(super) fn split_batch<'a>(body: &'a [u8], limits: &LimitsConfig) -> Result<ParsedRequest<'a>, IntakeError> {
    let envelope: BatchEnvelope = serde_json::from_slice(body).map_err(json_error)?;
    let items = envelope
        .batch
        .ok_or_else(|| IntakeError::InvalidBody(" with a `batch` array".into()))?;
    if items.is_empty() {
        return Err(IntakeError::EmptyBatch);
    }
    if items.len() > limits.max_batch_events {
        return Err(IntakeError::TooManyEvents {
            count: items.len(),
            limit: limits.max_batch_events,
        });
    }
    let members = EnvelopeMembers::read(envelope.write_key, envelope.sent_at, envelope.context)?;
    let events = items
        .into_iter()
        .map(|raw| parse_batch_item(raw, limits.max_event_bytes))
        .collect();
    Ok(members.with_events(events))
}

/// A batch body's members besides `batch`, checked.
pub(super) struct EnvelopeMembers {
    write_key: Option<String>,
    sent_at: Option<DateTime<Utc>>,
    context: Option<Map<String, Value>>,
}

impl EnvelopeMembers {
    pub(super) fn read(
        write_key: Option<Value>,
        sent_at: Option<Value>,
        context: Option<Value>,
    ) -> Result<EnvelopeMembers, IntakeError> {
        let write_key = match write_key {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => Some(key),
            Some(_) => return Err(IntakeError::InvalidBody(": `writeKey` must be a string".into())),
        };
        let sent_at = match sent_at {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(
                parse_timestamp(&text)
                    .ok_or_else(|| IntakeError::InvalidBody(": batch `sentAt` must be an RFC 3339 timestamp".into()))?,
            ),
            Some(_) => {
                return Err(IntakeError::InvalidBody(
                    ": batch `sentAt` must be an RFC 3339 timestamp".into(),
                ))
            }
        };
        let context = match context {
            None | Some(Value::Null) => None,
            Some(Value::Object(context)) => Some(context),
            Some(_) => return Err(IntakeError::InvalidBody(": batch `context` must be an object".into())),
        };
        Ok(EnvelopeMembers {
            write_key,
            sent_at,
            context,
        })
    }

    pub(super) fn with_events(self, events: Vec<Result<ReceivedEvent<'_>, Refused>>) -> ParsedRequest<'_> {
        ParsedRequest {
            write_key: self.write_key,
            sent_at: self.sent_at,
            context: self.context,
            events,
        }
    }
}

pub(super) fn parse_batch_item<'a>(raw: &'a RawValue, max_event_bytes: usize) -> Result<ReceivedEvent<'a>, Refused> {
    let text = raw.get();
    if text.len() > max_event_bytes {
        let reason = EventRejection::new(
            "event_too_large",
            format!("event is {} bytes; the limit is {max_event_bytes}", text.len()),
        );
        return Err(refused_text(reason, text));
    }
    if !text.starts_with('{') {
        let reason = match serde_json::from_str::<Value>(text) {
            Ok(_) => EventRejection::new("not_an_object", "each batch item must be a JSON object"),
            Err(e) => EventRejection::new("invalid_json", e.to_string()),
        };
        return Err(refused_text(reason, text));
    }
    match ReceivedEvent::parse(text) {
        Ok(event) => Ok(batch_item(event)),
        Err(e) => Err(refused_text(EventRejection::new("invalid_json", e.to_string()), text)),
    }
}

/// A parsed batch item as it goes on: a per-event writeKey is not an auth channel,
/// so it is kept out of the sinks.
pub(super) fn batch_item(mut event: ReceivedEvent<'_>) -> ReceivedEvent<'_> {
    event.remove("writeKey");
    event
}

pub(super) fn take_write_key(event: &mut ReceivedEvent) -> Result<Option<String>, IntakeError> {
    let key = match event.kind("writeKey") {
        FieldKind::Absent => None,
        FieldKind::String(key) => Some(key.into_owned()),
        _ => return Err(IntakeError::InvalidBody(": `writeKey` must be a string".into())),
    };
    event.remove("writeKey");
    Ok(key)
}

pub(super) fn json_error(error: serde_json::Error) -> IntakeError {
    match error.classify() {
        serde_json::error::Category::Data => IntakeError::InvalidBody(format!(" ({error})")),
        _ => IntakeError::InvalidJson(error.to_string()),
    }
}
