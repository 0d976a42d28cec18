use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::*;
use crate::codec::{decode, encode};
use crate::messages::*;
use crate::status::*;
use crate::validate::Inbound;

const BOTH: [Encoding; 2] = [Encoding::Json, Encoding::MsgPack];

#[track_caller]
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: T) {
    for encoding in BOTH {
        let bytes = encode(encoding, &value);
        let back: T = decode(encoding, &bytes)
            .unwrap_or_else(|e| panic!("{} round trip of {value:?}: {e}", encoding.as_str()));
        assert_eq!(back, value, "{} round trip", encoding.as_str());
    }
}

fn full_request() -> RequestMsg {
    RequestMsg {
        host: None,
        request_id: Some("chat-1-42".into()),
        service_id: Some(SVC.into()),
        priority: 255,
        timeout_ms: Some(0),
        lease_ms: Some(30_000),
        vram_mb: Some(crate::validate::MAX_VRAM_MB),
        gpu: Some("GPU-0:1.a_b".into()),
        preemptible: Some(false),
        pause_ms: Some(crate::validate::MAX_PAUSE_MS),
    }
}

fn minimal_request() -> RequestMsg {
    RequestMsg {
        host: None,
        request_id: None,
        service_id: None,
        priority: 0,
        timeout_ms: None,
        lease_ms: None,
        vram_mb: None,
        gpu: None,
        preemptible: None,
        pause_ms: None,
    }
}

#[test]
fn inputs_round_trip() {
    round_trip(full_request());
    round_trip(minimal_request());
    round_trip(ReleaseMsg::default());
    round_trip(ReleaseMsg {
        request_id: Some("r".into()),
        fence: Some(u64::MAX),
    });
    round_trip(RenewMsg {
        request_id: "r".into(),
        fence: Some(3),
        lease_ms: Some(1),
    });
    round_trip(RenewMsg {
        request_id: "r".into(),
        fence: None,
        lease_ms: None,
    });
    for action in [AckAction::Paused, AckAction::Resumed] {
        round_trip(AckMsg {
            request_id: "r".into(),
            fence: Some(9),
            action,
        });
    }
    round_trip(CancelMsg {
        request_id: "ünïcödé id ✓".into(),
    });
}

#[test]
fn outputs_round_trip() {
    for outcome in [
        Outcome::Granted,
        Outcome::TimedOut,
        Outcome::Cancelled,
        Outcome::Released,
        Outcome::Renewed,
        Outcome::Rejected,
        Outcome::Queued,
        Outcome::Paused,
        Outcome::Revoked,
    ] {
        round_trip(Reply::new("r", outcome));
    }
    round_trip(Reply {
        request_id: "r".into(),
        outcome: Outcome::Granted,
        gpu: Some("gpu0".into()),
        fence: Some(12),
        lease_ms: Some(30_000),
        expires_at: Some(crate::time::rfc3339(1_795_000_000_123)),
        vram_mb: Some(8_000),
        waited_ms: Some(5),
        error: Some("field `priority` is missing".into()),
        code: None,
    });
    // Every rejection code, and one from a newer coordinator, read as `other`.
    for code in RejectCode::ALL {
        let mut reply = Reply::new("r", Outcome::Rejected);
        reply.error = Some("why".into());
        reply.code = Some(code);
        round_trip(reply);
        assert_eq!(RejectCode::parse(code.as_str()), Some(code));
        let written = serde_json::to_string(&code).expect("encodes");
        assert_eq!(written, format!("\"{}\"", code.as_str()));
    }
    let newer: Reply = serde_json::from_str(
        r#"{"request_id":"r","outcome":"rejected","error":"why","code":"a_later_code"}"#,
    )
    .expect("an unknown code decodes");
    assert_eq!(newer.code, Some(RejectCode::Other));
    for action in [
        ControlAction::Pause,
        ControlAction::Resume,
        ControlAction::Revoke,
        ControlAction::Restart,
    ] {
        round_trip(Control {
            action,
            request_id: "r".into(),
            fence: 4,
            deadline_ms: Some(5_000),
            reason: "preempted by chat-1-9 (priority 0)".into(),
            lease_ms: Some(30_000),
            expires_at: Some("2026-11-26T14:39:09.123Z".into()),
            gpu: Some("gpu0".into()),
        });
    }
    round_trip(Control {
        action: ControlAction::Revoke,
        request_id: "r".into(),
        fence: 0,
        deadline_ms: None,
        reason: String::new(),
        lease_ms: None,
        expires_at: None,
        gpu: None,
    });
    for kind in [
        EventKind::Requested,
        EventKind::Queued,
        EventKind::Granted,
        EventKind::Preempting,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::Released,
        EventKind::Renewed,
        EventKind::Expired,
        EventKind::Revoked,
        EventKind::TimedOut,
        EventKind::Cancelled,
        EventKind::Rejected,
    ] {
        round_trip(Event {
            capacity_mb: None,
            at: "2026-11-26T14:39:09.123Z".into(),
            kind,
            request_id: Some("r".into()),
            service_id: SVC.into(),
            priority: Some(2),
            gpu: Some("gpu0".into()),
            fence: Some(1),
            detail: Some("why".into()),
            reclaim_for: None,
            code: (kind == EventKind::Rejected).then_some(RejectCode::StaleFence),
        });
    }
    // A reclaim says for whose guarantee.
    round_trip(Event {
        capacity_mb: None,
        at: "2026-11-26T14:39:09.123Z".into(),
        kind: EventKind::Preempting,
        request_id: Some("r".into()),
        service_id: SVC.into(),
        priority: Some(0),
        gpu: Some("gpu0".into()),
        fence: Some(3),
        detail: Some("request `c` of `chat` ... takes back VRAM".into()),
        reclaim_for: Some("chat".into()),
        code: None,
    });
    round_trip(Event {
        capacity_mb: None,
        at: "2026-11-26T14:39:09.123Z".into(),
        kind: EventKind::Rejected,
        request_id: None,
        service_id: SVC.into(),
        priority: None,
        gpu: None,
        fence: None,
        detail: None,
        reclaim_for: None,
        code: None,
    });
}

fn status_doc() -> StatusDoc {
    StatusDoc {
        hosts: Vec::new(),
        queue_total: 250,
        queue_offset: 100,
        queue_counts: vec![
            crate::QueueCount {
                priority: 1,
                gpu: None,
                queued: 200,
                paused: 0,
            },
            crate::QueueCount {
                priority: 2,
                gpu: Some("gpu0".into()),
                queued: 49,
                paused: 1,
            },
        ],
        services: vec![
            crate::ServiceStatus {
                service_id: "voice".into(),
                used_mb: 8_000,
                borrowed_mb: 2_000,
                guaranteed_vram_mb: Some(6_000),
                max_vram_mb: Some(12_000),
            },
            crate::ServiceStatus {
                service_id: "batch".into(),
                used_mb: 1_000,
                borrowed_mb: 0,
                guaranteed_vram_mb: None,
                max_vram_mb: None,
            },
        ],
        leader: Some(crate::LeaderStatus {
            holder: "box-1-0a0b0c0d".into(),
            term: 3,
            standbys: vec!["box-2-01020304".into()],
        }),
        storage_full: Some("SQLite is full (out of disk space): database or disk is full".into()),
        at: "2026-11-26T14:39:09.123Z".into(),
        vram_source: VramSource::Nvml,
        gpus: vec![GpuStatus {
            host: None,
            reachable: None,
            uuid: None,
            id: "gpu0".into(),
            total_mb: 24_000,
            used_mb: 9_000,
            free_mb: 15_000,
            external_mb: 1_000,
            vram_source: VramSource::Config,
            holders: vec![
                HolderStatus {
                    request_id: "r1".into(),
                    service_id: "voice".into(),
                    priority: 1,
                    fence: 7,
                    vram_mb: 8_000,
                    granted_at: "2026-11-26T14:39:00.000Z".into(),
                    expires_at: "2026-11-26T14:39:30.000Z".into(),
                    state: HolderState::Active,
                    preemptible: true,
                    pause_ms: Some(1_500),
                },
                HolderStatus {
                    request_id: "r2".into(),
                    service_id: "batch".into(),
                    priority: 2,
                    fence: 6,
                    vram_mb: 0,
                    granted_at: "2026-11-26T14:38:00.000Z".into(),
                    expires_at: "2026-11-26T14:39:30.000Z".into(),
                    state: HolderState::Pausing,
                    preemptible: false,
                    pause_ms: None,
                },
            ],
        }],
        paused: vec![PausedStatus {
            request_id: "r3".into(),
            service_id: "batch".into(),
            priority: 2,
            gpu: "gpu0".into(),
            vram_mb: 4_000,
            paused_at: "2026-11-26T14:38:30.000Z".into(),
        }],
        queue: vec![
            QueueEntry {
                position: 1,
                request_id: "r3".into(),
                service_id: "batch".into(),
                priority: 2,
                vram_mb: Some(4_000),
                gpu: Some("gpu0".into()),
                requested_at: "2026-11-26T14:38:00.000Z".into(),
                paused: true,
                timeout_at: None,
                estimated_wait_ms: None,
            },
            QueueEntry {
                position: 2,
                request_id: "r4".into(),
                service_id: SVC.into(),
                priority: 0,
                vram_mb: None,
                gpu: None,
                requested_at: "2026-11-26T14:39:01.000Z".into(),
                paused: false,
                timeout_at: Some("2026-11-26T14:40:01.000Z".into()),
                estimated_wait_ms: Some(12_000),
            },
        ],
    }
}

#[test]
fn status_round_trips() {
    round_trip(status_doc());
    round_trip(StatusDoc {
        hosts: Vec::new(),
        leader: None,
        storage_full: None,
        at: "2026-11-26T14:39:09.123Z".into(),
        vram_source: VramSource::Config,
        gpus: vec![],
        paused: vec![],
        queue: vec![],
        queue_total: 0,
        queue_offset: 0,
        queue_counts: vec![],
        services: vec![],
    });
}

#[test]
fn nested_errors_name_the_path() {
    let mut value = serde_json::to_value(status_doc()).unwrap();
    value["gpus"][0]["holders"][1]["fence"] = serde_json::json!("seven");
    for encoding in BOTH {
        let err = decode::<StatusDoc>(encoding, &encode(encoding, &value)).unwrap_err();
        assert_eq!(
            err.0,
            "field `gpus[0].holders[1].fence`: expected a whole number >= 0, got the string \"seven\""
        );
    }
    let mut value = serde_json::to_value(status_doc()).unwrap();
    value["queue"][1].as_object_mut().unwrap().remove("paused");
    let err = decode::<StatusDoc>(Encoding::Json, &encode(Encoding::Json, &value)).unwrap_err();
    assert_eq!(err.0, "field `queue[1].paused` is missing");
}

/// What a client sends arrives as the scheduler sees it, in both encodings.
#[test]
fn inputs_pass_decode_input_unchanged() {
    let cases: Vec<(InputKind, Inbound)> = vec![
        (InputKind::Request, Inbound::Request(full_request())),
        (
            InputKind::Release,
            Inbound::Release(ReleaseMsg {
                request_id: Some("r".into()),
                fence: Some(2),
            }),
        ),
        (InputKind::Release, Inbound::Release(ReleaseMsg::default())),
        (
            InputKind::Renew,
            Inbound::Renew(RenewMsg {
                request_id: "r".into(),
                fence: Some(2),
                lease_ms: Some(10),
            }),
        ),
        (
            InputKind::Ack,
            Inbound::Ack(AckMsg {
                request_id: "r".into(),
                fence: None,
                action: AckAction::Resumed,
            }),
        ),
        (
            InputKind::Cancel,
            Inbound::Cancel(CancelMsg {
                request_id: "r".into(),
            }),
        ),
    ];
    for (kind, inbound) in cases {
        for encoding in BOTH {
            let bytes = match &inbound {
                Inbound::Request(m) => encode(encoding, m),
                Inbound::Release(m) => encode(encoding, m),
                Inbound::Renew(m) => encode(encoding, m),
                Inbound::Ack(m) => encode(encoding, m),
                Inbound::Cancel(m) => encode(encoding, m),
            };
            let decoded = input(kind, encoding, &bytes).expect("a valid input");
            assert_eq!(decoded.service, SVC);
            assert_eq!(decoded.encoding, encoding);
            assert_eq!(decoded.input, inbound);
            assert_eq!(decoded.input.kind(), kind);
        }
    }
}

#[test]
fn a_request_gets_its_defaults() {
    for encoding in BOTH {
        let decoded = input(
            InputKind::Request,
            encoding,
            &encode(encoding, &minimal_request()),
        )
        .unwrap();
        let Inbound::Request(msg) = decoded.input else {
            panic!("a request decodes as a request");
        };
        assert_eq!(msg.request_id.as_deref(), Some("chat-1-7"));
        assert_eq!(msg.service_id.as_deref(), Some(SVC));
        assert_eq!(msg.priority, 0);
    }
}

#[test]
fn unknown_fields_and_nulls_are_ignored() {
    let value = serde_json::json!({
        "priority": 1,
        "future_field": {"nested": [1, 2, {"x": null}]},
        "lease_ms": null,
        "service_id": null,
    });
    for encoding in BOTH {
        let decoded = input(InputKind::Request, encoding, &payload(encoding, &value)).unwrap();
        let Inbound::Request(msg) = decoded.input else {
            panic!("a request decodes as a request");
        };
        assert_eq!(msg.priority, 1);
        assert_eq!(msg.lease_ms, None);
        assert_eq!(msg.service_id.as_deref(), Some(SVC));
    }
}

#[test]
fn json_may_have_whitespace_and_msgpack_content_type_any_case() {
    let decoded = decode_input(
        &subjects(),
        "gpu.cancel.chat-1",
        None,
        b"\n  { \"request_id\" : \"r\" }\n",
        1,
    )
    .unwrap();
    assert_eq!(
        decoded.input,
        Inbound::Cancel(CancelMsg {
            request_id: "r".into()
        })
    );
    let bytes = encode(
        Encoding::MsgPack,
        &CancelMsg {
            request_id: "r".into(),
        },
    );
    let decoded = decode_input(
        &subjects(),
        "gpu.cancel.chat-1",
        Some(" Application/MsgPack "),
        &bytes,
        1,
    )
    .unwrap();
    assert_eq!(decoded.encoding, Encoding::MsgPack);
}
