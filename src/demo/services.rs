//! The story's services, each a client of the coordinator's HTTP API: the ASR worker that pauses
//! and resumes, the diarization job, and the chat.

use super::*;

/// Asks for the GPU and waits for the grant (the long poll of `POST /gpu/request`): the fence.
async fn acquire(api: &Api, body: serde_json::Value) -> anyhow::Result<u64> {
    let (status, reply) = api.call("/gpu/request", body).await?;
    anyhow::ensure!(
        status == 200 && reply["outcome"] == "granted",
        "not granted: HTTP {status}, {reply}"
    );
    reply["fence"]
        .as_u64()
        .with_context(|| format!("a grant without a fence: {reply}"))
}

/// Releases `request_id` of `service` under `fence`.
async fn release(api: &Api, service: &str, request_id: &str, fence: u64) -> anyhow::Result<()> {
    let body = json!({"service_id": service, "request_id": request_id, "fence": fence});
    let (status, reply) = api.call("/gpu/release", body).await?;
    anyhow::ensure!(status == 200, "release refused: HTTP {status}, {reply}");
    Ok(())
}

/// The ASR worker: transcribes 2-second chunks while it holds the GPU and renews its lease; on
/// `pause` it finishes its chunk, offloads, and ACKs; on `resume` it reloads and goes on.
pub(super) async fn asr_worker(
    api: Api,
    story: Story,
    stop: CancellationToken,
    chunks: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    const ID: &str = "asr-1";
    const LEASE_MS: u64 = 10_000;
    // Open before asking: no order is missed.
    let mut orders = api.events("/gpu/control/asr").await?;
    let fence = acquire(
        &api,
        json!({"service_id": "asr", "request_id": ID, "priority": 2, "vram_mb": ASR_MB,
               "lease_ms": LEASE_MS, "timeout_ms": 60_000}),
    )
    .await
    .context("requesting the GPU")?;
    let fence = Arc::new(AtomicU64::new(fence));
    let active = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let renewing = CancellationToken::new();
    let renewer = tokio::spawn({
        let (api, fence, active, renewing) =
            (api.clone(), fence.clone(), active.clone(), renewing.clone());
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(LEASE_MS / 3)) => {}
                    _ = renewing.cancelled() => return,
                }
                if active.load(Ordering::SeqCst) {
                    let body = json!({"service_id": "asr", "request_id": ID,
                                      "fence": fence.load(Ordering::SeqCst)});
                    if let Err(e) = api.call("/gpu/renew", body).await {
                        tracing::warn!("asr: renewing: {e:#}");
                    }
                }
            }
        }
    });
    let result = async {
        loop {
            if active.load(Ordering::SeqCst) {
                if stop.is_cancelled() {
                    return anyhow::Ok(());
                }
                story.sleep(2.0).await;
                chunks.fetch_add(1, Ordering::Relaxed);
                // Orders that came during the chunk: a pause waits for the chunk to finish.
                while let Ok(order) = orders.try_recv() {
                    obey(&api, &story, order, &fence, &active).await?;
                }
            } else {
                // Paused (also at the end: the worker is resumed before it leaves).
                let order = tokio::time::timeout(Duration::from_secs(60), orders.recv())
                    .await
                    .context("not resumed within 60 s")?
                    .context("the control stream ended")?;
                obey(&api, &story, order, &fence, &active).await?;
            }
        }
    }
    .await;
    renewing.cancel();
    let _ = renewer.await;
    result?;
    release(&api, "asr", ID, fence.load(Ordering::SeqCst))
        .await
        .context("releasing")
}

/// Carries out one control order of the ASR worker.
async fn obey(
    api: &Api,
    story: &Story,
    (action, data): SseEvent,
    fence: &AtomicU64,
    active: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let order: Control = serde_json::from_str(&data).context("a control order")?;
    match action.as_str() {
        "pause" => {
            story.say("  asr", "finished its chunk; offloading the model");
            story.sleep(0.5).await;
            active.store(false, Ordering::SeqCst);
            let body = json!({"service_id": "asr", "request_id": order.request_id,
                              "fence": order.fence, "action": "paused"});
            let (status, reply) = api.call("/gpu/ack", body).await?;
            anyhow::ensure!(status < 300, "ACK refused: HTTP {status}, {reply}");
        }
        "resume" => {
            story.say("  asr", "reloading the model");
            story.sleep(0.5).await;
            fence.store(order.fence, Ordering::SeqCst);
            active.store(true, Ordering::SeqCst);
        }
        other => anyhow::bail!("the coordinator sent `{other}`: {}", order.reason),
    }
    Ok(())
}

/// The diarization job: a 3-second job at story seconds 8, 26, 44, ...
pub(super) async fn diarization(
    api: Api,
    story: Story,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let mut jobs = 0;
    let mut at = 8.0;
    loop {
        tokio::select! {
            _ = story.sleep_until(at) => {}
            _ = stop.cancelled() => return Ok(jobs),
        }
        let id = format!("diar-{}", jobs + 1);
        let fence = acquire(
            &api,
            json!({"service_id": "diarization", "request_id": id, "priority": 1,
                   "vram_mb": DIAR_MB, "lease_ms": 10_000, "timeout_ms": 60_000,
                   "preemptible": false}),
        )
        .await
        .context("requesting the GPU")?;
        story.sleep(3.0).await;
        release(&api, "diarization", &id, fence)
            .await
            .context("releasing")?;
        jobs += 1;
        at += 18.0;
    }
}

/// The chat service: the first message at story second 4, then at random (about every 7 s); each
/// message takes the GPU for 1.5 s. Returns the real time each waited for the GPU.
pub(super) async fn chat(
    api: Api,
    story: Story,
    stop: CancellationToken,
    seed: u64,
) -> anyhow::Result<Vec<Duration>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut waits = Vec::new();
    let mut at = 4.0;
    loop {
        tokio::select! {
            _ = story.sleep_until(at) => {}
            _ = stop.cancelled() => return Ok(waits),
        }
        let asked = Instant::now();
        let id = format!("chat-{}", waits.len() + 1);
        let fence = acquire(
            &api,
            json!({"service_id": "chat", "request_id": id, "priority": 0,
                   "vram_mb": CHAT_MB, "lease_ms": 10_000, "timeout_ms": 30_000,
                   "preemptible": false}),
        )
        .await
        .context("requesting the GPU")?;
        waits.push(asked.elapsed());
        story.say("  chat", "answering a message");
        story.sleep(1.5).await;
        release(&api, "chat", &id, fence)
            .await
            .context("releasing")?;
        // Exponential inter-arrival times, mean 7 s, at least 2 s.
        let u: f64 = rng.random_range(0.0..1.0);
        at = story.now() + (2.0 - 5.0 * (1.0 - u).ln()).min(20.0);
    }
}
