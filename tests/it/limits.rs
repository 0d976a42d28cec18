//! `[services.<id>]` against a real coordinator: what a service may ask for is enforced over NATS and
//! HTTP alike, the defaults apply, and `audit` passes over the history.

use gpu_coordinator::audit::Since;
use gpu_coordinator::config::{Config, ServiceConfig};
use reqwest::StatusCode;
use serde_json::json;

use crate::http::{client, error_of, post};
use crate::support::{test_config, Coordinator, Probe};

/// A coordinator's configuration with these `[services.<id>]` sections.
fn with_services(mut config: Config, sections: &[(&str, ServiceConfig)]) -> Config {
    for (id, section) in sections {
        config
            .services
            .named
            .insert(id.to_string(), section.clone());
    }
    config
}

#[tokio::test]
async fn a_priority_0_request_of_a_service_capped_at_2_is_rejected_over_nats_and_http() {
    let batch = ServiceConfig {
        max_priority: Some(2),
        ..Default::default()
    };
    let idx = ServiceConfig {
        max_priority: Some(2),
        clamp_priority: Some(true),
        default_priority: Some(3),
        default_vram_mb: Some(1_000),
        ..Default::default()
    };
    let mut config = with_services(
        test_config("limits_prio", &[("0", 24_000)]),
        &[
            ("batch", batch),
            ("idx", idx),
            ("chat", ServiceConfig::default()),
        ],
    );
    config.services.allow_unknown = false;
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let c = client();

    // Over NATS: rejected, the reply and the event naming the limit.
    probe
        .pub_json(
            "request",
            "batch",
            json!({"request_id": "b-nats", "priority": 0, "vram_mb": 1000}),
        )
        .await;
    let reply = probe.reply("b-nats", "rejected").await;
    let error = reply.error.unwrap_or_default();
    assert!(
        error.contains("field `priority`: 0 is more urgent than service `batch` may ask for")
            && error.contains("`services.batch.max_priority` is 2"),
        "{error}"
    );
    let event = probe.event("rejected", Some("b-nats")).await;
    assert_eq!(event.priority, Some(0), "the request's own rejection");

    // Over HTTP: 400, with the same sentence.
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "batch", "request_id": "b-http", "priority": 0, "vram_mb": 1000}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        error_of(&body).contains("`services.batch.max_priority` is 2"),
        "{body}"
    );

    // At its limit it is granted, over either.
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "batch", "request_id": "b-2", "priority": 2, "vram_mb": 1000}),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::OK, Some("granted"))
    );

    // A clamped service: priority 0 is taken at 2, and its `requested` event says so.
    probe
        .pub_json(
            "request",
            "idx",
            json!({"request_id": "i-0", "priority": 0, "vram_mb": 1000}),
        )
        .await;
    probe.reply("i-0", "granted").await;
    let requested = probe.event("requested", Some("i-0")).await;
    assert_eq!(requested.priority, Some(2));
    assert!(
        requested
            .detail
            .unwrap_or_default()
            .contains("priority 0 taken as 2"),
        "the event says it was clamped"
    );

    // Over HTTP a body may leave priority and VRAM out: the service's defaults.
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "idx", "request_id": "i-default"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["vram_mb"], 1000);
    let status = probe.status().await;
    let holder = status.gpus[0]
        .holders
        .iter()
        .find(|h| h.request_id == "i-default")
        .expect("i-default holds");
    assert_eq!((holder.priority, holder.vram_mb), (3, 1_000));

    // A service without a section is refused: services.allow_unknown is false.
    probe
        .pub_json(
            "request",
            "stranger",
            json!({"request_id": "s-0", "priority": 5, "vram_mb": 1000}),
        )
        .await;
    let reply = probe.reply("s-0", "rejected").await;
    assert!(
        reply
            .error
            .unwrap_or_default()
            .contains("`services.allow_unknown` is false"),
        "the reply names the setting"
    );

    let summary = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read")
        .unwrap_or_else(|v| panic!("the history was judged broken:\n{v}"));
    assert_eq!(summary.grants, 3, "{summary}");
    coordinator.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_capped_service_waits_for_its_own_leases_and_others_pass_it() {
    let batch = ServiceConfig {
        max_vram_mb: Some(10_000),
        ..Default::default()
    };
    let config = with_services(
        test_config("limits_cap", &[("0", 24_000)]),
        &[("batch", batch)],
    );
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;

    for id in ["b-1", "b-2"] {
        probe
            .pub_json(
                "request",
                "batch",
                json!({"request_id": id, "priority": 2, "vram_mb": 4000}),
            )
            .await;
        probe.reply(id, "granted").await;
    }
    // 8000 held: 4000 more would pass its 10000. It waits, though the GPU has 16000 free.
    probe
        .pub_json(
            "request",
            "batch",
            json!({"request_id": "b-3", "priority": 2, "vram_mb": 4000}),
        )
        .await;
    probe.event("queued", Some("b-3")).await;
    // More than its cap alone: rejected at once.
    probe
        .pub_json(
            "request",
            "batch",
            json!({"request_id": "b-big", "priority": 2, "vram_mb": 12000}),
        )
        .await;
    let reply = probe.reply("b-big", "rejected").await;
    assert!(
        reply
            .error
            .unwrap_or_default()
            .contains("`services.batch.max_vram_mb` is 10000 MB"),
        "the reply names the cap"
    );
    // Another service passes the waiting one.
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "c-1", "priority": 3, "vram_mb": 8000}),
        )
        .await;
    probe.reply("c-1", "granted").await;
    // batch releases one of its own: b-3 is granted.
    let status = probe.status().await;
    let fence = status.gpus[0]
        .holders
        .iter()
        .find(|h| h.request_id == "b-1")
        .map(|h| h.fence);
    probe
        .pub_json(
            "release",
            "batch",
            json!({"request_id": "b-1", "fence": fence}),
        )
        .await;
    probe.reply("b-3", "granted").await;

    let summary = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read")
        .unwrap_or_else(|v| panic!("the history was judged broken:\n{v}"));
    assert_eq!(summary.grants, 4, "{summary}");
    coordinator.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_service_under_its_guarantee_takes_vram_back_from_a_more_urgent_borrower() {
    let chat = ServiceConfig {
        guaranteed_vram_mb: Some(16_000),
        ..Default::default()
    };
    let asr = ServiceConfig {
        guaranteed_vram_mb: Some(8_000),
        ..Default::default()
    };
    let config = with_services(
        test_config("limits_reclaim", &[("0", 24_000)]),
        &[("chat", chat), ("asr", asr)],
    );
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;

    // asr is idle: chat borrows its guarantee (4000 beyond chat's own 16000).
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "vram_mb": 20000}),
        )
        .await;
    let chat = probe.reply("chat-1", "granted").await;
    // The status says what each service holds against its guarantee.
    let status = probe.status().await;
    let row = |status: &gpu_coordinator_wire::StatusDoc, id: &str| {
        status
            .services
            .iter()
            .find(|s| s.service_id == id)
            .map(|s| (s.used_mb, s.borrowed_mb, s.guaranteed_vram_mb))
    };
    assert_eq!(row(&status, "chat"), Some((20_000, 4_000, Some(16_000))));
    assert_eq!(row(&status, "asr"), Some((0, 0, Some(8_000))));
    // asr asks within its guarantee, less urgent than chat: a reclaim pauses chat.
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 8000}),
        )
        .await;
    let pause = probe.control("chat-1", "pause").await;
    assert!(
        pause
            .reason
            .contains("takes back VRAM within its guarantee of 8000 MB"),
        "{}",
        pause.reason
    );
    let preempting = probe.event("preempting", Some("chat-1")).await;
    assert_eq!(preempting.reclaim_for.as_deref(), Some("asr"));
    probe
        .pub_json(
            "ack",
            "chat",
            json!({"request_id": "chat-1", "fence": chat.fence, "action": "paused"}),
        )
        .await;
    let asr = probe.reply("asr-1", "granted").await;
    assert_eq!(asr.vram_mb, Some(8_000));
    // chat, paused for 20000, borrows: it does not take asr's guaranteed VRAM back by priority.
    let status = probe.status().await;
    assert_eq!(status.paused.len(), 1, "{status:?}");
    assert_eq!(status.gpus[0].holders.len(), 1, "{status:?}");
    assert_eq!(row(&status, "asr"), Some((8_000, 0, Some(8_000))));
    assert_eq!(row(&status, "chat"), Some((0, 0, Some(16_000))));
    // So do the metrics, with the reclaim counted for asr.
    let c = client();
    let metrics = c
        .get(coordinator.url("/metrics"))
        .send()
        .await
        .expect("the metrics are answered")
        .text()
        .await
        .expect("text");
    for line in [
        "gpu_coordinator_reclaims_total{service=\"asr\"} 1",
        "gpu_coordinator_service_vram_used_bytes{service=\"asr\"} 8388608000",
        "gpu_coordinator_service_vram_guaranteed_bytes{service=\"chat\"} 16777216000",
        "gpu_coordinator_service_vram_borrowed_bytes{service=\"chat\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // The story, as the event stream tells it.
    let events = c
        .get(coordinator.url("/gpu/events?since=1h&format=jsonl"))
        .send()
        .await
        .expect("the events are answered")
        .text()
        .await
        .expect("JSON lines");
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).expect("an event");
        println!(
            "{:<11} {:<7} {:<5} priority {}{}{}",
            e["kind"].as_str().unwrap_or_default(),
            e["request_id"].as_str().unwrap_or_default(),
            e["service_id"].as_str().unwrap_or_default(),
            e["priority"],
            e["reclaim_for"]
                .as_str()
                .map(|s| format!("  reclaim_for {s}"))
                .unwrap_or_default(),
            e["detail"]
                .as_str()
                .map(|d| format!("  {d:?}"))
                .unwrap_or_default(),
        );
    }
    assert!(events.contains("\"reclaim_for\":\"asr\""), "{events}");

    let summary = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read")
        .unwrap_or_else(|v| panic!("the history was judged broken:\n{v}"));
    assert_eq!((summary.grants, summary.preemptions), (2, 1), "{summary}");
    coordinator.stop().await.expect("stops cleanly");
}
