//! JSON Schemas of the messages, generated from the types (schemars), checked in under `schemas/` at the
//! root of the repository. A test regenerates them and fails when a checked-in file is out of date.

use schemars::schema::RootSchema;
use schemars::schema_for;

use crate::messages::{
    AckMsg, CancelMsg, Control, Event, ReaderAnswer, ReaderAsk, ReleaseMsg, RenewMsg, Reply,
    RequestMsg,
};
use crate::status::StatusDoc;

/// Every message's JSON Schema as `(name, pretty-printed JSON with a trailing newline)`; the file of
/// each is `schemas/<name>.schema.json`.
pub fn schemas() -> Vec<(&'static str, String)> {
    vec![
        ("request", render(schema_for!(RequestMsg))),
        ("release", render(schema_for!(ReleaseMsg))),
        ("renew", render(schema_for!(RenewMsg))),
        ("ack", render(schema_for!(AckMsg))),
        ("cancel", render(schema_for!(CancelMsg))),
        ("reply", render(schema_for!(Reply))),
        ("control", render(schema_for!(Control))),
        ("event", render(schema_for!(Event))),
        ("status", render(schema_for!(StatusDoc))),
        ("reader", render(schema_for!(ReaderAsk))),
        ("reader-answer", render(schema_for!(ReaderAnswer))),
        ("node", render(schema_for!(crate::node::NodeSample))),
    ]
}

fn render(schema: RootSchema) -> String {
    let mut text =
        serde_json::to_string_pretty(&schema).expect("a JSON Schema always serializes to JSON");
    text.push('\n');
    text
}
