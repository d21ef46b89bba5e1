//! The common batch body read in one pass: `{"batch":[{…},{…},…]}`, with any other
//! members (`sentAt`, `writeKey`, `context`, a WebSocket frame's `id`, members we
//! ignore) before or after `batch`, JSON whitespace anywhere. Each item is parsed
//! where it stands, so the body is not first split into raw items (a second scan of
//! every byte: about 30 % of the parse, `cargo bench --bench intake_floor`).
//!
//! Only bodies with nothing to refuse are taken: any other shape, any item that is
//! not an object, too large or unparseable, any envelope problem returns `None`,
//! and `parse_batch` reads the body the general way. So both ways give the same
//! result for every body; `tests::both_ways_agree` checks it on generated bodies.

use super::parse::{batch_item, BatchEnvelope, EnvelopeMembers};
use super::{ParsedRequest, ReceivedEvent};
use crate::config::LimitsConfig;

pub(super) fn common_batch<'a>(body: &'a [u8], limits: &LimitsConfig) -> Option<ParsedRequest<'a>> {
    // Items are borrowed as `&str`; an item that parses is valid UTF-8 anyway.
    let text = std::str::from_utf8(body).ok()?;
    let mut cursor = Cursor { text, at: 0 };
    cursor.take(b'{')?;
    let leading = cursor.members_before_batch()?;
    for expected in [b':', b'['] {
        cursor.take(expected)?;
    }
    let mut events = Vec::new();
    loop {
        if cursor.next_byte()? != b'{' {
            return None;
        }
        let event = ReceivedEvent::parse_leading(&text[cursor.at..])?;
        if event.text.len() > limits.max_event_bytes || events.len() == limits.max_batch_events {
            return None;
        }
        cursor.at += event.text.len();
        events.push(Ok(batch_item(event)));
        match cursor.take_next()? {
            b',' => continue,
            b']' => break,
            _ => return None,
        }
    }
    // The members before and after `batch`, as one object of their own.
    let others = match cursor.take_next()? {
        b'}' => {
            cursor.skip_whitespace();
            if cursor.at != text.len() {
                return None;
            }
            let leading = leading.trim_end();
            format!("{{{}}}", leading.strip_suffix(',').unwrap_or(leading))
        }
        b',' => {
            if cursor.next_byte()? != b'"' {
                return None; // a trailing comma, or not a member
            }
            format!("{{{leading}{}", &text[cursor.at..])
        }
        _ => return None,
    };
    let envelope: BatchEnvelope = serde_json::from_str(&others).ok()?;
    if envelope.batch.is_some() {
        return None; // `batch` twice: refused the general way
    }
    let members = EnvelopeMembers::read(envelope.write_key, envelope.sent_at, envelope.context).ok()?;
    Some(members.with_events(events))
}

/// A position in the body, moved past JSON whitespace.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn skip_whitespace(&mut self) {
        let rest = &self.text.as_bytes()[self.at..];
        self.at += rest
            .iter()
            .take_while(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
    }

    /// The next byte that is not whitespace, left in place.
    fn next_byte(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.text.as_bytes().get(self.at).copied()
    }

    /// The next byte that is not whitespace, taken.
    fn take_next(&mut self) -> Option<u8> {
        let byte = self.next_byte()?;
        self.at += 1;
        Some(byte)
    }

    /// Moves past the members before `"batch"` (a WebSocket frame's `id`, say) and
    /// the `"batch"` key itself; returns those members' text, each with its comma.
    /// `None` if there is no `batch` key as plain text. (A key before it that spells
    /// `batch` with an escape is found when the members are read as an envelope.)
    fn members_before_batch(&mut self) -> Option<&'a str> {
        let start = self.at;
        loop {
            if self.next_byte()? != b'"' {
                return None;
            }
            let members = &self.text[start..self.at];
            if self.take_str("\"batch\"").is_some() {
                return Some(members);
            }
            self.take_value()?; // the key
            self.take(b':')?;
            self.take_value()?;
            self.take(b',')?;
        }
    }

    /// Moves past the JSON value here (a key is a string value).
    fn take_value(&mut self) -> Option<()> {
        let rest = &self.text[self.at..];
        let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<serde::de::IgnoredAny>();
        stream.next()?.ok()?;
        self.at += stream.byte_offset();
        Some(())
    }

    fn take(&mut self, expected: u8) -> Option<()> {
        (self.take_next()? == expected).then_some(())
    }

    /// `expected` right here, no whitespace before it.
    fn take_str(&mut self, expected: &str) -> Option<()> {
        self.text[self.at..]
            .starts_with(expected)
            .then(|| self.at += expected.len())
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse::{parse_batch, split_batch};
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_event_bytes: 300,
            max_batch_events: 6,
            ..LimitsConfig::default()
        }
    }

    /// Bodies as SDKs send them are read in one pass.
    #[test]
    fn common_bodies_are_read_in_one_pass() {
        let event = r#"{"type":"track","event":"A","userId":"u","writeKey":"w","properties":{"a":[1,2.5,"x"]}}"#;
        let bodies = [
            format!(r#"{{"batch":[{event},{event}]}}"#),
            // Python's json.dumps separators, and a batch sentAt after the items.
            format!("{{\"batch\": [{event}, {event}], \"sentAt\": \"2024-05-01T12:00:00.000Z\"}}\n"),
            format!(r#"{{"batch":[{event}],"writeKey":"k","context":{{"ip":"192.0.2.1"}},"other":1}}"#),
            // A WebSocket frame, and members on both sides of `batch`.
            format!(r#"{{"id":7,"batch":[{event}]}}"#),
            format!(r#"{{"id":{{"n":[1]}}, "sentAt":"2024-05-01T12:00:00Z" ,"batch":[{event}],"writeKey":"k"}}"#),
        ];
        for body in &bodies {
            let parsed = common_batch(body.as_bytes(), &LimitsConfig::default());
            let parsed = parsed.unwrap_or_else(|| panic!("not read in one pass: {body}"));
            assert_eq!(
                format!("{parsed:?}"),
                format!("{:?}", split_batch(body.as_bytes(), &LimitsConfig::default()).unwrap())
            );
            let first = parsed.events[0].as_ref().unwrap();
            assert_eq!(first.text, event, "an item's text is the item as sent");
            assert!(first.get("writeKey").is_none());
        }
    }

    /// Bodies with anything to refuse, or of another shape, go the general way.
    #[test]
    fn other_bodies_go_the_general_way() {
        let event = r#"{"type":"track"}"#;
        for body in [
            format!(r#"{{"\u0062atch":[{event}],"batch":[{event}]}}"#),
            format!(r#"{{"sentAt":null,"batch":[{event}],"sentAt":null}}"#),
            format!(r#"{{"id":1 "batch":[{event}]}}"#),
            r#"{"id":1,}"#.to_string(),
            format!(r#"{{"batch":[{event},1]}}"#),
            format!(r#"{{"batch":[{event},{{"a":}}]}}"#),
            format!(r#"{{"batch":[{event}],}}"#),
            format!(r#"{{"batch":[{event}]}}x"#),
            format!(r#"{{"batch":[{event}],"batch":[]}}"#),
            format!(r#"{{"batch":[{event}],"sentAt":5}}"#),
            format!(r#"{{"batch":[{event}, ]}}"#),
            format!(r#"{{"batch":[{{"p":"{}"}}]}}"#, "x".repeat(400)),
            format!("{{\"batch\":[{}]}}", [event; 7].join(",")),
            r#"{"batch":[]}"#.to_string(),
            r#"{"\u0062atch":[{}]}"#.to_string(),
        ] {
            assert!(
                common_batch(body.as_bytes(), &limits()).is_none(),
                "read in one pass: {body}"
            );
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z\u{e9}\"\\\\/\u{1} ]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::vec(("[a-c]|writeKey|type", inner), 0..4)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    /// One batch item's text: an object as serde_json writes it (compact or
    /// pretty), or raw text serde_json would not write.
    fn item() -> impl Strategy<Value = String> {
        prop_oneof![
            12 => prop::collection::vec(("[a-c]|writeKey|type|messageId", json_value()), 0..5).prop_map(|members| {
                serde_json::to_string(&Value::Object(members.into_iter().collect())).unwrap()
            }),
            1 => json_value().prop_map(|value| serde_json::to_string_pretty(&value).unwrap()),
            1 => prop::sample::select(vec![
                r#"{"a":1,"a":2}"#, r#"{"n":1.50,"m":-0,"e":1E2,"z":-0.0}"#, r#"{"s":"\u00e9\/\n\ud83d\ude00"}"#,
                r#"{"a":}"#, r#"{"s":"\ud800"}"#, r#"{"n":1e400}"#, "{ }", r#" {"a" : [ 1 , 2 ] } "#, "[1]", "7", r#""x""#,
            ])
            .prop_map(str::to_string),
        ]
    }

    fn body() -> impl Strategy<Value = String> {
        let head = prop::sample::select(vec![
            r#"{"batch":["#,
            r#"{"batch":["#,
            "{\"batch\": [",
            "{ \"batch\" :\n[ ",
            "\t{\"batch\":[",
            r#"{"writeKey":"k","batch":["#,
            r#"{"batch":{"#,
            r#"{"id":1,"batch":["#,
            "{\"id\": {\"a\":[1, 2]} ,\n\"batch\":[",
            r#"{"\u0062atch":[{}],"batch":["#,
            r#"{"sentAt":"2024-05-01T12:00:00Z","batch":["#,
            r#"{"id":1 "batch":["#,
            r#"{"sentAt":null,"sentAt":null,"batch":["#,
            r#"{"x\"y":1,"batch":["#,
            r#"{"id":1e400,"batch":["#,
        ]);
        let separator = prop::sample::select(vec![",", ",", ", ", " ,\n", ",,", " "]);
        let tail = prop::sample::select(vec![
            "]}",
            "] }\n",
            r#"],"sentAt":"2024-05-01T12:00:00.000Z"}"#,
            r#"], "writeKey": "k", "x": [1]}"#,
            r#"],"context":{"ip":"192.0.2.1"}}"#,
            r#"],"sentAt":"yesterday"}"#,
            r#"],"writeKey":1}"#,
            r#"],"context":[]}"#,
            r#"],"batch":[]}"#,
            "],}",
            "]}]",
            "]",
            r#"],"sentAt":null,"writeKey":null}"#,
        ]);
        (head, prop::collection::vec(item(), 0..7), separator, tail)
            .prop_map(|(head, items, separator, tail)| format!("{head}{}{tail}", items.join(separator)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whatever the body, the one-pass read either declines it or gives exactly
        /// what the general way gives, and `parse_batch` answers as the general way.
        #[test]
        fn both_ways_agree(body in body()) {
            let general = split_batch(body.as_bytes(), &limits());
            if let Some(one_pass) = common_batch(body.as_bytes(), &limits()) {
                let general = general.as_ref().expect("the general way refused what one pass took");
                prop_assert_eq!(format!("{one_pass:?}"), format!("{general:?}"));
            }
            let parsed = parse_batch(body.as_bytes(), &limits());
            prop_assert_eq!(format!("{parsed:?}"), format!("{general:?}"));
        }
    }
}
