//! The deserializer of a [`Node`] tree into a message type, tracking the path of the field being read,
//! so that an error names the field, what was expected and what came.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, Unexpected, Visitor};

use super::{quote, Node};

/// One step of the path to the field that is wrong.
#[derive(Debug)]
enum Segment {
    Field(String),
    Index(usize),
}

/// What is wrong at the end of the path.
#[derive(Debug)]
enum Problem {
    Missing(&'static str),
    Duplicate(&'static str),
    Mismatch { expected: String, got: String },
    Other(String),
}

/// The error of [`NodeDe`]: a problem and the path to where it is. Its `Display` is the sentence.
#[derive(Debug)]
pub(super) struct FieldError {
    /// Outermost first.
    path: Vec<Segment>,
    problem: Problem,
}

impl FieldError {
    fn new(problem: Problem) -> Self {
        FieldError {
            path: Vec::new(),
            problem,
        }
    }

    fn mismatch(expected: impl Into<String>, got: impl Into<String>) -> Self {
        FieldError::new(Problem::Mismatch {
            expected: expected.into(),
            got: got.into(),
        })
    }

    /// The same error, seen from one level up.
    fn within(mut self, segment: Segment) -> Self {
        self.path.insert(0, segment);
        self
    }

    fn path_with(&self, last: Option<&str>) -> String {
        let mut text = String::new();
        for segment in &self.path {
            match segment {
                Segment::Field(name) => {
                    if !text.is_empty() {
                        text.push('.');
                    }
                    text.push_str(name);
                }
                Segment::Index(i) => text.push_str(&format!("[{i}]")),
            }
        }
        if let Some(last) = last {
            if !text.is_empty() {
                text.push('.');
            }
            text.push_str(last);
        }
        text
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let at = |path: String| {
            if path.is_empty() {
                "the message".to_owned()
            } else {
                format!("field `{path}`")
            }
        };
        match &self.problem {
            Problem::Missing(field) => {
                write!(f, "field `{}` is missing", self.path_with(Some(field)))
            }
            Problem::Duplicate(field) => write!(
                f,
                "field `{}` appears more than once",
                self.path_with(Some(field))
            ),
            Problem::Mismatch { expected, got } => {
                write!(
                    f,
                    "{}: expected {expected}, got {got}",
                    at(self.path_with(None))
                )
            }
            Problem::Other(text) => write!(f, "{}: {text}", at(self.path_with(None))),
        }
    }
}

impl std::error::Error for FieldError {}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FieldError::new(Problem::Other(msg.to_string()))
    }

    fn invalid_type(unexp: Unexpected, exp: &dyn de::Expected) -> Self {
        FieldError::mismatch(expected_text(exp), unexpected_text(&unexp))
    }

    fn invalid_value(unexp: Unexpected, exp: &dyn de::Expected) -> Self {
        FieldError::mismatch(expected_text(exp), unexpected_text(&unexp))
    }

    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        FieldError::mismatch(expected_text(exp), format!("{len} elements"))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        FieldError::mismatch(one_of(expected), quote(variant))
    }

    fn missing_field(field: &'static str) -> Self {
        FieldError::new(Problem::Missing(field))
    }

    fn duplicate_field(field: &'static str) -> Self {
        FieldError::new(Problem::Duplicate(field))
    }
}

/// serde's names for what a visitor expects ("u8", "struct RequestMsg") in a person's words.
fn expected_text(exp: &dyn de::Expected) -> String {
    let raw = exp.to_string();
    let text = match raw.as_str() {
        "u8" => "an integer 0-255",
        "u16" => "an integer 0-65535",
        "u32" => "an integer 0-4294967295",
        "u64" | "u128" | "usize" => "a whole number >= 0",
        "i8" => "an integer from -128 to 127",
        "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" | "a borrowed string" => "a string",
        "a character" => "a single character",
        "a sequence" => "an array",
        "unit" => "null",
        other if other.starts_with("struct ") => "an object (a map of field names to values)",
        other => return other.to_owned(),
    };
    text.to_owned()
}

/// What came, in a person's words.
fn unexpected_text(unexp: &Unexpected) -> String {
    match unexp {
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(v) => format!("{v:?}"),
        Unexpected::Char(c) => format!("the character {c:?}"),
        Unexpected::Str(s) => format!("the string {}", quote(s)),
        Unexpected::Bytes(_) => "binary data".to_owned(),
        Unexpected::Unit => "null".to_owned(),
        Unexpected::Seq => "an array".to_owned(),
        Unexpected::Map => "an object".to_owned(),
        other => other.to_string(),
    }
}

fn one_of(variants: &[&str]) -> String {
    let names: Vec<String> = variants.iter().map(|v| format!("{v:?}")).collect();
    match names.as_slice() {
        [] => "nothing".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// A serde deserializer over a [`Node`] whose errors carry the field path.
#[derive(Clone, Copy)]
pub(super) struct NodeDe<'a>(pub(super) &'a Node);

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.0 {
            Node::Null => visitor.visit_unit(),
            Node::Bool(b) => visitor.visit_bool(*b),
            Node::Uint(n) => visitor.visit_u64(*n),
            Node::Int(n) => visitor.visit_i64(*n),
            Node::Float(v) => visitor.visit_f64(*v),
            Node::Str(s) => visitor.visit_str(s),
            Node::Bytes(b) => visitor.visit_bytes(b),
            Node::Seq(items) => visit_seq(items, visitor),
            Node::Map(entries) => visitor.visit_map(MapAcc::new(entries)),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.0 {
            Node::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        // Only maps with field names: an array would otherwise be taken field by field in order.
        match self.0 {
            Node::Map(entries) => visitor.visit_map(MapAcc::new(entries)),
            other => Err(FieldError::mismatch(
                "an object (a map of field names to values)",
                other.describe(),
            )),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.0 {
            Node::Map(entries) => visitor.visit_map(MapAcc::new(entries)),
            other => Err(FieldError::mismatch("an object", other.describe())),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        match self.0 {
            Node::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(FieldError::mismatch(one_of(variants), other.describe())),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct seq tuple tuple_struct identifier
    }
}

fn visit_seq<'de, V: Visitor<'de>>(items: &[Node], visitor: V) -> Result<V::Value, FieldError> {
    let mut access = SeqAcc {
        items: items.iter(),
        index: 0,
    };
    let value = visitor.visit_seq(&mut access)?;
    if access.items.len() == 0 {
        Ok(value)
    } else {
        Err(de::Error::invalid_length(items.len(), &"fewer elements"))
    }
}

struct SeqAcc<'a> {
    items: std::slice::Iter<'a, Node>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for SeqAcc<'_> {
    type Error = FieldError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, FieldError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let index = self.index;
        self.index += 1;
        seed.deserialize(NodeDe(item))
            .map(Some)
            .map_err(|e| e.within(Segment::Index(index)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAcc<'a> {
    entries: std::slice::Iter<'a, (Node, Node)>,
    pending: Option<(String, &'a Node)>,
}

impl<'a> MapAcc<'a> {
    fn new(entries: &'a [(Node, Node)]) -> Self {
        MapAcc {
            entries: entries.iter(),
            pending: None,
        }
    }
}

impl<'de> de::MapAccess<'de> for MapAcc<'_> {
    type Error = FieldError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, FieldError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let name = match key {
            Node::Str(s) => s.clone(),
            Node::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => s.to_owned(),
                Err(_) => return Err(non_string_key(key)),
            },
            _ => return Err(non_string_key(key)),
        };
        let key = seed.deserialize(name.as_str().into_deserializer())?;
        self.pending = Some((name, value));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, FieldError> {
        let Some((name, value)) = self.pending.take() else {
            return Err(de::Error::custom("a value was asked for before its key"));
        };
        seed.deserialize(NodeDe(value))
            .map_err(|e| e.within(Segment::Field(name)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

fn non_string_key(key: &Node) -> FieldError {
    FieldError::new(Problem::Other(format!(
        "field names must be strings, got {}",
        key.describe()
    )))
}
