//! The Segment HTTP Tracking API's event parser: splitting single and batch bodies
//! into events (`parse.rs`; the common batch shape in one pass, `one_pass.rs`),
//! each read on its own (`received.rs`), validated and
//! normalized (`normalize.rs`: messageId, `timestamps.rs`: times with clock-skew
//! correction, receivedAt, source). Pure functions: no I/O here. The event model it
//! produces (`NormalizedEvent`) lives in `crate::event`.

mod normalize;
mod one_pass;
mod parse;
mod received;
mod timestamps;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::error::EventRejection;
use crate::event::EventType;
pub use normalize::normalize;
pub use parse::{parse_batch, parse_single};
pub use received::ReceivedEvent;

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

/// An event refused on its own, with what is kept of it for the rejected store:
/// the object as received (minus any `writeKey`), or an excerpt of unparseable text.
#[derive(Debug)]
pub struct Refused {
    pub reason: EventRejection,
    pub event: Value,
}

/// What a request gives every event it carries.
pub struct RequestContext<'a> {
    /// The route's type for single-event endpoints; `None` for batches.
    pub route_type: Option<EventType>,
    pub sent_at: Option<DateTime<Utc>>,
    pub context: Option<&'a Map<String, Value>>,
    pub received_at: DateTime<Utc>,
    pub source: &'a str,
    /// `context` keys the client gives every event that lacks them (its `ip` and
    /// `userAgent`), each with its value as JSON text; after the batch's context.
    pub client_fields: &'a [(&'static str, Vec<u8>)],
}

#[cfg(test)]
mod tests {
    use super::timestamps::{json_timestamp, parse_timestamp};
    use super::*;
    use crate::config::LimitsConfig;
    use crate::event::format_timestamp;
    use crate::intake::error::IntakeError;
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
            client_fields: &[],
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

    /// The client's ip and userAgent go where neither the event nor the batch
    /// context has them; the event's own context is kept as sent otherwise.
    #[test]
    fn client_fields_fill_only_what_the_event_and_batch_lack() {
        let client: Vec<(&'static str, Vec<u8>)> = vec![
            ("ip", b"\"203.0.113.9\"".to_vec()),
            ("userAgent", b"\"UA/1 \\\"x\\\"\"".to_vec()),
        ];
        let mut req = request(None);
        req.client_fields = &client;
        let cases = [
            (json!(null), json!({"ip":"203.0.113.9","userAgent":"UA/1 \"x\""})),
            (json!({}), json!({"ip":"203.0.113.9","userAgent":"UA/1 \"x\""})),
            (
                json!({"ip":"5.6.7.8","page":{"ip":"nested"}}),
                json!({"ip":"5.6.7.8","userAgent":"UA/1 \"x\"","page":{"ip":"nested"}}),
            ),
            (
                json!({"userAgent":"Own","ip":"1.1.1.1"}),
                json!({"userAgent":"Own","ip":"1.1.1.1"}),
            ),
        ];
        for (context, expected) in cases {
            let mut event = json!({"type":"track","userId":"u","event":"e"});
            if !context.is_null() {
                event["context"] = context.clone();
            }
            let stored = normalized(event, &req).unwrap();
            assert_eq!(stored["context"], expected, "{context}");
        }
        // With a batch context: it fills first, the client after.
        let batch_context = object(json!({"ip":"9.9.9.9"}));
        req.context = Some(&batch_context);
        let stored = normalized(json!({"type":"track","userId":"u","event":"e"}), &req).unwrap();
        assert_eq!(stored["context"], json!({"ip":"9.9.9.9","userAgent":"UA/1 \"x\""}));
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
