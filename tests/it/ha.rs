//! One active coordinator per prefix: a second one stands by, takes over when the leader stops or dies,
//! and the history shows no two holders beyond capacity and fences that only rise.

use std::time::{Duration, Instant};

use gpu_coordinator::audit::{self, Since};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{eventually, test_config, Coordinator, CoordinatorProcess, Probe};

/// The HTTP status of `GET /gpu/status` on a coordinator.
async fn status_code(coordinator: &Coordinator) -> StatusCode {
    reqwest::get(coordinator.url("/gpu/status"))
        .await
        .expect("the HTTP API answers")
        .status()
}

#[tokio::test]
async fn a_second_coordinator_stands_by_and_takes_over_with_the_state() {
    let config = test_config("ha_two", &[("0", 24_000)]);
    let first = Coordinator::start(config.clone()).await;
    let second = Coordinator::start(config.clone()).await;
    assert_eq!(status_code(&first).await, StatusCode::OK);
    // Once connected, the second one says it stands by (before that: it is starting).
    let url = second.url("/gpu/status");
    eventually("the second coordinator stands by", || async {
        let answer = reqwest::get(&url).await.ok()?;
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        (status == StatusCode::SERVICE_UNAVAILABLE && body.contains("not leading")).then_some(())
    })
    .await;
    assert_eq!(
        status_code(&first).await,
        StatusCode::OK,
        "the first still leads"
    );

    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 20000}),
        )
        .await;
    let held = probe.reply("asr-1", "granted").await;

    // The leader stops; the standby takes over at once (the lease is handed on) with the queue and
    // the holder as they were.
    first.stop().await.expect("the leader stops cleanly");
    eventually("the standby leads", || async {
        (status_code(&second).await == StatusCode::OK).then_some(())
    })
    .await;
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders[0].request_id, "asr-1");
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "vram_mb": 20000}),
        )
        .await;
    probe.control("asr-1", "pause").await;
    probe
        .pub_json(
            "ack",
            "asr",
            json!({"request_id": "asr-1", "fence": held.fence, "action": "paused"}),
        )
        .await;
    let chat = probe.reply("chat-1", "granted").await;
    assert!(chat.fence > held.fence, "fences go on rising across terms");
    second.stop().await.expect("stops cleanly");
    let verdict = audit::run(&config, Since::Start)
        .await
        .expect("the history can be read");
    if let Err(violation) = verdict {
        panic!("{violation}");
    }
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_its_lease() {
    let config = test_config("ha_kill", &[("0", 24_000)]);
    let leader = CoordinatorProcess::start(&config).await;
    let standby = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    let first = probe.reply("a-1", "granted").await;

    leader.kill();
    let killed = Instant::now();
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    let second = probe.reply("b-1", "granted").await;
    let takeover = killed.elapsed();
    println!("first grant {takeover:?} after kill -9 of the leader");
    assert!(second.fence > first.fence);
    // The lease lasts leader.ttl_ms (1 s): the standby cannot have taken over much sooner.
    assert!(
        takeover >= Duration::from_millis(200),
        "taken over {takeover:?} after the kill: before the lease could expire?"
    );
    assert_eq!(status_code(&standby).await, StatusCode::OK);
    standby.stop().await.expect("stops cleanly");
}

/// JetStream loses both streams while the coordinator runs: it makes them anew and goes on.
#[tokio::test]
async fn streams_lost_at_run_time_are_made_anew() {
    let config = test_config("ha_streams", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    probe.reply("a-1", "granted").await;
    let subjects = gpu_coordinator_wire::Subjects::new(&config.nats.prefix).expect("prefix");
    for stream in [subjects.input_stream(), subjects.output_stream()] {
        probe
            .js
            .delete_stream(&stream)
            .await
            .expect("delete the stream");
    }
    // Inputs published before the input stream is back are stored nowhere: sent again until the
    // coordinator answers.
    let subject = format!("{}.request.b", config.nats.prefix);
    let body = json!({"request_id": "b-1", "priority": 1, "vram_mb": 1000}).to_string();
    eventually("a request answered after the streams were lost", || {
        let (js, subject, body) = (probe.js.clone(), subject.clone(), body.clone());
        async move {
            js.publish(subject, body.into()).await.ok()?.await.ok()?;
            Some(())
        }
    })
    .await;
    probe.reply("b-1", "granted").await;
    coordinator.stop().await.expect("stops cleanly");
}
