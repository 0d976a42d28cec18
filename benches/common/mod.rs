//! What the benches share: a coordinator running in the bench's process on the machine's Postgres,
//! Redis and NATS, under names of its own, with one GPU of 24 GB.

#![allow(dead_code)]

use std::time::Duration;

use gpu_coordinator::config::{Config, GpuConfig};
use tokio_util::sync::CancellationToken;

/// A coordinator started in this process; [`Bench::stop`] ends it.
pub struct Bench {
    pub config: Config,
    /// `http://127.0.0.1:<port>`, where its HTTP API listens.
    pub http: String,
    /// A NATS connection of the bench's own.
    pub client: async_nats::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Bench {
    /// Starts a coordinator under the subject prefix, key prefix and database `tag` (with room for
    /// `max_per_service` requests per service), and waits until it answers `status`.
    pub async fn start(tag: &str, max_per_service: usize) -> anyhow::Result<Bench> {
        Self::start_gpus(tag, max_per_service, 1).await
    }

    /// [`Bench::start`] with `gpus` GPUs of 24 GB (`0`, `1`, ...), Postgres written behind the
    /// journal stream when `GPU_BENCH_WRITE_BEHIND=1`.
    pub async fn start_gpus(
        tag: &str,
        max_per_service: usize,
        gpus: usize,
    ) -> anyhow::Result<Bench> {
        Self::start_with(tag, max_per_service, gpus, write_behind_env()).await
    }

    /// [`Bench::start_gpus`], `database.write_behind` as given.
    pub async fn start_with(
        tag: &str,
        max_per_service: usize,
        gpus: usize,
        write_behind: bool,
    ) -> anyhow::Result<Bench> {
        let mut config = Config::default();
        config.database.write_behind = write_behind;
        config.nats.prefix = tag.to_owned();
        config.redis.key_prefix = tag.to_owned();
        config.database.url = format!("postgres://postgres@127.0.0.1:5432/gpu_{tag}");
        config.queue.max_per_service = max_per_service;
        config.gpus = (0..gpus)
            .map(|i| GpuConfig {
                id: i.to_string(),
                vram_mb: 24_576,
            })
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gpu_coordinator::app::run(
            config.clone(),
            listener,
            shutdown.clone(),
        ));
        let client = async_nats::connect(&config.nats.url).await?;
        wait_status(&client, tag).await;
        Ok(Bench {
            config,
            http,
            client,
            shutdown,
            task,
        })
    }

    /// Stops the coordinator and answers how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// Waits until a coordinator answers `<prefix>.status`.
pub async fn wait_status(client: &async_nats::Client, prefix: &str) {
    loop {
        let asked = client.request(format!("{prefix}.status"), "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), asked).await {
            return;
        }
    }
}

/// Prints `samples`' count, p50, p99 and max in milliseconds after `name`, and answers the p50.
pub fn percentiles(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    println!(
        "{name:<44} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        samples.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    );
    at(0.50)
}

/// Publishes `queued` requests (`q0`, `q1`, ...; priorities 1 to 3, services `svc0`..) into the input
/// stream, in windows of 1,000 awaited PubAcks; an input whose PubAck does not come is published again
/// under the same message id (stored once).
pub async fn fill_queue(
    js: &async_nats::jetstream::Context,
    subjects: &gpu_coordinator_wire::Subjects,
    queued: usize,
    services: usize,
) -> anyhow::Result<()> {
    let publish = |i: usize| {
        let js = js.clone();
        let subject = subjects.request(&format!("svc{}", i % services));
        async move {
            let body = format!(
                r#"{{"request_id":"q{i}","priority":{},"timeout_ms":3600000}}"#,
                1 + i % 3
            );
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(body.into())
                .message_id(format!("q{i}"));
            js.send_publish(subject, publish).await
        }
    };
    for window in (0..queued).collect::<Vec<_>>().chunks(1_000) {
        let mut acks = Vec::with_capacity(window.len());
        for &i in window {
            acks.push((i, publish(i).await?));
        }
        for (i, ack) in acks {
            let mut tries = 0;
            let mut result = ack.await.map(|_| ()).map_err(anyhow::Error::from);
            while result.is_err() && tries < 10 {
                tries += 1;
                result = match publish(i).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
            }
            result.map_err(|e| anyhow::anyhow!("publishing q{i}: {e}"))?;
        }
    }
    Ok(())
}

/// The resident set of process `pid`, in MB (NaN where `/proc` does not say).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Whether `GPU_BENCH_WRITE_BEHIND=1` asks for the coordinators that a bench runs once to write
/// Postgres behind the journal stream (`database.write_behind`).
pub fn write_behind_env() -> bool {
    std::env::var("GPU_BENCH_WRITE_BEHIND").is_ok_and(|v| v == "1")
}

/// How a coordinator writes its journal, for the benches' lines.
pub fn journal_mode(write_behind: bool) -> &'static str {
    if write_behind {
        "Postgres written behind"
    } else {
        "Postgres commit"
    }
}

/// The first number on the bench's command line (`cargo bench --bench NAME -- N`), else `default`.
pub fn number_arg<T: std::str::FromStr>(default: T) -> T {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(default)
}

/// `gpu-coordinator serve` on the machine's servers under the bench's `tag` (subject prefix, key
/// prefix, database `gpu_<tag>`), HTTP on a free port, without NVML, its output discarded; the caller
/// adds what else it needs and spawns it.
pub fn serve_command(tag: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"));
    command
        .arg("serve")
        .env("GPU_COORDINATOR_NATS__PREFIX", tag)
        .env("GPU_COORDINATOR_REDIS__KEY_PREFIX", tag)
        .env(
            "GPU_COORDINATOR_DATABASE__URL",
            format!("postgres://postgres@127.0.0.1:5432/gpu_{tag}"),
        )
        .env("GPU_COORDINATOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("GPU_COORDINATOR_NVML__ENABLED", "false")
        .env(
            "GPU_COORDINATOR_DATABASE__WRITE_BEHIND",
            write_behind_env().to_string(),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    command
}

/// The coordinator's `gpu_coordinator_batch_stage_seconds` as read from `/metrics` at `http`: each
/// stage's total seconds and count.
pub async fn batch_stages(
    http: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, (f64, u64)>> {
    let text = reqwest::get(format!("{http}/metrics"))
        .await?
        .text()
        .await?;
    let mut stages = std::collections::BTreeMap::<String, (f64, u64)>::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("gpu_coordinator_batch_stage_seconds_") else {
            continue;
        };
        let (Some((what, rest)), Some(value)) =
            (rest.split_once("{stage=\""), line.split(' ').nth(1))
        else {
            continue;
        };
        let Some((stage, _)) = rest.split_once('"') else {
            continue;
        };
        let entry = stages.entry(stage.to_owned()).or_default();
        match what {
            "sum" => entry.0 = value.parse()?,
            "count" => entry.1 = value.parse()?,
            _ => {}
        }
    }
    Ok(stages)
}

/// Prints each stage's mean between two readings of [`batch_stages`], in milliseconds.
pub fn print_stage_means(
    name: &str,
    before: &std::collections::BTreeMap<String, (f64, u64)>,
    after: &std::collections::BTreeMap<String, (f64, u64)>,
) {
    let means: Vec<String> = after
        .iter()
        .filter_map(|(stage, (sum, count))| {
            let (sum0, count0) = before.get(stage).copied().unwrap_or_default();
            let n = count.checked_sub(count0).filter(|&n| n > 0)?;
            Some(format!("{stage} {:.3}", (sum - sum0) / n as f64 * 1e3))
        })
        .collect();
    println!("{name}, mean ms per batch: {}", means.join(", "));
}
