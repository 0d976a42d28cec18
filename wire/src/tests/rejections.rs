use serde_json::json;

use super::*;
use crate::codec::{decode, encode, DecodeError};
use crate::messages::RequestMsg;
use crate::status::StatusDoc;
use crate::validate::Inbound;

// --- the subject ---

#[test]
fn a_bad_service_id_in_the_subject_has_no_service() {
    for svc in ["bad!", "a b", &"x".repeat(65)] {
        let subject = format!("gpu.request.{svc}");
        let r = decode_input(&subjects(), &subject, None, br#"{"priority":1}"#, 1).unwrap_err();
        assert_eq!(r.service, None, "{subject}");
        assert_mentions(&r.error, &["service id", "1 to 64 characters"]);
    }
}

#[test]
fn an_unknown_input_kind_is_rejected_to_its_service() {
    let r = decode_input(
        &subjects(),
        "gpu.grab.chat-1",
        None,
        br#"{"request_id":"r9","priority":1}"#,
        1,
    )
    .unwrap_err();
    assert_eq!(r.service.as_deref(), Some(SVC));
    assert_eq!(r.request_id.as_deref(), Some("r9"));
    assert_mentions(
        &r.error,
        &[
            "\"gpu.grab.chat-1\"",
            "not an input subject",
            "request, release",
        ],
    );
}

#[test]
fn a_subject_outside_the_prefix_is_rejected_without_service() {
    for subject in [
        "other.request.chat-1",
        "gpu.request",
        "gpu.request.chat-1.x",
        "",
    ] {
        let r = decode_input(&subjects(), subject, None, br#"{"priority":1}"#, 1).unwrap_err();
        assert_eq!(r.service, None, "{subject}");
        assert_mentions(&r.error, &["not an input subject"]);
    }
}

// --- bytes that are not a document ---

#[test]
fn an_empty_payload() {
    for kind in InputKind::ALL {
        let r = input(kind, Encoding::Json, b"").unwrap_err();
        assert_mentions(&r.error, &["payload is empty", "JSON object"]);
        let r = input(kind, Encoding::Json, b" \n").unwrap_err();
        assert_mentions(&r.error, &["payload is empty"]);
        let r = input(kind, Encoding::MsgPack, b"").unwrap_err();
        assert_mentions(&r.error, &["MessagePack payload is empty"]);
    }
}

#[test]
fn non_utf8_bytes() {
    let r = input(InputKind::Request, Encoding::Json, b"{\"a\xff\":1}").unwrap_err();
    assert_eq!(r.error, "the payload is not valid UTF-8 JSON (byte 3)");
    assert_eq!(
        r.request_id.as_deref(),
        Some("chat-1-7"),
        "a request's default id"
    );
}

#[test]
fn msgpack_sent_as_json_gets_a_hint() {
    let bytes = encode(Encoding::MsgPack, &json!({"priority": 1}));
    let r = input(InputKind::Request, Encoding::Json, &bytes).unwrap_err();
    assert_mentions(
        &r.error,
        &[
            "not valid UTF-8 JSON (byte 0)",
            "Content-Type: application/msgpack",
        ],
    );
}

#[test]
fn json_sent_as_msgpack_gets_a_hint() {
    let r = input(InputKind::Request, Encoding::MsgPack, br#"{"priority":1}"#).unwrap_err();
    assert_mentions(&r.error, &["looks like JSON", "without the header"]);
}

#[test]
fn invalid_json() {
    let r = input(InputKind::Request, Encoding::Json, br#"{"priority" 1}"#).unwrap_err();
    assert_mentions(
        &r.error,
        &["not valid JSON", "expected `:`", "line 1 column 13"],
    );
    let r = input(InputKind::Request, Encoding::Json, br#"{"priority":1} x"#).unwrap_err();
    assert_mentions(&r.error, &["not valid JSON", "trailing characters"]);
}

#[test]
fn truncated_json() {
    let r = input(
        InputKind::Request,
        Encoding::Json,
        br#"{"request_id":"r1","prio"#,
    )
    .unwrap_err();
    assert_mentions(&r.error, &["JSON payload is truncated"]);
}

#[test]
fn truncated_msgpack() {
    let whole = encode(
        Encoding::MsgPack,
        &json!({"request_id": "r1", "priority": 1, "lease_ms": 100_000}),
    );
    for len in 1..whole.len() {
        let r = input(InputKind::Request, Encoding::MsgPack, &whole[..len]).unwrap_err();
        assert_mentions(&r.error, &["MessagePack payload is truncated"]);
        assert_eq!(r.encoding, Encoding::MsgPack);
    }
}

#[test]
fn msgpack_with_bytes_after_the_message() {
    let mut bytes = encode(Encoding::MsgPack, &json!({"request_id": "r1"}));
    bytes.extend_from_slice(&[0x01, 0x02]);
    let r = input(InputKind::Cancel, Encoding::MsgPack, &bytes).unwrap_err();
    assert_mentions(&r.error, &["goes on after the end", "2 unexpected bytes"]);
}

#[test]
fn msgpack_lengths_are_not_trusted() {
    // map32, array32, str32 and bin32 headers that claim 4 GiB, with nothing after them.
    for bytes in [
        &[0xdf, 0xff, 0xff, 0xff, 0xff][..],
        &[0xdd, 0xff, 0xff, 0xff, 0xff],
        &[0x81, 0xa1, b'a', 0xdb, 0xff, 0xff, 0xff, 0xff, b'x'],
        &[0x81, 0xa1, b'a', 0xc6, 0xff, 0xff, 0xff, 0xff],
    ] {
        let r = input(InputKind::Request, Encoding::MsgPack, bytes).unwrap_err();
        assert_mentions(&r.error, &["truncated"]);
    }
}

#[test]
fn msgpack_reserved_byte_and_extension_types() {
    let r = input(InputKind::Request, Encoding::MsgPack, &[0xc1]).unwrap_err();
    assert_mentions(&r.error, &["not valid MessagePack"]);
    // {"priority": ext8(type 1, 1 byte)}
    let mut bytes = vec![0x81, 0xa8];
    bytes.extend_from_slice(b"priority");
    bytes.extend_from_slice(&[0xd4, 0x01, 0x00]);
    let r = input(InputKind::Request, Encoding::MsgPack, &bytes).unwrap_err();
    assert_mentions(&r.error, &["extension type"]);
}

#[test]
fn msgpack_keys_must_be_names() {
    // {1: 1}
    let r = input(InputKind::Request, Encoding::MsgPack, &[0x81, 0x01, 0x01]).unwrap_err();
    assert_mentions(&r.error, &["field names must be strings", "got 1"]);
    // {bin"priority": 3} is read as a name.
    let mut bytes = vec![0x81, 0xc4, 8];
    bytes.extend_from_slice(b"priority");
    bytes.push(0x03);
    let d = input(InputKind::Request, Encoding::MsgPack, &bytes).unwrap();
    assert_eq!(d.input.request_id(), Some("chat-1-7"));
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let r = input(InputKind::Request, Encoding::Json, deep_json.as_bytes()).unwrap_err();
    assert_mentions(&r.error, &["not valid JSON", "recursion limit"]);
    let mut deep_msgpack = vec![0x91; 100_000];
    deep_msgpack.push(0xc0);
    let r = input(InputKind::Request, Encoding::MsgPack, &deep_msgpack).unwrap_err();
    assert_mentions(&r.error, &["deeper than 128 levels"]);
}

#[test]
fn the_message_must_be_an_object() {
    for value in [json!([1, 2]), json!(1), json!("x"), json!(null)] {
        let r = rejected(InputKind::Request, value.clone());
        assert_mentions(
            &r.error,
            &["the message: expected an object (a map of field names to values), got"],
        );
    }
    let r = rejected(InputKind::Release, json!([]));
    assert_eq!(
        r.error,
        "the message: expected an object (a map of field names to values), got an array"
    );
}

// --- fields ---

#[test]
fn wrong_type() {
    let r = rejected(InputKind::Request, json!({"priority": "high"}));
    assert_eq!(
        r.error,
        "field `priority`: expected an integer 0-255, got the string \"high\""
    );
    let r = rejected(
        InputKind::Request,
        json!({"priority": 1, "preemptible": "no"}),
    );
    assert_eq!(
        r.error,
        "field `preemptible`: expected true or false, got the string \"no\""
    );
    let r = rejected(InputKind::Request, json!({"priority": 1.5}));
    assert_eq!(
        r.error,
        "field `priority`: expected an integer 0-255, got 1.5"
    );
    let r = rejected(InputKind::Renew, json!({"request_id": 12}));
    assert_eq!(r.error, "field `request_id`: expected a string, got 12");
    assert_eq!(r.request_id, None, "a number is no request id");
    let r = rejected(InputKind::Release, json!({"fence": -1}));
    assert_eq!(
        r.error,
        "field `fence`: expected a whole number >= 0, got -1"
    );
    let r = rejected(
        InputKind::Request,
        json!({"priority": 1, "timeout_ms": [5]}),
    );
    assert_eq!(
        r.error,
        "field `timeout_ms`: expected a whole number >= 0, got an array"
    );
}

#[test]
fn missing_priority() {
    let r = rejected(InputKind::Request, json!({"request_id": "r1"}));
    assert_eq!(r.error, "field `priority` is missing");
    assert_eq!(r.request_id.as_deref(), Some("r1"));
    let r = rejected(InputKind::Request, json!({"priority": null}));
    assert_eq!(
        r.error,
        "field `priority`: expected an integer 0-255, got null"
    );
}

#[test]
fn out_of_range() {
    let r = rejected(InputKind::Request, json!({"priority": 300}));
    assert_eq!(
        r.error,
        "field `priority`: expected an integer 0-255, got 300"
    );
    let r = rejected(InputKind::Request, json!({"priority": -1}));
    assert_eq!(
        r.error,
        "field `priority`: expected an integer 0-255, got -1"
    );
    let r = rejected(InputKind::Request, json!({"priority": 1, "lease_ms": 1e30}));
    assert_eq!(
        r.error,
        "field `lease_ms`: expected a whole number >= 0, got 1e30"
    );
}

#[test]
fn zero_lease_and_vram() {
    let r = rejected(InputKind::Request, json!({"priority": 1, "lease_ms": 0}));
    assert_mentions(
        &r.error,
        &["field `lease_ms` must be greater than 0", "got 0"],
    );
    let r = rejected(InputKind::Renew, json!({"request_id": "r", "lease_ms": 0}));
    assert_mentions(&r.error, &["field `lease_ms` must be greater than 0"]);
    assert_eq!(r.request_id.as_deref(), Some("r"));
    let r = rejected(InputKind::Request, json!({"priority": 1, "vram_mb": 0}));
    assert_mentions(
        &r.error,
        &[
            "field `vram_mb` must be greater than 0",
            "got 0",
            "whole GPU",
        ],
    );
}

#[test]
fn a_host_is_a_name_and_agrees_with_the_gpu() {
    let r = rejected(InputKind::Request, json!({"priority": 1, "host": "a.b"}));
    assert_mentions(
        &r.error,
        &["field `host` must be 1 to 64 characters", "\"a.b\""],
    );
    let r = rejected(
        InputKind::Request,
        json!({"priority": 1, "host": "h1", "gpu": "h2/0"}),
    );
    assert_mentions(&r.error, &["is on host \"h2\"", "not on \"h1\""]);
    let r = rejected(
        InputKind::Request,
        json!({"priority": 1, "host": "h1", "gpu": "0"}),
    );
    assert_mentions(&r.error, &["names no host", "`<host>/<id>`"]);
    for body in [
        json!({"priority": 1, "host": "h1", "gpu": "h1/0"}),
        json!({"priority": 1, "host": "h1"}),
        json!({"priority": 1, "gpu": "h1/0"}),
    ] {
        let bytes = payload(Encoding::Json, &body);
        let decoded = input(InputKind::Request, Encoding::Json, &bytes);
        assert!(decoded.is_ok(), "{body} is accepted: {decoded:?}");
    }
}

#[test]
fn bad_gpu() {
    for gpu in ["", "gpu 0", "gpu*0", &"g".repeat(65), "gpü"] {
        let r = rejected(InputKind::Request, json!({"priority": 1, "gpu": gpu}));
        assert_mentions(
            &r.error,
            &["field `gpu` must be 1 to 64 characters", "got \""],
        );
    }
    let ok = input(
        InputKind::Request,
        Encoding::Json,
        br#"{"priority":1,"gpu":"GPU-3f2a:0.1_b"}"#,
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn oversized_request_id() {
    let long = "r".repeat(129);
    for kind in InputKind::ALL {
        let r = rejected(
            kind,
            json!({"request_id": long, "priority": 1, "action": "paused"}),
        );
        assert_mentions(
            &r.error,
            &[
                "field `request_id` must be 1 to 128 characters",
                "got 129 characters",
            ],
        );
        assert_eq!(
            r.request_id.as_deref(),
            Some(long.as_str()),
            "echoed to its sender"
        );
    }
    let ok = input(
        InputKind::Cancel,
        Encoding::Json,
        format!(r#"{{"request_id":"{}"}}"#, "é".repeat(128)).as_bytes(),
    );
    assert!(
        ok.is_ok(),
        "128 characters is fine, whatever their bytes: {ok:?}"
    );
    let huge = "r".repeat(5000);
    let r = rejected(InputKind::Cancel, json!({"request_id": huge}));
    assert_eq!(r.request_id, None, "too long to echo");
}

#[test]
fn empty_request_id() {
    for kind in InputKind::ALL {
        let r = rejected(
            kind,
            json!({"request_id": "", "priority": 1, "action": "paused"}),
        );
        assert_mentions(
            &r.error,
            &["field `request_id` must be 1 to 128", "empty string"],
        );
    }
}

#[test]
fn control_characters_in_request_id() {
    for kind in InputKind::ALL {
        let r = rejected(
            kind,
            json!({"request_id": "a\nb", "priority": 1, "action": "paused"}),
        );
        assert_eq!(
            r.error,
            "field `request_id` must not contain control characters, got \"a\\nb\""
        );
        assert_ne!(r.request_id.as_deref(), Some("a\nb"), "never echoed");
    }
}

#[test]
fn missing_request_id() {
    for kind in [InputKind::Renew, InputKind::Ack, InputKind::Cancel] {
        let r = rejected(kind, json!({"action": "paused"}));
        assert_eq!(r.error, "field `request_id` is missing");
        assert_eq!(r.request_id, None);
    }
}

#[test]
fn service_id_that_is_not_the_subjects() {
    let r = rejected(
        InputKind::Request,
        json!({"request_id": "r1", "service_id": "voice", "priority": 1}),
    );
    assert_mentions(
        &r.error,
        &[
            "field `service_id` is \"voice\"",
            "the subject names the service \"chat-1\"",
            "publish on `gpu.request.voice`",
        ],
    );
    assert_eq!(r.request_id.as_deref(), Some("r1"));
    assert_eq!(r.service.as_deref(), Some(SVC));
    let r = rejected(
        InputKind::Request,
        json!({"service_id": "no way", "priority": 1}),
    );
    assert_mentions(&r.error, &["or set it to \"chat-1\""]);
    for kind in [InputKind::Release, InputKind::Renew, InputKind::Cancel] {
        let r = rejected(kind, json!({"request_id": "r1", "service_id": "voice"}));
        assert_mentions(&r.error, &["field `service_id` is \"voice\""]);
    }
    let r = rejected(
        InputKind::Cancel,
        json!({"request_id": "r1", "service_id": 3}),
    );
    assert_eq!(r.error, "field `service_id`: expected a string, got 3");
    let same = input(
        InputKind::Request,
        Encoding::Json,
        br#"{"service_id":"chat-1","priority":1}"#,
    );
    assert!(same.is_ok(), "{same:?}");
}

#[test]
fn bad_ack_action() {
    let r = rejected(
        InputKind::Ack,
        json!({"request_id": "r", "action": "stopped"}),
    );
    assert_eq!(
        r.error,
        "field `action`: expected \"paused\" or \"resumed\", got \"stopped\""
    );
    assert_eq!(r.request_id.as_deref(), Some("r"));
    let r = rejected(InputKind::Ack, json!({"request_id": "r", "action": 1}));
    assert_eq!(
        r.error,
        "field `action`: expected \"paused\" or \"resumed\", got 1"
    );
    let r = rejected(InputKind::Ack, json!({"request_id": "r"}));
    assert_eq!(r.error, "field `action` is missing");
}

#[test]
fn duplicate_fields() {
    let r = input(
        InputKind::Request,
        Encoding::Json,
        br#"{"priority":1,"priority":2}"#,
    )
    .unwrap_err();
    assert_eq!(r.error, "field `priority` appears more than once");
}

#[test]
fn request_id_is_read_from_an_otherwise_invalid_payload() {
    let r = rejected(
        InputKind::Request,
        json!({"request_id": "keep-me", "priority": "urgent", "vram_mb": -5}),
    );
    assert_eq!(r.request_id.as_deref(), Some("keep-me"));
    let r = rejected(
        InputKind::Ack,
        json!({"request_id": "keep-me", "fence": "x"}),
    );
    assert_eq!(r.request_id.as_deref(), Some("keep-me"));
    let r = rejected(InputKind::Request, json!({"priority": 999}));
    assert_eq!(
        r.request_id.as_deref(),
        Some("chat-1-7"),
        "a request's default id"
    );
    let r = rejected(InputKind::Release, json!({"fence": "x"}));
    assert_eq!(r.request_id, None, "only a request has a default id");
}

#[test]
fn decode_is_usable_on_its_own() {
    let err: DecodeError = decode::<RequestMsg>(Encoding::Json, b"{}").unwrap_err();
    assert_eq!(err.to_string(), "field `priority` is missing");
    let err = decode::<StatusDoc>(Encoding::MsgPack, &[0x92, 0x01]).unwrap_err();
    assert_mentions(&err.0, &["truncated"]);
}

#[test]
fn durations_and_vram_beyond_any_real_use_are_rejected() {
    for (body, field) in [
        (json!({"priority": 1, "timeout_ms": u64::MAX}), "timeout_ms"),
        (
            json!({"priority": 1, "timeout_ms": 9_223_372_036_854_775_808u64}),
            "timeout_ms",
        ),
        (
            json!({"priority": 1, "lease_ms": crate::validate::MAX_DURATION_MS + 1}),
            "lease_ms",
        ),
        (json!({"priority": 1, "vram_mb": u64::MAX}), "vram_mb"),
    ] {
        let payload = serde_json::to_vec(&body).unwrap();
        let r = decode_input(&subjects(), "gpu.request.chat-1", None, &payload, 1).unwrap_err();
        assert_mentions(&r.error, &[field, "at most"]);
    }
    let renew = br#"{"request_id":"r1","lease_ms":18446744073709551615}"#;
    let r = decode_input(&subjects(), "gpu.renew.chat-1", None, renew, 1).unwrap_err();
    assert_mentions(&r.error, &["lease_ms", "at most"]);
    let fine = br#"{"priority":1,"timeout_ms":31536000000,"vram_mb":1073741824}"#;
    assert!(decode_input(&subjects(), "gpu.request.chat-1", None, fine, 1).is_ok());
}

#[test]
fn pause_ms_is_an_optional_hint_of_at_most_an_hour() {
    let max = crate::validate::MAX_PAUSE_MS;
    let r = rejected(
        InputKind::Request,
        json!({"request_id": "r1", "priority": 2, "pause_ms": max + 1}),
    );
    assert_eq!(r.request_id.as_deref(), Some("r1"));
    assert_eq!(
        r.error,
        format!("field `pause_ms`: at most {max} (an hour), got {}", max + 1)
    );
    let r = rejected(
        InputKind::Request,
        json!({"priority": 2, "pause_ms": "fast"}),
    );
    assert_eq!(
        r.error,
        "field `pause_ms`: expected a whole number >= 0, got the string \"fast\""
    );
    let r = rejected(InputKind::Request, json!({"priority": 2, "pause_ms": -1}));
    assert_mentions(
        &r.error,
        &["field `pause_ms`", "expected a whole number >= 0"],
    );
    // 0 (pauses at once) and the bound are fine, in both encodings; absent stays absent.
    for (pause_ms, want) in [
        (json!(0), Some(0)),
        (json!(max), Some(max)),
        (json!(null), None),
    ] {
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let body = json!({"priority": 2, "pause_ms": pause_ms});
            let decoded = input(InputKind::Request, encoding, &payload(encoding, &body))
                .expect("a valid request");
            let Inbound::Request(msg) = decoded.input else {
                panic!("a request: {decoded:?}");
            };
            assert_eq!(msg.pause_ms, want, "{body} in {}", encoding.as_str());
        }
    }
}
