//! The wire contract of the GPU Coordinator (`docs/protocol.md`): every message as a type, the two
//! encodings, the subjects, and the validation that turns bad input into an error a person can act on.
//!
//! This crate is pure: no I/O, no clock. Both the coordinator and the client library speak through it.
//! Invariants: decoding never panics on any input (property-tested), every refusal is a sentence naming
//! the field, what was expected and what came, and unknown fields are ignored.
//!
//! - [`messages`]: the message types (serde + JSON Schema).
//! - [`codec`]: JSON or MessagePack (maps with field names), chosen by the `Content-Type` header.
//! - [`subjects`]: subject and stream names under a prefix, and parsing of input subjects.
//! - [`validate`]: decoding plus validation of an input message into an [`Inbound`], or a [`Rejection`].
//! - [`schema`]: the JSON Schema of every message, checked in under `schemas/` at the repository root
//!   (a test fails when they are stale; `UPDATE_SCHEMAS=1 cargo test -p gpu-coordinator-wire` refreshes
//!   them).
//! - [`time`]: instants as milliseconds since the Unix epoch, written as RFC 3339 UTC.
//!
//! The tests live in `src/tests/` (one test binary): round trips, one test per kind of bad input,
//! property tests, and the schema check.

pub mod codec;
pub mod messages;
pub mod node;
pub mod schema;
pub mod status;
pub mod subjects;
pub mod time;
pub mod validate;

#[cfg(test)]
mod tests;

pub use codec::{DecodeError, Encoding};
pub use messages::*;
pub use node::{GpuProcess, NodeGpu, NodeSample};
pub use schema::schemas;
pub use status::*;
pub use subjects::{valid_host, valid_service_id, InputKind, Subjects};
pub use validate::{decode_input, Decoded, Inbound, Rejection};
