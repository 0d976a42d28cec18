//! The coordinator end to end over real NATS JetStream, Redis and Postgres, driven exactly as services
//! (or a person with the `nats` CLI) drive it.

use async_nats::HeaderMap;
use gpu_coordinator_wire::{Encoding, HolderState, RequestMsg};
use serde_json::json;

use crate::support::{eventually, test_config, Coordinator, Probe};

/// The seed's sequence: a background holder; chat at priority 0 asks; `pause` to the holder; no grant
/// before its ACK; ACK; grant to chat; release; `resume` to the holder; fences increasing throughout.
#[tokio::test]
async fn chat_preempts_background_then_background_resumes() {
    let config = test_config("seed", &[("0", 24_576)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;

    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 20000}),
        )
        .await;
    let asr = probe.reply("asr-1", "granted").await;
    assert_eq!(asr.gpu.as_deref(), Some("0"));
    let asr_fence = asr.fence.expect("a grant carries a fence");

    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "vram_mb": 8000}),
        )
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
    assert!(!probe.drain_and_find(
        |s| s.str("request_id") == Some("chat-1") && s.str("outcome") == Some("granted")
    ));

    probe
        .pub_json(
            "ack",
            "asr",
            json!({"request_id": "asr-1", "fence": asr_fence, "action": "paused"}),
        )
        .await;
    probe.event("paused", Some("asr-1")).await;
    let chat = probe.reply("chat-1", "granted").await;
    let chat_fence = chat.fence.expect("fence");
    assert!(chat_fence > asr_fence);

    probe
        .pub_json(
            "release",
            "chat",
            json!({"request_id": "chat-1", "fence": chat_fence}),
        )
        .await;
    probe.reply("chat-1", "released").await;
    let resume = probe.control("asr-1", "resume").await;
    assert!(resume.fence > chat_fence, "resume carries a new fence");
    probe.event("resumed", Some("asr-1")).await;

    // The resumed holder renews and releases under its new fence; the old one is stale.
    probe
        .pub_json(
            "renew",
            "asr",
            json!({"request_id": "asr-1", "fence": asr_fence}),
        )
        .await;
    let stale = probe.reply("asr-1", "rejected").await;
    assert!(stale.error.unwrap_or_default().contains("stale fence"));
    probe
        .pub_json(
            "release",
            "asr",
            json!({"request_id": "asr-1", "fence": resume.fence}),
        )
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
        host: None,
        request_id: Some("mp-1".into()),
        service_id: None,
        priority: 1,
        timeout_ms: None,
        lease_ms: Some(5_000),
        vram_mb: Some(1_000),
        gpu: None,
        preemptible: None,
        pause_ms: None,
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
        .js_pub(
            "request",
            "diar",
            headers,
            br#"{"request_id":"json-1","priority":1,"vram_mb":1000}"#.to_vec(),
        )
        .await;
    let json_grant = probe
        .expect("json grant", |s| {
            s.str("request_id") == Some("json-1") && s.str("outcome") == Some("granted")
        })
        .await;
    assert_eq!(json_grant.encoding, Encoding::Json);
    coordinator.stop().await.expect("a clean stop");
}

/// A pause ACK that never comes: `revoke` once the deadline passed and the lease ran out (a holder that
/// never heard the pause uses the GPU until then), and only then the grant.
#[tokio::test]
async fn missing_pause_ack_revokes_then_grants() {
    let mut config = test_config("noack", &[("0", 16_000)]);
    config.preemption.ack_deadline_ms = 300;
    config.lease.default_ms = 1_000;
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json("request", "asr", json!({"request_id": "a", "priority": 2}))
        .await;
    probe.reply("a", "granted").await;
    probe
        .pub_json("request", "chat", json!({"request_id": "c", "priority": 0}))
        .await;
    probe.control("a", "pause").await;
    let revoke = probe.control("a", "revoke").await;
    assert!(revoke.reason.contains("no pause ACK"), "{}", revoke.reason);
    // The grant comes after the revoke event: the probe consumed everything up to the revoke first.
    probe.event("revoked", Some("a")).await;
    probe.reply("c", "granted").await;
    // The revoked holder's late ACK is rejected: its lease is gone.
    probe
        .pub_json("ack", "asr", json!({"request_id": "a", "action": "paused"}))
        .await;
    let late = probe.reply("a", "rejected").await;
    assert!(late.error.unwrap_or_default().contains("ended"));
    coordinator.stop().await.expect("a clean stop");
}

/// A lease not renewed: `revoke` then `restart`; a renewed lease stays.
#[tokio::test]
async fn unrenewed_lease_is_revoked_renewed_lease_stays() {
    let config = test_config("expiry", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    // `kept` is granted first, so without its renewal it would expire before `lapsed`.
    probe
        .pub_json(
            "request",
            "kept",
            json!({"request_id": "k", "priority": 1, "vram_mb": 1000, "lease_ms": 600}),
        )
        .await;
    let kept = probe.reply("k", "granted").await;
    probe
        .pub_json(
            "request",
            "lapsed",
            json!({"request_id": "l", "priority": 1, "vram_mb": 1000, "lease_ms": 600}),
        )
        .await;
    probe.reply("l", "granted").await;
    probe
        .pub_json(
            "renew",
            "kept",
            json!({"request_id": "k", "fence": kept.fence, "lease_ms": 60000}),
        )
        .await;
    let renewed = probe.reply("k", "renewed").await;
    assert_eq!(renewed.lease_ms, Some(60_000));
    probe.event("expired", Some("l")).await;
    probe.control("l", "revoke").await;
    probe.control("l", "restart").await;
    let status = probe.status().await;
    let holders: Vec<_> = status.gpus[0]
        .holders
        .iter()
        .map(|h| h.request_id.as_str())
        .collect();
    assert_eq!(
        holders,
        ["k"],
        "the renewed lease stays, the lapsed one is gone"
    );
    assert!(!probe
        .drain_and_find(|s| s.str("request_id") == Some("k") && s.str("action") == Some("revoke")));
    coordinator.stop().await.expect("a clean stop");
}

/// Timeouts, cancel, a repeated request id (with and without `Nats-Msg-Id`), a stale fence, an unknown
/// request.
#[tokio::test]
async fn timeouts_cancel_duplicates_and_stale_inputs() {
    let config = test_config("misc", &[("0", 10_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "hold",
            json!({"request_id": "h", "priority": 0, "preemptible": false}),
        )
        .await;
    let held = probe.reply("h", "granted").await;

    probe
        .pub_json(
            "request",
            "w",
            json!({"request_id": "t", "priority": 2, "timeout_ms": 200}),
        )
        .await;
    let timed_out = probe.reply("t", "timed_out").await;
    assert!(timed_out.error.unwrap_or_default().contains("timeout_ms"));
    probe.event("timed_out", Some("t")).await;

    probe
        .pub_json("request", "w", json!({"request_id": "q", "priority": 2}))
        .await;
    probe.event("queued", Some("q")).await;
    probe
        .pub_json("cancel", "w", json!({"request_id": "q"}))
        .await;
    probe.reply("q", "cancelled").await;
    probe.event("cancelled", Some("q")).await;

    // The same request id twice without Nats-Msg-Id: answered with the current state, queued once.
    probe
        .pub_json(
            "request",
            "hold",
            json!({"request_id": "h", "priority": 0, "preemptible": false}),
        )
        .await;
    let again = probe.reply("h", "granted").await;
    assert_eq!(
        again.fence, held.fence,
        "a repeated request is not granted twice"
    );
    // Twice with the same Nats-Msg-Id: JetStream keeps one, so one `requested` event.
    for _ in 0..2 {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "dup-1");
        probe
            .js_pub(
                "request",
                "w",
                headers,
                br#"{"request_id":"dup-1","priority":1}"#.to_vec(),
            )
            .await;
    }
    probe.event("requested", Some("dup-1")).await;
    let status = probe.status().await;
    assert_eq!(
        status
            .queue
            .iter()
            .filter(|e| e.request_id == "dup-1")
            .count(),
        1
    );
    assert_eq!(status.gpus[0].holders.len(), 1);
    assert!(!probe.drain_and_find(
        |s| s.subject.contains(".event.requested.") && s.str("request_id") == Some("dup-1")
    ));

    probe
        .pub_json(
            "release",
            "hold",
            json!({"request_id": "h", "fence": held.fence.unwrap() + 1000}),
        )
        .await;
    let stale = probe.reply("h", "rejected").await;
    assert!(stale.error.unwrap_or_default().contains("stale fence"));
    probe.event("rejected", Some("h")).await;
    probe
        .pub_json("renew", "hold", json!({"request_id": "nope"}))
        .await;
    let unknown = probe.reply("nope", "rejected").await;
    assert!(unknown
        .error
        .unwrap_or_default()
        .contains("unknown request_id"));
    coordinator.stop().await.expect("a clean stop");
}

/// Every kind of malformed input gets its `rejected` reply and event with a readable error, is never
/// redelivered, and the coordinator goes on serving.
#[tokio::test]
async fn malformed_inputs_are_rejected_once_and_serving_goes_on() {
    let config = test_config("malformed", &[("0", 10_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        ("request", "svc", b"not json".to_vec(), ""),
        (
            "request",
            "svc",
            br#"{"request_id":"r1","priority":"high"}"#.to_vec(),
            "priority",
        ),
        (
            "request",
            "svc",
            br#"{"request_id":"r2"}"#.to_vec(),
            "priority",
        ),
        (
            "request",
            "svc",
            br#"{"request_id":"r3","priority":300}"#.to_vec(),
            "priority",
        ),
        (
            "request",
            "svc",
            format!(r#"{{"request_id":"{}","priority":1}}"#, "x".repeat(200)).into_bytes(),
            "request_id",
        ),
        (
            "request",
            "svc",
            br#"{"request_id":"r5","priority":1,"service_id":"other"}"#.to_vec(),
            "service_id",
        ),
        ("request", "svc", vec![0xff, 0xfe, 0x00], ""),
        (
            "ack",
            "svc",
            br#"{"request_id":"r6","action":"sleeping"}"#.to_vec(),
            "action",
        ),
        ("renew", "svc", br#"{}"#.to_vec(), "request_id"),
    ];
    for (kind, svc, payload, _) in &cases {
        probe.pub_raw(kind, svc, payload.clone()).await;
    }
    // Truncated MessagePack with the header.
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", "application/msgpack");
    let mut truncated = gpu_coordinator_wire::codec::encode(
        Encoding::MsgPack,
        &json!({"request_id": "r7", "priority": 1}),
    );
    truncated.truncate(truncated.len() / 2);
    probe.js_pub("request", "svc", headers, truncated).await;
    // A bad service id in the subject.
    probe
        .pub_raw("request", "bad$svc", br#"{"priority":1}"#.to_vec())
        .await;

    for (i, (_, _, _, field)) in cases.iter().enumerate() {
        let reply = probe
            .expect(&format!("rejection #{i}"), |s| {
                s.subject.ends_with(".reply.svc") && s.str("outcome") == Some("rejected")
            })
            .await
            .reply();
        let error = reply.error.expect("a rejection says why");
        assert!(!error.is_empty());
        assert!(
            error.contains(field),
            "case {i}: `{error}` should name `{field}`"
        );
    }
    let mp = probe
        .expect("msgpack rejection", |s| {
            s.str("outcome") == Some("rejected") && s.encoding == Encoding::MsgPack
        })
        .await;
    assert!(!mp.reply().error.unwrap_or_default().is_empty());
    let unknown = probe.event("rejected", None).await;
    assert!(unknown.detail.is_some());

    // Still serving.
    probe
        .pub_json("request", "svc", json!({"request_id": "ok", "priority": 1}))
        .await;
    probe.reply("ok", "granted").await;
    // Nothing waits for a redelivery: every input was acknowledged or terminated.
    let stream = probe
        .js
        .get_stream(format!(
            "{}_INPUT",
            config.nats.prefix.to_uppercase().replace('-', "_")
        ))
        .await
        .expect("input stream");
    let info = crate::support::eventually("all inputs acknowledged", || {
        let stream = stream.clone();
        async move {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer("coordinator").await.ok()?;
            let info = consumer.info().await.ok()?.clone();
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(info)
        }
    })
    .await;
    assert_eq!(info.num_redelivered, 0);
    coordinator.stop().await.expect("a clean stop");
}

/// Two GPUs and VRAM sharing: holders share a GPU while their sum fits; a third waits.
#[tokio::test]
async fn vram_is_shared_and_spread_over_gpus() {
    let config = test_config("share", &[("0", 24_000), ("1", 12_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    for (id, mb) in [("a", 10_000), ("b", 10_000), ("c", 10_000), ("d", 10_000)] {
        probe
            .pub_json(
                "request",
                "svc",
                json!({"request_id": id, "priority": 1, "vram_mb": mb}),
            )
            .await;
    }
    // Best fit: a -> GPU 1 (12 GB, least left over), b and c share GPU 0, d waits.
    assert_eq!(probe.reply("a", "granted").await.gpu.as_deref(), Some("1"));
    assert_eq!(probe.reply("b", "granted").await.gpu.as_deref(), Some("0"));
    assert_eq!(probe.reply("c", "granted").await.gpu.as_deref(), Some("0"));
    probe.event("queued", Some("d")).await;
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders.len(), 2);
    assert_eq!(status.gpus[0].used_mb, 20_000);
    assert_eq!(status.gpus[1].holders.len(), 1);
    assert_eq!(status.queue.len(), 1);
    probe
        .pub_json("release", "svc", json!({"request_id": "b"}))
        .await;
    assert_eq!(probe.reply("d", "granted").await.gpu.as_deref(), Some("0"));
    coordinator.stop().await.expect("a clean stop");
}

/// kill -9 while 1,000 requests are being queued and one holder is paused, then start again: every
/// request is still answered, in order, and handled once; the paused holder is resumed; no fence is
/// reused.
#[tokio::test]
async fn restart_after_kill_loses_nothing_and_reuses_no_fence() {
    restart_after_kill(false).await
}

/// The same with Postgres written behind the journal stream: what the killed coordinator acknowledged
/// but had not yet written to Postgres is written at the restart, before anything is served.
#[tokio::test]
async fn restart_after_kill_loses_nothing_with_postgres_written_behind() {
    restart_after_kill(true).await
}

async fn restart_after_kill(write_behind: bool) {
    use crate::support::CoordinatorProcess;
    const QUEUED: usize = 1_000;
    let mut config = test_config("restart", &[("0", 24_000)]);
    config.database.write_behind = write_behind;
    let process = CoordinatorProcess::start(&config).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "bg",
            json!({"request_id": "bg", "priority": 2, "vram_mb": 20000}),
        )
        .await;
    let bg = probe.reply("bg", "granted").await;
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat", "priority": 0, "vram_mb": 20000, "lease_ms": 600000}),
        )
        .await;
    probe.control("bg", "pause").await;
    probe
        .pub_json(
            "ack",
            "bg",
            json!({"request_id": "bg", "fence": bg.fence, "action": "paused"}),
        )
        .await;
    let chat = probe.reply("chat", "granted").await;
    let mut fences = vec![bg.fence.unwrap(), chat.fence.unwrap()];
    for i in 0..QUEUED {
        probe
            .pub_json(
                "request",
                "batch",
                json!({
                    "request_id": format!("q{i:04}"), "priority": 1, "vram_mb": 20000,
                    "timeout_ms": 600000, "lease_ms": 600000
                }),
            )
            .await;
    }
    // Killed while it is still taking the requests in: some handled, some in flight, some not read yet.
    process.kill();

    let process = CoordinatorProcess::start(&config).await;
    let status = crate::support::eventually("every request queued after the restart", || async {
        let status = probe.status().await;
        (status.queue_total == QUEUED as u64 + 1).then_some(status)
    })
    .await;
    assert_eq!(status.queue.len(), 100, "a page of the queue is listed");
    assert_eq!(status.paused.len(), 1, "the paused holder survived");
    assert_eq!(status.gpus[0].holders[0].request_id, "chat");
    assert_eq!(
        status.queue[0].request_id, "q0000",
        "priority 1 goes before the paused priority 2"
    );
    let last = probe.status_page(Some(QUEUED as u64), Some(10)).await;
    assert_eq!(
        (last.queue.len(), last.queue[0].position),
        (1, QUEUED as u64 + 1)
    );
    assert_eq!(last.queue[0].request_id, "bg");

    probe
        .pub_json(
            "release",
            "chat",
            json!({"request_id": "chat", "fence": chat.fence}),
        )
        .await;
    for i in 0..QUEUED {
        let id = format!("q{i:04}");
        let granted = probe.reply(&id, "granted").await;
        fences.push(granted.fence.unwrap());
        probe
            .pub_json(
                "release",
                "batch",
                json!({"request_id": id, "fence": granted.fence}),
            )
            .await;
        probe.reply(&id, "released").await;
    }
    let resume = probe.control("bg", "resume").await;
    fences.push(resume.fence);
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fences strictly increase: {fences:?}"
    );
    drop(process);
}

/// Redis restarts empty while a lease is held: the lease is written back and no second holder appears.
#[tokio::test]
async fn redis_restart_writes_leases_back() {
    use crate::support::{eventually, RedisServer};
    let mut redis_server = RedisServer::start();
    let mut config = test_config("redisflush", &[("0", 24_000)]);
    config.redis.url = redis_server.url();
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "held", "priority": 1, "lease_ms": 60000}),
        )
        .await;
    let held = probe.reply("held", "granted").await;
    // The lease store keeps the request by its scoped id (service and id).
    let key = format!(
        "{}:lease:{}",
        config.redis.key_prefix,
        gpu_coordinator_core::scoped("a", "held")
    );
    let client = redis::Client::open(redis_server.url()).unwrap();
    let exists = |client: redis::Client, key: String| async move {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let n: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .ok()?;
        Some(n)
    };
    assert_eq!(exists(client.clone(), key.clone()).await, Some(1));

    redis_server.restart();
    eventually("the lease written back", || {
        let (client, key) = (client.clone(), key.clone());
        async move { (exists(client, key).await == Some(1)).then_some(()) }
    })
    .await;
    // A second whole-GPU request must wait: no second holder.
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "second", "priority": 1, "timeout_ms": 60000}),
        )
        .await;
    probe.event("queued", Some("second")).await;
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders.len(), 1);
    probe
        .pub_json(
            "renew",
            "a",
            json!({"request_id": "held", "fence": held.fence}),
        )
        .await;
    probe.reply("held", "renewed").await;
    probe
        .pub_json(
            "release",
            "a",
            json!({"request_id": "held", "fence": held.fence}),
        )
        .await;
    let second = probe.reply("second", "granted").await;
    assert!(second.fence > held.fence);
    coordinator.stop().await.expect("a clean stop");
}

/// Postgres goes away under load: the coordinator waits for it with backoff (nothing is granted or
/// acknowledged without it), then goes on; after a restart of the coordinator nothing is lost.
#[tokio::test]
async fn postgres_outage_is_waited_for_and_loses_nothing() {
    use crate::support::PgServer;
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start Postgres");
    let mut config = test_config("pgoutage", &[("0", 24_000)]);
    config.database.url = pg.url("gpu_it");
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a", "priority": 1, "vram_mb": 1000, "lease_ms": 600000}),
        )
        .await;
    let a = probe.reply("a", "granted").await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .expect("stop Postgres");
    // Stored by JetStream while Postgres is down; the coordinator cannot make it durable yet.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "b");
    probe
        .js_pub(
            "request",
            "b",
            headers,
            br#"{"request_id":"b","priority":1,"vram_mb":1000,"lease_ms":600000}"#.to_vec(),
        )
        .await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.resume();
        pg
    })
    .await
    .expect("restart Postgres");
    let b = probe.reply("b", "granted").await;
    assert!(b.fence > a.fence);
    coordinator.stop().await.expect("a clean stop");

    // Both grants were committed: a new coordinator on the same database knows both holders.
    let coordinator = Coordinator::start(config.clone()).await;
    let status = probe.status().await;
    let mut holders: Vec<_> = status.gpus[0]
        .holders
        .iter()
        .map(|h| (h.request_id.clone(), h.fence))
        .collect();
    holders.sort();
    assert_eq!(
        holders,
        [
            ("a".to_string(), a.fence.unwrap()),
            ("b".to_string(), b.fence.unwrap())
        ]
    );
    coordinator.stop().await.expect("a clean stop");
    drop(pg);
}

/// Redis comes back with the wrong leases (an old snapshot, say) while its epoch mark survives: the
/// coordinator releases the lease it should not hold and writes back the one it lost.
#[tokio::test]
async fn redis_is_reconciled_with_the_scheduler() {
    use crate::support::eventually;
    use gpu_coordinator::adapters::redis::RedisLeases;
    use gpu_coordinator_core::{Fence, Lease};
    let config = test_config("reconcile", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let store = RedisLeases::connect(&config.redis.url, &config.redis.key_prefix)
        .await
        .expect("connect to Redis");
    let held = |store: RedisLeases, id: &'static str| async move {
        store.leases().await.ok().map(|l| {
            l.iter()
                .any(|l| l.request_id == gpu_coordinator_core::scoped(id, id))
        })
    };

    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a", "priority": 1, "lease_ms": 60000}),
        )
        .await;
    let a = probe.reply("a", "granted").await;
    probe
        .pub_json("release", "a", json!({"request_id": "a"}))
        .await;
    probe.reply("a", "released").await;
    // An old snapshot brings A's lease back.
    let ghost = Lease {
        request_id: gpu_coordinator_core::scoped("a", "a").into(),
        service_id: "a".into(),
        gpu: "0".into(),
        fence: Fence(a.fence.unwrap()),
        vram_mb: 24_000,
        capacity_mb: 24_000,
        expires_at: gpu_coordinator::clock::now_ms() + 60_000,
    };
    let written = store
        .rewrite(std::slice::from_ref(&ghost))
        .await
        .expect("rewrite");
    assert!(written[0].is_ok(), "{written:?}");
    eventually("the ghost lease released", || {
        let store = store.clone();
        async move { (held(store, "a").await == Some(false)).then_some(()) }
    })
    .await;

    // B gets the whole GPU (Redis does not refuse it), then Redis loses B's lease: it is written back.
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b", "priority": 1, "lease_ms": 60000}),
        )
        .await;
    let b = probe.reply("b", "granted").await;
    assert!(store
        .release(
            &gpu_coordinator_core::scoped("b", "b"),
            Fence(b.fence.unwrap())
        )
        .await
        .expect("release in Redis"));
    eventually("the lost lease written back", || {
        let store = store.clone();
        async move { (held(store, "b").await == Some(true)).then_some(()) }
    })
    .await;
    assert!(!probe.drain_and_find(|s| s.str("action") == Some("revoke")));
    coordinator.stop().await.expect("a clean stop");
}

/// The input stream is deleted while the coordinator is down: the coordinator makes it anew numbered
/// after the last input it handled, so the new inputs are handled (not skipped as seen) and a default
/// request id (`<svc>-<stream sequence>`) never names an older request.
#[tokio::test]
async fn a_recreated_input_stream_goes_on_numbering_after_the_last_input_handled() {
    let config = test_config("newstream", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    // A request without an id: `s-1`, the first input.
    probe
        .pub_json("request", "s", json!({"priority": 1, "vram_mb": 1000}))
        .await;
    let first = probe.reply("s-1", "granted").await;
    for id in ["a", "b"] {
        probe
            .pub_json(
                "request",
                "s",
                json!({"request_id": id, "priority": 1, "vram_mb": 1000}),
            )
            .await;
        probe.reply(id, "granted").await;
    }
    coordinator.stop().await.expect("a clean stop");
    let stream = format!(
        "{}_INPUT",
        config.nats.prefix.to_uppercase().replace('-', "_")
    );
    probe
        .js
        .delete_stream(&stream)
        .await
        .expect("delete the input stream");

    let coordinator = Coordinator::start(config.clone()).await;
    let info = probe
        .js
        .get_stream(&stream)
        .await
        .expect("the coordinator made the input stream anew")
        .info()
        .await
        .expect("its state")
        .state
        .clone();
    assert_eq!(info.first_sequence, 4, "numbered after input #3: {info:?}");
    // Another request without an id: input #4, so `s-4`, a new request (not `s-1` again).
    probe
        .pub_json("request", "s", json!({"priority": 1, "vram_mb": 1000}))
        .await;
    let fourth = probe.reply("s-4", "granted").await;
    assert!(fourth.fence > first.fence, "a new grant: {fourth:?}");
    let status = probe.status().await;
    assert_eq!(
        status.gpus[0].holders.len(),
        4,
        "the old holders stay, the new one is granted"
    );
    coordinator.stop().await.expect("a clean stop");
}

/// Redis is away longer than a lease while the holder keeps renewing: its renewals were stored on time,
/// so they count at the time they were stored, and the lease is not revoked when Redis is back.
#[tokio::test]
async fn renewals_stored_during_a_stall_keep_the_lease() {
    use crate::support::RedisServer;
    let mut redis_server = RedisServer::start();
    let mut config = test_config("stall", &[("0", 24_000)]);
    config.redis.url = redis_server.url();
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "lease_ms": 3000}),
        )
        .await;
    let granted = probe.reply("a-1", "granted").await;
    let renew = json!({"request_id": "a-1", "fence": granted.fence});

    // Redis goes away; the holder renews every second, for twice the lease.
    redis_server.stop();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    for _ in 0..6 {
        every.tick().await;
        probe.pub_json("renew", "a", renew.clone()).await;
    }
    redis_server.restart();
    // The holder goes on renewing every second until the coordinator has caught up: it may wait (with
    // backoff, up to 5 s) before it tries Redis again, longer than the lease. Each renewal was stored
    // in time, so it counts at the time it was stored, however late it is handled.
    let mut renewals = 6;
    loop {
        every.tick().await;
        probe.pub_json("renew", "a", renew.clone()).await;
        renewals += 1;
        probe.drain_and_find(|_| false);
        let answered = probe
            .seen
            .iter()
            .filter(|s| s.str("request_id") == Some("a-1") && s.str("outcome") == Some("renewed"))
            .count();
        if answered + 1 >= renewals {
            break;
        }
        assert!(
            renewals < 30,
            "the coordinator never caught up: {answered} answered"
        );
    }
    // Every renewal is answered, the last one included, and none of them finds the lease revoked.
    for _ in 0..renewals {
        probe.reply("a-1", "renewed").await;
    }
    assert!(
        !probe.drain_and_find(|s| s.str("action") == Some("revoke")),
        "the lease was revoked though every renewal was stored in time"
    );
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders[0].request_id, "a-1");
    assert_eq!(status.gpus[0].holders[0].fence, granted.fence.unwrap());
    coordinator.stop().await.expect("a clean stop");
}

/// The coordinator process is stopped (SIGSTOP) for more than a lease, five times, while the holder
/// goes on renewing every 300 ms: each time it goes on, the renewals stored meanwhile count at the
/// time they were stored, before the expiries that fell due while it was stopped, so every renewal is
/// answered `renewed` and the lease is never revoked. Each stop also outlasts the leader's lease: the
/// one coordinator wakes deposed and leads again, in a new term, from the journal.
#[tokio::test]
async fn renewals_stored_while_the_coordinator_was_stopped_keep_the_lease() {
    renewals_stored_while_the_leader_was_stopped(false).await
}

/// The same with a standby: the leader is stopped five times (whichever coordinator leads); the
/// standby takes over while it is stopped, and handles the renewals stored since, each at the time it
/// was stored; the stopped one wakes deposed and stands by.
#[tokio::test]
async fn renewals_stored_while_the_leader_was_stopped_keep_the_lease_with_a_standby() {
    renewals_stored_while_the_leader_was_stopped(true).await
}

async fn renewals_stored_while_the_leader_was_stopped(standby: bool) {
    use crate::support::CoordinatorProcess;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    const LEASE_MS: u64 = 1_000;
    const STOPS: usize = 5;
    let mut config = test_config("sigstop", &[("0", 24_000)]);
    config.lease.default_ms = LEASE_MS;
    let mut processes = vec![CoordinatorProcess::start(&config).await];
    if standby {
        processes.push(CoordinatorProcess::start(&config).await);
    }
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json("request", "a", json!({"request_id": "a-1", "priority": 1}))
        .await;
    let granted = probe.reply("a-1", "granted").await;
    let renew = json!({"request_id": "a-1", "fence": granted.fence});
    // The holder renews every 300 ms throughout; `stored` counts the renewals JetStream stored.
    let stored = Arc::new(AtomicUsize::new(0));
    let renewer = tokio::spawn({
        let (js, subject) = (probe.js.clone(), format!("{}.renew.a", config.nats.prefix));
        let stored = stored.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_millis(300));
            loop {
                every.tick().await;
                let acked = match js.publish(subject.clone(), renew.to_string().into()).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if acked {
                    stored.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    let signal = |pid: u32, signal: &str| {
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    };
    let reply = format!("{}.reply.", config.nats.prefix);
    let control = format!("{}.control.", config.nats.prefix);
    let mut answered = 0;
    for stop in 1..=STOPS {
        // The leader: its holder name carries its process id (`<host>-<pid>-<random>`). A status
        // question that reaches a term in the branch where it ends (its leadership lapsed while the
        // process was stopped) is dropped with it, unanswered: asked again.
        let holder = eventually("the leader named by the status", || async {
            probe.try_status().await?.leader.map(|l| l.holder)
        })
        .await;
        let pid: u32 = holder
            .rsplit('-')
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .expect("a process id in the holder's name");
        assert!(
            processes.iter().any(|p| p.pid() == pid),
            "{holder} is none of ours"
        );
        signal(pid, "-STOP");
        // The fault: stopped for two and a half leases (and leader leases).
        tokio::time::sleep(Duration::from_millis(LEASE_MS * 5 / 2)).await;
        signal(pid, "-CONT");
        // Every renewal stored until now is answered `renewed`, in order; nothing else is said to
        // the holder (no revoke, no refusal).
        let due = stored.load(Ordering::SeqCst);
        while answered < due {
            let seen = probe
                .expect(
                    &format!("renewal {} answered after stop {stop}", answered + 1),
                    |s| {
                        s.str("request_id") == Some("a-1")
                            && [reply.as_str(), control.as_str()]
                                .iter()
                                .any(|p| s.subject.starts_with(p))
                    },
                )
                .await;
            assert_eq!(
                seen.str("outcome"),
                Some("renewed"),
                "after stop {stop}, {answered} renewal(s) answered, then: {:?} on {}",
                seen.json,
                seen.subject
            );
            answered += 1;
        }
    }
    renewer.abort();
    assert!(
        !probe.drain_and_find(|s| s.str("request_id") == Some("a-1")
            && s.str("outcome").is_some_and(|o| o != "renewed")),
        "a renewal was refused though every one was stored in time"
    );
    assert!(
        !probe.drain_and_find(|s| s.str("action") == Some("revoke")),
        "the lease was revoked though every renewal was stored in time"
    );
    let status = eventually("the status", || probe.try_status()).await;
    assert_eq!(status.gpus[0].holders[0].request_id, "a-1");
    assert_eq!(status.gpus[0].holders[0].fence, granted.fence.unwrap());
    for process in processes {
        process.kill();
    }
}

/// A message the outbox kept from before a stop, which the output stream already holds, is not
/// published again at the next start, even after the stream's duplicate window forgot its id.
#[tokio::test]
async fn messages_left_in_the_outbox_are_not_published_twice_past_the_duplicate_window() {
    use futures::StreamExt;
    use sea_orm::{ConnectionTrait, Database, Statement};

    let config = test_config("outbox_late", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "s",
            json!({"request_id": "a", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    probe.event("granted", Some("a")).await;
    coordinator.stop().await.expect("a clean stop");

    // The stop left the outbox empty; put back the last message published, as a crash between its
    // PubAck and the outbox's cleanup leaves it.
    let subjects = gpu_coordinator_wire::Subjects::new(&config.nats.prefix).expect("prefix");
    let mut output = probe
        .js
        .get_stream(subjects.output_stream())
        .await
        .expect("the output stream");
    let last_seq = output.info().await.expect("its state").state.last_sequence;
    let last = output
        .get_raw_message(last_seq)
        .await
        .expect("the last message");
    let msg_id = last
        .headers
        .get("Nats-Msg-Id")
        .expect("published with an id")
        .to_string();
    let db = Database::connect(&config.database.url)
        .await
        .expect("the journal");
    db.execute(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO outbox (id, msg_id, subject, msgpack, payload) VALUES (1, $1, $2, false, $3)",
        [
            msg_id.clone().into(),
            last.subject.to_string().into(),
            last.payload.to_vec().into(),
        ],
    ))
    .await
    .expect("plant the outbox row");

    // The stream's duplicate window passes: JetStream forgets the ids it saw.
    let mut stream_config = output.info().await.expect("its config").config.clone();
    stream_config.duplicate_window = std::time::Duration::from_millis(100);
    probe
        .js
        .update_stream(stream_config)
        .await
        .expect("a short duplicate window");
    let forgotten = format!("{}.event.released.zz", config.nats.prefix);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "window-probe");
    let publish = || {
        let (js, subject, headers) = (probe.js.clone(), forgotten.clone(), headers.clone());
        async move {
            js.publish_with_headers(subject, headers, "{}".into())
                .await
                .expect("publish")
                .await
                .expect("stored")
        }
    };
    publish().await;
    eventually("JetStream forgets the ids past its window", || async {
        (!publish().await.duplicate).then_some(())
    })
    .await;

    let coordinator = Coordinator::start(config.clone()).await;
    let reader = output
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("a reader");
    let end = output.info().await.expect("its state").state.last_sequence;
    let mut messages = reader.messages().await.expect("messages");
    let mut copies = 0;
    while let Some(Ok(msg)) = messages.next().await {
        let same = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .is_some_and(|id| id.as_str() == msg_id);
        copies += usize::from(same);
        if msg.info().map(|i| i.stream_sequence).unwrap_or(0) >= end {
            break;
        }
    }
    assert_eq!(copies, 1, "message {msg_id} is in the output stream once");
    coordinator.stop().await.expect("a clean stop");
}
