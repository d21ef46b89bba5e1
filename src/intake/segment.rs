//! The Segment HTTP Tracking API's event model: parsing single and batch bodies,
//! validating each event on its own, and normalizing it (messageId, timestamps with
//! clock-skew correction, receivedAt, source). Pure functions: no I/O here.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::{EventRejection, IntakeError};
use crate::config::LimitsConfig;

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Track,
    Identify,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        EventType::Track,
        EventType::Identify,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Identify => "identify",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }

    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// Longest `messageId` accepted; longer ids are refused rather than truncated.
pub const MAX_MESSAGE_ID_CHARS: usize = 256;

/// An event ready for the sinks: the fields sinks index or route on, and the whole
/// normalized event as JSON (one line, no newline), encoded once for every sink.
#[derive(Debug, Clone)]
pub struct NormalizedEvent {
    pub message_id: String,
    pub event_type: EventType,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// The track event's name; empty for other types.
    pub event_name: String,
    /// Clock-skew corrected event time, Unix milliseconds.
    pub timestamp_ms: i64,
    /// Server receive time, Unix milliseconds.
    pub received_at_ms: i64,
    pub json: Vec<u8>,
}

#[cfg(test)]
impl NormalizedEvent {
    /// An anonymous track event with the given id and JSON bytes, for unit tests.
    pub fn for_tests(message_id: &str, json: &[u8]) -> NormalizedEvent {
        NormalizedEvent {
            message_id: message_id.to_string(),
            event_type: EventType::Track,
            user_id: None,
            anonymous_id: Some("a".into()),
            event_name: "e".into(),
            timestamp_ms: 0,
            received_at_ms: 0,
            json: json.to_vec(),
        }
    }
}

/// A request body split into events, each parsed on its own so one bad event does
/// not sink the others.
#[derive(Debug)]
pub struct ParsedRequest {
    /// `writeKey` from the body, if any (the browser SDK puts it there).
    pub write_key: Option<String>,
    /// Batch-level `sentAt`, applied to events that carry none.
    pub sent_at: Option<DateTime<Utc>>,
    /// Batch-level `context`, merged under each event's own.
    pub context: Option<Map<String, Value>>,
    pub events: Vec<Result<Map<String, Value>, Refused>>,
}

/// An event refused on its own, with what is kept of it for the rejected store:
/// the object as received (minus any `writeKey`), or an excerpt of unparseable text.
#[derive(Debug)]
pub struct Refused {
    pub reason: EventRejection,
    pub event: Value,
}

/// Bytes of a refused non-object item kept for the rejected store.
const REFUSED_EXCERPT_BYTES: usize = 1024;

fn refused_text(reason: EventRejection, text: &str) -> Refused {
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
pub fn parse_single(body: &[u8], limits: &LimitsConfig) -> Result<ParsedRequest, IntakeError> {
    if body.len() > limits.max_event_bytes {
        return Err(IntakeError::EventTooLarge {
            limit: limits.max_event_bytes,
        });
    }
    let value: Value = serde_json::from_slice(body).map_err(json_error)?;
    let Value::Object(mut event) = value else {
        return Err(IntakeError::InvalidBody(String::new()));
    };
    let write_key = take_write_key(&mut event)?;
    Ok(ParsedRequest {
        write_key,
        sent_at: None,
        context: None,
        events: vec![Ok(event)],
    })
}

#[derive(Deserialize)]
struct BatchEnvelope<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "writeKey")]
    write_key: Option<Value>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    context: Option<Value>,
}

/// Parses `{"batch":[…], "sentAt":…, "context":…, "writeKey":…}`.
pub fn parse_batch(body: &[u8], limits: &LimitsConfig) -> Result<ParsedRequest, IntakeError> {
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
    let write_key = match envelope.write_key {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) => Some(key),
        Some(_) => return Err(IntakeError::InvalidBody(": `writeKey` must be a string".into())),
    };
    let sent_at = match envelope.sent_at {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            parse_timestamp(&value)
                .ok_or_else(|| IntakeError::InvalidBody(": batch `sentAt` must be an RFC 3339 timestamp".into()))?,
        ),
    };
    let context = match envelope.context {
        None | Some(Value::Null) => None,
        Some(Value::Object(context)) => Some(context),
        Some(_) => return Err(IntakeError::InvalidBody(": batch `context` must be an object".into())),
    };
    let events = items
        .into_iter()
        .map(|raw| parse_batch_item(raw, limits.max_event_bytes))
        .collect();
    Ok(ParsedRequest {
        write_key,
        sent_at,
        context,
        events,
    })
}

fn parse_batch_item(raw: &RawValue, max_event_bytes: usize) -> Result<Map<String, Value>, Refused> {
    let text = raw.get();
    if text.len() > max_event_bytes {
        let reason = EventRejection::new(
            "event_too_large",
            format!("event is {} bytes; the limit is {max_event_bytes}", text.len()),
        );
        return Err(refused_text(reason, text));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(mut event)) => {
            // A per-event writeKey is not an auth channel; keep it out of the sinks.
            event.remove("writeKey");
            Ok(event)
        }
        Ok(_) => Err(refused_text(
            EventRejection::new("not_an_object", "each batch item must be a JSON object"),
            text,
        )),
        Err(e) => Err(refused_text(EventRejection::new("invalid_json", e.to_string()), text)),
    }
}

fn take_write_key(event: &mut Map<String, Value>) -> Result<Option<String>, IntakeError> {
    match event.remove("writeKey") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(key)) => Ok(Some(key)),
        Some(_) => Err(IntakeError::InvalidBody(": `writeKey` must be a string".into())),
    }
}

fn json_error(error: serde_json::Error) -> IntakeError {
    match error.classify() {
        serde_json::error::Category::Data => IntakeError::InvalidBody(format!(" ({error})")),
        _ => IntakeError::InvalidJson(error.to_string()),
    }
}

/// What a request gives every event it carries.
pub struct RequestContext<'a> {
    /// The route's type for single-event endpoints; `None` for batches.
    pub route_type: Option<EventType>,
    pub sent_at: Option<DateTime<Utc>>,
    pub context: Option<&'a Map<String, Value>>,
    pub received_at: DateTime<Utc>,
    pub source: &'a str,
}

/// Validates one event and returns it normalized. The output keeps every field the
/// producer sent and sets: `type`, `messageId` (generated when absent), `receivedAt`,
/// `timestamp` (clock-skew corrected), `originalTimestamp`, `sentAt`, `sourceName`.
pub fn normalize(mut event: Map<String, Value>, request: &RequestContext) -> Result<NormalizedEvent, Refused> {
    match normalize_in_place(&mut event, request) {
        Ok(fields) => {
            let json = serde_json::to_vec(&event).expect("a JSON map always serializes");
            let text = |field: &str| event.get(field).and_then(Value::as_str).map(str::to_string);
            Ok(NormalizedEvent {
                message_id: fields.message_id,
                event_type: fields.event_type,
                user_id: text("userId"),
                anonymous_id: text("anonymousId"),
                event_name: if fields.event_type == EventType::Track {
                    text("event").unwrap_or_default()
                } else {
                    String::new()
                },
                timestamp_ms: fields.timestamp.timestamp_millis(),
                received_at_ms: request.received_at.timestamp_millis(),
                json,
            })
        }
        Err(reason) => Err(Refused {
            reason,
            event: Value::Object(event),
        }),
    }
}

/// What normalization learned that is not just a JSON field lookup away.
struct NormalizedFields {
    message_id: String,
    event_type: EventType,
    timestamp: DateTime<Utc>,
}

fn normalize_in_place(
    event: &mut Map<String, Value>,
    request: &RequestContext,
) -> Result<NormalizedFields, EventRejection> {
    let event_type = match request.route_type {
        Some(route_type) => route_type,
        None => match event.get("type") {
            None | Some(Value::Null) => {
                return Err(EventRejection::new("missing_type", "event has no `type`"));
            }
            Some(Value::String(name)) => EventType::parse(name).ok_or_else(|| {
                EventRejection::new(
                    "invalid_type",
                    format!("`type` must be one of track, identify, page, screen, group, alias; got `{name}`"),
                )
            })?,
            Some(_) => return Err(EventRejection::new("invalid_type", "`type` must be a string")),
        },
    };
    event.insert("type".into(), Value::String(event_type.as_str().into()));

    let user_id = identifier(event, "userId")?;
    let anonymous_id = identifier(event, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(EventRejection::new(
            "missing_identity",
            "event needs a non-empty `userId` or `anonymousId`",
        ));
    }
    for (field, value) in [("userId", user_id), ("anonymousId", anonymous_id)] {
        if let Some(value) = value {
            event.insert(field.into(), Value::String(value));
        }
    }

    match event_type {
        EventType::Track => match event.get("event") {
            Some(Value::String(name)) if !name.trim().is_empty() => {}
            _ => {
                return Err(EventRejection::new(
                    "missing_event",
                    "track event needs a non-empty string `event`",
                ));
            }
        },
        EventType::Group => require_identifier(event, "groupId", "missing_group_id")?,
        EventType::Alias => require_identifier(event, "previousId", "missing_previous_id")?,
        EventType::Identify | EventType::Page | EventType::Screen => {}
    }

    let message_id = match event.get("messageId") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(id)) if !id.is_empty() && id.chars().count() <= MAX_MESSAGE_ID_CHARS => id.clone(),
        Some(_) => {
            return Err(EventRejection::new(
                "invalid_message_id",
                format!("`messageId` must be a non-empty string of at most {MAX_MESSAGE_ID_CHARS} characters"),
            ));
        }
    };
    event.insert("messageId".into(), Value::String(message_id.clone()));

    for field in ["context", "properties", "traits", "integrations"] {
        if !matches!(event.get(field), None | Some(Value::Null) | Some(Value::Object(_))) {
            return Err(EventRejection::new(
                "invalid_field",
                format!("`{field}` must be an object"),
            ));
        }
    }
    if let Some(batch_context) = request.context {
        merge_context(event, batch_context);
    }

    let timestamp = optional_timestamp(event, "timestamp")?;
    let original = optional_timestamp(event, "originalTimestamp")?.or(timestamp);
    let sent_at = optional_timestamp(event, "sentAt")?.or(request.sent_at);
    let received_at = request.received_at;
    // Segment's clock-skew correction: the device clock may be wrong, but the gap
    // between creating the event and sending it is measured on that same clock.
    let corrected = match (original, sent_at) {
        (Some(original), Some(sent_at)) => received_at - (sent_at - original),
        (Some(original), None) => original,
        (None, _) => received_at,
    };
    event.insert("receivedAt".into(), Value::String(format_timestamp(received_at)));
    event.insert("timestamp".into(), Value::String(format_timestamp(corrected)));
    if let Some(original) = original {
        event.insert("originalTimestamp".into(), Value::String(format_timestamp(original)));
    }
    if let Some(sent_at) = sent_at {
        event.insert("sentAt".into(), Value::String(format_timestamp(sent_at)));
    }
    event.insert("sourceName".into(), Value::String(request.source.to_string()));
    Ok(NormalizedFields {
        message_id,
        event_type,
        timestamp: corrected,
    })
}

/// `userId`-like fields: a non-empty string, or a number (kept as its string form).
fn identifier(event: &Map<String, Value>, field: &str) -> Result<Option<String>, EventRejection> {
    match event.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(EventRejection::new(
            "invalid_field",
            format!("`{field}` must be a string or a number"),
        )),
    }
}

fn require_identifier(event: &mut Map<String, Value>, field: &str, code: &'static str) -> Result<(), EventRejection> {
    let value = identifier(event, field)?
        .ok_or_else(|| EventRejection::new(code, format!("{} event needs `{field}`", event_type_name(event))))?;
    event.insert(field.into(), Value::String(value));
    Ok(())
}

fn event_type_name(event: &Map<String, Value>) -> &str {
    event.get("type").and_then(Value::as_str).unwrap_or("this")
}

/// Batch-level context fills in keys the event's own context lacks.
fn merge_context(event: &mut Map<String, Value>, batch_context: &Map<String, Value>) {
    let context = event.entry("context").or_insert_with(|| Value::Object(Map::new()));
    if context.is_null() {
        *context = Value::Object(Map::new());
    }
    if let Value::Object(context) = context {
        for (key, value) in batch_context {
            context.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
}

fn optional_timestamp(event: &Map<String, Value>, field: &str) -> Result<Option<DateTime<Utc>>, EventRejection> {
    match event.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => parse_timestamp(value).map(Some).ok_or_else(|| {
            EventRejection::new(
                "invalid_timestamp",
                format!("`{field}` must be an RFC 3339 timestamp such as 2024-01-31T12:00:00.000Z"),
            )
        }),
    }
}

fn parse_timestamp(value: &Value) -> Option<DateTime<Utc>> {
    let text = value.as_str()?;
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

/// RFC 3339 in UTC with milliseconds, as Segment writes them.
pub fn format_timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn received() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2024-05-01T12:00:10Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn request(route_type: Option<EventType>) -> RequestContext<'static> {
        RequestContext {
            route_type,
            sent_at: None,
            context: None,
            received_at: received(),
            source: "web",
        }
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn normalized(value: Value, request: &RequestContext) -> Result<Value, EventRejection> {
        normalize(object(value), request)
            .map(|e| serde_json::from_slice(&e.json).unwrap())
            .map_err(|refused| refused.reason)
    }

    #[test]
    fn clock_skew_is_corrected_with_the_event_sent_at() {
        // Device clock 1 hour fast: created at 13:00:00, sent at 13:00:05 (device time).
        let event = normalized(
            json!({"userId":"u","event":"e","timestamp":"2024-05-01T13:00:00Z","sentAt":"2024-05-01T13:00:05Z"}),
            &request(Some(EventType::Track)),
        )
        .unwrap();
        assert_eq!(event["timestamp"], "2024-05-01T12:00:05.000Z");
        assert_eq!(event["originalTimestamp"], "2024-05-01T13:00:00.000Z");
        assert_eq!(event["receivedAt"], "2024-05-01T12:00:10.000Z");
    }

    #[test]
    fn batch_sent_at_applies_when_the_event_has_none() {
        let mut req = request(None);
        req.sent_at = Some(
            DateTime::parse_from_rfc3339("2024-05-01T12:00:20+00:00")
                .unwrap()
                .with_timezone(&Utc),
        );
        let event = normalized(
            json!({"type":"identify","anonymousId":"a","originalTimestamp":"2024-05-01T12:00:19Z"}),
            &req,
        )
        .unwrap();
        assert_eq!(event["timestamp"], "2024-05-01T12:00:09.000Z");
        assert_eq!(event["sentAt"], "2024-05-01T12:00:20.000Z");
    }

    #[test]
    fn without_client_times_the_timestamp_is_received_at() {
        let event = normalized(json!({"userId":"u"}), &request(Some(EventType::Identify))).unwrap();
        assert_eq!(event["timestamp"], event["receivedAt"]);
        assert!(event.get("originalTimestamp").is_none());
    }

    #[test]
    fn message_id_is_kept_or_generated() {
        let kept = normalized(json!({"userId":"u","messageId":"m-1"}), &request(Some(EventType::Page))).unwrap();
        assert_eq!(kept["messageId"], "m-1");
        let generated = normalized(json!({"userId":"u"}), &request(Some(EventType::Page))).unwrap();
        assert_eq!(generated["messageId"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn route_type_wins_and_source_is_recorded() {
        let event = normalized(json!({"type":"track","userId":"u"}), &request(Some(EventType::Screen))).unwrap();
        assert_eq!(event["type"], "screen");
        assert_eq!(event["sourceName"], "web");
    }

    #[test]
    fn numeric_user_ids_become_strings() {
        let event = normalized(json!({"userId":42}), &request(Some(EventType::Identify))).unwrap();
        assert_eq!(event["userId"], "42");
    }

    #[test]
    fn each_rule_has_its_own_code() {
        let cases = [
            (json!({"event":"e"}), Some(EventType::Track), "missing_identity"),
            (json!({"userId":"u"}), Some(EventType::Track), "missing_event"),
            (
                json!({"userId":"u","event":""}),
                Some(EventType::Track),
                "missing_event",
            ),
            (json!({"userId":"u"}), Some(EventType::Group), "missing_group_id"),
            (json!({"userId":"u"}), Some(EventType::Alias), "missing_previous_id"),
            (json!({"userId":"u"}), None, "missing_type"),
            (json!({"userId":"u","type":"click"}), None, "invalid_type"),
            (
                json!({"userId":"u","messageId":7}),
                Some(EventType::Page),
                "invalid_message_id",
            ),
            (
                json!({"userId":"u","timestamp":"yesterday"}),
                Some(EventType::Page),
                "invalid_timestamp",
            ),
            (json!({"userId":{"a":1}}), Some(EventType::Page), "invalid_field"),
            (
                json!({"userId":"u","properties":[1]}),
                Some(EventType::Page),
                "invalid_field",
            ),
        ];
        for (event, route_type, code) in cases {
            let err = normalized(event.clone(), &request(route_type)).unwrap_err();
            assert_eq!(err.code, code, "{event}");
        }
    }

    #[test]
    fn batch_context_fills_gaps_without_overriding() {
        let batch_context = object(json!({"library":{"name":"sdk"},"ip":"1.2.3.4"}));
        let mut req = request(None);
        req.context = Some(&batch_context);
        let event = normalized(
            json!({"type":"track","userId":"u","event":"e","context":{"ip":"5.6.7.8"}}),
            &req,
        )
        .unwrap();
        assert_eq!(event["context"]["ip"], "5.6.7.8");
        assert_eq!(event["context"]["library"]["name"], "sdk");
    }

    #[test]
    fn batch_items_are_parsed_one_by_one() {
        let limits = LimitsConfig {
            max_event_bytes: 40,
            ..LimitsConfig::default()
        };
        let body = br#"{"writeKey":"k","batch":[{"type":"track"},[1],{"type":"track","event":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}"#;
        let parsed = parse_batch(body, &limits).unwrap();
        assert_eq!(parsed.write_key.as_deref(), Some("k"));
        assert!(parsed.events[0].is_ok());
        assert_eq!(parsed.events[1].as_ref().unwrap_err().reason.code, "not_an_object");
        assert_eq!(parsed.events[2].as_ref().unwrap_err().reason.code, "event_too_large");
    }

    #[test]
    fn batch_level_errors() {
        let limits = LimitsConfig {
            max_batch_events: 2,
            ..LimitsConfig::default()
        };
        assert!(matches!(
            parse_batch(b"{\"batch\":[]}", &limits),
            Err(IntakeError::EmptyBatch)
        ));
        assert!(matches!(
            parse_batch(b"{\"batch\":[{},{},{}]}", &limits),
            Err(IntakeError::TooManyEvents { count: 3, limit: 2 })
        ));
        assert!(matches!(
            parse_batch(b"{\"batch\":", &limits),
            Err(IntakeError::InvalidJson(_))
        ));
        assert!(matches!(parse_batch(b"[1]", &limits), Err(IntakeError::InvalidBody(_))));
        assert!(matches!(parse_batch(b"{}", &limits), Err(IntakeError::InvalidBody(_))));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_single(
            body.as_bytes(),
            &LimitsConfig {
                max_event_bytes: 1 << 20,
                ..LimitsConfig::default()
            }
        )
        .is_err());
    }
}
