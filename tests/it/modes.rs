//! The HTTP acceptance flows against both modes from one test body: distributed (NATS, Redis,
//! Postgres) and embedded (SQLite, in-process leases, the embedded bus; no server). Then what only the
//! embedded mode has to prove: a `kill -9` loses no acknowledged request, a second coordinator on the
//! same data directory stands by, and the history is replayable (`GET /gpu/events`, `audit`).

use std::time::Duration;

use gpu_coordinator::audit::Since;
use gpu_coordinator::config::{BusBackend, LeasesBackend};
use gpu_coordinator_wire::StatusDoc;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::http::{client, error_of, get, post, SseReader};
use crate::support::{
    embedded_config, eventually, test_config, wait_ready_http, Coordinator, CoordinatorProcess,
};

/// Every HTTP flow a service without NATS uses, as one story: a long poll granted and one timed out,
/// a repeated id, renew, status with VRAM and holder, pause over SSE -> ACK -> grant -> resume,
/// release, a stale fence and bad bodies refused with a readable 400.
async fn acceptance(coordinator: &Coordinator) {
    let c = client();
    let url = |path: &str| coordinator.url(path);

    let (status, asr) = post(
        &c,
        &url("/gpu/request"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "priority": 2, "vram_mb": 20_000}),
    )
    .await;
    assert_eq!(
        (status, asr["outcome"].as_str()),
        (StatusCode::OK, Some("granted")),
        "{asr}"
    );
    let asr_fence = asr["fence"].as_u64().expect("a fence");

    // The same id again: the request's state, not a second request.
    let (status, again) = post(
        &c,
        &url("/gpu/request"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "priority": 2, "vram_mb": 20_000}),
    )
    .await;
    assert_eq!(
        (status, again["fence"].as_u64()),
        (StatusCode::OK, Some(asr_fence))
    );

    // Not placeable beside it, and not urgent enough to preempt: it times out.
    let (status, timed_out) = post(
        &c,
        &url("/gpu/request"),
        None,
        json!({"service_id": "bg", "request_id": "bg-1", "priority": 3, "vram_mb": 10_000,
               "timeout_ms": 200}),
    )
    .await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{timed_out}");
    assert!(error_of(&timed_out).contains("timeout_ms"), "{timed_out}");

    let (status, renewed) = post(
        &c,
        &url("/gpu/renew"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "fence": asr_fence, "lease_ms": 60_000}),
    )
    .await;
    assert_eq!(
        (
            status,
            renewed["outcome"].as_str(),
            renewed["lease_ms"].as_u64()
        ),
        (StatusCode::OK, Some("renewed"), Some(60_000)),
        "{renewed}"
    );

    let (status, doc) = get(&c, &url("/gpu/status"), None).await;
    assert_eq!(status, StatusCode::OK);
    let doc: StatusDoc = serde_json::from_value(doc).expect("a status document");
    assert_eq!(doc.gpus[0].total_mb, 24_576);
    assert_eq!(doc.gpus[0].holders.len(), 1);
    assert_eq!(doc.gpus[0].holders[0].request_id, "asr-1");
    assert_eq!(doc.gpus[0].holders[0].vram_mb, 20_000);

    // The control stream, open before the urgent request: pause -> ACK -> grant -> resume.
    let res = c
        .get(url("/gpu/control/asr"))
        .send()
        .await
        .expect("the control stream opens");
    assert_eq!(res.status(), StatusCode::OK);
    let mut orders = SseReader::new(res);
    let chat = tokio::spawn({
        let (c, url) = (c.clone(), url("/gpu/request"));
        async move {
            post(
                &c,
                &url,
                None,
                json!({"service_id": "chat", "request_id": "chat-1", "priority": 0, "vram_mb": 8_000}),
            )
            .await
        }
    });
    let pause = orders.next().await;
    assert_eq!(pause.event, "pause", "{}", pause.data);
    let order: Value = serde_json::from_str(&pause.data).expect("a control document");
    assert_eq!(order["fence"].as_u64(), Some(asr_fence));
    let (status, acked) = post(
        &c,
        &url("/gpu/ack"),
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
    let chat_fence = chat["fence"].as_u64().expect("a fence");
    assert!(chat_fence > asr_fence, "fences rise");

    // A stale fence is refused, with a reason a person can act on.
    let (status, stale) = post(
        &c,
        &url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": "chat-1", "fence": chat_fence + 100}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{stale}");
    assert!(error_of(&stale).contains("stale fence"), "{stale}");

    let (status, released) = post(
        &c,
        &url("/gpu/release"),
        None,
        json!({"service_id": "chat", "request_id": "chat-1", "fence": chat_fence}),
    )
    .await;
    assert_eq!(
        (status, released["outcome"].as_str()),
        (StatusCode::OK, Some("released")),
        "{released}"
    );
    let resume = orders.next().await;
    assert_eq!(resume.event, "resume", "{}", resume.data);
    let order: Value = serde_json::from_str(&resume.data).expect("a control document");
    let resume_fence = order["fence"].as_u64().expect("a fence");
    assert!(resume_fence > chat_fence, "resume carries a new fence");
    let (status, _) = post(
        &c,
        &url("/gpu/release"),
        None,
        json!({"service_id": "asr", "request_id": "asr-1", "fence": resume_fence}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Bad input: 400 with a sentence that names what is wrong; nothing is queued.
    for (body, says) in [
        ("{not json", "not valid JSON"),
        (r#"{"service_id": "chat"}"#, "priority"),
        (r#"{"service_id": "chat", "priority": "high"}"#, "priority"),
        (r#"{"service_id": "bad id!", "priority": 1}"#, "service_id"),
    ] {
        let (status, answer) = post(&c, &url("/gpu/request"), None, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(error_of(&answer).contains(says), "{body}: {answer}");
    }
    let (_, doc) = get(&c, &url("/gpu/status"), None).await;
    let doc: StatusDoc = serde_json::from_value(doc).expect("a status document");
    assert!(
        doc.queue.is_empty() && doc.gpus[0].holders.is_empty(),
        "{doc:?}"
    );
}

#[tokio::test]
async fn http_flows_distributed() {
    let config = test_config("modes_dist", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    acceptance(&coordinator).await;
    let checked = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history is readable")
        .expect("every rule held");
    assert!(checked.records > 10, "{checked}");
    coordinator.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn http_flows_embedded() {
    let config = embedded_config("modes_emb", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    acceptance(&coordinator).await;

    // The history is kept and replayable: as JSON lines, and through `audit`.
    let text = client()
        .get(coordinator.url("/gpu/events?since=1h&format=jsonl"))
        .send()
        .await
        .expect("the events are answered")
        .text()
        .await
        .expect("a body");
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("one JSON document per line")["kind"]
                .as_str()
                .expect("a kind")
                .to_owned()
        })
        .collect();
    for kind in [
        "requested",
        "granted",
        "preempting",
        "paused",
        "resumed",
        "released",
        "timed_out",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    let checked = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history is readable")
        .expect("every rule held");
    assert!(checked.records > 10, "{checked}");
    coordinator.stop().await.expect("a clean stop");
    let _ = std::fs::remove_dir_all(&config.embedded.data_dir);
}

/// Backends mixed: the journal in SQLite, the leases in Redis, the bus on NATS (a box that already runs
/// NATS). The same flows, and the history on NATS keeps every rule.
#[tokio::test]
async fn http_flows_with_sqlite_beside_nats_and_redis() {
    let mut config = embedded_config("modes_mix", &[("0", 24_576)]);
    config.backends.leases = LeasesBackend::Redis;
    config.backends.bus = BusBackend::Nats;
    config.backends.one_box = true;
    config.validate().expect("a mix for one box, confirmed");
    let coordinator = Coordinator::start(config.clone()).await;
    acceptance(&coordinator).await;
    let checked = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history is readable")
        .expect("every rule held");
    assert!(checked.records > 10, "{checked}");
    coordinator.stop().await.expect("a clean stop");
    assert!(
        std::path::Path::new(&config.embedded.data_dir)
            .join("coordinator.db")
            .exists(),
        "the journal is the SQLite file"
    );
    let _ = std::fs::remove_dir_all(&config.embedded.data_dir);
}

/// The queue in grant order, as `GET /gpu/status` lists it.
async fn queue(base: &str) -> Vec<(String, u8)> {
    let (_, doc) = get(&client(), &format!("{base}/gpu/status"), None).await;
    let doc: StatusDoc = serde_json::from_value(doc).expect("a status document");
    doc.queue
        .iter()
        .map(|q| (q.request_id.clone(), q.priority))
        .collect()
}

/// `kill -9` of an embedded coordinator with 50 requests of two priorities queued behind a holder:
/// after the restart the holder still holds under its fence, the queue is in the same order, and every
/// request is granted in that order with fences rising. Then a second coordinator on the same data
/// directory stands by until the first stops.
#[tokio::test]
async fn embedded_kill_9_loses_no_acknowledged_request() {
    let mut config = embedded_config("modes_kill", &[("0", 24_576)]);
    config.http.listen = format!("127.0.0.1:{}", gpu_coordinator_test_support::free_port());
    config.request.default_timeout_ms = 600_000;
    let base = format!("http://{}", config.http.listen);
    let c = client();
    let process = CoordinatorProcess::start(&config).await;

    let (status, held) = post(
        &c,
        &format!("{base}/gpu/request"),
        None,
        json!({"service_id": "holder", "request_id": "h", "priority": 0, "lease_ms": 600_000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{held}");
    let held_fence = held["fence"].as_u64().expect("a fence");
    // Whole-GPU requests, priorities 1 and 2 by turns: each waits behind the holder. Their long polls
    // are cut by the kill; the requests were acknowledged once the queue shows them.
    let waiting: Vec<_> = (0..50)
        .map(|i| {
            let (c, url) = (c.clone(), format!("{base}/gpu/request"));
            tokio::spawn(async move {
                let body = json!({"service_id": "batch", "request_id": format!("r{i:02}"),
                                  "priority": 1 + i % 2});
                let _ = c.post(url).json(&body).send().await;
            })
        })
        .collect();
    let before = eventually("the 50 requests queued", || {
        let base = base.clone();
        async move {
            let q = queue(&base).await;
            (q.len() == 50).then_some(q)
        }
    })
    .await;
    let priorities: Vec<u8> = before.iter().map(|(_, p)| *p).collect();
    assert!(priorities.windows(2).all(|w| w[0] <= w[1]), "{before:?}");

    process.kill();
    for w in waiting {
        w.abort();
    }
    let process = CoordinatorProcess::start(&config).await;
    assert_eq!(
        queue(&base).await,
        before,
        "the same queue, in the same order"
    );
    let (_, doc) = get(&c, &format!("{base}/gpu/status"), None).await;
    let doc: StatusDoc = serde_json::from_value(doc).expect("a status document");
    assert_eq!(
        doc.gpus[0]
            .holders
            .iter()
            .map(|h| (h.request_id.as_str(), h.fence))
            .collect::<Vec<_>>(),
        [("h", held_fence)],
        "the holder still holds under its fence"
    );

    // Released, the queue drains in its order: each asked again by its id gets its grant.
    let (status, _) = post(
        &c,
        &format!("{base}/gpu/release"),
        None,
        json!({"service_id": "holder", "request_id": "h", "fence": held_fence}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut last = held_fence;
    for (id, _) in &before {
        let (status, granted) = post(
            &c,
            &format!("{base}/gpu/request"),
            None,
            json!({"service_id": "batch", "request_id": id, "priority": 1}),
        )
        .await;
        assert_eq!(
            (status, granted["outcome"].as_str()),
            (StatusCode::OK, Some("granted")),
            "{id}: {granted}"
        );
        let fence = granted["fence"].as_u64().expect("a fence");
        assert!(fence > last, "fences rise: {fence} after {last}");
        last = fence;
        let (status, released) = post(
            &c,
            &format!("{base}/gpu/release"),
            None,
            json!({"service_id": "batch", "request_id": id, "fence": fence}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{released}");
    }

    // A second coordinator on the same directory stands by: it does not answer while the first runs,
    // and takes over once the first is gone.
    let mut second_config = config.clone();
    second_config.http.listen = format!("127.0.0.1:{}", gpu_coordinator_test_support::free_port());
    let second_base = format!("http://{}", second_config.http.listen);
    let second = tokio::spawn(async move { CoordinatorProcess::start(&second_config).await });
    let answered = client()
        .get(format!("{second_base}/gpu/status"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    if let Ok(res) = answered {
        assert_eq!(
            res.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "a standby answers 503"
        );
    }
    assert!(!second.is_finished(), "the second waits for the lock");
    process.kill();
    let second = second
        .await
        .expect("the second starts once the first is gone");
    let doc = wait_ready_http(&second_base).await;
    assert!(doc.queue.is_empty() && doc.gpus[0].holders.is_empty());
    let checked = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history is readable")
        .expect("every rule held across the kill");
    assert!(checked.records > 100, "{checked}");
    second.kill();
    let _ = std::fs::remove_dir_all(&config.embedded.data_dir);
}
