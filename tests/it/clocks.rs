//! A coordinator whose clock is off does not lead: leases, pause deadlines and revokes are counted on
//! the leader's clock, so one ten minutes ahead would revoke every lease at once while its holders
//! still work (two holders), one behind would hand GPUs on late.

use crate::support::{eventually, test_config, CoordinatorProcess, Probe};

#[tokio::test]
async fn a_coordinator_whose_clock_is_off_does_not_lead() {
    let config = test_config("clock_skew", &[("0", 24_000)]);
    let log = std::env::temp_dir().join(gpu_coordinator_test_support::unique("skewed.log"));
    let mut skewed_config = config.clone();
    let http = format!("127.0.0.1:{}", gpu_coordinator_test_support::free_port());
    skewed_config.http.listen = http.clone();
    // Alone, it would lead at once; it says instead why it does not.
    let skewed = CoordinatorProcess::start_shifted(&skewed_config, "+10m", &log);
    eventually(
        "the skewed coordinator says why it does not lead",
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("does not lead until the clocks agree")
                .then_some(())
        },
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("ahead of Postgres's"), "{text}");
    // Its status says why too.
    let answer = eventually("the skewed coordinator's HTTP API answers", || async {
        let answer = reqwest::get(format!("http://{http}/gpu/status"))
            .await
            .ok()?;
        Some((answer.status(), answer.text().await.ok()?))
    })
    .await;
    assert_eq!(answer.0, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.1.contains("ahead of Postgres's"), "{}", answer.1);

    // A coordinator on the right clock leads beside it, and grants.
    let sound = CoordinatorProcess::start(&config).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            serde_json::json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    probe.reply("a-1", "granted").await;
    let leader = probe
        .status()
        .await
        .leader
        .expect("the status names its leader");
    assert!(
        leader.holder.contains(&format!("-{}-", sound.pid())),
        "the coordinator on the right clock leads, not {} (the skewed one is pid {})",
        leader.holder,
        skewed.pid()
    );
    let _ = std::fs::remove_file(&log);
}
