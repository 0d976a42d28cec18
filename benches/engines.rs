//! Engine sidecars against fake inference engines (test-support's `engines`), in one run, each figure
//! beside direct calls to the same fake engine:
//!
//! 1. **Proxy overhead per small request**: N small non-streamed `POST /v1/completions`, straight to
//!    a fake vLLM (`chunk_delay` 0 and no tokens: it answers at once, where each token, even 0 ms
//!    apart, would be a tokio sleep ending on the timer's next 1 ms tick) and through its sidecar
//!    (awake under a held lease, `idle_ms` an hour), interleaved, each side on a keep-alive
//!    connection of its own (one reqwest client each). Goal: p50 <= 0.2 ms above direct.
//! 2. **Time to the first streamed chunk**: `"stream": true` completions, direct and proxied,
//!    interleaved, timed from the send to the first body chunk, the engine sending its headers first
//!    and its first token 10 ms later, as a real engine does after its prefill. The headline is an
//!    engine whose socket has `TCP_NODELAY`, as uvicorn's (vLLM, SGLang) has: a fake behind a relay
//!    that gives it that ([`nodelay_front`]); the fake as served (`axum::serve`, Nagle on) is printed
//!    beside it as a reference, and the sidecar once more with each request 60 ms after the last
//!    answer (beyond the kernel's delayed ACK). Goal: <= 1 ms above direct.
//! 3. **The chat's time to GPU through sidecars**: a chat engine (priority 0, on request, 16,000 MB)
//!    and a background engine (priority 2, `want = "always"`, 12,000 MB) on a 24,000 MB fake GPU, the
//!    coordinator's NVML a probe over the fake GPU's ledger (as in `tests/it/engines.rs`), so that
//!    the coordinator's settle and the sidecar's freed-memory check see the fakes' memory. R rounds:
//!    with the background engine awake and the chat engine asleep, a streamed chat request through
//!    the chat sidecar (the chat engine behind the same relay as in 2), timed to its first chunk;
//!    less the background engine's sleep and the chat engine's wake (the fakes' `sleep_time` and
//!    `wake_time`, 50 ms each) and the direct first-chunk time (measured right after, on the chat
//!    engine still awake), the remainder is what the coordinator and the sidecars add. Goal:
//!    <= 10 ms at p50. Run once per `nvml.sample_ms` in `GPU_BENCH_SAMPLE_MS` (default `10,1000`:
//!    low, and the default), with where the time went, read from the fake GPU's ledger, the fakes'
//!    awake intervals, the sidecar's measured sleep and the coordinator's events.
//!
//! Embedded mode (no server) by default; `-- --distributed` or `GPU_BENCH_DISTRIBUTED=1` runs the
//! coordinators on the machine's NATS, Redis and Postgres. Sizes: `GPU_BENCH_N` (default 2000, or
//! the first number on the command line), `GPU_BENCH_STREAMS` (500), `GPU_BENCH_ROUNDS` (20);
//! `GPU_BENCH_LOG=info` shows the coordinator's and the sidecars' log.
//!
//! `cargo bench --bench engines [-- [N] [--distributed]]`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use gpu_coordinator::adapters::nvml::{DeviceSample, GpuProbe, ProbeError};
use gpu_coordinator::app::Extras;
use gpu_coordinator::config::{BackendsConfig, Config, GpuConfig};
use gpu_coordinator::engines::{EngineConfig, EngineKind, Want};
use gpu_coordinator_test_support::engines::{FakeEngine, FakeEngineOptions, FakeGpu, Kind};
use gpu_coordinator_test_support::free_port;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const GPU_MB: u64 = 24_000;
/// The fakes' sleep and wake in the chat rounds: what is taken off the chat's time to the GPU.
const SLEEP_TIME: Duration = Duration::from_millis(50);
const WAKE_TIME: Duration = Duration::from_millis(50);
/// The chat sidecar goes idle this long after its last request, so that the rounds come quickly.
const CHAT_IDLE_MS: u64 = 200;
/// How long a round waits for the engines to be back where it starts.
const ROUND_WAIT: Duration = Duration::from_secs(30);

/// The goals, in ms.
const GOAL_OVERHEAD_MS: f64 = 0.2;
const GOAL_FIRST_CHUNK_MS: f64 = 1.0;
const GOAL_TIME_TO_GPU_MS: f64 = 10.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Embedded,
    Distributed,
}

impl Mode {
    fn from_env() -> Mode {
        let asked = std::env::args().any(|a| a == "--distributed")
            || std::env::var("GPU_BENCH_DISTRIBUTED").is_ok_and(|v| v == "1");
        if asked {
            Mode::Distributed
        } else {
            Mode::Embedded
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded (SQLite journal, embedded bus, leases in memory)",
            Mode::Distributed => "distributed (Postgres commit, NATS, Redis on loopback)",
        }
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// NVML as the coordinator and the sidecars see it, read from the fake GPU's ledger (as the tests'
/// `LedgerProbe`): the coordinator's settle and the sidecars' freed-memory check see the fakes' memory.
struct LedgerProbe {
    gpu: FakeGpu,
}

impl GpuProbe for LedgerProbe {
    fn devices(&self) -> Result<Vec<DeviceSample>, ProbeError> {
        Ok(vec![DeviceSample {
            mig: None,
            index: 0,
            uuid: "GPU-fake-ledger".into(),
            name: "fake GPU".into(),
            total_mb: self.gpu.capacity_mb(),
            used_mb: self.gpu.used_mb(),
            processes: Vec::new(),
        }])
    }
}

/// A sidecar in front of `upstream`, on a free port of loopback.
fn engine(service: &str, upstream: &str, priority: u8, vram_mb: u64) -> EngineConfig {
    EngineConfig {
        priority: Some(priority),
        vram_mb: Some(vram_mb),
        // Long enough that a loaded machine's late renewal does not end a lease mid-measurement.
        lease_ms: Some(30_000),
        idle_ms: 3_600_000,
        max_wait_ms: 20_000,
        drain_ms: 500,
        ..EngineConfig::new(
            service,
            EngineKind::Vllm,
            &format!("127.0.0.1:{}", free_port()),
            upstream,
        )
    }
}

/// A coordinator with sidecars, in this process.
struct Running {
    http: String,
    config: Config,
    mode: Mode,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts `engines` under a coordinator of their own (`tag`: its prefix, key prefix, database or
    /// data directory), NVML being `gpu`'s ledger sampled every `sample_ms`; waits for its status.
    async fn start(
        tag: &str,
        mode: Mode,
        engines: Vec<EngineConfig>,
        gpu: &FakeGpu,
        sample_ms: u64,
    ) -> anyhow::Result<Running> {
        let mut config = Config::default();
        config.nats.prefix = tag.to_owned();
        config.redis.key_prefix = tag.to_owned();
        config.database.url = format!("postgres://postgres@127.0.0.1:5432/gpu_{tag}");
        // JetStream sets each stream's max_bytes aside in its store up front.
        config.nats.max_bytes = 16 << 20;
        if mode == Mode::Embedded {
            config.backends = BackendsConfig::embedded();
            config.embedded.data_dir = std::env::temp_dir()
                .join(format!("gpu-bench-{tag}"))
                .display()
                .to_string();
        }
        config.gpus = vec![GpuConfig {
            id: "0".into(),
            vram_mb: GPU_MB,
        }];
        config.nvml.sample_ms = sample_ms;
        config.engines = engines;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let extras = Extras {
            probe: Some(Arc::new(LedgerProbe { gpu: gpu.clone() })),
        };
        let task = tokio::spawn(gpu_coordinator::app::run_with(
            config.clone(),
            listener,
            stop.clone(),
            extras,
        ));
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(res) = client.get(format!("{http}/gpu/status")).send().await {
                if res.status().is_success() {
                    break;
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60) && !task.is_finished(),
                "the coordinator `{tag}` did not answer GET /gpu/status"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Running {
            http,
            config,
            mode,
            stop,
            task,
        })
    }

    /// Each sidecar's row of `GET /gpu/engines`, by service.
    async fn engines(&self, client: &reqwest::Client) -> anyhow::Result<Vec<Value>> {
        let doc: Value = client
            .get(format!("{}/gpu/engines", self.http))
            .send()
            .await?
            .json()
            .await?;
        Ok(doc.as_array().cloned().unwrap_or_default())
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let ended = self.task.await?;
        match self.mode {
            Mode::Embedded => {
                let _ = std::fs::remove_dir_all(&self.config.embedded.data_dir);
            }
            Mode::Distributed => {
                if let Ok(client) = async_nats::connect(&self.config.nats.url).await {
                    common::forget(&client, &self.config.nats.prefix).await;
                }
            }
        }
        ended
    }
}

/// A fake vLLM of `mb` on `gpu`, asleep at the start.
async fn fake(
    gpu: &FakeGpu,
    name: &str,
    mb: u64,
    chunks: usize,
    chunk_delay: Duration,
) -> FakeEngine {
    let mut options = FakeEngineOptions::new(name, Kind::Vllm, mb);
    options.awake_at_start = false;
    options.sleep_time = SLEEP_TIME;
    options.wake_time = WAKE_TIME;
    options.chunks = chunks;
    options.chunk_delay = chunk_delay;
    FakeEngine::start(gpu, options).await
}

/// A TCP relay in front of a fake engine, so that it answers as a real engine's server does: the
/// fakes are served by `axum::serve`, which leaves Nagle's algorithm on, so a streamed answer's first
/// chunk, written after its headers, waits for the client's delayed ACK of the headers (40 ms on
/// Linux, once the keep-alive connection is in its request-response mode), where uvicorn (vLLM,
/// SGLang) sets `TCP_NODELAY`. The relay's sockets have `TCP_NODELAY`, and it reads the engine with
/// `TCP_QUICKACK` set before each read, so that the engine's writes are acknowledged at once and go
/// out as they are made. Answers the relay's URL.
async fn nodelay_front(engine_url: &str) -> anyhow::Result<String> {
    let engine: std::net::SocketAddr = engine_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(engine).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let fd = std::os::fd::AsRawFd::as_raw_fd(&upstream);
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_engine, mut to_engine) = upstream.into_split();
                let requests = tokio::io::copy(&mut from_client, &mut to_engine);
                let answers = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        quickack(fd);
                        match from_engine.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to_client.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = requests => {}
                    () = answers => {}
                }
            });
        }
    });
    Ok(url)
}

/// Leaves the socket's delayed-ACK mode: what comes next is acknowledged once read.
fn quickack(fd: std::os::fd::RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open TCP socket owned by the relay's task (its halves are alive while it
    // reads), and the option's value is a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn small_body(stream: bool) -> Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 8, "stream": stream})
}

/// One small non-streamed completion at `base`, timed to the end of its body.
async fn small(client: &reqwest::Client, base: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let response = client
        .post(format!("{base}/v1/completions"))
        .json(&small_body(false))
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    let took = start.elapsed();
    anyhow::ensure!(
        status.is_success(),
        "{base}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(took)
}

/// One streamed request of `body` to `url`, timed from the send to its first body chunk; the rest is
/// read to the end, so that the connection is kept for the next one.
async fn first_chunk(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut response = client.post(url).json(body).send().await?;
    let status = response.status();
    let mut first = None;
    let mut text = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if first.is_none() && !chunk.is_empty() {
            first = Some(start.elapsed());
        }
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    anyhow::ensure!(status.is_success(), "{url}: {status} {text}");
    anyhow::ensure!(
        text.contains("[DONE]"),
        "{url}: the stream ended early: {text}"
    );
    first.ok_or_else(|| anyhow::anyhow!("{url}: an empty stream"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p` quantile of `samples` (ms), nearest rank; what is not a number (a figure a round could
/// not read) is left out.
fn quantile(samples: &[f64], p: f64) -> f64 {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Prints p50/p90/p99 of `samples` (ms) after `name`; answers the p50.
fn line(name: &str, samples: &[f64]) -> f64 {
    println!(
        "{name:<52} n={:<5} p50={:>8.3} ms  p90={:>8.3} ms  p99={:>8.3} ms",
        samples.iter().filter(|v| v.is_finite()).count(),
        quantile(samples, 0.50),
        quantile(samples, 0.90),
        quantile(samples, 0.99),
    );
    quantile(samples, 0.50)
}

/// A row of the final table.
struct Row {
    figure: String,
    goal: String,
    measured: String,
    /// `None`: a reference, not held to the goal.
    met: Option<bool>,
}

/// How many samples (ms) took 30 ms or more: a chunk that waited for a delayed ACK (40 ms).
fn stalls(samples: &[f64]) -> usize {
    samples.iter().filter(|t| **t >= 30.0).count()
}

/// Parts 1 and 2: one coordinator, three sidecars held awake: one in front of an engine that answers
/// at once (part 1), two in front of engines that stream their first token 10 ms after their headers,
/// one of them as the fakes serve (Nagle's algorithm on) and one behind [`nodelay_front`] (part 2).
async fn proxy_overhead(
    mode: Mode,
    tag: &str,
    n: usize,
    streams: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let gpu = FakeGpu::start(GPU_MB).await;
    // chunks 0: the answer is made at once (each chunk, even 0 ms apart, is a tokio sleep that
    // ends on the timer's next 1 ms tick).
    let quick = fake(&gpu, "quick", 1_000, 0, Duration::ZERO).await;
    let raw = fake(&gpu, "raw", 1_000, 1, Duration::from_millis(10)).await;
    let fronted = fake(&gpu, "fronted", 1_000, 1, Duration::from_millis(10)).await;
    let fronted_url = nodelay_front(&fronted.url()).await?;
    let sidecars = vec![
        engine("quick", &quick.url(), 1, 1_000),
        engine("raw", &raw.url(), 1, 1_000),
        engine("fronted", &fronted_url, 1, 1_000),
    ];
    let proxies: Vec<String> = sidecars
        .iter()
        .map(|s| format!("http://{}", s.listen))
        .collect();
    let coordinator = Running::start(tag, mode, sidecars, &gpu, 1_000).await?;
    let direct = reqwest::Client::new();
    let proxied = reqwest::Client::new();
    // The first request through each sidecar asks for the GPU and wakes its engine; from then on the
    // lease is held (idle_ms is an hour).
    small(&proxied, &proxies[0]).await?;
    for proxy in &proxies[1..] {
        let url = format!("{proxy}/v1/completions");
        first_chunk(&proxied, &url, &small_body(true)).await?;
    }
    anyhow::ensure!(
        quick.awake() && raw.awake() && fronted.awake(),
        "the engines are awake"
    );

    // 1. Small requests, interleaved, after a warm-up of each connection.
    for _ in 0..100 {
        small(&direct, &quick.url()).await?;
        small(&proxied, &proxies[0]).await?;
    }
    let (mut straight, mut through) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        straight.push(ms(small(&direct, &quick.url()).await?));
        through.push(ms(small(&proxied, &proxies[0]).await?));
    }
    println!(
        "\n1. small non-streamed POST /v1/completions (fake vLLM answering at once: chunk_delay 0, no tokens), interleaved"
    );
    let a = line("direct to the engine", &straight);
    let b = line("through the sidecar", &through);
    let diffs: Vec<f64> = through.iter().zip(&straight).map(|(t, s)| t - s).collect();
    line("pairwise difference (proxied - direct)", &diffs);
    println!("p50 difference: {:+.3} ms", b - a);
    rows.push(Row {
        figure: "proxy overhead per small request, p50".into(),
        goal: format!("<= {GOAL_OVERHEAD_MS} ms above direct"),
        measured: format!("{:+.3} ms (direct {a:.3}, proxied {b:.3} ms; n={n})", b - a),
        met: Some(b - a <= GOAL_OVERHEAD_MS),
    });

    // 2. Streamed, to the first chunk: the headline against the engine that answers as a real
    // server does; then the fake as it is served, whose own Nagle stalls the direct path.
    let body = small_body(true);
    for (what, engine_url, proxy, goal) in [
        (
            "engine with TCP_NODELAY (the fake behind the relay)",
            fronted_url.clone(),
            &proxies[2],
            true,
        ),
        (
            "the fake as served (Nagle on)",
            raw.url(),
            &proxies[1],
            false,
        ),
    ] {
        let (engine_url, proxy_url) = (
            format!("{engine_url}/v1/completions"),
            format!("{proxy}/v1/completions"),
        );
        for _ in 0..20 {
            first_chunk(&direct, &engine_url, &body).await?;
            first_chunk(&proxied, &proxy_url, &body).await?;
        }
        let (mut straight, mut through) =
            (Vec::with_capacity(streams), Vec::with_capacity(streams));
        for _ in 0..streams {
            straight.push(ms(first_chunk(&direct, &engine_url, &body).await?));
            through.push(ms(first_chunk(&proxied, &proxy_url, &body).await?));
        }
        println!(
            "\n2. time to the first chunk of a streamed completion (first token 10 ms after the \
             headers), {what}, interleaved"
        );
        let a = line("direct to the engine", &straight);
        let b = line("through the sidecar", &through);
        let (a90, b90) = (quantile(&straight, 0.9), quantile(&through, 0.9));
        println!(
            "p50 difference {:+.3} ms, p90 difference {:+.3} ms; 30 ms or more: {} direct, {} proxied",
            b - a,
            b90 - a90,
            stalls(&straight),
            stalls(&through)
        );
        rows.push(Row {
            figure: format!("time to first streamed chunk, {what}, p50 / p90"),
            goal: format!("<= {GOAL_FIRST_CHUNK_MS} ms above direct"),
            measured: format!(
                "{:+.3} / {:+.3} ms (direct {a:.3} / {a90:.3}, proxied {b:.3} / {b90:.3} ms; n={streams})",
                b - a,
                b90 - a90
            ),
            met: goal.then_some(b - a <= GOAL_FIRST_CHUNK_MS),
        });
    }
    // The same through the sidecar, each request more than the kernel's delayed-ACK time (40 ms)
    // after the last answer: the client's connection then leaves its request-response mode and
    // acknowledges the headers at once, so a stall above is Nagle's on the sidecar's socket.
    let proxy_url = format!("{}/v1/completions", proxies[2]);
    let spaced_n = streams.min(100);
    let mut spaced = Vec::with_capacity(spaced_n);
    for _ in 0..spaced_n {
        tokio::time::sleep(Duration::from_millis(60)).await;
        spaced.push(ms(first_chunk(&proxied, &proxy_url, &body).await?));
    }
    line(
        "through the sidecar, each 60 ms after the last answer",
        &spaced,
    );
    println!("30 ms or more: {} of {spaced_n}", stalls(&spaced));
    anyhow::ensure!(
        [&quick, &raw, &fronted]
            .iter()
            .all(|e| e.refused_asleep() == 0),
        "nothing reached an engine asleep"
    );
    coordinator.stop().await
}

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
async fn chat_rounds(
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
    let client = reqwest::Client::new();
    let direct = reqwest::Client::new();
    let body = json!({
        "model": "m", "stream": true, "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let mut done: Vec<Round> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // The background engine awake under its lease, the chat engine asleep with its GPU given back.
        let waited = Instant::now();
        loop {
            let views = coordinator.engines(&client).await?;
            let state = |service: &str| {
                views
                    .iter()
                    .find(|v| v["service"] == service)
                    .and_then(|v| v["state"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            if bg.awake()
                && !chat.awake()
                && gpu.holding("chat") == 0
                && state("bg") == "awake"
                && state("chat") == "asleep"
            {
                break;
            }
            anyhow::ensure!(
                waited.elapsed() < ROUND_WAIT,
                "round {round}: the background engine did not come back awake (bg {}, chat {})",
                state("bg"),
                state("chat")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;

        // The coordinator's own clock (this process's: the wall clock read once, then monotonic),
        // which its events are stamped with, in whole ms.
        let sent_ms = gpu_coordinator::clock::now_ms();
        let sent = Instant::now();
        let total = first_chunk(&client, &chat_proxy, &body).await?;
        let direct_first = if chat.awake() {
            ms(first_chunk(&direct, &chat_direct, &body).await?)
        } else {
            f64::NAN
        };
        // Where the time went: the ledger's and the fakes' instants, the sidecar's measured sleep,
        // and the coordinator's events (ms precision, on the wall clock).
        let log = gpu.log();
        let after = |engine: &str, freed: bool| {
            log.iter()
                .find(|e| e.at > sent && e.engine == engine && (e.engine_mb == 0) == freed)
                .map(|e| e.at)
        };
        let bg_sleep_call = bg
            .awake_intervals()
            .iter()
            .filter_map(|(_, end)| *end)
            .find(|end| *end > sent);
        let chat_serving = chat
            .awake_intervals()
            .iter()
            .map(|(start, _)| *start)
            .find(|start| *start > sent);
        let views = coordinator.engines(&client).await?;
        let bg_slept = views
            .iter()
            .find(|v| v["service"] == "bg")
            .and_then(|v| v["last_sleep_ms"].as_f64());
        // The events are read back from the output stream: a late one is asked for again.
        let mut events = Vec::new();
        for _ in 0..10 {
            events = events_since(&client, &coordinator.http, sent_ms).await?;
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
        let event = |kind: &str, service: &str| {
            events
                .iter()
                .find(|(k, s, _)| k == kind && s == service)
                .map(|(_, _, at)| (*at - sent_ms) as f64)
        };
        let (Some(call), Some(freed), Some(alloc), Some(serving), Some(slept)) = (
            bg_sleep_call,
            after("bg", true),
            after("chat", false),
            chat_serving,
            bg_slept,
        ) else {
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
        done.push(Round {
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
        });
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
    coordinator.stop().await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(filter) = std::env::var("GPU_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let mode = Mode::from_env();
    let n: usize = env_number("GPU_BENCH_N", common::number_arg(2_000));
    let streams: usize = env_number("GPU_BENCH_STREAMS", 500);
    let rounds: usize = env_number("GPU_BENCH_ROUNDS", 20);
    let sample_ms: Vec<u64> = std::env::var("GPU_BENCH_SAMPLE_MS")
        .unwrap_or_else(|_| "10,1000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    println!(
        "machine: {} cores; mode: {}",
        std::thread::available_parallelism()?,
        mode.name()
    );
    let tag = format!("benchengines{}", std::process::id());
    let mut rows = Vec::new();
    proxy_overhead(mode, &format!("{tag}p"), n, streams, &mut rows)
        .await
        .context(
            "parts 1 and 2 (a direct request refused as asleep: the engine's sidecar lost its lease \
             mid-run, as when a loaded machine costs the coordinator its leadership; \
             GPU_BENCH_LOG=info shows it)",
        )?;
    for (i, sample) in sample_ms.iter().enumerate() {
        chat_rounds(mode, &format!("{tag}c{i}"), *sample, rounds, &mut rows).await?;
    }

    println!(
        "\nengine sidecars, {} mode, {} cores:",
        match mode {
            Mode::Embedded => "embedded",
            Mode::Distributed => "distributed",
        },
        std::thread::available_parallelism()?
    );
    println!("| figure | goal | measured | met |");
    println!("|---|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} |",
            row.figure,
            row.goal,
            row.measured,
            match row.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "(reference)",
            }
        );
    }
    Ok(())
}
