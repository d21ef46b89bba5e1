//! Validating one event and normalizing it: type, identity, type-specific fields,
//! messageId (generated when absent), batch context, the times (`timestamps.rs`)
//! and `sourceName`, written back merged with the event's own fields by key.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::super::compact_json::{self, write_parsed_str};
use super::super::error::EventRejection;
use super::received::{FieldKind, Known, KnownFields};
use super::timestamps::{event_times, push_times};
use super::{ReceivedEvent, Refused, RequestContext};
use crate::event::{EventType, NormalizedEvent, MAX_MESSAGE_ID_CHARS};

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
    let event_type = event_type_of(&event, request)?;
    let mut json = vec![("type", json_string(event_type.as_str()))];
    let (user_id, anonymous_id) = identity(&event)?;
    for (field, value) in [(Known::UserId, &user_id), (Known::AnonymousId, &anonymous_id)] {
        if let Some(value) = value {
            json.push((field.name(), json_string(value)));
        }
    }
    let event_name = type_specific_fields(&event, event_type, &mut json)?;
    let message_id = message_id_of(&event)?;
    json.push(("messageId", json_string(&message_id)));
    check_objects(&event)?;
    match request.context {
        Some(batch_context) => json.push(("context", merged_context(&event, batch_context, request.client_fields))),
        None if !request.client_fields.is_empty() => {
            json.push(("context", with_client_fields(&event, request.client_fields)))
        }
        None => {}
    }
    let times = event_times(&event, request)?;
    push_times(&mut json, &times);
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
        timestamp: times.corrected,
        json,
    })
}

/// The route's type (`/v1/track`), else the event's own `type`.
fn event_type_of(event: &KnownFields, request: &RequestContext) -> Result<EventType, EventRejection> {
    if let Some(route_type) = request.route_type {
        return Ok(route_type);
    }
    match event.kind(Known::Type) {
        FieldKind::Absent => Err(EventRejection::new("missing_type", "event has no `type`")),
        FieldKind::String(name) => EventType::parse(&name).ok_or_else(|| {
            EventRejection::new(
                "invalid_type",
                format!("`type` must be one of track, identify, page, screen, group, alias; got `{name}`"),
            )
        }),
        _ => Err(EventRejection::new("invalid_type", "`type` must be a string")),
    }
}

/// `userId` and `anonymousId`; at least one is needed.
fn identity(event: &KnownFields) -> Result<(Option<String>, Option<String>), EventRejection> {
    let user_id = identifier(event, Known::UserId)?;
    let anonymous_id = identifier(event, Known::AnonymousId)?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(EventRejection::new(
            "missing_identity",
            "event needs a non-empty `userId` or `anonymousId`",
        ));
    }
    Ok((user_id, anonymous_id))
}

/// What one type requires: track an `event` name (returned), group a `groupId`,
/// alias a `previousId`.
fn type_specific_fields(
    event: &KnownFields,
    event_type: EventType,
    json: &mut Vec<(&'static str, Vec<u8>)>,
) -> Result<String, EventRejection> {
    match event_type {
        EventType::Track => match event.kind(Known::Event) {
            FieldKind::String(name) if !name.trim().is_empty() => return Ok(name.into_owned()),
            _ => {
                return Err(EventRejection::new(
                    "missing_event",
                    "track event needs a non-empty string `event`",
                ));
            }
        },
        EventType::Group => json.push((
            "groupId",
            required_identifier(event, event_type, Known::GroupId, "missing_group_id")?,
        )),
        EventType::Alias => json.push((
            "previousId",
            required_identifier(event, event_type, Known::PreviousId, "missing_previous_id")?,
        )),
        EventType::Identify | EventType::Page | EventType::Screen => {}
    }
    Ok(String::new())
}

/// The event's `messageId`, or a new UUID when it has none.
fn message_id_of(event: &KnownFields) -> Result<String, EventRejection> {
    match event.kind(Known::MessageId) {
        FieldKind::Absent => Ok(uuid::Uuid::new_v4().to_string()),
        FieldKind::String(id) if !id.is_empty() && id.chars().count() <= MAX_MESSAGE_ID_CHARS => Ok(id.into_owned()),
        _ => Err(EventRejection::new(
            "invalid_message_id",
            format!("`messageId` must be a non-empty string of at most {MAX_MESSAGE_ID_CHARS} characters"),
        )),
    }
}

/// `context`, `properties`, `traits` and `integrations` must be objects when present.
fn check_objects(event: &KnownFields) -> Result<(), EventRejection> {
    for field in [Known::Context, Known::Properties, Known::Traits, Known::Integrations] {
        if !matches!(event.kind(field), FieldKind::Absent | FieldKind::Object(_)) {
            return Err(EventRejection::new(
                "invalid_field",
                format!("`{}` must be an object", field.name()),
            ));
        }
    }
    Ok(())
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

pub(super) fn json_string(text: &str) -> Vec<u8> {
    serde_json::to_vec(text).expect("a string always serializes")
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

/// Batch-level context fills in keys the event's own context lacks, then the
/// client's fields fill in what both lack.
fn merged_context(
    event: &KnownFields,
    batch_context: &Map<String, Value>,
    client_fields: &[(&'static str, Vec<u8>)],
) -> Vec<u8> {
    let mut context: Map<String, Value> = match event.kind(Known::Context) {
        FieldKind::Object(json) => serde_json::from_slice(json).expect("compact JSON from a parsed object"),
        _ => Map::new(),
    };
    for (key, value) in batch_context {
        context.entry(key.clone()).or_insert_with(|| value.clone());
    }
    for (key, value) in client_fields {
        if !context.contains_key(*key) {
            let value = serde_json::from_slice(value).expect("client fields are JSON");
            context.insert((*key).to_string(), value);
        }
    }
    serde_json::to_vec(&context).expect("a JSON map always serializes")
}

/// The event's context (as sent, compacted) with the client's fields it lacks put
/// first: its top-level keys are read without building its values, and its text is
/// kept. (The common case on every request, so it avoids `merged_context`'s rebuild.)
fn with_client_fields(event: &KnownFields, client_fields: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
    let sent: &[u8] = match event.kind(Known::Context) {
        FieldKind::Object(json) => json,
        _ => b"{}",
    };
    let mut out = Vec::with_capacity(sent.len() + 64);
    out.push(b'{');
    for (key, value) in client_fields
        .iter()
        .filter(|(key, _)| !compact_json::has_top_level_key(sent, key))
    {
        out.push(b'"');
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(value);
        out.push(b',');
    }
    let inner = &sent[1..sent.len() - 1];
    if inner.is_empty() {
        if out.len() > 1 {
            out.pop();
        }
    } else {
        out.extend_from_slice(inner);
    }
    out.push(b'}');
    out
}
