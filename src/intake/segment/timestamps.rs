//! The times normalization sets: `receivedAt`, `originalTimestamp`, `sentAt` and the
//! clock-skew corrected `timestamp`, each formatted once.

use chrono::{DateTime, Datelike, Timelike, Utc};

use super::super::error::EventRejection;
use super::received::{FieldKind, Known, KnownFields};
use super::RequestContext;
use crate::event::format_timestamp;

/// An event's times as read and corrected.
pub(super) struct EventTimes {
    pub(super) received_at: DateTime<Utc>,
    pub(super) original: Option<DateTime<Utc>>,
    pub(super) sent_at: Option<DateTime<Utc>>,
    /// The event time on the server's clock.
    pub(super) corrected: DateTime<Utc>,
}

/// Reads the event's times (the batch's `sentAt` when it has none) and corrects the
/// clock skew.
pub(super) fn event_times(event: &KnownFields, request: &RequestContext) -> Result<EventTimes, EventRejection> {
    let timestamp = optional_timestamp(event, Known::Timestamp)?;
    let original = optional_timestamp(event, Known::OriginalTimestamp)?.or(timestamp);
    let sent_at = optional_timestamp(event, Known::SentAt)?.or(request.sent_at);
    let received_at = request.received_at;
    // Segment's clock-skew correction: the device clock may be wrong, but the gap
    // between creating the event and sending it is measured on that same clock.
    let corrected = match (original, sent_at) {
        (Some(original), Some(sent_at)) => received_at - (sent_at - original),
        (Some(original), None) => original,
        (None, _) => received_at,
    };
    Ok(EventTimes {
        received_at,
        original,
        sent_at,
        corrected,
    })
}

/// Adds the times as JSON. Without a sentAt, timestamp is originalTimestamp;
/// without any client time, it is receivedAt: each distinct time is formatted once.
pub(super) fn push_times(json: &mut Vec<(&'static str, Vec<u8>)>, times: &EventTimes) {
    let corrected_json = json_timestamp(times.corrected);
    let same_or_new = |time: DateTime<Utc>| {
        if time == times.corrected {
            corrected_json.clone()
        } else {
            json_timestamp(time)
        }
    };
    json.push(("receivedAt", same_or_new(times.received_at)));
    if let Some(original) = times.original {
        json.push(("originalTimestamp", same_or_new(original)));
    }
    json.push(("timestamp", corrected_json));
    if let Some(sent_at) = times.sent_at {
        json.push(("sentAt", json_timestamp(sent_at)));
    }
}

/// `format_timestamp` as a JSON string (RFC 3339 never needs escaping), written
/// directly for the years 0–9999 that real events have: chrono's general formatter
/// cost more than the rest of normalization.
pub(super) fn json_timestamp(time: DateTime<Utc>) -> Vec<u8> {
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

pub(super) fn optional_timestamp(event: &KnownFields, field: Known) -> Result<Option<DateTime<Utc>>, EventRejection> {
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

pub(super) fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}
