//! A JSON document tree that borrows its strings from the body it was parsed from.
//!
//! Classification walks every request body. `serde_json::Value` copies each string and builds a
//! hashed map per object; this tree keeps unescaped strings as slices of the body and objects as
//! member lists (looked up from the end, so the last of duplicate keys wins, as with
//! `serde_json::Value`). Same parser (serde_json), same errors and nesting limit.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object(Object<'a>),
}

/// A JSON number as serde_json reads it: non-negative integers, negative integers, the rest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    PosInt(u64),
    NegInt(i64),
    Float(f64),
}

/// An object's members in document order, duplicates included.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Object<'a>(pub Vec<(Cow<'a, str>, Value<'a>)>);

impl<'a> Object<'a> {
    /// The value of the last member named `key`.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'a> Value<'a> {
    /// The member `key` of an object (`None` for anything else).
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Object(o) => o.get(key),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Vec<Value<'a>>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A non-negative integer that fits in u64 (as `serde_json::Value::as_u64`).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(Number::PosInt(n)) => Some(*n),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

impl PartialEq<str> for Value<'_> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == Some(other)
    }
}

/// A string that borrows from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value<'de>, E> {
        // As serde_json: a non-negative integer is a PosInt whichever visit it came through.
        Ok(Value::Number(match u64::try_from(n) {
            Ok(u) => Number::PosInt(u),
            Err(_) => Number::NegInt(n),
        }))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value<'de>, E> {
        Ok(Value::Number(Number::PosInt(n)))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value<'de>, E> {
        Ok(Value::Number(Number::Float(n)))
    }
    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Borrowed(s)))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Owned(s.to_string())))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Owned(s)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        let mut members = Vec::new();
        while let Some(Str(k)) = map.next_key()? {
            members.push((k, map.next_value()?));
        }
        Ok(Value::Object(Object(members)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value<'_> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn reads_what_serde_json_value_reads() {
        let docs = [
            r#"{"a":1,"b":-2,"c":1.5,"d":"x\"y","e":null,"f":true,"g":[1,{"h":[]}],"i":{}}"#,
            r#"{"n":18446744073709551615,"big":18446744073709551616,"neg0":-0,"exp":1e2}"#,
            r#"{"k":1,"k":{"z":2},"\u006b":"last"}"#,
            r#"[{"type":"image_url"},"text",3]"#,
        ];
        for doc in docs {
            let ours = parse(doc);
            let theirs: serde_json::Value = serde_json::from_str(doc).unwrap();
            assert_eq!(to_serde(&ours), theirs, "{doc}");
        }
    }

    #[test]
    fn unescaped_strings_borrow_from_the_body() {
        let v = parse(r#"{"plain":"abc","escaped":"a\nb"}"#);
        assert!(matches!(
            v.get("plain"),
            Some(Value::String(Cow::Borrowed("abc")))
        ));
        assert_eq!(v.get("escaped").and_then(Value::as_str), Some("a\nb"));
    }

    #[test]
    fn same_errors_as_serde_json() {
        for bad in ["{", "[1,]", "{\"a\" 1}", "nul", "{\"a\":1} x"] {
            let ours = serde_json::from_str::<Value>(bad).unwrap_err().to_string();
            let theirs = serde_json::from_str::<serde_json::Value>(bad)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs, "{bad}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(serde_json::from_str::<Value>(&deep).is_err());
    }

    /// The serde_json value this tree stands for (duplicates resolved: last wins).
    fn to_serde(v: &Value) -> serde_json::Value {
        match v {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Number(Number::PosInt(n)) => (*n).into(),
            Value::Number(Number::NegInt(n)) => (*n).into(),
            Value::Number(Number::Float(f)) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::String(s) => s.to_string().into(),
            Value::Array(a) => a.iter().map(to_serde).collect(),
            Value::Object(o) => {
                let mut m = serde_json::Map::new();
                for (k, v) in &o.0 {
                    m.insert(k.to_string(), to_serde(v));
                }
                serde_json::Value::Object(m)
            }
        }
    }
}
