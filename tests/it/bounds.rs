//! Bounded resources on NATS: a full input stream refuses inputs at publish while the coordinator
//! goes on running its timers, then makes room by removing inputs it has handled.

use gpu_coordinator_wire::Subjects;
use serde_json::json;

use crate::support::{eventually, test_config, Coordinator, Probe};

#[tokio::test]
async fn a_full_input_stream_refuses_inputs_and_the_coordinator_goes_on() {
    let mut config = test_config("bound_full", &[("0", 1_000)]);
    config.nats.max_msgs = 1_000;
    let subjects = Subjects::new(&config.nats.prefix).unwrap();
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "lease_ms": 3_000}),
        )
        .await;
    probe.reply("a-1", "granted").await;

    // Inputs (each rejected: no such request) until the stream refuses one.
    let mut refused = None;
    for i in 0..20_000 {
        let payload = serde_json::to_vec(&json!({"request_id": format!("none-{i}")})).unwrap();
        let ack = probe
            .js
            .publish(subjects.cancel("x"), payload.into())
            .await
            .expect("the publish leaves the client");
        if let Err(e) = ack.await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("a full input stream refuses an input");
    assert!(
        refused.to_lowercase().contains("maximum messages"),
        "the publisher is told why: {refused}"
    );

    // The coordinator's timers go on: a-1, not renewed, is revoked at its expiry.
    probe.control("a-1", "revoke").await;
    // And it makes room: inputs are accepted again, and handled.
    eventually("the input stream takes inputs again", || async {
        let payload =
            serde_json::to_vec(&json!({"request_id": "b-1", "priority": 1, "vram_mb": 500}))
                .unwrap();
        let ack = probe
            .js
            .publish(subjects.request("b"), payload.into())
            .await
            .ok()?;
        ack.await.ok().map(|_| ())
    })
    .await;
    probe.reply("b-1", "granted").await;
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders[0].request_id, "b-1");
    coordinator.stop().await.expect("stops cleanly");
}
