//! The Segment HTTP Tracking API's event model: parsing single and batch bodies,
//! validating each event on its own, and normalizing it (messageId, timestamps with
//! clock-skew correction, receivedAt, source). Pure functions: no I/O here.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use chrono::{DateTime, Datelike, SecondsFormat, Timelike, Utc};
use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::compact_json::{string_value, write_parsed_str, CompactCopy, Key};
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
pub struct ParsedRequest<'a> {
    /// `writeKey` from the body, if any (the browser SDK puts it there).
    pub write_key: Option<String>,
    /// Batch-level `sentAt`, applied to events that carry none.
    pub sent_at: Option<DateTime<Utc>>,
    /// Batch-level `context`, merged under each event's own.
    pub context: Option<Map<String, Value>>,
    pub events: Vec<Result<ReceivedEvent<'a>, Refused>>,
}

/// One event as received, parsed but not yet validated: its top-level fields in key
/// order, each value already compact JSON. Values are not parsed into a tree; only
/// the few top-level fields normalization reads are ever looked at.
#[derive(Debug)]
pub struct ReceivedEvent<'a> {
    /// The event as the producer sent it, kept for the rejected store.
    text: &'a str,
    /// Sorted by key; of duplicate keys only the last is kept, as in JavaScript.
    fields: Vec<Field<'a>>,
    /// Every field's value as compact JSON, back to back.
    values: Vec<u8>,
}

#[derive(Debug)]
struct Field<'a> {
    key: Cow<'a, str>,
    value: Range<usize>,
}

impl<'a> ReceivedEvent<'a> {
    /// Parses one event object. Fails as a `serde_json::Value` parse would (bad
    /// syntax, invalid UTF-8, numbers beyond f64, nesting beyond 128 levels), and
    /// with a data error when the text is not an object.
    pub fn parse(text: &'a str) -> Result<ReceivedEvent<'a>, serde_json::Error> {
        let mut values = Vec::with_capacity(text.len());
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let mut fields = (EventFields { values: &mut values }).deserialize(&mut deserializer)?;
        deserializer.end()?;
        // A stable sort keeps duplicates in arrival order; keep the last of each run.
        fields.sort_by(|a, b| a.key.cmp(&b.key));
        fields.dedup_by(|later, earlier| {
            let same = later.key == earlier.key;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        Ok(ReceivedEvent { text, fields, values })
    }

    /// The field's value as compact JSON.
    fn get(&self, key: &str) -> Option<&[u8]> {
        let index = self.fields.binary_search_by(|f| f.key.as_ref().cmp(key)).ok()?;
        Some(&self.values[self.fields[index].value.clone()])
    }

    fn kind(&self, key: &str) -> FieldKind<'_> {
        FieldKind::of(self.get(key))
    }

    fn remove(&mut self, key: &str) -> Option<Range<usize>> {
        let index = self.fields.binary_search_by(|f| f.key.as_ref().cmp(key)).ok()?;
        Some(self.fields.remove(index).value)
    }

    /// The event as received, minus any `writeKey`, for the rejected store.
    fn as_received(&self) -> Value {
        let mut value: Value = serde_json::from_str(self.text).unwrap_or_else(|_| Value::String(self.text.into()));
        if let Value::Object(map) = &mut value {
            map.remove("writeKey");
        }
        value
    }
}

/// A top-level field's value, as normalization needs to see it.
enum FieldKind<'e> {
    /// Missing or `null`.
    Absent,
    String(Cow<'e, str>),
    /// An object, as compact JSON.
    Object(&'e [u8]),
    /// A number, as compact JSON (which is also its canonical text).
    Number(&'e [u8]),
    /// `true`, `false` or an array.
    Other,
}

impl<'e> FieldKind<'e> {
    /// What a field holds, by the first byte of its compact JSON.
    fn of(json: Option<&'e [u8]>) -> FieldKind<'e> {
        match json {
            None | Some(b"null") => FieldKind::Absent,
            Some(json) => match json[0] {
                b'"' => FieldKind::String(string_value(json).unwrap_or_default()),
                b'{' => FieldKind::Object(json),
                b'-' | b'0'..=b'9' => FieldKind::Number(json),
                _ => FieldKind::Other,
            },
        }
    }
}

/// The top-level fields normalization reads.
#[derive(Debug, Clone, Copy)]
enum Known {
    Type,
    UserId,
    AnonymousId,
    Event,
    GroupId,
    PreviousId,
    MessageId,
    Context,
    Properties,
    Traits,
    Integrations,
    Timestamp,
    OriginalTimestamp,
    SentAt,
}

impl Known {
    const COUNT: usize = Known::SentAt as usize + 1;

    fn name(self) -> &'static str {
        match self {
            Known::Type => "type",
            Known::UserId => "userId",
            Known::AnonymousId => "anonymousId",
            Known::Event => "event",
            Known::GroupId => "groupId",
            Known::PreviousId => "previousId",
            Known::MessageId => "messageId",
            Known::Context => "context",
            Known::Properties => "properties",
            Known::Traits => "traits",
            Known::Integrations => "integrations",
            Known::Timestamp => "timestamp",
            Known::OriginalTimestamp => "originalTimestamp",
            Known::SentAt => "sentAt",
        }
    }

    fn from_name(name: &str) -> Option<Known> {
        Some(match name {
            "type" => Known::Type,
            "userId" => Known::UserId,
            "anonymousId" => Known::AnonymousId,
            "event" => Known::Event,
            "groupId" => Known::GroupId,
            "previousId" => Known::PreviousId,
            "messageId" => Known::MessageId,
            "context" => Known::Context,
            "properties" => Known::Properties,
            "traits" => Known::Traits,
            "integrations" => Known::Integrations,
            "timestamp" => Known::Timestamp,
            "originalTimestamp" => Known::OriginalTimestamp,
            "sentAt" => Known::SentAt,
            _ => return None,
        })
    }
}

/// The values of an event's known fields, found in one pass over its fields.
struct KnownFields<'e>([Option<&'e [u8]>; Known::COUNT]);

impl<'e> KnownFields<'e> {
    fn of(event: &'e ReceivedEvent) -> KnownFields<'e> {
        let mut found = [None; Known::COUNT];
        for field in &event.fields {
            if let Some(known) = Known::from_name(&field.key) {
                found[known as usize] = Some(&event.values[field.value.clone()]);
            }
        }
        KnownFields(found)
    }

    fn kind(&self, field: Known) -> FieldKind<'e> {
        FieldKind::of(self.0[field as usize])
    }
}

/// Reads an event object into fields, copying each value into `values`.
struct EventFields<'v> {
    values: &'v mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for EventFields<'_> {
    type Value = Vec<Field<'de>>;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EventFields<'_> {
    type Value = Vec<Field<'de>>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(16);
        while let Some(Key(key)) = map.next_key()? {
            let start = self.values.len();
            map.next_value_seed(CompactCopy { out: self.values })?;
            fields.push(Field {
                key,
                value: start..self.values.len(),
            });
        }
        Ok(fields)
    }
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
pub fn parse_batch<'a>(body: &'a [u8], limits: &LimitsConfig) -> Result<ParsedRequest<'a>, IntakeError> {
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

fn parse_batch_item<'a>(raw: &'a RawValue, max_event_bytes: usize) -> Result<ReceivedEvent<'a>, Refused> {
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
        Ok(mut event) => {
            // A per-event writeKey is not an auth channel; keep it out of the sinks.
            event.remove("writeKey");
            Ok(event)
        }
        Err(e) => Err(refused_text(EventRejection::new("invalid_json", e.to_string()), text)),
    }
}

fn take_write_key(event: &mut ReceivedEvent) -> Result<Option<String>, IntakeError> {
    let key = match event.kind("writeKey") {
        FieldKind::Absent => None,
        FieldKind::String(key) => Some(key.into_owned()),
        _ => return Err(IntakeError::InvalidBody(": `writeKey` must be a string".into())),
    };
    event.remove("writeKey");
    Ok(key)
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
/// Top-level keys come out sorted; nested values are kept as sent, compacted.
pub fn normalize(event: ReceivedEvent, request: &RequestContext) -> Result<NormalizedEvent, Refused> {
    match normalized_fields(&event, request) {
        Ok(set) => Ok(write_normalized(&event, set, request)),
        Err(reason) => Err(Refused {
            reason,
            event: event.as_received(),
        }),
    }
}

/// What normalization sets on an event, each value as JSON text.
struct SetFields {
    event_type: EventType,
    message_id: String,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    event_name: String,
    timestamp: DateTime<Utc>,
    /// Sorted by key; each replaces the event's own field of that name.
    json: Vec<(&'static str, Vec<u8>)>,
}

fn normalized_fields(event: &ReceivedEvent, request: &RequestContext) -> Result<SetFields, EventRejection> {
    let event = KnownFields::of(event);
    let event_type = match request.route_type {
        Some(route_type) => route_type,
        None => match event.kind(Known::Type) {
            FieldKind::Absent => return Err(EventRejection::new("missing_type", "event has no `type`")),
            FieldKind::String(name) => EventType::parse(&name).ok_or_else(|| {
                EventRejection::new(
                    "invalid_type",
                    format!("`type` must be one of track, identify, page, screen, group, alias; got `{name}`"),
                )
            })?,
            _ => return Err(EventRejection::new("invalid_type", "`type` must be a string")),
        },
    };
    let mut json = vec![("type", json_string(event_type.as_str()))];

    let user_id = identifier(&event, Known::UserId)?;
    let anonymous_id = identifier(&event, Known::AnonymousId)?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(EventRejection::new(
            "missing_identity",
            "event needs a non-empty `userId` or `anonymousId`",
        ));
    }
    for (field, value) in [(Known::UserId, &user_id), (Known::AnonymousId, &anonymous_id)] {
        if let Some(value) = value {
            json.push((field.name(), json_string(value)));
        }
    }

    let mut event_name = String::new();
    match event_type {
        EventType::Track => match event.kind(Known::Event) {
            FieldKind::String(name) if !name.trim().is_empty() => event_name = name.into_owned(),
            _ => {
                return Err(EventRejection::new(
                    "missing_event",
                    "track event needs a non-empty string `event`",
                ));
            }
        },
        EventType::Group => json.push((
            "groupId",
            required_identifier(&event, event_type, Known::GroupId, "missing_group_id")?,
        )),
        EventType::Alias => json.push((
            "previousId",
            required_identifier(&event, event_type, Known::PreviousId, "missing_previous_id")?,
        )),
        EventType::Identify | EventType::Page | EventType::Screen => {}
    }

    let message_id = match event.kind(Known::MessageId) {
        FieldKind::Absent => uuid::Uuid::new_v4().to_string(),
        FieldKind::String(id) if !id.is_empty() && id.chars().count() <= MAX_MESSAGE_ID_CHARS => id.into_owned(),
        _ => {
            return Err(EventRejection::new(
                "invalid_message_id",
                format!("`messageId` must be a non-empty string of at most {MAX_MESSAGE_ID_CHARS} characters"),
            ));
        }
    };
    json.push(("messageId", json_string(&message_id)));

    for field in [Known::Context, Known::Properties, Known::Traits, Known::Integrations] {
        if !matches!(event.kind(field), FieldKind::Absent | FieldKind::Object(_)) {
            return Err(EventRejection::new(
                "invalid_field",
                format!("`{}` must be an object", field.name()),
            ));
        }
    }
    if let Some(batch_context) = request.context {
        json.push(("context", merged_context(&event, batch_context)));
    }

    let timestamp = optional_timestamp(&event, Known::Timestamp)?;
    let original = optional_timestamp(&event, Known::OriginalTimestamp)?.or(timestamp);
    let sent_at = optional_timestamp(&event, Known::SentAt)?.or(request.sent_at);
    let received_at = request.received_at;
    // Segment's clock-skew correction: the device clock may be wrong, but the gap
    // between creating the event and sending it is measured on that same clock.
    let corrected = match (original, sent_at) {
        (Some(original), Some(sent_at)) => received_at - (sent_at - original),
        (Some(original), None) => original,
        (None, _) => received_at,
    };
    // Without a sentAt, timestamp is originalTimestamp; without any client time, it
    // is receivedAt: format each distinct time once.
    let corrected_json = json_timestamp(corrected);
    let same_or_new = |time: DateTime<Utc>| {
        if time == corrected {
            corrected_json.clone()
        } else {
            json_timestamp(time)
        }
    };
    json.push(("receivedAt", same_or_new(received_at)));
    if let Some(original) = original {
        json.push(("originalTimestamp", same_or_new(original)));
    }
    json.push(("timestamp", corrected_json));
    if let Some(sent_at) = sent_at {
        json.push(("sentAt", json_timestamp(sent_at)));
    }
    json.push(("sourceName", json_string(request.source)));
    json.sort_unstable_by_key(|(key, _)| *key);

    // What the sinks index: the identifier as set, or else the field as sent.
    let as_sent = |field: Known| match event.kind(field) {
        FieldKind::String(text) => Some(text.into_owned()),
        _ => None,
    };
    Ok(SetFields {
        event_type,
        user_id: user_id.or_else(|| as_sent(Known::UserId)),
        anonymous_id: anonymous_id.or_else(|| as_sent(Known::AnonymousId)),
        message_id,
        event_name,
        timestamp: corrected,
        json,
    })
}

/// Writes the event's own fields merged with the ones normalization set, by key.
fn write_normalized(event: &ReceivedEvent, set: SetFields, request: &RequestContext) -> NormalizedEvent {
    let mut out = Vec::with_capacity(event.values.len() + event.fields.len() * 16 + 256);
    out.push(b'{');
    let (mut own, mut setting) = (0, 0);
    loop {
        let own_field = event.fields.get(own);
        let set_field = set.json.get(setting);
        let takes_own = match (own_field, set_field) {
            (None, None) => break,
            (Some(field), Some((set_key, _))) => {
                if field.key.as_ref() == *set_key {
                    own += 1; // replaced by the set value
                    false
                } else {
                    field.key.as_ref() < *set_key
                }
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if out.len() > 1 {
            out.push(b',');
        }
        let value = if takes_own {
            let field = &event.fields[own];
            own += 1;
            write_parsed_str(&mut out, &field.key, matches!(field.key, Cow::Borrowed(_)));
            &event.values[field.value.clone()]
        } else {
            let (key, value) = &set.json[setting];
            setting += 1;
            // Our own names: plain ASCII, nothing to escape.
            write_parsed_str(&mut out, key, true);
            value
        };
        out.push(b':');
        out.extend_from_slice(value);
    }
    out.push(b'}');
    NormalizedEvent {
        message_id: set.message_id,
        event_type: set.event_type,
        user_id: set.user_id,
        anonymous_id: set.anonymous_id,
        event_name: set.event_name,
        timestamp_ms: set.timestamp.timestamp_millis(),
        received_at_ms: request.received_at.timestamp_millis(),
        json: out,
    }
}

fn json_string(text: &str) -> Vec<u8> {
    serde_json::to_vec(text).expect("a string always serializes")
}

/// `format_timestamp` as a JSON string (RFC 3339 never needs escaping), written
/// directly for the years 0–9999 that real events have: chrono's general formatter
/// cost more than the rest of normalization.
fn json_timestamp(time: DateTime<Utc>) -> Vec<u8> {
    let (date, clock) = (time.date_naive(), time.time());
    let leap_second = clock.nanosecond() >= 1_000_000_000;
    if !(0..=9999).contains(&date.year()) || leap_second {
        return format!("\"{}\"", format_timestamp(time)).into_bytes();
    }
    let mut out = Vec::with_capacity(26);
    out.push(b'"');
    let mut digits = |value: u32, width: u32, after: u8| {
        for power in (0..width).rev() {
            out.push(b'0' + (value / 10u32.pow(power) % 10) as u8);
        }
        out.push(after);
    };
    digits(date.year() as u32, 4, b'-');
    digits(date.month(), 2, b'-');
    digits(date.day(), 2, b'T');
    digits(clock.hour(), 2, b':');
    digits(clock.minute(), 2, b':');
    digits(clock.second(), 2, b'.');
    digits(clock.nanosecond() / 1_000_000, 3, b'Z');
    out.push(b'"');
    out
}

/// `userId`-like fields: a non-empty string, or a number (kept as its string form).
fn identifier(event: &KnownFields, field: Known) -> Result<Option<String>, EventRejection> {
    match event.kind(field) {
        FieldKind::Absent => Ok(None),
        FieldKind::String(s) if s.trim().is_empty() => Ok(None),
        FieldKind::String(s) => Ok(Some(s.into_owned())),
        FieldKind::Number(n) => Ok(Some(String::from_utf8_lossy(n).into_owned())),
        FieldKind::Object(_) | FieldKind::Other => Err(EventRejection::new(
            "invalid_field",
            format!("`{}` must be a string or a number", field.name()),
        )),
    }
}

/// A required `userId`-like field, as the JSON string it is set to.
fn required_identifier(
    event: &KnownFields,
    event_type: EventType,
    field: Known,
    code: &'static str,
) -> Result<Vec<u8>, EventRejection> {
    let value = identifier(event, field)?
        .ok_or_else(|| EventRejection::new(code, format!("{} event needs `{}`", event_type.as_str(), field.name())))?;
    Ok(json_string(&value))
}

/// Batch-level context fills in keys the event's own context lacks.
fn merged_context(event: &KnownFields, batch_context: &Map<String, Value>) -> Vec<u8> {
    let mut context: Map<String, Value> = match event.kind(Known::Context) {
        FieldKind::Object(json) => serde_json::from_slice(json).expect("compact JSON from a parsed object"),
        _ => Map::new(),
    };
    for (key, value) in batch_context {
        context.entry(key.clone()).or_insert_with(|| value.clone());
    }
    serde_json::to_vec(&context).expect("a JSON map always serializes")
}

fn optional_timestamp(event: &KnownFields, field: Known) -> Result<Option<DateTime<Utc>>, EventRejection> {
    let invalid = || {
        EventRejection::new(
            "invalid_timestamp",
            format!(
                "`{}` must be an RFC 3339 timestamp such as 2024-01-31T12:00:00.000Z",
                field.name()
            ),
        )
    };
    match event.kind(field) {
        FieldKind::Absent => Ok(None),
        FieldKind::String(text) => parse_timestamp(&text).map(Some).ok_or_else(invalid),
        _ => Err(invalid()),
    }
}

fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
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
        let text = value.to_string();
        normalize(ReceivedEvent::parse(&text).unwrap(), request)
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
    fn timestamps_are_written_as_chrono_writes_them() {
        let times = [
            "2024-05-01T12:00:10Z",
            "2024-05-01T12:00:10.5Z",
            "1969-12-31T23:59:59.999Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.9999Z",
            "2016-12-31T23:59:60.250Z", // leap second
            "2024-02-29T01:02:03.004+05:30",
        ];
        for text in times {
            let time = parse_timestamp(text).unwrap();
            let json = String::from_utf8(json_timestamp(time)).unwrap();
            assert_eq!(json, format!("\"{}\"", format_timestamp(time)), "{text}");
        }
        let before_year_zero =
            DateTime::parse_from_rfc3339("0001-01-01T00:00:00Z").unwrap().to_utc() - chrono::Duration::days(400);
        assert_eq!(
            String::from_utf8(json_timestamp(before_year_zero)).unwrap(),
            format!("\"{}\"", format_timestamp(before_year_zero))
        );
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
