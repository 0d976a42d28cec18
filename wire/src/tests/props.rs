//! Whatever comes in, `decode_input` answers `Ok` or a `Rejection` with a sentence, and never panics.

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::codec::{decode, encode};
use crate::messages::RequestMsg;
use crate::status::StatusDoc;
use crate::validate::Inbound;

/// Field names of every message, so that generated maps often hit real fields.
const FIELDS: &[&str] = &[
    "request_id",
    "service_id",
    "priority",
    "timeout_ms",
    "lease_ms",
    "vram_mb",
    "gpu",
    "preemptible",
    "fence",
    "action",
];

fn arb_kind() -> impl Strategy<Value = InputKind> {
    prop::sample::select(InputKind::ALL.to_vec())
}

fn arb_encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Json), Just(Encoding::MsgPack)]
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..300).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[a-z0-9_-]{0,130}".prop_map(Value::String),
        prop::sample::select(vec!["paused", "resumed", "chat-1", "gpu0", ""])
            .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..8)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// An object whose keys are mostly the contract's field names, with arbitrary values.
fn arb_object() -> impl Strategy<Value = Value> {
    prop::collection::vec((arb_key(), arb_json()), 0..10)
        .prop_map(|entries| Value::Object(entries.into_iter().collect()))
}

/// The answer is `Ok` with the invariants of a valid input, or a rejection with an error.
fn check_answer(kind: InputKind, encoding: Encoding, answer: Result<Decoded, Rejection>) {
    match answer {
        Ok(decoded) => {
            assert_eq!(decoded.service, SVC);
            assert_eq!(decoded.encoding, encoding);
            assert_eq!(decoded.input.kind(), kind);
            if let Inbound::Request(msg) = &decoded.input {
                assert_eq!(msg.service_id.as_deref(), Some(SVC));
                assert!(msg.request_id.is_some());
            }
            if let Some(id) = decoded.input.request_id() {
                assert!((1..=128).contains(&id.chars().count()));
                assert!(!id.chars().any(char::is_control));
            }
        }
        Err(rejection) => {
            assert!(!rejection.error.trim().is_empty());
            assert_eq!(rejection.service.as_deref(), Some(SVC));
            assert_eq!(rejection.encoding, encoding);
            if let Some(id) = &rejection.request_id {
                assert!(!id.chars().any(char::is_control));
            }
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes(kind in arb_kind(), encoding in arb_encoding(),
                       bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_answer(kind, encoding, input(kind, encoding, &bytes));
    }

    #[test]
    fn arbitrary_msgpack_like_bytes(kind in arb_kind(),
                                    head in prop::sample::select(vec![0x80u8, 0x81, 0x85, 0xde, 0xdf, 0x91, 0xdc]),
                                    bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut payload = vec![head];
        payload.extend(bytes);
        check_answer(kind, Encoding::MsgPack, input(kind, Encoding::MsgPack, &payload));
    }

    #[test]
    fn arbitrary_json_values(kind in arb_kind(), encoding in arb_encoding(), value in arb_json()) {
        check_answer(kind, encoding, input(kind, encoding, &encode(encoding, &value)));
    }

    #[test]
    fn arbitrary_objects(kind in arb_kind(), encoding in arb_encoding(), value in arb_object()) {
        check_answer(kind, encoding, input(kind, encoding, &encode(encoding, &value)));
    }

    #[test]
    fn both_encodings_agree(kind in arb_kind(), value in arb_object()) {
        let json = input(kind, Encoding::Json, &encode(Encoding::Json, &value));
        let msgpack = input(kind, Encoding::MsgPack, &encode(Encoding::MsgPack, &value));
        match (json, msgpack) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a.input, b.input),
            (Err(a), Err(b)) => {
                prop_assert_eq!(a.error, b.error);
                prop_assert_eq!(a.request_id, b.request_id);
            }
            (a, b) => prop_assert!(false, "JSON gave {:?}, MessagePack {:?}", a, b),
        }
    }

    #[test]
    fn arbitrary_subjects(subject in "(gpu\\.)?[a-z.*>!]{0,12}(\\.[A-Za-z0-9_!-]{0,70})?",
                          content_type in prop::option::of("[a-z/]{0,20}"),
                          bytes in prop::collection::vec(any::<u8>(), 0..32)) {
        match decode_input(&subjects(), &subject, content_type.as_deref(), &bytes, 1) {
            Ok(decoded) => prop_assert!(crate::subjects::valid_service_id(&decoded.service)),
            Err(rejection) => {
                prop_assert!(!rejection.error.is_empty());
                if let Some(svc) = rejection.service {
                    prop_assert!(crate::subjects::valid_service_id(&svc));
                }
            }
        }
    }

    #[test]
    fn valid_requests_are_accepted(
        request_id in prop::option::of("[A-Za-z0-9 ._:-]{1,128}"),
        priority in any::<u8>(),
        timeout_ms in prop::option::of(0..=crate::validate::MAX_DURATION_MS),
        lease_ms in prop::option::of(1..=crate::validate::MAX_DURATION_MS),
        vram_mb in prop::option::of(1..=crate::validate::MAX_VRAM_MB),
        gpu in prop::option::of("[A-Za-z0-9_:.-]{1,64}"),
        preemptible in prop::option::of(any::<bool>()),
        pause_ms in prop::option::of(0..=crate::validate::MAX_PAUSE_MS),
        encoding in arb_encoding(),
    ) {
        let msg = RequestMsg { host: None,
            request_id, service_id: None, priority, timeout_ms, lease_ms, vram_mb, gpu, preemptible,
            pause_ms,
        };
        let decoded = input(InputKind::Request, encoding, &encode(encoding, &msg));
        let Ok(Decoded { input: Inbound::Request(got), .. }) = decoded else {
            return Err(TestCaseError::fail(format!("{msg:?} was refused: {decoded:?}")));
        };
        let mut want = msg.clone();
        want.request_id.get_or_insert_with(|| "chat-1-7".to_owned());
        want.service_id = Some(SVC.to_owned());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn decode_of_any_type_never_panics(encoding in arb_encoding(), value in arb_json(),
                                       bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode::<StatusDoc>(encoding, &bytes);
        let _ = decode::<StatusDoc>(encoding, &encode(encoding, &value));
        let _ = decode::<Value>(encoding, &encode(encoding, &value));
    }
}
