//! The coordinator end to end over real NATS JetStream, Redis and Postgres, driven exactly as services
//! (or a person with the `nats` CLI) drive it.

use async_nats::HeaderMap;
use gpu_coordinator_wire::{Encoding, HolderState, RequestMsg};
use serde_json::json;

use crate::support::{test_config, Coordinator, Probe};

/// The seed's sequence: a background holder; chat at priority 0 asks; `pause` to the holder; no grant
/// before its ACK; ACK; grant to chat; release; `resume` to the holder; fences increasing throughout.
#[tokio::test]
async fn chat_preempts_background_then_background_resumes() {
    let config = test_config("seed", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;

    probe
        .pub_json("request", "asr", json!({"request_id": "asr-1", "priority": 2, "vram_mb": 20000}))
        .await;
    let asr = probe.reply("asr-1", "granted").await;
    assert_eq!(asr.gpu.as_deref(), Some("0"));
    let asr_fence = asr.fence.expect("a grant carries a fence");

    probe
        .pub_json("request", "chat", json!({"request_id": "chat-1", "priority": 0, "vram_mb": 8000}))
        .await;
    let pause = probe.control("asr-1", "pause").await;
    assert_eq!(pause.fence, asr_fence);
    assert!(pause.deadline_ms.is_some());
    probe.event("preempting", Some("asr-1")).await;

    // Inputs are handled in order: a status asked after the pause shows the holder still holding.
    let status = probe.status().await;
    let holders = &status.gpus[0].holders;
    assert_eq!(holders.len(), 1, "{status:?}");
    assert_eq!(holders[0].request_id, "asr-1");
    assert_eq!(holders[0].state, HolderState::Pausing);
    assert_eq!(status.queue[0].request_id, "chat-1");
    assert!(!probe.drain_and_find(|s| s.str("request_id") == Some("chat-1")
        && s.str("outcome") == Some("granted")));

    probe
        .pub_json("ack", "asr", json!({"request_id": "asr-1", "fence": asr_fence, "action": "paused"}))
        .await;
    probe.event("paused", Some("asr-1")).await;
    let chat = probe.reply("chat-1", "granted").await;
    let chat_fence = chat.fence.expect("fence");
    assert!(chat_fence > asr_fence);

    probe
        .pub_json("release", "chat", json!({"request_id": "chat-1", "fence": chat_fence}))
        .await;
    probe.reply("chat-1", "released").await;
    let resume = probe.control("asr-1", "resume").await;
    assert!(resume.fence > chat_fence, "resume carries a new fence");
    probe.event("resumed", Some("asr-1")).await;

    // The resumed holder renews and releases under its new fence; the old one is stale.
    probe
        .pub_json("renew", "asr", json!({"request_id": "asr-1", "fence": asr_fence}))
        .await;
    let stale = probe.reply("asr-1", "rejected").await;
    assert!(stale.error.unwrap_or_default().contains("stale fence"));
    probe
        .pub_json("release", "asr", json!({"request_id": "asr-1", "fence": resume.fence}))
        .await;
    probe.reply("asr-1", "released").await;
    coordinator.stop().await.expect("a clean stop");
}

/// MessagePack in, MessagePack out, with the header; JSON without it.
#[tokio::test]
async fn msgpack_requests_get_msgpack_replies() {
    let config = test_config("msgpack", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let request = RequestMsg {
        request_id: Some("mp-1".into()),
        service_id: None,
        priority: 1,
        timeout_ms: None,
        lease_ms: Some(5_000),
        vram_mb: Some(1_000),
        gpu: None,
        preemptible: None,
    };
    probe.pub_msgpack("request", "diar", &request).await;
    let granted = probe
        .expect("msgpack grant", |s| {
            s.str("request_id") == Some("mp-1") && s.str("outcome") == Some("granted")
        })
        .await;
    assert_eq!(granted.encoding, Encoding::MsgPack);
    assert_eq!(granted.json["lease_ms"], 5_000);

    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "json-1");
    probe
        .js_pub("request", "diar", headers, br#"{"request_id":"json-1","priority":1,"vram_mb":1000}"#.to_vec())
        .await;
    let json_grant = probe
        .expect("json grant", |s| s.str("request_id") == Some("json-1") && s.str("outcome") == Some("granted"))
        .await;
    assert_eq!(json_grant.encoding, Encoding::Json);
    coordinator.stop().await.expect("a clean stop");
}
