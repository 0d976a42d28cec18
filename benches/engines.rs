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
//!    that gives it that ([`relay::nodelay_front`]); the fake as served (`axum::serve`, Nagle on)
//!    is printed beside it as a reference, and the sidecar once more with each request 60 ms after
//!    the last answer (beyond the kernel's delayed ACK). Goal: <= 1 ms above direct.
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
//!
//! The parts lie beside this file, under `engines/`: `setup` (the coordinator with its sidecars, the
//! fakes, NVML read from the fake GPU's ledger), `relay` (the `TCP_NODELAY` relay), `measure` (the
//! timed requests and their quantiles), `overhead` (parts 1 and 2) and `chat` (part 3).

#[path = "engines/chat.rs"]
mod chat;
mod common;
#[path = "engines/measure.rs"]
mod measure;
#[path = "engines/overhead.rs"]
mod overhead;
#[path = "engines/relay.rs"]
mod relay;
#[path = "engines/setup.rs"]
mod setup;

use std::time::Duration;

use anyhow::Context as _;

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

/// A row of the final table.
struct Row {
    figure: String,
    goal: String,
    measured: String,
    /// `None`: a reference, not held to the goal.
    met: Option<bool>,
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
    overhead::proxy_overhead(mode, &format!("{tag}p"), n, streams, &mut rows)
        .await
        .context(
            "parts 1 and 2 (a direct request refused as asleep: the engine's sidecar lost its lease \
             mid-run, as when a loaded machine costs the coordinator its leadership; \
             GPU_BENCH_LOG=info shows it)",
        )?;
    for (i, sample) in sample_ms.iter().enumerate() {
        chat::chat_rounds(mode, &format!("{tag}c{i}"), *sample, rounds, &mut rows).await?;
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
