//! Bodies checked as NATS inputs: ids made up, default priorities filled in, mistakes named.

use super::prepare::prepare;
use super::*;
use crate::adapters::http::tests::settings;
use crate::metrics::Metrics;
use gpu_coordinator_wire::Subjects;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn state() -> HttpState {
    HttpState::new(
        settings(),
        Subjects::default(),
        Metrics::new(),
        CancellationToken::new(),
    )
}

fn bad(body: &str, kind: InputKind) -> String {
    match prepare(&state(), &HeaderMap::new(), body.as_bytes(), kind) {
        Err(ApiError::BadRequest(e)) => e,
        Err(other) => panic!("expected 400, got {other:?}"),
        Ok(_) => panic!("expected 400 for {body}"),
    }
}

#[test]
fn a_request_without_id_gets_one_and_keeps_its_fields() {
    let p = prepare(
        &state(),
        &HeaderMap::new(),
        br#"{"service_id":"chat","priority":0,"vram_mb":8000,"extra":1}"#,
        InputKind::Request,
    )
    .expect("valid");
    let Inbound::Request(msg) = p.input else {
        panic!("a request")
    };
    let id = msg.request_id.expect("an id");
    assert!(id.starts_with("chat-http-"), "{id}");
    assert_eq!(msg.vram_mb, Some(8000));
    let published: Value = serde_json::from_slice(&p.payload).expect("json");
    assert_eq!(published["request_id"], id.as_str());
    assert_eq!(
        published.get("extra"),
        None,
        "an unknown field is not stored"
    );
    assert_eq!(p.service, "chat");
    assert!(p.generated_id);

    // A given id may be a repeated one: this call does not know that it creates the request.
    let p = prepare(
        &state(),
        &HeaderMap::new(),
        br#"{"service_id":"chat","request_id":"job-1","priority":0}"#,
        InputKind::Request,
    )
    .expect("valid");
    assert!(!p.generated_id);
}

#[test]
fn a_body_without_priority_gets_its_services_default_priority() {
    let mut settings = settings();
    settings.services.named.insert(
        "asr".into(),
        gpu_coordinator_core::ServicePolicy {
            default_priority: Some(2),
            ..Default::default()
        },
    );
    let state = HttpState::new(
        settings,
        Subjects::default(),
        Metrics::new(),
        CancellationToken::new(),
    );
    let priority = |body: &str| {
        let p = prepare(
            &state,
            &HeaderMap::new(),
            body.as_bytes(),
            InputKind::Request,
        )
        .map_err(|e| format!("{e:?}"))?;
        let stored: Value = serde_json::from_slice(&p.payload).expect("json");
        Ok::<_, String>(stored["priority"].clone())
    };
    // Left out (or null): the default, stored with the input.
    assert_eq!(priority(r#"{"service_id":"asr"}"#), Ok(Value::from(2)));
    assert_eq!(
        priority(r#"{"service_id":"asr","priority":null}"#),
        Ok(Value::from(2))
    );
    // Given: what was given (the core checks it against max_priority).
    assert_eq!(
        priority(r#"{"service_id":"asr","priority":0}"#),
        Ok(Value::from(0))
    );
    // A service without a default must give one, as over NATS.
    let e = priority(r#"{"service_id":"chat"}"#).expect_err("no default");
    assert!(e.contains("`priority`"), "{e}");
}

#[test]
fn bad_bodies_name_what_is_wrong() {
    assert!(bad("", InputKind::Request).contains("the body is empty"));
    assert!(bad("{\"priority\": 1", InputKind::Request).contains("not valid JSON"));
    assert!(bad("[1]", InputKind::Request).contains("got an array"));
    assert!(
        bad(r#"{"priority": 1}"#, InputKind::Request).contains("field `service_id` is required")
    );
    assert!(
        bad(r#"{"service_id": 7, "priority": 1}"#, InputKind::Request)
            .contains("field `service_id`: expected a string, got 7")
    );
    assert!(bad(
        r#"{"service_id": "a b", "priority": 1}"#,
        InputKind::Request
    )
    .contains("field `service_id`"));
    let e = bad(
        r#"{"service_id": "chat", "priority": "high"}"#,
        InputKind::Request,
    );
    assert!(e.contains("`priority`"), "{e}");
    let e = bad(
        r#"{"service_id": "chat", "priority": 300}"#,
        InputKind::Request,
    );
    assert!(e.contains("`priority`"), "{e}");
    let e = bad(r#"{"service_id": "chat"}"#, InputKind::Renew);
    assert!(e.contains("`request_id`"), "{e}");
    let e = bad(
        r#"{"service_id": "chat", "request_id": "r", "action": "slept"}"#,
        InputKind::Ack,
    );
    assert!(e.contains("`action`"), "{e}");
}

#[test]
fn an_operator_token_acts_for_no_service_named_or_not() {
    let mut settings = settings();
    settings.tokens.insert(
        "secret-op".into(),
        crate::adapters::http::TokenHolder::Operator,
    );
    let state = HttpState::new(
        settings,
        Subjects::default(),
        Metrics::new(),
        CancellationToken::new(),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        axum::http::header::AUTHORIZATION,
        "Bearer secret-op".parse().expect("a header value"),
    );
    for body in [r#"{"priority":0}"#, r#"{"service_id":"chat","priority":0}"#] {
        match prepare(&state, &headers, body.as_bytes(), InputKind::Request) {
            Err(ApiError::Forbidden(e)) => assert!(e.contains("acts for no service"), "{e}"),
            Err(other) => panic!("expected 403 for {body}, got {other:?}"),
            Ok(_) => panic!("expected 403 for {body}"),
        }
    }
}
