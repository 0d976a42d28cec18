//! Part 3: the chat's time to the GPU through the sidecars, a chat engine preempting a background
//! engine on a full fake GPU, round after round, with where the time went.

use std::time::{Duration, Instant};

use gpu_coordinator::engines::Want;
use gpu_coordinator_test_support::engines::{FakeEngine, FakeGpu};
use serde_json::{json, Value};

use crate::measure::{first_chunk, line, ms, quantile};
use crate::relay::nodelay_front;
use crate::setup::{engine, fake, Running};
use crate::{
    Mode, Row, CHAT_IDLE_MS, GOAL_TIME_TO_GPU_MS, GPU_MB, ROUND_WAIT, SLEEP_TIME, WAKE_TIME,
};

/// A named figure of a round, for the lines of where the time went.
type Step = (&'static str, fn(&Round) -> f64);

/// One round's figures (ms), to say where the chat's time went.
#[derive(Default)]
struct Round {
    /// Send -> first chunk through the chat sidecar.
    total: f64,
    /// The direct first chunk of the chat engine, right after.
    direct: f64,
    /// Send -> the coordinator took the chat's request (its `requested` event, in whole ms of the
    /// coordinator's clock, as the other events).
    to_requested: f64,
    /// `requested` -> the background holder's `preempting` event.
    to_preempting: f64,
    /// `preempting` -> the background engine's sleep call (the pause order carried to its sidecar,
    /// the gate closed and drained).
    to_sleep_call: f64,
    /// Its sleep call -> its memory freed in the ledger (the fake's `sleep_time`).
    sleep: f64,
    /// Its memory freed -> its sidecar confirmed the sleep (the sidecar's measured sleep, less the
    /// above).
    confirm: f64,
    /// Confirmed -> the coordinator took the ACK (`paused` event).
    to_paused: f64,
    /// `paused` -> the chat's `granted` event (the settle: NVML's next sample showing the memory free).
    to_granted: f64,
    /// `granted` -> the chat engine's allocation (the grant carried to its sidecar, the wake call).
    to_wake: f64,
    /// The chat engine's allocation -> it serves (the fake's `wake_time`).
    wake: f64,
    /// It serves -> the first chunk through the sidecar.
    serving_to_first: f64,
}

/// The coordinator's events since `since_ms` (Unix ms): (kind, service, at in Unix ms).
async fn events_since(
    client: &reqwest::Client,
    http: &str,
    since_ms: u64,
) -> anyhow::Result<Vec<(String, String, u64)>> {
    let text = client
        .get(format!("{http}/gpu/events?since=60s&format=jsonl"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| {
            let at = gpu_coordinator_wire::time::parse_rfc3339(e["at"].as_str()?)?;
            Some((
                e["kind"].as_str()?.to_owned(),
                e["service_id"].as_str()?.to_owned(),
                at,
            ))
        })
        .filter(|(_, _, at)| *at >= since_ms)
        .collect())
}

/// Part 3 with `nvml.sample_ms` = `sample_ms`: R rounds of a chat request preempting the
/// background engine.
pub(super) async fn chat_rounds(
    mode: Mode,
    tag: &str,
    sample_ms: u64,
    rounds: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let gpu = FakeGpu::start(GPU_MB).await;
    let chat = fake(&gpu, "chat", 16_000, 3, Duration::from_millis(10)).await;
    let bg = fake(&gpu, "bg", 12_000, 3, Duration::from_millis(10)).await;
    // The chat engine answers as a real server does (see `nodelay_front`), to the sidecar and to
    // the direct reference alike.
    let chat_url = nodelay_front(&chat.url()).await?;
    let mut chat_sidecar = engine("chat", &chat_url, 0, 16_000);
    chat_sidecar.idle_ms = CHAT_IDLE_MS;
    let mut bg_sidecar = engine("bg", &bg.url(), 2, 12_000);
    bg_sidecar.want = Want::Always;
    let chat_proxy = format!("http://{}/v1/chat/completions", chat_sidecar.listen);
    let chat_direct = format!("{chat_url}/v1/chat/completions");
    let coordinator =
        Running::start(tag, mode, vec![chat_sidecar, bg_sidecar], &gpu, sample_ms).await?;
    let scene = Scene {
        gpu: &gpu,
        chat: &chat,
        bg: &bg,
        coordinator: &coordinator,
        client: reqwest::Client::new(),
        direct: reqwest::Client::new(),
        chat_proxy,
        chat_direct,
        body: json!({
            "model": "m", "stream": true, "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        }),
    };
    let mut done: Vec<Round> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        scene.wait_start(round).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        done.push(scene.round(round).await?);
    }
    anyhow::ensure!(
        gpu.ooms().is_empty() && gpu.peak_mb() <= GPU_MB,
        "the engines held {} of {GPU_MB} MB at once; OOMs {:?}",
        gpu.peak_mb(),
        gpu.ooms()
    );
    anyhow::ensure!(
        chat.refused_asleep() == 0 && bg.refused_asleep() == 0,
        "nothing reached an engine asleep"
    );
    report(&done, &gpu, sample_ms, rounds, rows);
    coordinator.stop().await
}

/// What a round runs against: the fake GPU, the two fakes, the coordinator, a client through the
/// chat sidecar and one straight to the chat engine, the chat's URLs and its request.
struct Scene<'a> {
    gpu: &'a FakeGpu,
    chat: &'a FakeEngine,
    bg: &'a FakeEngine,
    coordinator: &'a Running,
    client: reqwest::Client,
    direct: reqwest::Client,
    chat_proxy: String,
    chat_direct: String,
    body: Value,
}

/// What the ledger, the fakes and the background sidecar saw of a round, each `None` where it did
/// not show: the background engine's sleep call, its memory freed, the chat engine's allocation, the
/// chat engine serving, and the background sidecar's measured sleep (ms).
type Marks = (
    Option<Instant>,
    Option<Instant>,
    Option<Instant>,
    Option<Instant>,
    Option<f64>,
);

impl Scene<'_> {
    /// Waits for the background engine awake under its lease, the chat engine asleep with its GPU
    /// given back.
    async fn wait_start(&self, round: usize) -> anyhow::Result<()> {
        let waited = Instant::now();
        loop {
            let views = self.coordinator.engines(&self.client).await?;
            let state = |service: &str| {
                views
                    .iter()
                    .find(|v| v["service"] == service)
                    .and_then(|v| v["state"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            if self.bg.awake()
                && !self.chat.awake()
                && self.gpu.holding("chat") == 0
                && state("bg") == "awake"
                && state("chat") == "asleep"
            {
                return Ok(());
            }
            anyhow::ensure!(
                waited.elapsed() < ROUND_WAIT,
                "round {round}: the background engine did not come back awake (bg {}, chat {})",
                state("bg"),
                state("chat")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One round: a streamed chat request through the chat sidecar, timed to its first chunk, the
    /// direct first chunk right after, and where the time went.
    async fn round(&self, round: usize) -> anyhow::Result<Round> {
        // The coordinator's own clock (this process's: the wall clock read once, then monotonic),
        // which its events are stamped with, in whole ms.
        let sent_ms = gpu_coordinator::clock::now_ms();
        let sent = Instant::now();
        let total = first_chunk(&self.client, &self.chat_proxy, &self.body).await?;
        let direct_first = if self.chat.awake() {
            ms(first_chunk(&self.direct, &self.chat_direct, &self.body).await?)
        } else {
            f64::NAN
        };
        let marks = self.marks(sent).await?;
        let events = self.events(sent_ms).await?;
        let event = |kind: &str, service: &str| {
            events
                .iter()
                .find(|(k, s, _)| k == kind && s == service)
                .map(|(_, _, at)| (*at - sent_ms) as f64)
        };
        let (Some(call), Some(freed), Some(alloc), Some(serving), Some(slept)) = marks else {
            anyhow::bail!("round {round}: the background engine was not paused for the chat");
        };
        let at = |i: Instant| ms(i.saturating_duration_since(sent));
        let (call, freed, alloc, serving) = (at(call), at(freed), at(alloc), at(serving));
        // The sidecar's clock starts just before its sleep call.
        let confirmed = call + slept.max(freed - call);
        let requested = event("requested", "chat").unwrap_or(f64::NAN);
        let preempting = event("preempting", "bg").unwrap_or(f64::NAN);
        let paused = event("paused", "bg").unwrap_or(f64::NAN);
        let granted = event("granted", "chat").unwrap_or(f64::NAN);
        Ok(Round {
            total: ms(total),
            direct: direct_first,
            to_requested: requested,
            to_preempting: preempting - requested,
            to_sleep_call: call - preempting,
            sleep: freed - call,
            confirm: confirmed - freed,
            to_paused: paused - confirmed,
            to_granted: granted - paused,
            to_wake: alloc - granted,
            wake: serving - alloc,
            serving_to_first: ms(total) - serving,
        })
    }

    /// Where the time went after `sent`: the ledger's and the fakes' instants, and the background
    /// sidecar's measured sleep.
    async fn marks(&self, sent: Instant) -> anyhow::Result<Marks> {
        let log = self.gpu.log();
        let after = |engine: &str, freed: bool| {
            log.iter()
                .find(|e| e.at > sent && e.engine == engine && (e.engine_mb == 0) == freed)
                .map(|e| e.at)
        };
        let bg_sleep_call = self
            .bg
            .awake_intervals()
            .iter()
            .filter_map(|(_, end)| *end)
            .find(|end| *end > sent);
        let chat_serving = self
            .chat
            .awake_intervals()
            .iter()
            .map(|(start, _)| *start)
            .find(|start| *start > sent);
        let views = self.coordinator.engines(&self.client).await?;
        let bg_slept = views
            .iter()
            .find(|v| v["service"] == "bg")
            .and_then(|v| v["last_sleep_ms"].as_f64());
        Ok((
            bg_sleep_call,
            after("bg", true),
            after("chat", false),
            chat_serving,
            bg_slept,
        ))
    }

    /// The coordinator's events since `sent_ms` (ms precision, on the wall clock), read back from the
    /// output stream: a late one is asked for again.
    async fn events(&self, sent_ms: u64) -> anyhow::Result<Vec<(String, String, u64)>> {
        let mut events = Vec::new();
        for _ in 0..10 {
            events = events_since(&self.client, &self.coordinator.http, sent_ms).await?;
            let has = |kind: &str, service: &str| {
                events.iter().any(|(k, s, _)| k == kind && s == service)
            };
            if has("requested", "chat")
                && has("preempting", "bg")
                && has("paused", "bg")
                && has("granted", "chat")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(events)
    }
}

/// Prints the rounds' figures and where the time went, and adds part 3's row.
fn report(done: &[Round], gpu: &FakeGpu, sample_ms: u64, rounds: usize, rows: &mut Vec<Row>) {
    let pick = |f: fn(&Round) -> f64| done.iter().map(f).collect::<Vec<f64>>();
    let remainder: Vec<f64> = done
        .iter()
        .map(|r| r.total - ms(SLEEP_TIME) - ms(WAKE_TIME) - r.direct)
        .collect();
    println!(
        "\n3. chat time to GPU through the sidecars, nvml.sample_ms = {sample_ms} (the ledger as \
         NVML; sleep_time {} ms, wake_time {} ms, the chat's idle_ms {CHAT_IDLE_MS})",
        SLEEP_TIME.as_millis(),
        WAKE_TIME.as_millis()
    );
    let total_p50 = line(
        "send -> first chunk through the chat sidecar",
        &pick(|r| r.total),
    );
    let direct_p50 = line(
        "direct first chunk (chat engine awake)",
        &pick(|r| r.direct),
    );
    let p50 = line(
        "remainder (less sleep, wake and the direct chunk)",
        &remainder,
    );
    let p90 = quantile(&remainder, 0.9);
    let less_measured: Vec<f64> = done
        .iter()
        .map(|r| r.total - r.sleep - r.wake - r.direct)
        .collect();
    line(
        "the same less the sleep and wake the ledger saw",
        &less_measured,
    );
    print_steps(done);
    println!(
        "the fake GPU's peak: {} of {GPU_MB} MB, no OOM",
        gpu.peak_mb()
    );
    rows.push(Row {
        figure: format!(
            "chat time to GPU through sidecars, nvml.sample_ms {sample_ms}, remainder p50 / p90"
        ),
        goal: format!("<= {GOAL_TIME_TO_GPU_MS} ms at p50"),
        measured: format!(
            "{p50:.1} / {p90:.1} ms (first chunk p50 {total_p50:.1} ms, direct {direct_p50:.1} ms; R={rounds})"
        ),
        met: Some(p50 <= GOAL_TIME_TO_GPU_MS),
    });
}

/// Prints where the time went, step by step, each step a quantile of its own.
fn print_steps(done: &[Round]) {
    let pick = |f: fn(&Round) -> f64| done.iter().map(f).collect::<Vec<f64>>();
    println!("where the time went, in order (each a quantile of its own; events in whole ms):");
    let steps: [Step; 10] = [
        ("  send -> `requested` (chat)", |r| r.to_requested),
        ("  -> `preempting` (bg)", |r| r.to_preempting),
        ("  -> the bg engine's sleep call", |r| r.to_sleep_call),
        ("  -> its memory freed (sleep_time)", |r| r.sleep),
        ("  -> its sidecar confirmed the sleep", |r| r.confirm),
        ("  -> `paused` (bg's ACK taken)", |r| r.to_paused),
        ("  -> `granted` (chat; the settle)", |r| r.to_granted),
        ("  -> the chat engine allocates (its wake call)", |r| {
            r.to_wake
        }),
        ("  -> it serves (wake_time)", |r| r.wake),
        ("  -> the first chunk through the sidecar", |r| {
            r.serving_to_first
        }),
    ];
    for (name, f) in steps {
        line(name, &pick(f));
    }
}
