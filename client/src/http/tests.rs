//! The HTTP transport without a server: how the answers to POSTs are classified, what inputs carry,
//! which URLs are taken.

use super::*;

fn answered(kind: InputKind, status: u16, body: &str) -> Result<Answered, Failure> {
    classify(kind, StatusCode::from_u16(status).unwrap(), body.as_bytes())
}

#[test]
fn replies_are_replies_whatever_the_status() {
    for (status, outcome) in [
        (200, "granted"),
        (408, "timed_out"),
        (400, "rejected"),
        (409, "released"),
        (202, "paused"),
    ] {
        let body = format!(r#"{{"request_id":"a-1","outcome":"{outcome}"}}"#);
        match answered(InputKind::Request, status, &body) {
            Ok(Answered::Reply(reply)) => assert_eq!(reply.request_id, "a-1"),
            _ => panic!("{status} {outcome}: not a reply"),
        }
    }
}

#[test]
fn a_long_poll_past_its_longest_waits_on_and_other_inputs_are_stored() {
    let still = r#"{"request_id":"a-1","detail":"still queued"}"#;
    assert!(matches!(
        answered(InputKind::Request, 202, still),
        Ok(Answered::WaitOn)
    ));
    assert!(matches!(
        answered(InputKind::Ack, 202, still),
        Ok(Answered::Stored)
    ));
    assert!(matches!(
        answered(InputKind::Release, 202, r#"{"detail":"stored"}"#),
        Ok(Answered::Stored)
    ));
}

#[test]
fn errors_carry_the_servers_sentence() {
    match answered(
        InputKind::Request,
        400,
        r#"{"error":"field `vram_mb` must be at least 1"}"#,
    ) {
        Err(Failure::Fatal(ClientError::InvalidRequest(e))) => {
            assert_eq!(e, "field `vram_mb` must be at least 1 (HTTP 400)")
        }
        _ => panic!("400 is an invalid request"),
    }
    match answered(
        InputKind::Renew,
        401,
        r#"{"error":"the bearer token is not valid"}"#,
    ) {
        Err(Failure::Fatal(ClientError::Rejected { error: e, .. })) => {
            assert!(e.contains("the bearer token is not valid"), "{e}")
        }
        _ => panic!("401 is a rejection"),
    }
    for status in [500, 502, 503, 504, 507] {
        match answered(InputKind::Renew, status, "<html>Bad gateway</html>") {
            Err(Failure::Retry(why)) => {
                assert!(why.contains("Bad gateway") && why.contains(&status.to_string()))
            }
            _ => panic!("{status} is tried again"),
        }
    }
}

#[test]
fn inputs_name_their_service() {
    let body = with_service(br#"{"request_id":"a-1","fence":3}"#, "asr").unwrap();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["service_id"], "asr");
    assert_eq!(doc["fence"], 3);
    // A request names it already; it is kept.
    let body = with_service(br#"{"service_id":"asr","priority":1}"#, "other").unwrap();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["service_id"], "asr");
}

#[test]
fn only_plain_http_urls_are_taken() {
    assert!(Http::new("http://127.0.0.1:8080/", "asr", Some("t")).is_ok());
    assert_eq!(
        Http::new("http://127.0.0.1:8080/", "asr", None)
            .unwrap()
            .base(),
        "http://127.0.0.1:8080"
    );
    for url in ["nats://127.0.0.1:4222", "https://example.com", "not a url"] {
        assert!(
            matches!(
                Http::new(url, "asr", None),
                Err(ClientError::InvalidConfig(_))
            ),
            "{url}"
        );
    }
    assert!(matches!(
        Http::new("http://127.0.0.1:8080", "asr", Some("a\nb")),
        Err(ClientError::InvalidConfig(_))
    ));
}
