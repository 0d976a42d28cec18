//! `gpu-coordinator audit` over a real history: a preemption keeps every rule, and a forged event that
//! puts a second holder on a full GPU is caught, by the library call and by the command's exit status.

use gpu_coordinator::audit::Since;
use serde_json::json;

use crate::support::{test_config, Coordinator, Probe};

/// A background holder paused for an urgent request, which releases; the holder resumes and releases;
/// a whole-GPU request comes after.
async fn preemption(probe: &mut Probe) {
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 20000}),
        )
        .await;
    let asr = probe.reply("asr-1", "granted").await;
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
            json!({"request_id": "asr-1", "fence": asr.fence, "action": "paused"}),
        )
        .await;
    let chat = probe.reply("chat-1", "granted").await;
    probe
        .pub_json(
            "release",
            "chat",
            json!({"request_id": "chat-1", "fence": chat.fence}),
        )
        .await;
    let resume = probe.control("asr-1", "resume").await;
    probe
        .pub_json(
            "release",
            "asr",
            json!({"request_id": "asr-1", "fence": resume.fence}),
        )
        .await;
    probe.event("released", Some("asr-1")).await;
    probe
        .pub_json(
            "request",
            "diar",
            json!({"request_id": "diar-1", "priority": 1}),
        )
        .await;
    probe.reply("diar-1", "granted").await;
}

#[tokio::test]
async fn a_real_preemption_keeps_every_rule_and_a_forged_grant_is_caught() {
    let config = test_config("audit", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    preemption(&mut probe).await;

    let summary = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read")
        .unwrap_or_else(|v| panic!("a clean history was judged broken:\n{v}"));
    assert_eq!(summary.requests, 3, "{summary}");
    assert_eq!(summary.grants, 3, "{summary}");
    assert_eq!(summary.resumes, 1, "{summary}");
    assert_eq!(summary.preemptions, 1, "{summary}");
    assert_eq!(summary.releases, 2, "{summary}");
    assert_eq!(summary.live, 1, "diar-1 still holds: {summary}");

    // A grant nobody made: a second holder beside the whole-GPU holder, published straight into the
    // output stream as any NATS client could.
    let status = probe.status().await;
    let fence = status.gpus[0].holders[0].fence + 1;
    let forged = json!({"at": "2026-11-28T18:00:00Z", "kind": "granted", "request_id": "intruder-1",
        "service_id": "intruder", "priority": 0, "gpu": "0", "fence": fence});
    let reply = json!({"request_id": "intruder-1", "outcome": "granted", "gpu": "0",
        "fence": fence, "vram_mb": 1000});
    for (subject, body) in [
        (format!("{}.reply.intruder", config.nats.prefix), reply),
        (
            format!("{}.event.granted.intruder", config.nats.prefix),
            forged,
        ),
    ] {
        probe
            .js
            .publish(subject, body.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let violation = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read")
        .expect_err("two holders on one GPU");
    assert!(
        violation.rule.contains("whole-GPU holder beside others"),
        "{violation}"
    );
    assert!(
        violation
            .records
            .iter()
            .any(|r| r.to_string().contains("diar-1")),
        "the records show the real holder:\n{violation}"
    );

    // The command says the same with its exit status.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .arg("audit")
        .env("GPU_COORDINATOR_NATS__URL", &config.nats.url)
        .env("GPU_COORDINATOR_NATS__PREFIX", &config.nats.prefix)
        .env("GPU_COORDINATOR_GPUS", "[{id=\"0\",vram_mb=24000}]")
        .output()
        .expect("run gpu-coordinator audit");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("VIOLATION"), "{stdout}");
    assert!(stdout.contains("intruder-1"), "{stdout}");
    coordinator.stop().await.expect("stops cleanly");
}

#[test]
fn since_reads_instants_and_spans() {
    let now = 1_800_000_000_000;
    assert_eq!(Since::parse("15m", now), Ok(Since::At(now - 900_000)));
    assert_eq!(Since::parse("2h", now), Ok(Since::At(now - 7_200_000)));
    assert_eq!(
        Since::parse("2026-11-28T18:00:00Z", now),
        Ok(Since::At(1_795_888_800_000))
    );
    let error = Since::parse("yesterday", now).expect_err("not a time");
    assert!(error.contains("RFC 3339"), "{error}");
}
