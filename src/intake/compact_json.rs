//! Copying JSON values as compact text without building a tree. Events are parsed
//! once: each top-level field's value is streamed from serde_json's parser into one
//! output buffer, checked exactly as a `serde_json::Value` parse would check it
//! (valid UTF-8, numbers within f64, at most 128 levels deep) but without a heap
//! allocation per string, number, array or object.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// A DeserializeSeed that writes the value it is given to `out` as compact JSON:
/// no whitespace; strings that had no escape copied as they are, others escaped
/// again the way serde_json writes them; numbers as serde_json formats them.
/// Object keys keep their order and duplicates.
pub struct CompactCopy<'o> {
    pub out: &'o mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for CompactCopy<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl CompactCopy<'_> {
    fn write<T: serde::Serialize + ?Sized, E: serde::de::Error>(self, value: &T) -> Result<(), E> {
        serde_json::to_writer(self.out, value).map_err(E::custom)
    }

    fn raw<E>(self, text: &[u8]) -> Result<(), E> {
        self.out.extend_from_slice(text);
        Ok(())
    }
}

impl<'de> Visitor<'de> for CompactCopy<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<(), E> {
        self.raw(if value { b"true" } else { b"false" })
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<(), E> {
        write!(self.out, "{value}").map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<(), E> {
        write!(self.out, "{value}").map_err(E::custom)
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<(), E> {
        self.write(&value)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, value: &'de str) -> Result<(), E> {
        write_parsed_str(self.out, value, true);
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<(), E> {
        self.write(value)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.raw(b"null")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        let mut first = true;
        loop {
            let comma_at = self.out.len();
            if !first {
                self.out.push(b',');
            }
            if seq.next_element_seed(CompactCopy { out: self.out })?.is_none() {
                self.out.truncate(comma_at);
                break;
            }
            first = false;
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let mut first = true;
        while let Some(Key(key)) = map.next_key()? {
            if !first {
                self.out.push(b',');
            }
            first = false;
            write_parsed_str(self.out, &key, matches!(key, Cow::Borrowed(_)));
            self.out.push(b':');
            map.next_value_seed(CompactCopy { out: self.out })?;
        }
        self.out.push(b'}');
        Ok(())
    }
}

/// An object key, borrowed from the input unless it had escapes to undo.
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Writes a string parsed from JSON as a JSON string. serde_json lends out (borrows)
/// only text that had no escape in the input, so such text has nothing to escape and
/// is copied between quotes as it is; text it had to unescape is escaped again.
pub fn write_parsed_str(out: &mut Vec<u8>, text: &str, borrowed: bool) {
    if borrowed {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, text).expect("writing to a Vec cannot fail");
    }
}

/// Whether the compact JSON object `object` (as `CompactCopy` writes it) has the
/// top-level key `key`. A scan, not a parse: in compact text every key whose
/// unescaped form is `key` is written as `"key"` when `key` needs no escaping (the
/// copy keeps unescaped text as it was sent and escapes again only what JSON
/// requires), so comparing bytes is exact for such keys; nested objects and string
/// values are skipped.
pub fn has_top_level_key(object: &[u8], key: &str) -> bool {
    debug_assert!(!key.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
    let (mut depth, mut at_key, mut i) = (0usize, false, 0usize);
    while i < object.len() {
        match object[i] {
            b'{' | b'[' => {
                depth += 1;
                at_key = depth == 1 && object[i] == b'{';
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' => at_key = depth == 1,
            b'"' => {
                let start = i + 1;
                i = start;
                while i < object.len() && object[i] != b'"' {
                    i += if object[i] == b'\\' { 2 } else { 1 };
                }
                if at_key && object.get(start..i) == Some(key.as_bytes()) {
                    return true;
                }
                at_key = false;
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// The text of a compact JSON string value, unescaped; `None` for any other value.
pub fn string_value(json: &[u8]) -> Option<Cow<'_, str>> {
    let inner = json.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.contains(&b'\\') {
        serde_json::from_slice::<String>(json).ok().map(Cow::Owned)
    } else {
        std::str::from_utf8(inner).ok().map(Cow::Borrowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(text: &str) -> Result<String, serde_json::Error> {
        let mut out = Vec::new();
        let mut deserializer = serde_json::Deserializer::from_str(text);
        CompactCopy { out: &mut out }.deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn copies_compactly_and_as_serde_json_writes() {
        let text = "{ \"b\" : [1, -2, 3.50, 1e3, true, null, {}], \"a\":\"\\u00e9\\n\\\"\", \"b\": []\n}";
        assert_eq!(
            compact(text).unwrap(),
            r#"{"b":[1,-2,3.5,1000.0,true,null,{}],"a":"é\n\"","b":[]}"#
        );
        assert_eq!(compact("[]").unwrap(), "[]");
        assert_eq!(compact("[[],[1]]").unwrap(), "[[],[1]]");
    }

    #[test]
    fn refuses_what_a_value_parse_refuses() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(compact(&deep).unwrap_err().to_string().contains("recursion limit"));
        let huge = format!("1{}", "0".repeat(400));
        assert!(compact(&huge).unwrap_err().to_string().contains("number out of range"));
        assert!(compact("[1,]").is_err());
        assert!(compact("[1] x").is_err());
    }

    #[test]
    fn top_level_keys_are_found_and_nested_keys_and_values_are_not() {
        let context = compact(
            r#"{"library":{"ip":"x","userAgent":[1,"ip"]},"note":"ip","\u0069p":"1","a\"b":{"ip":{}},"z":[{"userAgent":1}]}"#,
        )
        .unwrap();
        assert!(
            has_top_level_key(context.as_bytes(), "ip"),
            "escaped key, written plainly: {context}"
        );
        assert!(has_top_level_key(context.as_bytes(), "library"));
        assert!(has_top_level_key(context.as_bytes(), "z"));
        assert!(!has_top_level_key(context.as_bytes(), "userAgent"), "only nested");
        assert!(!has_top_level_key(b"{}", "ip"));
        assert!(!has_top_level_key(br#"{"x":"ip","y":"userAgent"}"#, "userAgent"));
        assert!(has_top_level_key(br#"{"x":"a\\","userAgent":1}"#, "userAgent"));
    }

    #[test]
    fn string_values_are_unescaped_only_when_needed() {
        assert!(matches!(string_value(br#""plain""#), Some(Cow::Borrowed("plain"))));
        assert_eq!(string_value(br#""a\nb""#).unwrap(), "a\nb");
        assert!(string_value(b"12").is_none());
        assert!(string_value(b"\"").is_none());
    }
}
