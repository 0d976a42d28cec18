//! What the benches share: a coordinator running in the bench's process on the machine's Postgres,
//! Redis and NATS, under names of its own, with one GPU of 24 GB (or on the servers of a configuration
//! of the bench's own, [`Bench::start_config`]); request -> grant -> release cycles against it.

//!
//! Beside it: `bus` (the machine's NATS: publishing, streams of a measurement's own, the bus's own
//! figures) and `serving` (a coordinator as a process of its own), re-exported here.

#![allow(dead_code)]

mod bus;
mod serving;

// Each bench uses a part of what is shared, as of the items here (`dead_code` above).
#[allow(unused_imports)]
pub use bus::{
    bus_ceiling, deliveries, fill_queue, next_message, pubacks, publish_all, round_trips,
    stored_messages, Scratch,
};
#[allow(unused_imports)]
pub use serving::{batch_stages, print_stage_means, rss_mb, serve_command, Serving};

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
        config.gpus = gpus_of_24gb(gpus);
        Self::start_config(config).await
    }

    /// A coordinator of `config` as it is (its servers, prefixes and GPUs), HTTP on a free port of
    /// loopback; waits until it answers `status`.
    pub async fn start_config(config: Config) -> anyhow::Result<Bench> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gpu_coordinator::app::run(
            config.clone(),
            listener,
            shutdown.clone(),
        ));
        let client = nats_connect(&config.nats.url).await?;
        wait_status(&client, &config.nats.prefix).await;
        Ok(Bench {
            config,
            http,
            client,
            shutdown,
            task,
        })
    }

    /// Stops the coordinator, [`forget`]s what it left and answers how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        let (client, prefix) = (self.client.clone(), self.config.nats.prefix.clone());
        let ended = self.end().await;
        forget(&client, &prefix).await;
        ended
    }

    /// Stops the coordinator and answers how it ended, leaving what it made (on private servers
    /// that go with it).
    pub async fn end(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// `gpus` GPUs of 24 GB, `0`, `1`, ...
pub fn gpus_of_24gb(gpus: usize) -> Vec<GpuConfig> {
    (0..gpus)
        .map(|i| GpuConfig {
            id: i.to_string(),
            vram_mb: 24_576,
        })
        .collect()
}

/// A NATS connection to `url`, one server or several separated by commas (as `nats.url` takes
/// them), as the coordinator and the client library make it.
pub async fn nats_connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let options = gpu_coordinator_client::connect_options(url).map_err(anyhow::Error::msg)?;
    let servers = gpu_coordinator_client::server_addrs(url).map_err(anyhow::Error::msg)?;
    Ok(options.connect(servers).await?)
}

/// Request -> grant -> release cycles of the service `bench` against the coordinator under a
/// prefix, one after another: each request a plain publish (as `nats pub` does), its `granted`
/// reply read through a subscription, the release published at once.
pub struct Cycles {
    client: async_nats::Client,
    prefix: String,
    replies: async_nats::Subscriber,
    /// The number of the next request (`r0`, `r1`, ...), across runs.
    next: usize,
}

impl Cycles {
    pub async fn new(client: &async_nats::Client, prefix: &str) -> anyhow::Result<Cycles> {
        let replies = client.subscribe(format!("{prefix}.reply.bench")).await?;
        client.flush().await?;
        Ok(Cycles {
            client: client.clone(),
            prefix: prefix.to_owned(),
            replies,
            next: 0,
        })
    }

    /// Runs `count` cycles: each one's latency from publishing the request to receiving its
    /// `granted` reply, and to receiving its `released` reply (the whole cycle).
    pub async fn run(&mut self, count: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
        use futures::StreamExt;
        use gpu_coordinator_wire::{Outcome, Reply};
        let prefix = &self.prefix;
        let mut grant = Vec::with_capacity(count);
        let mut cycle = Vec::with_capacity(count);
        for _ in 0..count {
            let id = format!("r{}", self.next);
            self.next += 1;
            let body = format!(r#"{{"request_id":"{id}","priority":1}}"#);
            let start = std::time::Instant::now();
            self.client
                .publish(format!("{prefix}.request.bench"), body.into())
                .await?;
            let reply = loop {
                let msg = self.replies.next().await.expect("replies");
                let reply: Reply = serde_json::from_slice(&msg.payload)?;
                if reply.request_id == id {
                    break reply;
                }
            };
            anyhow::ensure!(
                reply.outcome == Outcome::Granted,
                "{id} answered {:?}, not granted",
                reply.outcome
            );
            grant.push(start.elapsed());
            let fence = reply.fence.expect("a grant carries its fence");
            let release = format!(r#"{{"request_id":"{id}","fence":{fence}}}"#);
            self.client
                .publish(format!("{prefix}.release.bench"), release.into())
                .await?;
            loop {
                let msg = self.replies.next().await.expect("replies");
                let reply: Reply = serde_json::from_slice(&msg.payload)?;
                if reply.request_id == id {
                    cycle.push(start.elapsed());
                    break;
                }
            }
        }
        Ok((grant, cycle))
    }
}

/// Deletes what a stopped coordinator under the bench's `tag` left, where it exists: its input, output
/// and journal streams and its database `gpu_<tag>`.
pub async fn forget(client: &async_nats::Client, tag: &str) {
    use sea_orm::ConnectionTrait as _;
    if let Ok(subjects) = gpu_coordinator_wire::Subjects::new(tag) {
        let js = async_nats::jetstream::new(client.clone());
        for name in [
            subjects.input_stream(),
            subjects.output_stream(),
            subjects.journal_stream(),
        ] {
            let _ = js.delete_stream(&name).await;
        }
    }
    if let Ok(db) = sea_orm::Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await
    {
        let _ = db
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS \"gpu_{tag}\" WITH (FORCE)"
            ))
            .await;
        let _ = db.close().await;
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
    let at = |p: f64| quantile(&samples, p);
    println!(
        "{name:<44} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        samples.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    );
    at(0.50)
}

/// The `p` quantile (0 to 1) of `sorted`, samples sorted in ascending order.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
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
