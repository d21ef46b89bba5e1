//! One event as received: its top-level fields in key order, each value compact
//! JSON, read in one pass; and the few fields normalization looks at.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde_json::Value;

use super::super::compact_json::{string_value, CompactCopy, Key};

/// One event as received, parsed but not yet validated: its top-level fields in key
/// order, each value already compact JSON. Values are not parsed into a tree; only
/// the few top-level fields normalization reads are ever looked at.
#[derive(Debug)]
pub struct ReceivedEvent<'a> {
    /// The event as the producer sent it, kept for the rejected store.
    pub(super) text: &'a str,
    /// Sorted by key; of duplicate keys only the last is kept, as in JavaScript.
    pub(super) fields: Vec<Field<'a>>,
    /// Every field's value as compact JSON, back to back.
    pub(super) values: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Field<'a> {
    pub(super) key: Cow<'a, str>,
    pub(super) value: Range<usize>,
}

impl<'a> ReceivedEvent<'a> {
    /// Parses one event object. Fails as a `serde_json::Value` parse would (bad
    /// syntax, invalid UTF-8, numbers beyond f64, nesting beyond 128 levels), and
    /// with a data error when the text is not an object.
    pub fn parse(text: &'a str) -> Result<ReceivedEvent<'a>, serde_json::Error> {
        let mut values = Vec::with_capacity(text.len());
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let fields = (EventFields { values: &mut values }).deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(ReceivedEvent::of_fields(text, fields, values))
    }

    /// Parses the object at the very start of `text` (which must begin with `{`)
    /// and returns it with its text, the object only; `None` if it does not parse.
    /// Lets a batch be read in one pass instead of being split first.
    pub(super) fn parse_leading(text: &'a str) -> Option<ReceivedEvent<'a>> {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<OwnedFields>();
        let OwnedFields { fields, values } = stream.next()?.ok()?;
        let end = stream.byte_offset();
        Some(ReceivedEvent::of_fields(&text[..end], fields, values))
    }

    fn of_fields(text: &'a str, mut fields: Vec<Field<'a>>, values: Vec<u8>) -> ReceivedEvent<'a> {
        // A stable sort keeps duplicates in arrival order; keep the last of each run.
        fields.sort_by(|a, b| a.key.cmp(&b.key));
        fields.dedup_by(|later, earlier| {
            let same = later.key == earlier.key;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
        ReceivedEvent { text, fields, values }
    }

    /// The field's value as compact JSON.
    pub(super) fn get(&self, key: &str) -> Option<&[u8]> {
        let index = self.fields.binary_search_by(|f| f.key.as_ref().cmp(key)).ok()?;
        Some(&self.values[self.fields[index].value.clone()])
    }

    pub(super) fn kind(&self, key: &str) -> FieldKind<'_> {
        FieldKind::of(self.get(key))
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<Range<usize>> {
        let index = self.fields.binary_search_by(|f| f.key.as_ref().cmp(key)).ok()?;
        Some(self.fields.remove(index).value)
    }

    /// The event as received, minus any `writeKey`, for the rejected store.
    pub(super) fn as_received(&self) -> Value {
        let mut value: Value = serde_json::from_str(self.text).unwrap_or_else(|_| Value::String(self.text.into()));
        if let Value::Object(map) = &mut value {
            map.remove("writeKey");
        }
        value
    }
}

/// A top-level field's value, as normalization needs to see it.
pub(super) enum FieldKind<'e> {
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
    pub(super) fn of(json: Option<&'e [u8]>) -> FieldKind<'e> {
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
pub(super) enum Known {
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
    pub(super) const COUNT: usize = Known::SentAt as usize + 1;

    pub(super) fn name(self) -> &'static str {
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

    pub(super) fn from_name(name: &str) -> Option<Known> {
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
pub(super) struct KnownFields<'e>([Option<&'e [u8]>; Known::COUNT]);

impl<'e> KnownFields<'e> {
    pub(super) fn of(event: &'e ReceivedEvent) -> KnownFields<'e> {
        let mut found = [None; Known::COUNT];
        for field in &event.fields {
            if let Some(known) = Known::from_name(&field.key) {
                found[known as usize] = Some(&event.values[field.value.clone()]);
            }
        }
        KnownFields(found)
    }

    pub(super) fn kind(&self, field: Known) -> FieldKind<'e> {
        FieldKind::of(self.0[field as usize])
    }
}

/// An event object's fields with a values buffer of its own, for
/// `serde_json::StreamDeserializer`, which knows where the object ended.
struct OwnedFields<'de> {
    fields: Vec<Field<'de>>,
    values: Vec<u8>,
}

impl<'de> serde::Deserialize<'de> for OwnedFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Room for a typical event's values; larger ones grow the buffer.
        let mut values = Vec::with_capacity(512);
        let fields = (EventFields { values: &mut values }).deserialize(deserializer)?;
        Ok(OwnedFields { fields, values })
    }
}

/// Reads an event object into fields, copying each value into `values`.
pub(super) struct EventFields<'v> {
    pub(super) values: &'v mut Vec<u8>,
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
