//! JSON or MessagePack, chosen by the `Content-Type` header.
//!
//! Decoding goes in two steps so that every error can name the field, what was expected and what came:
//! the payload is first read into a `Node` tree (any JSON or MessagePack document, nesting bounded by
//! [`MAX_DEPTH`]), then the message type is deserialized from that tree by a deserializer of this module
//! that tracks the field path. Nothing here panics on any input, and nothing allocates more than the
//! payload's size suggests (lengths a MessagePack header claims are never trusted).
//!
//! This module knows encodings only; the rules of the contract (ranges, ids, subjects) live in
//! [`crate::validate`].

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Serialize};

/// The `Content-Type` header value that selects MessagePack.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";

/// The deepest nesting of arrays and maps a payload may have (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// The encoding of a message. A message without `Content-Type` is JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Encoding {
    /// UTF-8 JSON, the default.
    #[default]
    Json,
    /// MessagePack maps with field names, as `rmp_serde::to_vec_named` writes them.
    MsgPack,
}

impl Encoding {
    /// The encoding a `Content-Type` header value selects (absent or anything else: JSON).
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(ct) if ct.trim().eq_ignore_ascii_case(MSGPACK_CONTENT_TYPE) => Encoding::MsgPack,
            _ => Encoding::Json,
        }
    }

    /// The header value to send, `None` for JSON (plain, as `nats pub` sends it).
    pub fn content_type(self) -> Option<&'static str> {
        match self {
            Encoding::Json => None,
            Encoding::MsgPack => Some(MSGPACK_CONTENT_TYPE),
        }
    }

    /// A stable name, for persistence and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::MsgPack => "msgpack",
        }
    }

    /// The inverse of [`Encoding::as_str`]; anything unknown is JSON.
    pub fn from_name(name: &str) -> Self {
        if name == "msgpack" {
            Encoding::MsgPack
        } else {
            Encoding::Json
        }
    }
}

/// Why a payload could not be decoded. The text is a sentence for a person: which field, what was
/// expected, what came (e.g. "field `priority`: expected an integer 0-255, got 300").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Encodes a message; MessagePack as maps with field names (`rmp_serde::to_vec_named`).
pub fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::to_vec(value).expect("wire types always serialize to JSON"),
        Encoding::MsgPack => {
            rmp_serde::to_vec_named(value).expect("wire types always serialize to MessagePack")
        }
    }
}

/// Decodes a message, never panicking, with an error that says what was wrong. Unknown fields are
/// ignored; a message must be a JSON object or a MessagePack map with field names.
pub fn decode<T: DeserializeOwned>(encoding: Encoding, payload: &[u8]) -> Result<T, DecodeError> {
    let node = decode_node(encoding, payload)?;
    from_node(&node)
}

/// Any JSON or MessagePack document, before it becomes a message type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    /// Any integer >= 0.
    Uint(u64),
    /// Negative integers only, so that each number has one form.
    Int(i64),
    Float(f64),
    Str(String),
    /// MessagePack `bin` (and `str` that is not UTF-8).
    Bytes(Vec<u8>),
    Seq(Vec<Node>),
    /// Entries in payload order; keys are strings in JSON, anything in MessagePack.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// The value of the string key `name`, when this is a map that has it.
    pub(crate) fn get(&self, name: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries
                .iter()
                .find(|(k, _)| matches!(k, Node::Str(s) if s == name))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// What this node is, for an error message: "300", "the string \"x\"", "an array".
    pub(crate) fn describe(&self) -> String {
        match self {
            Node::Null => "null".to_owned(),
            Node::Bool(b) => b.to_string(),
            Node::Uint(n) => n.to_string(),
            Node::Int(n) => n.to_string(),
            Node::Float(f) => format!("{f:?}"),
            Node::Str(s) => format!("the string {}", quote(s)),
            Node::Bytes(_) => "binary data".to_owned(),
            Node::Seq(_) => "an array".to_owned(),
            Node::Map(_) => "an object".to_owned(),
        }
    }
}

/// `s` in double quotes with escapes, cut after 40 characters: safe to put in any message.
pub(crate) fn quote(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}...")
    }
}

/// Reads a payload into a [`Node`], with a message for a person when it is not a JSON or MessagePack
/// document.
pub(crate) fn decode_node(encoding: Encoding, payload: &[u8]) -> Result<Node, DecodeError> {
    match encoding {
        Encoding::Json => decode_json(payload),
        Encoding::MsgPack => decode_msgpack(payload),
    }
}

/// Deserializes a message type from a [`Node`], naming the field path in the error.
pub(crate) fn from_node<T: DeserializeOwned>(node: &Node) -> Result<T, DecodeError> {
    T::deserialize(NodeDe(node)).map_err(|e| DecodeError(e.to_string()))
}

fn decode_json(payload: &[u8]) -> Result<Node, DecodeError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError(
            "the payload is empty: expected a JSON object of field names to values".to_owned(),
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|e| {
        let hint = if looks_like_msgpack_map(payload) {
            "; it looks like MessagePack: send it with the header `Content-Type: application/msgpack`"
        } else {
            ""
        };
        DecodeError(format!(
            "the payload is not valid UTF-8 JSON (byte {}){hint}",
            e.valid_up_to()
        ))
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let node = Node::deserialize(&mut de).map_err(json_error)?;
    de.end().map_err(json_error)?;
    Ok(node)
}

fn json_error(e: serde_json::Error) -> DecodeError {
    match e.classify() {
        serde_json::error::Category::Eof => {
            DecodeError(format!("the JSON payload is truncated: {e}"))
        }
        _ => DecodeError(format!("the payload is not valid JSON: {e}")),
    }
}

/// A MessagePack map header: fixmap, map16 or map32.
fn looks_like_msgpack_map(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

fn decode_msgpack(payload: &[u8]) -> Result<Node, DecodeError> {
    if payload.is_empty() {
        return Err(DecodeError(
            "the MessagePack payload is empty: expected a map of field names to values".to_owned(),
        ));
    }
    let hint = if matches!(payload.first(), Some(b'{' | b'[')) {
        "; it looks like JSON: send JSON without the header `Content-Type: application/msgpack`"
    } else {
        ""
    };
    let mut rest: &[u8] = payload;
    let node = {
        // A reader over a slice: lengths in the payload are checked against what is there before
        // anything is allocated, and `rest` tells what is left after the document.
        let mut de = rmp_serde::Deserializer::new(&mut rest);
        de.set_max_depth(MAX_DEPTH);
        Node::deserialize(&mut de).map_err(|e| msgpack_error(e, hint))?
    };
    if !rest.is_empty() {
        return Err(DecodeError(format!(
            "the MessagePack payload goes on after the end of the message: {} unexpected bytes from byte {}{hint}",
            rest.len(),
            payload.len() - rest.len()
        )));
    }
    Ok(node)
}

fn msgpack_error(e: rmp_serde::decode::Error, hint: &str) -> DecodeError {
    use rmp_serde::decode::Error;
    let text = match e {
        Error::InvalidMarkerRead(io) | Error::InvalidDataRead(io)
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            "the MessagePack payload is truncated: it ends in the middle of a value".to_owned()
        }
        Error::DepthLimitExceeded => {
            format!("the MessagePack payload nests arrays or maps deeper than {MAX_DEPTH} levels")
        }
        Error::TypeMismatch(marker) => {
            format!("the payload is not valid MessagePack: unexpected marker {marker:?}")
        }
        other => format!("the payload is not valid MessagePack: {other}"),
    };
    DecodeError(format!("{text}{hint}"))
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON or MessagePack value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(u64::try_from(v).map_or(Node::Int(v), Node::Uint))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Uint(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Node, E> {
        Ok(Node::Bytes(v.to_vec()))
    }

    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Node, E> {
        Ok(Node::Bytes(v))
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, _: D) -> Result<Node, D::Error> {
        // rmp_serde hands MessagePack extension types over as a newtype struct.
        Err(de::Error::custom(
            "it holds a MessagePack extension type, which no field accepts",
        ))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        // No `with_capacity(size_hint)`: a MessagePack header may claim billions of elements.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

mod tree_de;
use tree_de::NodeDe;
