//! The HTTP API under a hostile client: one that trickles its headers, one that holds streams open, a
//! service token that looks at other services, a page framed or fed a script by another site.

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::http::{client, error_of, get, post, SseReader};
use crate::support::{eventually, test_config, Coordinator, Probe, DEADLINE};

/// Whether the server has closed `conn`: it reads an end of file (or a reset) without waiting.
fn closed_by_server(conn: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match conn.try_read(&mut buf) {
        Ok(0) => true,
        // Whatever was answered before the end (nothing here) is not a close yet.
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Waits until the server closes `conn`, failing after [`DEADLINE`]; returns what it sent first.
async fn until_closed(mut conn: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept a connection with half a header open for {DEADLINE:?} (sent {:?})",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// A connection that sends half a request's headers and then nothing: the server closes it after
/// `http.header_read_timeout_ms`. With `http.max_connections` such connections open, a well-behaved
/// client is not refused: it is served, once the server has dropped a slow one to make room.
#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_bounded() {
    let mut config = test_config("http_slow", &[("0", 24_000)]);
    config.http.header_read_timeout_ms = 500;
    config.http.max_connections = 3;
    let coordinator = Coordinator::start(config.clone()).await;
    let addr = coordinator.http_addr;

    let mut slow = Vec::new();
    for _ in 0..config.http.max_connections {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: coordinator\r\nX-Slow: ")
            .await
            .expect("half a header");
        slow.push(conn);
    }

    // A well-behaved client, on its own connection beyond the limit.
    let mut polite = TcpStream::connect(addr).await.expect("connect");
    polite
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: coordinator\r\nConnection: close\r\n\r\n")
        .await
        .expect("a whole request");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, polite.read_to_end(&mut answer))
        .await
        .expect("the well-behaved client is served in time")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // It was served only after the server had closed a slow connection to make room: the close was
    // sent before the answer, so it is already there to read.
    assert!(
        slow.iter().any(closed_by_server),
        "the server answered a fourth connection while three were open, beyond http.max_connections"
    );

    // Every slow connection is closed, and none was answered as if its request were whole.
    for conn in slow {
        let sent = until_closed(conn).await;
        let sent = String::from_utf8_lossy(&sent);
        assert!(!sent.contains("200 OK"), "{sent}");
    }
    // Room again: an ordinary client is served at once.
    let (status, _) = get(&client(), &coordinator.url("/healthz"), None).await;
    assert_eq!(status, StatusCode::OK);
    coordinator.stop().await.expect("a clean stop");
}

/// A GET that holds its answer's stream open: its status, and the response to keep (dropping it closes
/// the stream and frees its slot).
async fn open(c: &reqwest::Client, url: &str, token: &str) -> reqwest::Response {
    c.get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("an answer")
}

/// Every long-lived stream takes a slot, the JSON-lines history as well as the SSE streams; a service's
/// token fills only its own slots, so the operator's event streams still open when it has taken every
/// slot it may (and when the services' streams in all are at `http.max_streams`).
#[tokio::test]
async fn every_stream_takes_a_slot_and_the_operator_keeps_its_own() {
    let mut config = test_config("http_slots", &[("0", 24_000)]);
    config.http.max_streams_per_service = 1;
    config.http.max_streams = 1;
    for (token, service) in [("op", "*"), ("tok-a", "a"), ("tok-b", "b")] {
        config.http.tokens.insert(token.into(), service.into());
    }
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let events = coordinator.url("/gpu/events");
    let jsonl = coordinator.url("/gpu/events?since=5m&format=jsonl");

    // Service a takes its one slot with an event stream.
    let a_events = open(&c, &events, "tok-a").await;
    assert_eq!(a_events.status(), StatusCode::OK);
    // The JSON-lines history is a stream too: a has no slot left for it.
    let refused = open(&c, &jsonl, "tok-a").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.expect("json");
    assert!(
        error_of(&body).contains("max_streams_per_service"),
        "{body}"
    );
    // Nor for a control stream of its own.
    let refused = open(&c, &coordinator.url("/gpu/control/a"), "tok-a").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // The services' streams in all are at http.max_streams: b is refused too.
    let refused = open(&c, &coordinator.url("/gpu/control/b"), "tok-b").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.expect("json");
    assert!(error_of(&body).contains("http.max_streams"), "{body}");

    // The operator's page still opens its event stream: its slots are its own.
    let op_events = open(&c, &events, "op").await;
    assert_eq!(op_events.status(), StatusCode::OK);
    let mut reader = SseReader::new(op_events);
    // ...and its one slot is then taken, by the JSON lines as by the SSE.
    let refused = open(&c, &jsonl, "op").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);

    // Closing a's stream gives its slot back; the JSON lines then answer, and end.
    drop(a_events);
    let history = eventually("a's closed stream frees its slot", || async {
        let res = open(&c, &jsonl, "tok-a").await;
        (res.status() == StatusCode::OK).then_some(res)
    })
    .await;
    let text = tokio::time::timeout(DEADLINE, history.text())
        .await
        .expect("the history ends")
        .expect("the history");
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{text}"
    );
    // The operator's stream is live all along.
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1_000}),
        )
        .await;
    probe.reply("a-1", "granted").await;
    let first = reader.next().await;
    assert_eq!(first.event, "requested", "{first:?}");
    drop(reader);
    coordinator.stop().await.expect("a clean stop");
}

/// With tokens configured, a service's token sees only its own service's entries of the status and the
/// events, never another's request ids or fences, and not the metrics; the operator's token sees all.
#[tokio::test]
async fn a_service_token_sees_only_its_own_service() {
    let mut config = test_config("http_scoped", &[("0", 24_000)]);
    for (token, service) in [("op", "*"), ("tok-chat", "chat"), ("tok-asr", "asr")] {
        config.http.tokens.insert(token.into(), service.into());
    }
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    // chat holds the whole GPU; asr waits behind it.
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "c-1", "priority": 1, "vram_mb": 24_000, "lease_ms": 600_000}),
        )
        .await;
    let granted = probe.reply("c-1", "granted").await;
    let fence = granted.fence.expect("a fence");
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 8_000}),
        )
        .await;
    probe.event("queued", Some("a-1")).await;
    let c = client();

    // The status: asr sees its queued request and the GPU's figures, nothing of chat's lease.
    let (status, doc) = get(&c, &coordinator.url("/gpu/status"), Some("tok-asr")).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["queue"][0]["request_id"], "a-1", "{doc}");
    assert_eq!(doc["gpus"][0]["holders"], json!([]), "{doc}");
    assert_eq!(
        doc["gpus"][0]["used_mb"], 24_000,
        "the GPU's figures stay: {doc}"
    );
    let text = doc.to_string();
    assert!(!text.contains("chat") && !text.contains("c-1"), "{doc}");
    // chat sees its lease, and not asr's request.
    let (_, doc) = get(&c, &coordinator.url("/gpu/status"), Some("tok-chat")).await;
    assert_eq!(doc["gpus"][0]["holders"][0]["request_id"], "c-1", "{doc}");
    assert_eq!(doc["gpus"][0]["holders"][0]["fence"], fence, "{doc}");
    assert_eq!(doc["queue"], json!([]), "{doc}");
    assert!(!doc.to_string().contains("asr"), "{doc}");
    // The operator sees both.
    let (_, doc) = get(&c, &coordinator.url("/gpu/status"), Some("op")).await;
    assert_eq!(doc["gpus"][0]["holders"][0]["request_id"], "c-1", "{doc}");
    assert_eq!(doc["queue"][0]["request_id"], "a-1", "{doc}");

    // The events, as JSON lines: asr's only.
    let history = |token: &'static str| {
        let (c, url) = (
            c.clone(),
            coordinator.url("/gpu/events?since=5m&format=jsonl"),
        );
        async move {
            let text = open(&c, &url, token)
                .await
                .text()
                .await
                .expect("the history");
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("an event document"))
                .collect::<Vec<_>>()
        }
    };
    let asr_events = history("tok-asr").await;
    let services: Vec<&str> = asr_events
        .iter()
        .map(|e| e["service_id"].as_str().unwrap_or(""))
        .collect();
    assert!(!services.is_empty(), "asr's own events are there");
    assert!(services.iter().all(|s| *s == "asr"), "{asr_events:?}");
    let all = history("op").await;
    assert!(all.iter().any(|e| e["service_id"] == "chat"), "{all:?}");
    // ...and as Server-Sent Events: the first asr reads is its own request, not chat's before it.
    let res = open(&c, &coordinator.url("/gpu/events?since=5m"), "tok-asr").await;
    assert_eq!(res.status(), StatusCode::OK);
    let first = SseReader::new(res).next().await;
    let first: Value = serde_json::from_str(&first.data).expect("an event document");
    assert_eq!(
        (first["service_id"].as_str(), first["request_id"].as_str()),
        (Some("asr"), Some("a-1")),
        "{first}"
    );

    // The metrics are every service's: the operator's only.
    let res = open(&c, &coordinator.url("/metrics"), "tok-asr").await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = open(&c, &coordinator.url("/metrics"), "op").await;
    assert_eq!(res.status(), StatusCode::OK);
    // A service still acts for itself.
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/cancel"),
        Some("tok-asr"),
        json!({"request_id": "a-1"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    coordinator.stop().await.expect("a clean stop");
}

/// The page and every answer of the API carry a Content-Security-Policy that lets the page load only
/// its own script, style and calls, and headers that keep other sites from framing it or the browser
/// from guessing types.
#[tokio::test]
async fn answers_carry_security_headers() {
    let config = test_config("http_headers", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config).await;
    let c = client();
    for path in [
        "/",
        "/ui",
        "/ui/app.js",
        "/ui/style.css",
        "/gpu/status",
        "/healthz",
        "/openapi.json",
        "/no-such-route",
    ] {
        let res = c
            .get(coordinator.url(path))
            .send()
            .await
            .expect("an answer");
        let h = res.headers();
        let csp = h
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{path}: no Content-Security-Policy"));
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(
            h.get("x-frame-options").map(|v| v.as_bytes()),
            Some(&b"DENY"[..]),
            "{path}"
        );
        assert_eq!(
            h.get("x-content-type-options").map(|v| v.as_bytes()),
            Some(&b"nosniff"[..]),
            "{path}"
        );
    }
    // The page loads no inline script or style, which the policy would block.
    let page = c
        .get(coordinator.url("/"))
        .send()
        .await
        .expect("the page")
        .text()
        .await
        .expect("its text");
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "{page}"
    );
    coordinator.stop().await.expect("a clean stop");
}
