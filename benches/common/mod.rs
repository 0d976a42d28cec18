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

    /// [`Bench::start`] with `gpus` GPUs of 24 GB (`0`, `1`, ...).
    pub async fn start_gpus(
        tag: &str,
        max_per_service: usize,
        gpus: usize,
    ) -> anyhow::Result<Bench> {
        let mut config = Config::default();
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
