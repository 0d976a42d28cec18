//! The crate's tests, in one test binary (links dominate on small machines).

mod props;
mod rejections;
mod round_trip;
mod schemas;
mod subjects;

use crate::codec::{Encoding, MSGPACK_CONTENT_TYPE};
use crate::subjects::{InputKind, Subjects};
use crate::validate::{decode_input, Decoded, Rejection};

/// The service every test publishes as.
const SVC: &str = "chat-1";

fn subjects() -> Subjects {
    Subjects::new("gpu").expect("`gpu` is a valid prefix")
}

fn content_type(encoding: Encoding) -> Option<&'static str> {
    match encoding {
        Encoding::Json => None,
        Encoding::MsgPack => Some(MSGPACK_CONTENT_TYPE),
    }
}

/// `value` in `encoding`, as a client would send it.
fn payload(encoding: Encoding, value: &serde_json::Value) -> Vec<u8> {
    crate::codec::encode(encoding, value)
}

fn input(kind: InputKind, encoding: Encoding, payload: &[u8]) -> Result<Decoded, Rejection> {
    decode_input(
        &subjects(),
        &subjects().input(kind, SVC),
        content_type(encoding),
        payload,
        7,
    )
}

/// The rejection of `value` sent as `kind`, in JSON and in MessagePack: both must say the same.
#[track_caller]
fn rejected(kind: InputKind, value: serde_json::Value) -> Rejection {
    let json = input(kind, Encoding::Json, &payload(Encoding::Json, &value))
        .expect_err("the input should be rejected");
    let msgpack = input(kind, Encoding::MsgPack, &payload(Encoding::MsgPack, &value))
        .expect_err("the input should be rejected in MessagePack too");
    assert_eq!(
        json.error, msgpack.error,
        "both encodings give the same error"
    );
    assert_eq!(json.request_id, msgpack.request_id);
    assert_eq!(json.encoding, Encoding::Json);
    assert_eq!(msgpack.encoding, Encoding::MsgPack);
    assert_eq!(json.service.as_deref(), Some(SVC));
    json
}

#[track_caller]
fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(error.contains(part), "{error:?} should mention {part:?}");
    }
}
