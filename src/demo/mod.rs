//! `gpu-coordinator demo`: the seed's story, live. A coordinator of its own shares one simulated 24 GB
//! GPU between three services that use its HTTP API. The coordinator is embedded (a data directory of
//! its own, no server) unless the configuration says otherwise (`demo --distributed`: its own subject
//! prefix, key prefix and database on the configured servers). The services:
//!
//! - an ASR worker at priority 2 that transcribes 2-second chunks and, on `pause`, finishes its chunk and
//!   offloads its model before it ACKs;
//! - a chat service at priority 0 whose messages arrive at random;
//! - a diarization job at priority 1.
//!
//! It prints a timeline from the audit events (who holds the GPU, pause, ACK, grant, resume, waits) and a
//! summary. Story time runs `speed` times faster than the clock. A protocol error (a rejection, a revoke,
//! a client error) makes it fail.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gpu_coordinator_wire::{Control, Event, EventKind};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::adapters::nats::NatsSettings;
use crate::config::{BusBackend, Config, GpuConfig};
use api::{Api, SseEvent};

mod api;
mod services;

use services::{asr_worker, chat, diarization};

/// The simulated GPU.
const GPU_MB: u64 = 24_576;
/// VRAM of each simulated service: ASR does not fit beside chat or diarization, so both preempt it;
/// chat and diarization fit together.
const ASR_MB: u64 = 14_000;
const CHAT_MB: u64 = 12_000;
const DIAR_MB: u64 = 11_000;

/// What the demo is asked for (`--duration`, `--speed`, `--seed`).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Story time to play.
    pub duration: Duration,
    /// How much faster than the clock the story runs.
    pub speed: f64,
    /// Seed of the random chat arrivals.
    pub seed: u64,
}

/// What the story did, printed at the end.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub chat_messages: usize,
    /// Real time from a chat request to its grant, sorted.
    pub chat_time_to_gpu: Vec<Duration>,
    pub chunks: u64,
    pub diarization_jobs: u64,
    pub preemptions: u64,
    pub revocations: u64,
    pub rejections: u64,
    /// What `audit` said of the story's history, once the coordinator stopped.
    pub audit: Option<String>,
    pub errors: Vec<String>,
}

impl Summary {
    /// Whether the story ran without a protocol error.
    pub fn ok(&self) -> bool {
        self.revocations == 0 && self.rejections == 0 && self.errors.is_empty()
    }

    fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.chat_time_to_gpu.len();
        (n > 0).then(|| self.chat_time_to_gpu[((n as f64 * p) as usize).min(n - 1)])
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                .unwrap_or_else(|| "-".into())
        };
        writeln!(f, "summary")?;
        writeln!(
            f,
            "  chat messages:        {} (time to GPU p50 {}, p99 {})",
            self.chat_messages,
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99))
        )?;
        writeln!(f, "  chunks transcribed:   {}", self.chunks)?;
        writeln!(f, "  diarization jobs:     {}", self.diarization_jobs)?;
        writeln!(f, "  preemptions:          {}", self.preemptions)?;
        writeln!(f, "  revocations:          {}", self.revocations)?;
        writeln!(f, "  rejections:           {}", self.rejections)?;
        if let Some(audit) = &self.audit {
            writeln!(f, "  audit:                {audit}")?;
        }
        for error in &self.errors {
            writeln!(f, "  error: {error}")?;
        }
        write!(
            f,
            "result: {}",
            if self.ok() {
                "ok, no protocol error"
            } else {
                "FAILED"
            }
        )
    }
}

/// The clock of the story.
#[derive(Clone)]
struct Story {
    start: Instant,
    speed: f64,
}

impl Story {
    /// Story seconds since the start.
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.speed
    }

    /// Sleeps for `secs` of story time.
    async fn sleep(&self, secs: f64) {
        tokio::time::sleep(Duration::from_secs_f64(secs / self.speed)).await;
    }

    /// Sleeps until story second `at`.
    async fn sleep_until(&self, at: f64) {
        let left = at - self.now();
        if left > 0.0 {
            self.sleep(left).await;
        }
    }

    fn say(&self, who: &str, what: &str) {
        println!("[{:>6.1}s] {who:<12} {what}", self.now());
    }
}

/// Runs the demo against the servers of `config`, with a coordinator of its own, and cleans up after.
pub async fn run(config: Config, options: DemoOptions) -> anyhow::Result<Summary> {
    anyhow::ensure!(options.speed > 0.0, "--speed must be greater than 0");
    let tag = format!("demo-{}", std::process::id());
    let mut demo = config;
    let embedded = demo.backends.bus == BusBackend::Embedded;
    demo.nats.prefix = tag.clone();
    demo.redis.key_prefix = tag.clone();
    demo.database.url = with_database(&demo.database.url, &tag.replace('-', "_"))?;
    // The embedded backends live in a directory of the demo's own, removed at the end.
    let data_dir = std::env::temp_dir().join(format!("gpu-coordinator-{tag}"));
    demo.embedded.data_dir = data_dir.display().to_string();
    demo.http.listen = "127.0.0.1:0".into();
    demo.http.tokens.clear();
    demo.nvml.enabled = false;
    demo.gpus = vec![GpuConfig {
        id: "0".into(),
        vram_mb: GPU_MB,
    }];

    println!(
        "GPU Coordinator demo: one {GPU_MB} MB GPU; ASR (priority 2, {ASR_MB} MB), \
         diarization (priority 1, {DIAR_MB} MB), chat (priority 0, {CHAT_MB} MB)"
    );
    let listener = tokio::net::TcpListener::bind(&demo.http.listen)
        .await
        .context("binding a local port for the demo's coordinator")?;
    let base = format!(
        "http://{}",
        listener.local_addr().context("the demo's HTTP address")?
    );
    let mode = if embedded {
        format!(
            "embedded, no server needed (data in {})",
            data_dir.display()
        )
    } else {
        format!(
            "distributed (NATS {}, Redis, Postgres; subjects under `{tag}.`)",
            gpu_coordinator_client::redact(&demo.nats.url)
        )
    };
    println!(
        "story: {:.0} s at {}x speed ([time] is story time; waits are real milliseconds); coordinator \
         {mode}; the services use its HTTP API at {base}",
        options.duration.as_secs_f64(),
        options.speed,
    );
    let shutdown = CancellationToken::new();
    let coordinator = tokio::spawn(crate::app::run(demo.clone(), listener, shutdown.clone()));

    let result = play(&Api::new(base), &options).await;

    shutdown.cancel();
    let stopped = coordinator.await;
    // The history is checked before it is removed: the story must keep every rule.
    let audit = crate::app::audit::run(&demo, crate::audit::Since::Start).await;
    if embedded {
        let _ = std::fs::remove_dir_all(&data_dir);
    } else {
        cleanup(&demo).await;
    }
    let mut summary = result?;
    match audit {
        Ok(Ok(checked)) => {
            summary.audit = Some(format!("every rule held over {} records", checked.records))
        }
        Ok(Err(violation)) => summary.errors.push(format!("audit: {violation}")),
        Err(e) => summary.errors.push(format!("audit: {e:#}")),
    }
    stopped
        .context("the demo's coordinator panicked")?
        .context("the demo's coordinator stopped with an error")?;
    Ok(summary)
}

async fn play(api: &Api, options: &DemoOptions) -> anyhow::Result<Summary> {
    wait_ready(api).await?;

    let story = Story {
        start: Instant::now(),
        speed: options.speed,
    };
    let summary = Arc::new(Mutex::new(Summary::default()));
    // Open before any service asks: the timeline sees every event.
    let events = api.events("/gpu/events").await?;
    let printed = Arc::new(AtomicU64::new(0));
    let timeline_done = CancellationToken::new();
    let timeline = tokio::spawn(timeline(
        events,
        story.clone(),
        summary.clone(),
        printed.clone(),
        timeline_done.clone(),
    ));

    let stop = CancellationToken::new();
    let chunks = Arc::new(AtomicU64::new(0));
    let asr = tokio::spawn(asr_worker(
        api.clone(),
        story.clone(),
        stop.clone(),
        chunks.clone(),
    ));
    let diar = tokio::spawn(diarization(api.clone(), story.clone(), stop.clone()));
    let chat = tokio::spawn(chat(api.clone(), story.clone(), stop.clone(), options.seed));

    story.sleep_until(options.duration.as_secs_f64()).await;
    stop.cancel();
    let mut errors = Vec::new();
    let mut times = Vec::new();
    let mut jobs = 0;
    match asr.await? {
        Ok(()) => {}
        Err(e) => errors.push(format!("asr: {e:#}")),
    }
    match diar.await? {
        Ok(n) => jobs = n,
        Err(e) => errors.push(format!("diarization: {e:#}")),
    }
    match chat.await? {
        Ok(t) => times = t,
        Err(e) => errors.push(format!("chat: {e:#}")),
    }
    // Once the coordinator is idle, the timeline prints every event it keeps, then stops.
    wait_idle(api).await?;
    let kept = api.events_kept().await? as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while printed.load(Ordering::SeqCst) < kept && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    timeline_done.cancel();
    timeline.await?;

    let mut summary = summary.lock().expect("the summary lock").clone();
    summary.chat_messages = times.len();
    times.sort();
    summary.chat_time_to_gpu = times;
    summary.chunks = chunks.load(Ordering::Relaxed);
    summary.diarization_jobs = jobs;
    summary.errors.extend(errors);
    Ok(summary)
}

/// Prints every audit event as a line of the timeline, with who holds the GPU after it; counts them
/// in `printed`.
async fn timeline(
    mut events: mpsc::UnboundedReceiver<SseEvent>,
    story: Story,
    summary: Arc<Mutex<Summary>>,
    printed: Arc<AtomicU64>,
    done: CancellationToken,
) {
    let mut holders = BTreeSet::new();
    loop {
        let next = tokio::select! {
            biased;
            next = events.recv() => next,
            _ = done.cancelled() => return,
        };
        let Some((_, data)) = next else {
            return;
        };
        let Ok(event) = serde_json::from_str::<Event>(&data) else {
            continue;
        };
        printed.fetch_add(1, Ordering::SeqCst);
        let id = event.request_id.clone().unwrap_or_default();
        {
            let mut s = summary.lock().expect("the summary lock");
            match event.kind {
                EventKind::Preempting => s.preemptions += 1,
                EventKind::Revoked => s.revocations += 1,
                EventKind::Rejected => s.rejections += 1,
                _ => {}
            }
        }
        let what = match event.kind {
            EventKind::Requested => format!(
                "asks for the GPU (priority {})",
                event.priority.unwrap_or(0)
            ),
            EventKind::Queued => format!("waits: {}", event.detail.clone().unwrap_or_default()),
            EventKind::Granted => {
                holders.insert(id.clone());
                format!(
                    "GRANTED, fence {} ({})",
                    event.fence.unwrap_or(0),
                    event.detail.clone().unwrap_or_default()
                )
            }
            EventKind::Preempting => {
                "PAUSE ordered: a more urgent request needs the GPU".to_string()
            }
            EventKind::Paused => {
                holders.remove(&id);
                "ACK paused: VRAM freed".to_string()
            }
            EventKind::Resumed => {
                holders.insert(id.clone());
                format!("RESUMED, new fence {}", event.fence.unwrap_or(0))
            }
            EventKind::Released => {
                holders.remove(&id);
                "released the GPU".to_string()
            }
            EventKind::Renewed => continue,
            other => {
                holders.remove(&id);
                format!(
                    "{}: {}",
                    other.as_str().to_uppercase(),
                    event.detail.clone().unwrap_or_default()
                )
            }
        };
        let held = if holders.is_empty() {
            "free".to_string()
        } else {
            holders.iter().cloned().collect::<Vec<_>>().join(" + ")
        };
        story.say(&id, &format!("{what:<64} | GPU 0: {held}"));
    }
}

async fn wait_ready(api: &Api) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(_)) = api.status().await {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the demo's coordinator did not start within 60 s (with --distributed: are Postgres, \
             Redis and NATS running?)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the coordinator holds and queues nothing.
async fn wait_idle(api: &Api) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(doc) = api.status().await? {
            if doc.queue.is_empty() && doc.gpus.iter().all(|g| g.holders.is_empty()) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "requests still live at the end: {doc:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The configured database URL with another database name.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, _) = url
        .rsplit_once('/')
        .filter(|(base, _)| base.contains("://"))
        .with_context(|| {
            format!(
                "database.url {} has no database name",
                crate::telemetry::redact_url(url)
            )
        })?;
    let query = url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    Ok(format!("{base}/{name}{query}"))
}

/// Removes what the demo made: its streams, its Redis keys, its database.
async fn cleanup(demo: &Config) {
    let settings = NatsSettings::from(&demo.nats);
    let options = crate::adapters::nats::options(&settings).await;
    let nats = match (options, crate::adapters::nats::servers(&settings)) {
        (Ok(options), Ok(servers)) => options.connect(servers).await.ok(),
        _ => None,
    };
    if let Some(nats) = nats {
        let js = async_nats::jetstream::new(nats);
        if let Ok(subjects) = gpu_coordinator_wire::Subjects::new(&demo.nats.prefix) {
            let _ = js.delete_stream(subjects.input_stream()).await;
            let _ = js.delete_stream(subjects.output_stream()).await;
        }
    }
    if let Ok(client) = redis::Client::open(demo.redis.url.as_str()) {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", demo.redis.key_prefix))
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
            }
        }
    }
    if let Some((server, name)) = demo.database.url.rsplit_once('/') {
        let name = name.split('?').next().unwrap_or(name).to_string();
        if let Ok(db) = sea_orm::Database::connect(format!("{server}/postgres")).await {
            use sea_orm::ConnectionTrait as _;
            let _ = db
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
            let _ = db.close().await;
        }
    }
}
