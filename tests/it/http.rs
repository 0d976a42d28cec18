//! The HTTP API against a coordinator running in-process, through a real HTTP client: the long poll, the
//! SSE pause/resume round trip, auth refusals, bad bodies, readiness, metrics, and VRAM from a fake NVML
//! device.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gpu_coordinator::adapters::nvml::{DeviceSample, FakeProbe, ProcessUsage};
use gpu_coordinator::app::Extras;
use gpu_coordinator_wire::{EventKind, StatusDoc, Subjects, VramSource};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

use crate::support::{eventually, test_config, Coordinator, Probe, RedisServer, DEADLINE};

pub(crate) fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// POSTs a JSON body (or raw text), with an optional bearer token; returns the status and the JSON answer.
pub(crate) async fn post(
    c: &Client,
    url: &str,
    token: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut req = c.post(url).header("Content-Type", "application/json");
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req
        .body(body.into().0)
        .send()
        .await
        .expect("the POST is answered");
    let status = res.status();
    let json = res.json::<Value>().await.expect("a JSON answer");
    (status, json)
}

pub(crate) async fn get(c: &Client, url: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = c.get(url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.expect("the GET is answered");
    let status = res.status();
    let json = res.json::<Value>().await.expect("a JSON answer");
    (status, json)
}

pub(crate) struct Body(Vec<u8>);

impl From<Value> for Body {
    fn from(v: Value) -> Body {
        Body(serde_json::to_vec(&v).expect("json"))
    }
}

impl From<&str> for Body {
    fn from(s: &str) -> Body {
        Body(s.as_bytes().to_vec())
    }
}

/// The body of `GET url` as text (the metrics' exposition), with no token.
pub(crate) async fn text_of(c: &Client, url: &str) -> String {
    c.get(url)
        .send()
        .await
        .expect("answered")
        .text()
        .await
        .expect("text")
}

pub(crate) fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no `error` in {body}"))
}

/// One Server-Sent Event.
#[derive(Debug, Default)]
pub(crate) struct Sse {
    pub(crate) event: String,
    pub(crate) id: String,
    pub(crate) data: String,
}

/// Reads Server-Sent Events from a streaming response.
pub(crate) struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl SseReader {
    pub(crate) fn new(res: reqwest::Response) -> SseReader {
        SseReader {
            stream: res.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event that has a name (comments and keep-alives are skipped), within [`DEADLINE`].
    pub(crate) async fn next(&mut self) -> Sse {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut sse = Sse::default();
                for line in block.lines() {
                    if let Some((field, value)) = line.split_once(':') {
                        let value = value.strip_prefix(' ').unwrap_or(value);
                        match field {
                            "event" => sse.event = value.to_string(),
                            "id" => sse.id = value.to_string(),
                            "data" => sse.data.push_str(value),
                            _ => {}
                        }
                    }
                }
                if !sse.event.is_empty() {
                    return sse;
                }
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                other => panic!(
                    "no server-sent event within {DEADLINE:?}: {other:?}; buffered {:?}",
                    self.buffer
                ),
            }
        }
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("series {series}: {e}"))
}

/// A request waits for its grant (200 with the reply); a second whole-GPU request times out (408);
/// renew and release answer with their replies; the status shows the holder.
#[tokio::test]
async fn request_long_polls_until_granted_or_timed_out() {
    let config = test_config("http_poll", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();

    let (status, health) = get(&c, &coordinator.url("/healthz"), None).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );

    // No request_id: the coordinator's answer carries the one made up for it.
    let (status, granted) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "chat", "priority": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["outcome"], "granted");
    assert_eq!(granted["gpu"], "0");
    let id = granted["request_id"]
        .as_str()
        .expect("a request id")
        .to_string();
    assert!(id.starts_with("chat-http-"), "{id}");
    let fence = granted["fence"].as_u64().expect("a fence");

    let started = std::time::Instant::now();
    let (status, timed_out) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "priority": 1, "timeout_ms": 300}),
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{timed_out}");
    assert_eq!(timed_out["outcome"], "timed_out");
    assert!(
        timed_out["error"]
            .as_str()
            .unwrap_or_default()
            .contains("timeout_ms"),
        "{timed_out}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));

    // The same id again is answered with the request's current state, not queued twice.
    let (status, again) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "chat", "request_id": id, "priority": 1}),
    )
    .await;
    assert_eq!(
        (status, again["fence"].as_u64()),
        (StatusCode::OK, Some(fence)),
        "{again}"
    );

    let (status, doc) = get(&c, &coordinator.url("/gpu/status"), None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: StatusDoc = serde_json::from_value(doc).expect("a status document");
    assert_eq!(doc.gpus[0].holders[0].request_id, id);
    assert_eq!(doc.vram_source, VramSource::Config);

    let (status, renewed) = post(
        &c,
        &coordinator.url("/gpu/renew"),
        None,
        json!({"service_id": "chat", "request_id": id, "fence": fence, "lease_ms": 60_000}),
    )
    .await;
    assert_eq!(
        (status, renewed["outcome"].as_str()),
        (StatusCode::OK, Some("renewed")),
        "{renewed}"
    );
    assert_eq!(renewed["lease_ms"], 60_000);

    let (status, stale) = post(
        &c,
        &coordinator.url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": id, "fence": fence + 100}),
    )
    .await;
    assert_eq!(
        (status, stale["outcome"].as_str()),
        (StatusCode::BAD_REQUEST, Some("rejected")),
        "{stale}"
    );
    assert!(error_of(&stale).contains("stale fence"), "{stale}");

    let (status, released) = post(
        &c,
        &coordinator.url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": id, "fence": fence}),
    )
    .await;
    assert_eq!(
        (status, released["outcome"].as_str()),
        (StatusCode::OK, Some("released")),
        "{released}"
    );

    // A queued request can be cancelled; a second cancel is rejected: it has ended.
    let (status, _) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "bg", "request_id": "bg-1", "priority": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), coordinator.url("/gpu/request"));
        async move {
            post(
                &c,
                &url,
                None,
                json!({"service_id": "bg", "request_id": "bg-2", "priority": 2}),
            )
            .await
        }
    });
    probe.event("queued", Some("bg-2")).await;
    let (status, cancelled) = post(
        &c,
        &coordinator.url("/gpu/cancel"),
        None,
        json!({"service_id": "bg", "request_id": "bg-2"}),
    )
    .await;
    assert_eq!(
        (status, cancelled["outcome"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{cancelled}"
    );
    let (status, ended) = waiting.await.expect("the long poll ends");
    assert_eq!(
        (status, ended["outcome"].as_str()),
        (StatusCode::CONFLICT, Some("cancelled")),
        "{ended}"
    );
    let (status, again) = post(
        &c,
        &coordinator.url("/gpu/cancel"),
        None,
        json!({"service_id": "bg", "request_id": "bg-2"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{again}");
    assert!(error_of(&again).contains("already ended"), "{again}");

    // The HTTP inputs went into the input stream, and the audit trail has their events.
    let subjects = Subjects::new(&config.nats.prefix).expect("a valid prefix");
    let input = probe
        .js
        .get_stream(subjects.input_stream())
        .await
        .expect("the input stream");
    let stored = input
        .get_last_raw_message_by_subject(&subjects.request("asr"))
        .await
        .expect("the HTTP request is in the input stream");
    let body: Value = serde_json::from_slice(&stored.payload).expect("JSON");
    assert_eq!(body["request_id"], "asr-1");
    let msg_id = stored
        .headers
        .get("Nats-Msg-Id")
        .map(|v| v.as_str().to_string());
    assert!(
        msg_id.as_deref().unwrap_or_default().starts_with("http-"),
        "{msg_id:?}"
    );
    let output = probe
        .js
        .get_stream(subjects.output_stream())
        .await
        .expect("the output stream");
    let event = output
        .get_last_raw_message_by_subject(&subjects.event(EventKind::TimedOut, "asr"))
        .await
        .expect("the timed_out event of the HTTP request is in the output stream");
    assert_eq!(
        serde_json::from_slice::<Value>(&event.payload).expect("JSON")["request_id"],
        "asr-1"
    );
    coordinator.stop().await.expect("a clean stop");
}

/// A service without NATS: it holds through HTTP, gets `pause` over SSE, ACKs with POST /gpu/ack, and
/// gets `resume` over SSE once the urgent request released.
#[tokio::test]
async fn sse_carries_pause_and_resume() {
    let config = test_config("http_sse", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();

    let (status, asr) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "priority": 2, "vram_mb": 20_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{asr}");
    let asr_fence = asr["fence"].as_u64().expect("fence");

    let res = c
        .get(coordinator.url("/gpu/control/asr"))
        .send()
        .await
        .expect("the event stream opens");
    assert_eq!(res.status(), StatusCode::OK);
    let content_type = res.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut events = SseReader::new(res);

    let chat = tokio::spawn({
        let (c, url) = (c.clone(), coordinator.url("/gpu/request"));
        async move {
            post(&c, &url, None, json!({"service_id": "chat", "request_id": "chat-1", "priority": 0, "vram_mb": 8_000})).await
        }
    });
    let pause = events.next().await;
    assert_eq!(pause.event, "pause", "{pause:?}");
    let order: Value = serde_json::from_str(&pause.data).expect("a control document");
    assert_eq!(
        (order["request_id"].as_str(), order["fence"].as_u64()),
        (Some("asr-1"), Some(asr_fence))
    );
    assert!(order["deadline_ms"].as_u64().is_some(), "{order}");
    assert!(
        pause.id.parse::<u64>().is_ok(),
        "the event id is a stream sequence: {pause:?}"
    );

    let (status, acked) = post(
        &c,
        &coordinator.url("/gpu/ack"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "fence": asr_fence, "action": "paused"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{acked}");

    let (status, chat) = chat.await.expect("the urgent long poll ends");
    assert_eq!(
        (status, chat["outcome"].as_str()),
        (StatusCode::OK, Some("granted")),
        "{chat}"
    );
    let chat_fence = chat["fence"].as_u64().expect("fence");
    assert!(chat_fence > asr_fence);

    let (status, _) = post(
        &c,
        &coordinator.url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": "chat-1", "fence": chat_fence}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let resume = events.next().await;
    assert_eq!(resume.event, "resume", "{resume:?}");
    let order: Value = serde_json::from_str(&resume.data).expect("a control document");
    assert_eq!(order["request_id"], "asr-1");
    let resume_fence = order["fence"].as_u64().expect("fence");
    assert!(resume_fence > chat_fence, "resume carries a new fence");
    assert!(
        resume.id.parse::<u64>().expect("a sequence")
            > pause.id.parse::<u64>().expect("a sequence")
    );

    let (status, released) = post(
        &c,
        &coordinator.url("/gpu/release"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "fence": resume_fence}),
    )
    .await;
    assert_eq!(
        (status, released["outcome"].as_str()),
        (StatusCode::OK, Some("released")),
        "{released}"
    );

    // Reconnecting with Last-Event-ID replays what came after it.
    let res = c
        .get(coordinator.url("/gpu/control/asr"))
        .header("Last-Event-ID", pause.id.clone())
        .send()
        .await
        .expect("the event stream opens again");
    let replayed = SseReader::new(res).next().await;
    assert_eq!(
        (replayed.event.as_str(), replayed.id.as_str()),
        ("resume", resume.id.as_str())
    );
    coordinator.stop().await.expect("a clean stop");
}

/// With tokens configured: 401 without a valid token, 403 for another service's; a token's own service
/// may leave `service_id` out.
#[tokio::test]
async fn tokens_act_only_for_their_service() {
    let mut config = test_config("http_auth", &[("0", 24_576)]);
    config.http.tokens = [("tok-chat", "chat"), ("tok-asr", "asr")]
        .into_iter()
        .map(|(t, s)| (t.to_string(), s.to_string()))
        .collect();
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let url = coordinator.url("/gpu/request");
    let body =
        || json!({"service_id": "chat", "request_id": "c-1", "priority": 1, "vram_mb": 1_000});

    let res = c.post(&url).json(&body()).send().await.expect("answered");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let missing: Value = res.json().await.expect("json");
    assert!(
        error_of(&missing).contains("Authorization: Bearer"),
        "{missing}"
    );

    let (status, wrong) = post(&c, &url, Some("tok-nope"), body()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
    assert!(error_of(&wrong).contains("not valid"), "{wrong}");

    let (status, other) = post(&c, &url, Some("tok-asr"), body()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{other}");
    assert!(
        error_of(&other).contains("`asr`") && error_of(&other).contains("`chat`"),
        "{other}"
    );

    let (status, granted) = post(
        &c,
        &url,
        Some("tok-chat"),
        json!({"request_id": "c-1", "priority": 1, "vram_mb": 1_000}),
    )
    .await;
    assert_eq!(
        (status, granted["outcome"].as_str()),
        (StatusCode::OK, Some("granted")),
        "{granted}"
    );

    let (status, _) = post(
        &c,
        &coordinator.url("/gpu/release"),
        Some("tok-asr"),
        json!({"service_id": "chat", "request_id": "c-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = get(&c, &coordinator.url("/gpu/control/chat"), Some("tok-asr")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = get(&c, &coordinator.url("/gpu/status"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, doc) = get(&c, &coordinator.url("/gpu/status"), Some("tok-asr")).await;
    assert_eq!(status, StatusCode::OK, "any valid token reads the status");
    assert_eq!(
        doc["gpus"][0]["holders"],
        json!([]),
        "not chat's lease: {doc}"
    );
    let (_, doc) = get(&c, &coordinator.url("/gpu/status"), Some("tok-chat")).await;
    assert_eq!(doc["gpus"][0]["holders"][0]["service_id"], "chat");
    let (status, _) = get(&c, &coordinator.url("/healthz"), None).await;
    assert_eq!(status, StatusCode::OK, "health needs no token");
    coordinator.stop().await.expect("a clean stop");
}

/// Bodies that are not JSON, or have wrong types: 400 with an error naming the field; unknown routes
/// and methods: JSON errors too; the OpenAPI document lists the routes.
#[tokio::test]
async fn bad_bodies_get_400_naming_the_field() {
    let config = test_config("http_bad", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let request = coordinator.url("/gpu/request");

    let cases: Vec<(&str, Body, &str)> = vec![
        (
            "/gpu/request",
            "{\"service_id\": \"chat\", ".into(),
            "not valid JSON",
        ),
        ("/gpu/request", "".into(), "the body is empty"),
        ("/gpu/request", "[1, 2]".into(), "JSON object"),
        (
            "/gpu/request",
            json!({"priority": 1}).into(),
            "field `service_id` is required",
        ),
        (
            "/gpu/request",
            json!({"service_id": 5, "priority": 1}).into(),
            "field `service_id`: expected a string",
        ),
        (
            "/gpu/request",
            json!({"service_id": "chat", "priority": "high"}).into(),
            "`priority`",
        ),
        (
            "/gpu/request",
            json!({"service_id": "chat", "priority": 300}).into(),
            "`priority`",
        ),
        (
            "/gpu/request",
            json!({"service_id": "chat", "priority": 1, "vram_mb": "lots"}).into(),
            "`vram_mb`",
        ),
        (
            "/gpu/request",
            json!({"service_id": "chat", "priority": 1, "lease_ms": 0}).into(),
            "`lease_ms`",
        ),
        (
            "/gpu/request",
            json!({"service_id": "chat", "priority": 1, "preemptible": "no"}).into(),
            "`preemptible`",
        ),
        (
            "/gpu/renew",
            json!({"service_id": "chat"}).into(),
            "`request_id`",
        ),
        (
            "/gpu/ack",
            json!({"service_id": "chat", "request_id": "r", "action": "slept"}).into(),
            "`action`",
        ),
        (
            "/gpu/release",
            json!({"service_id": "chat", "fence": "one"}).into(),
            "`fence`",
        ),
        (
            "/gpu/cancel",
            json!({"service_id": "chat", "request_id": ""}).into(),
            "`request_id`",
        ),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = post(&c, &coordinator.url(path), None, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {answer}");
        assert!(
            error_of(&answer).contains(expected),
            "{path}: expected {expected:?} in {answer}"
        );
    }
    // Valid, but the coordinator does not know the request: its rejection, as a reply.
    let (status, rejected) = post(
        &c,
        &coordinator.url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": "nope"}),
    )
    .await;
    assert_eq!(
        (status, rejected["outcome"].as_str()),
        (StatusCode::BAD_REQUEST, Some("rejected")),
        "{rejected}"
    );
    assert!(
        error_of(&rejected).contains("unknown request_id `nope`"),
        "{rejected}"
    );
    // A pinned GPU that does not exist is the coordinator's rejection too.
    let (status, rejected) = post(
        &c,
        &request,
        None,
        json!({"service_id": "chat", "priority": 1, "gpu": "7"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{rejected}");
    assert!(error_of(&rejected).contains("field `gpu`"), "{rejected}");

    let (status, missing) = get(&c, &coordinator.url("/nope"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&missing).contains("/nope"));
    let (status, method) = get(&c, &request, None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    let (status, _) = get(&c, &coordinator.url("/gpu/control/not%20valid"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, doc) = get(&c, &coordinator.url("/openapi.json"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3."),
        "{doc}"
    );
    for path in [
        "/gpu/request",
        "/gpu/release",
        "/gpu/renew",
        "/gpu/ack",
        "/gpu/cancel",
        "/gpu/status",
        "/gpu/control/{service_id}",
        "/metrics",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"].get("Reply").is_some());
    coordinator.stop().await.expect("a clean stop");
}

/// `/readyz` says which server is missing: Redis stopped -> 503 naming Redis; back -> ready.
#[tokio::test]
async fn readyz_names_the_server_that_is_down() {
    let mut redis = RedisServer::start();
    let mut config = test_config("http_ready", &[("0", 24_576)]);
    config.redis.url = redis.url();
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let url = coordinator.url("/readyz");

    let (status, ready) = get(&c, &url, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(
        ready["checks"],
        json!({"nats": "ok", "redis": "ok", "postgres": "ok"})
    );

    redis.stop();
    let down = eventually("readyz reporting Redis down", || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let (status, body) = get(&c, &url, None).await;
            (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
        }
    })
    .await;
    assert!(
        error_of(&down).starts_with("Redis is not reachable"),
        "{down}"
    );
    assert_eq!(
        (
            down["checks"]["nats"].as_str(),
            down["checks"]["postgres"].as_str()
        ),
        (Some("ok"), Some("ok")),
        "{down}"
    );
    let (status, _) = get(&c, &coordinator.url("/healthz"), None).await;
    assert_eq!(status, StatusCode::OK, "the process is still up");

    redis.restart();
    eventually("readyz ready again", || {
        let (c, url) = (c.clone(), url.clone());
        async move { (get(&c, &url, None).await.0 == StatusCode::OK).then_some(()) }
    })
    .await;
    coordinator.stop().await.expect("a clean stop");
}

/// After a preemption the counters and histograms say so, and the gauges show the holder and the
/// paused request.
#[tokio::test]
async fn metrics_after_a_preemption() {
    let config = test_config("http_metrics", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json("request", "asr", json!({"request_id": "a", "priority": 2}))
        .await;
    let asr = probe.reply("a", "granted").await;
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "c", "priority": 0, "vram_mb": 4_000}),
        )
        .await;
    probe.control("a", "pause").await;
    probe
        .pub_json(
            "ack",
            "asr",
            json!({"request_id": "a", "fence": asr.fence, "action": "paused"}),
        )
        .await;
    probe.reply("c", "granted").await;
    probe
        .pub_json("renew", "asr", json!({"request_id": "zzz"}))
        .await;
    probe.reply("zzz", "rejected").await;

    let res = client()
        .get(coordinator.url("/metrics"))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("application/openmetrics-text"));
    let text = res.text().await.expect("text");
    for (series, value) in [
        ("gpu_coordinator_grants_total", 2.0),
        ("gpu_coordinator_preemptions_total", 1.0),
        ("gpu_coordinator_revocations_total", 0.0),
        ("gpu_coordinator_timeouts_total", 0.0),
        ("gpu_coordinator_rejections_total", 1.0),
        ("gpu_coordinator_grant_latency_seconds_count", 2.0),
        ("gpu_coordinator_pause_ack_seconds_count", 1.0),
        (
            "gpu_coordinator_queue_wait_seconds_count{outcome=\"granted\"}",
            2.0,
        ),
        ("gpu_coordinator_holders{gpu=\"0\",state=\"active\"}", 1.0),
        ("gpu_coordinator_paused_requests{priority=\"2\"}", 1.0),
        (
            "gpu_coordinator_vram_total_bytes{gpu=\"0\"}",
            24_576.0 * 1_048_576.0,
        ),
        (
            "gpu_coordinator_vram_used_bytes{gpu=\"0\"}",
            4_000.0 * 1_048_576.0,
        ),
        ("gpu_coordinator_vram_from_nvml", 0.0),
        ("gpu_coordinator_events_total{kind=\"paused\"}", 1.0),
    ] {
        assert_eq!(metric(&text, series), value, "{series}");
    }
    assert!(metric(&text, "gpu_coordinator_pause_ack_seconds_sum") > 0.0);
    // Where the batches spent their time: every round writes the journal and waits for it (and for
    // the lease store when it changes a lease, as the grants did); the batches of inputs are timed
    // whole; each stage took some time.
    let stage = |text: &str, what: &str, stage: &str| {
        metric(
            text,
            &format!("gpu_coordinator_batch_stage_seconds_{what}{{stage=\"{stage}\"}}"),
        )
    };
    let journal = stage(&text, "count", "journal");
    assert!(journal >= 1.0, "journal writes timed: {journal}");
    assert_eq!(
        stage(&text, "count", "durable"),
        journal,
        "each round waits once"
    );
    let leases = stage(&text, "count", "leases");
    assert!(
        (1.0..=journal).contains(&leases),
        "lease writes timed only in the rounds that change a lease: {leases} of {journal}"
    );
    assert!(stage(&text, "count", "batch") >= 1.0);
    for name in ["journal", "leases", "durable", "batch"] {
        assert!(stage(&text, "sum", name) > 0.0, "{name} took no time");
    }
    // A batch's publish is timed once the bus stored its messages, after the answers were seen.
    eventually("the publishes timed", || {
        let (c, url) = (client(), coordinator.url("/metrics"));
        async move {
            let text = c.get(url).send().await.ok()?.text().await.ok()?;
            (text.contains("gpu_coordinator_batch_stage_seconds_count{stage=\"publish\"}")
                && stage(&text, "sum", "publish") > 0.0)
                .then_some(())
        }
    })
    .await;
    coordinator.stop().await.expect("a clean stop");
}

/// With an NVML device (a fake one), the inventory comes from it, memory used outside the leases counts
/// against admission, and the status and metrics show it.
#[tokio::test]
async fn external_vram_from_nvml_counts_against_admission() {
    let mut config = test_config("http_nvml", &[]);
    config.nvml.sample_ms = 20;
    let probe = FakeProbe::new(vec![DeviceSample {
        mig: None,
        index: 0,
        uuid: "GPU-fake-0".into(),
        name: "Fake H100".into(),
        total_mb: 80_000,
        used_mb: 70_000,
        processes: vec![ProcessUsage {
            pid: 4242,
            used_mb: 70_000,
        }],
    }]);
    let extras = Extras {
        probe: Some(Arc::new(probe.clone())),
    };
    let coordinator = Coordinator::start_with(config.clone(), extras).await;
    let c = client();

    let status = || {
        let (c, url) = (c.clone(), coordinator.url("/gpu/status"));
        async move {
            serde_json::from_value::<StatusDoc>(get(&c, &url, None).await.1)
                .expect("a status document")
        }
    };
    let doc = eventually("the external VRAM in the status", || async {
        let doc = status().await;
        (doc.gpus[0].external_mb == 70_000).then_some(doc)
    })
    .await;
    assert_eq!(doc.vram_source, VramSource::Nvml);
    assert_eq!(
        (doc.gpus[0].id.as_str(), doc.gpus[0].total_mb),
        ("0", 80_000)
    );
    assert_eq!(doc.gpus[0].free_mb, 10_000);

    // 20 GB does not fit beside the 70 GB used elsewhere; it is granted once that memory is freed.
    let mut nats = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let waiting = tokio::spawn({
        let (c, url) = (c.clone(), coordinator.url("/gpu/request"));
        async move {
            post(
                &c,
                &url,
                None,
                json!({"service_id": "llm", "request_id": "big", "priority": 1, "vram_mb": 20_000}),
            )
            .await
        }
    });
    nats.event("queued", Some("big")).await;
    probe.set_used(0, 5_000);
    let (code, granted) = waiting.await.expect("the long poll ends");
    assert_eq!(
        (code, granted["outcome"].as_str()),
        (StatusCode::OK, Some("granted")),
        "{granted}"
    );

    // Now the holder's own use is not "external": 25 GB used, 20 GB of it held.
    probe.set_used(0, 25_000);
    eventually("the held memory not counted as external", || async {
        let doc = status().await;
        (doc.gpus[0].external_mb == 5_000 && doc.gpus[0].used_mb == 25_000).then_some(())
    })
    .await;
    let text = text_of(&c, &coordinator.url("/metrics")).await;
    assert_eq!(metric(&text, "gpu_coordinator_vram_from_nvml"), 1.0);
    assert_eq!(
        metric(&text, "gpu_coordinator_vram_external_bytes{gpu=\"0\"}"),
        5_000.0 * 1_048_576.0
    );
    assert_eq!(
        metric(
            &text,
            "gpu_coordinator_process_vram_bytes{gpu=\"0\",pid=\"4242\"}"
        ),
        70_000.0 * 1_048_576.0
    );
    coordinator.stop().await.expect("a clean stop");
}

/// `gpu-coordinator status`: JSON from NATS, a table from HTTP.
#[tokio::test]
async fn the_status_command_reads_nats_or_http() {
    let config = test_config("http_cli", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let (status, _) = post(
        &client(),
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "chat", "request_id": "cli-1", "priority": 0, "vram_mb": 4_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let run = |args: Vec<String>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
                .args(args)
                .env("GPU_COORDINATOR_NATS__URL", &config.nats.url)
                .env("GPU_COORDINATOR_NATS__PREFIX", &config.nats.prefix)
                .env("RUST_LOG", "warn")
                .output()
                .expect("run gpu-coordinator status")
        })
    };
    let out = run(vec!["status".into(), "--json".into()])
        .await
        .expect("the command ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: StatusDoc = serde_json::from_slice(&out.stdout).expect("a status document on stdout");
    assert_eq!(doc.gpus[0].holders[0].request_id, "cli-1");

    let base = coordinator.url("");
    let out = run(vec!["status".into(), "--http".into(), base])
        .await
        .expect("the command ran");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("Holders") && table.contains("cli-1") && table.contains("4000"),
        "{table}"
    );
    coordinator.stop().await.expect("a clean stop");
}

/// A client that gives up its long poll (the connection closes) leaves no request behind that would be
/// granted to nobody: the request is released.
#[tokio::test]
async fn an_abandoned_long_poll_releases_its_request() {
    let config = test_config("http_gone", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let c = client();
    let (status, _) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "chat", "request_id": "holder", "priority": 0, "preemptible": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let waiting = tokio::spawn({
        let url = coordinator.url("/gpu/request");
        async move {
            post(
                &client(),
                &url,
                None,
                json!({"service_id": "asr", "request_id": "gone", "priority": 2}),
            )
            .await
        }
    });
    probe.event("queued", Some("gone")).await;
    waiting.abort();
    let _ = waiting.await;
    let released = probe.event("released", Some("gone")).await;
    assert_eq!(released.service_id, "asr");
    assert!(probe.status().await.queue.is_empty());

    // Without a request_id the handler makes one up: the request is this call's all the same.
    let waiting = tokio::spawn({
        let url = coordinator.url("/gpu/request");
        async move {
            post(
                &client(),
                &url,
                None,
                json!({"service_id": "tts", "priority": 2}),
            )
            .await
        }
    });
    let queued = format!("{}.event.queued.tts", config.nats.prefix);
    let id = probe
        .expect("event queued for tts", |s| s.subject == queued)
        .await
        .event()
        .request_id
        .expect("a request id");
    assert!(id.starts_with("tts-http-"), "{id}");
    waiting.abort();
    let _ = waiting.await;
    probe.event("released", Some(&id)).await;
    assert!(probe.status().await.queue.is_empty());
    coordinator.stop().await.expect("a clean stop");
}

/// A POST /gpu/request that repeats the `request_id` of a request a NATS service queued is answered with
/// its state; neither the handler's own deadline nor the client going away releases it: it is the
/// service's, and is granted to it later.
#[tokio::test]
async fn a_repeated_id_over_http_leaves_the_services_request_alone() {
    let config = test_config("http_repeat", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let c = client();
    let (status, holder) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "chat", "request_id": "holder", "priority": 0, "preemptible": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{holder}");
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "job-1", "priority": 2, "timeout_ms": 60_000}),
        )
        .await;
    probe.event("queued", Some("job-1")).await;
    let still_queued = |doc: &StatusDoc| doc.queue.iter().any(|q| q.request_id == "job-1");

    // A short wait: answered `queued` at once, then nothing until the handler's deadline (504).
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "asr", "request_id": "job-1", "priority": 2, "timeout_ms": 50}),
    )
    .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    probe.reply("job-1", "queued").await;

    // A client that goes away while it waits.
    let waiting = tokio::spawn({
        let url = coordinator.url("/gpu/request");
        async move {
            post(
                &client(),
                &url,
                None,
                json!({"service_id": "asr", "request_id": "job-1", "priority": 2}),
            )
            .await
        }
    });
    probe.reply("job-1", "queued").await;
    waiting.abort();
    let _ = waiting.await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let ended = |s: &crate::support::Seen| {
        s.str("request_id") == Some("job-1")
            && ["released", "cancelled", "timed_out"]
                .iter()
                .any(|end| s.str("outcome") == Some(end) || s.subject.contains(&format!(".{end}.")))
    };
    assert!(
        !probe.drain_and_find(ended),
        "the service's request ended: {:#?}",
        probe.seen
    );
    let doc = probe.status().await;
    assert!(still_queued(&doc), "{doc:?}");

    // It is still the service's: granted to it once the GPU is free.
    let (status, released) = post(
        &c,
        &coordinator.url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": "holder"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{released}");
    let granted = probe.reply("job-1", "granted").await;
    assert_eq!(granted.gpu.as_deref(), Some("0"));
    coordinator.stop().await.expect("a clean stop");
}

/// After a pause ACK, the GPU is given on only once NVML sees the paused holder's VRAM freed.
#[tokio::test]
async fn a_grant_after_a_pause_waits_for_nvml_to_see_the_vram_freed() {
    let mut config = test_config("nvml_settle", &[]);
    config.nvml.sample_ms = 20;
    config.nvml.settle_ms = 60_000;
    let probe = FakeProbe::new(vec![DeviceSample {
        mig: None,
        index: 0,
        uuid: "GPU-fake-0".into(),
        name: "Fake H100".into(),
        total_mb: 80_000,
        used_mb: 0,
        processes: vec![],
    }]);
    let extras = Extras {
        probe: Some(Arc::new(probe.clone())),
    };
    let coordinator = Coordinator::start_with(config.clone(), extras).await;
    let mut nats = Probe::new(&config.nats.url, &config.nats.prefix).await;
    nats.pub_json(
        "request",
        "asr",
        json!({"request_id": "asr", "priority": 2, "vram_mb": 60_000}),
    )
    .await;
    let asr = nats.reply("asr", "granted").await;
    probe.set_used(0, 60_000);
    nats.pub_json(
        "request",
        "chat",
        json!({"request_id": "chat", "priority": 0, "vram_mb": 60_000}),
    )
    .await;
    nats.control("asr", "pause").await;
    nats.pub_json(
        "ack",
        "asr",
        json!({"request_id": "asr", "fence": asr.fence, "action": "paused"}),
    )
    .await;
    nats.event("paused", Some("asr")).await;
    // NVML still sees the 60 GB in use: samples keep coming, and the chat request keeps waiting.
    eventually("samples seen after the ACK", || async {
        let doc = nats.status().await;
        (doc.gpus[0].external_mb == 60_000).then_some(())
    })
    .await;
    let doc = nats.status().await;
    assert!(doc.gpus[0].holders.is_empty());
    assert_eq!(doc.queue[0].request_id, "chat");
    // The worker frees its memory: the grant follows, without a warning.
    probe.set_used(0, 0);
    nats.reply("chat", "granted").await;
    let granted = nats.event("granted", Some("chat")).await;
    assert!(!granted.detail.unwrap_or_default().contains("anyway"));
    coordinator.stop().await.expect("a clean stop");
}

/// A long poll waits behind a holder while NATS restarts: the HTTP API reads the coordinator's answers
/// from the output stream (the same reader as the client library), recreating its consumers after the
/// restart, so the grant that follows still reaches the waiting call.
#[tokio::test]
async fn a_long_poll_gets_its_grant_across_a_nats_restart() {
    let mut server = crate::support::NatsServer::start();
    let mut config = test_config("http_natsrestart", &[("0", 24_000)]);
    config.nats.url = server.url();
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let request = coordinator.url("/gpu/request");
    let (status, held) = post(
        &c,
        &request,
        None,
        json!({"service_id": "bg", "request_id": "bg-1", "priority": 1, "vram_mb": 20000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{held}");

    let waiter = {
        let (c, request) = (c.clone(), request.clone());
        tokio::spawn(async move {
            post(
                &c,
                &request,
                None,
                json!({"service_id": "chat", "request_id": "chat-1", "priority": 1,
                    "vram_mb": 20000, "timeout_ms": 60000}),
            )
            .await
        })
    };
    let status_url = coordinator.url("/gpu/status");
    eventually("chat-1 queued behind bg-1", || async {
        let (_, doc) = get(&c, &status_url, None).await;
        let queued = doc["queue"].as_array()?;
        queued
            .iter()
            .any(|q| q["request_id"] == "chat-1")
            .then_some(())
    })
    .await;

    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .expect("the nats-server restart");
    // The holder lets go once NATS is back (a release sent while it reconnects gets 503: sent again).
    let release = coordinator.url("/gpu/release");
    eventually("bg-1 released after the restart", || async {
        let (status, answer) = post(
            &c,
            &release,
            None,
            json!({"service_id": "bg", "request_id": "bg-1", "fence": held["fence"]}),
        )
        .await;
        // An earlier try may have been stored before its answer was lost: then it has ended already.
        let ended = answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("already ended"));
        (status == StatusCode::OK || ended).then_some(())
    })
    .await;
    let (status, granted) = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("the long poll answers")
        .expect("the waiting call did not panic");
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["outcome"], "granted");
    assert!(granted["fence"].as_u64() > held["fence"].as_u64());
    coordinator.stop().await.expect("stops cleanly");
    drop(server);
}

/// Every HTTP resource is bounded: a long poll's wait, the open control streams per service and in
/// all, the body size; the metrics want the operator's token when tokens are set; the status lists a
/// page of the queue with its total.
#[tokio::test]
async fn http_resources_are_bounded() {
    let mut config = test_config("http_bounds", &[("0", 1_000)]);
    config.http.max_wait_ms = 300;
    config.http.max_streams_per_service = 1;
    config.http.max_streams = 2;
    config.http.max_body_bytes = 4_096;
    config.http.tokens = [("tok-a", "a"), ("tok-b", "b"), ("tok-c", "c"), ("op", "*")]
        .into_iter()
        .map(|(t, s)| (t.to_string(), s.to_string()))
        .collect();
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let request = coordinator.url("/gpu/request");

    // The GPU is held; a request that may wait a minute is answered 202 at the cap, and stays queued.
    let (status, held) = post(
        &c,
        &request,
        Some("tok-a"),
        json!({"request_id": "a-1", "priority": 1, "lease_ms": 600_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{held}");
    let (status, waiting) = post(
        &c,
        &request,
        Some("tok-b"),
        json!({"request_id": "b-1", "priority": 1, "timeout_ms": 60_000}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{waiting}");
    assert_eq!(waiting["request_id"], "b-1");
    assert!(
        waiting["detail"]
            .as_str()
            .is_some_and(|d| d.contains("http.max_wait_ms")),
        "{waiting}"
    );
    let (_, doc) = get(&c, &coordinator.url("/gpu/status?limit=0"), Some("tok-b")).await;
    assert_eq!(doc["queue_total"], 1, "b-1 stays queued: {doc}");
    assert_eq!(doc["queue"], json!([]), "{doc}");
    assert_eq!(doc["queue_counts"][0]["queued"], 1, "{doc}");
    let (status, bad) = get(&c, &coordinator.url("/gpu/status?limit=x"), Some("tok-b")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");

    // One control stream per service, two in all.
    let open = |token: &'static str, svc: &'static str| {
        let c = c.clone();
        let url = coordinator.url(&format!("/gpu/control/{svc}"));
        async move {
            c.get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("answered")
        }
    };
    let first = open("tok-a", "a").await;
    assert_eq!(first.status(), StatusCode::OK);
    let again = open("tok-a", "a").await;
    assert_eq!(again.status(), StatusCode::TOO_MANY_REQUESTS);
    let again: Value = again.json().await.expect("json");
    assert!(
        error_of(&again).contains("max_streams_per_service"),
        "{again}"
    );
    let second = open("tok-b", "b").await;
    assert_eq!(second.status(), StatusCode::OK);
    let third = open("tok-c", "c").await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    // A stream that is closed frees its place.
    drop(first);
    eventually("a closed stream is no longer counted", || async {
        let res = open("tok-c", "c").await;
        (res.status() == StatusCode::OK).then_some(())
    })
    .await;
    drop(second);

    // A body over the limit is refused, and nothing of it is published.
    let big = format!(
        r#"{{"request_id":"a-2","priority":1,"pad":"{}"}}"#,
        "x".repeat(8_000)
    );
    let res = c
        .post(&request)
        .bearer_auth("tok-a")
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // The metrics want a token too, the operator's.
    let res = c
        .get(coordinator.url("/metrics"))
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = c
        .get(coordinator.url("/metrics"))
        .bearer_auth("tok-a")
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = c
        .get(coordinator.url("/metrics"))
        .bearer_auth("op")
        .send()
        .await
        .expect("answered");
    assert_eq!(res.status(), StatusCode::OK);
    let text = res.text().await.expect("text");
    assert_eq!(
        metric(&text, "gpu_coordinator_queue_length{priority=\"1\"}"),
        1.0,
        "{text}"
    );
    coordinator.stop().await.expect("a clean stop");
}

/// Reads SSE events (`id`, `event`, `data`) from a streaming response until `stop` says so.
async fn sse_until(
    response: reqwest::Response,
    stop: impl Fn(&str, &Value) -> bool,
) -> Vec<(u64, String, Value)> {
    let mut body = response.bytes_stream();
    let (mut buffer, mut seen) = (String::new(), Vec::new());
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("the events came in time")
            .expect("the stream goes on")
            .expect("a chunk");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_owned();
            buffer.drain(..=end);
            if line.is_empty() {
                if let (Some(n), false) = (id.take(), data.is_empty()) {
                    let doc: Value = serde_json::from_str(&data).expect("an event document");
                    let done = stop(&event, &doc);
                    seen.push((n, std::mem::take(&mut event), doc));
                    if done {
                        return seen;
                    }
                }
                data.clear();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
    }
}

/// `GET /gpu/events` gives the history since `?since=` and then the live events; a client that comes
/// back with `Last-Event-ID` gets exactly the events after the last it saw, none lost or doubled.
#[tokio::test]
async fn the_event_stream_resumes_after_the_last_event_seen() {
    let config = test_config("http_events", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "a-1", "priority": 2, "vram_mb": 8000}),
        )
        .await;
    probe.reply("a-1", "granted").await;
    let c = client();
    let first = c
        .get(coordinator.url("/gpu/events?since=5m"))
        .send()
        .await
        .expect("the event stream");
    assert_eq!(first.status(), StatusCode::OK);
    let seen = sse_until(first, |kind, doc| {
        kind == "granted" && doc["request_id"] == "a-1"
    })
    .await;
    let kinds: Vec<&str> = seen.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["requested", "granted"], "the history since then");
    let last = seen.last().expect("events").0;

    // Cut off; meanwhile a-1 is released and b-1 granted.
    probe
        .pub_json("release", "asr", json!({"request_id": "a-1"}))
        .await;
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "b-1", "priority": 0, "vram_mb": 8000}),
        )
        .await;
    probe.reply("b-1", "granted").await;
    let again = c
        .get(coordinator.url("/gpu/events?since=5m"))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .expect("the event stream again");
    let rest = sse_until(again, |kind, doc| {
        kind == "granted" && doc["request_id"] == "b-1"
    })
    .await;
    let kinds: Vec<(&str, &str)> = rest
        .iter()
        .map(|(_, k, d)| (k.as_str(), d["request_id"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        kinds,
        [
            ("released", "a-1"),
            ("requested", "b-1"),
            ("granted", "b-1")
        ],
        "exactly the events after the last one seen"
    );
    assert!(rest.iter().all(|(id, ..)| *id > last));
    let (status, body) = get(&c, &coordinator.url("/gpu/events?since=yesterday"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap_or("").contains("since"),
        "{body}"
    );
    coordinator.stop().await.expect("a clean stop");
}

/// An operator's token (`"*"` in `[http.tokens]`) reads the status, the events and any service's control
/// stream, and acts for no service; without a token nothing is read.
#[tokio::test]
async fn an_operator_token_reads_everything_and_acts_for_no_service() {
    let mut config = test_config("http_operator", &[("0", 24_000)]);
    config.http.tokens.insert("op-token".into(), "*".into());
    config.http.tokens.insert("asr-token".into(), "asr".into());
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    for path in ["/gpu/status", "/gpu/events", "/gpu/control/asr"] {
        let answer = c
            .get(coordinator.url(path))
            .bearer_auth("op-token")
            .send()
            .await
            .expect("an answer");
        assert_eq!(answer.status(), StatusCode::OK, "{path}");
        let anonymous = c
            .get(coordinator.url(path))
            .send()
            .await
            .expect("an answer");
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        Some("op-token"),
        json!({"service_id": "asr", "request_id": "x", "priority": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["error"].as_str().unwrap_or("").contains("operator"),
        "{body}"
    );
    // The page itself needs no token: it asks for one.
    let page = c.get(coordinator.url("/")).send().await.expect("the page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page
        .text()
        .await
        .unwrap_or_default()
        .contains("<title>GPU Coordinator"));
    coordinator.stop().await.expect("a clean stop");
}
