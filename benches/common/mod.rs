//! What the benches share: a coordinator running in the bench's process on the machine's Postgres,
//! Redis and NATS, under names of its own, with one GPU of 24 GB (or on the servers of a configuration
//! of the bench's own, [`Bench::start_config`]); request -> grant -> release cycles against it.

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

/// Publishes `queued` requests (`q0`, `q1`, ...; priorities 1 to 3, services `svc0`..) into the input
/// stream, as [`publish_all`] does.
pub async fn fill_queue(
    js: &async_nats::jetstream::Context,
    subjects: &gpu_coordinator_wire::Subjects,
    queued: usize,
    services: usize,
) -> anyhow::Result<()> {
    publish_all(js, queued, |i| {
        (
            subjects.request(&format!("svc{}", i % services)),
            format!(
                r#"{{"request_id":"q{i}","priority":{},"timeout_ms":3600000}}"#,
                1 + i % 3
            ),
            format!("q{i}"),
        )
    })
    .await
}

/// Publishes `count` messages, `message(i)` answering the subject, body and message id of the i-th, in
/// windows of 1,000 awaited PubAcks; a message whose PubAck does not come is published again under
/// the same message id (stored once).
pub async fn publish_all(
    js: &async_nats::jetstream::Context,
    count: usize,
    message: impl Fn(usize) -> (String, String, String),
) -> anyhow::Result<()> {
    let publish = |i: usize| {
        let (subject, body, id) = message(i);
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(id);
        js.send_publish(subject, publish)
    };
    for window in (0..count).collect::<Vec<_>>().chunks(1_000) {
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
            result.map_err(|e| anyhow::anyhow!("publishing message {i}: {e}"))?;
        }
    }
    Ok(())
}

/// A stream of a reference measurement's own (file storage, as the coordinator's): `<TAG>_<WHAT>` on
/// subject `<tag>.<what>`.
pub struct Scratch {
    js: async_nats::jetstream::Context,
    stream: async_nats::jetstream::stream::Stream,
    pub subject: String,
}

impl Scratch {
    pub async fn create(
        js: &async_nats::jetstream::Context,
        tag: &str,
        what: &str,
    ) -> anyhow::Result<Scratch> {
        let subject = format!("{tag}.{what}");
        let stream = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: format!("{}_{}", tag.to_uppercase(), what.to_uppercase()),
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await?;
        Ok(Scratch {
            js: js.clone(),
            stream,
            subject,
        })
    }

    /// Its messages, through a pull consumer that acknowledges none (as the client library reads
    /// its answers).
    pub async fn read(&self) -> anyhow::Result<async_nats::jetstream::consumer::pull::Stream> {
        use async_nats::jetstream::consumer;
        let consumer = self
            .stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }

    pub async fn delete(self) -> anyhow::Result<()> {
        self.js
            .delete_stream(&self.stream.cached_info().config.name)
            .await?;
        Ok(())
    }
}

/// The bus's own ceiling on this machine: `count` messages of about a request's size published into a
/// stream of their own (file storage, as the coordinator's) as [`publish_all`] does, while a pull
/// consumer reads them; answers the messages stored and delivered per second. Every input and output
/// of the coordinator takes this path at least once, so a figure that needs M messages can go no
/// faster than this divided by M.
pub async fn bus_ceiling(
    client: &async_nats::Client,
    tag: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let js = async_nats::jetstream::new(client.clone());
    let scratch = Scratch::create(&js, tag, "ceiling").await?;
    let mut messages = scratch.read().await?;
    let start = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..count {
            next_message(&mut messages).await?;
        }
        anyhow::Ok(())
    });
    publish_all(&js, count, |i| {
        (
            scratch.subject.clone(),
            format!(r#"{{"request_id":"c{i}","priority":1,"timeout_ms":3600000}}"#),
            format!("c{i}"),
        )
    })
    .await?;
    reader.await??;
    let rate = count as f64 / start.elapsed().as_secs_f64();
    scratch.delete().await?;
    Ok(rate)
}

/// `samples` NATS request-reply round trips through an echo responder on the machine's server.
pub async fn round_trips(tag: &str, samples: usize) -> anyhow::Result<Vec<std::time::Duration>> {
    use futures::StreamExt;
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let subject = format!("{tag}.echo");
    let mut echo = client.subscribe(subject.clone()).await?;
    let responder = client.clone();
    let echoing = tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = std::time::Instant::now();
        client.request(subject.clone(), "x".into()).await?;
        times.push(start.elapsed());
    }
    echoing.abort();
    Ok(times)
}

/// `samples` plain publishes into a stream of their own, each timed until a pull consumer delivers it
/// (the path of every input into the coordinator, and of every answer out to the client library),
/// after `pause()` each.
pub async fn deliveries(
    tag: &str,
    samples: usize,
    mut pause: impl FnMut() -> std::time::Duration,
) -> anyhow::Result<Vec<std::time::Duration>> {
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = async_nats::jetstream::new(client.clone());
    let scratch = Scratch::create(&js, tag, "delivery").await?;
    let mut messages = scratch.read().await?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let wait = pause();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let start = std::time::Instant::now();
        client.publish(scratch.subject.clone(), "x".into()).await?;
        next_message(&mut messages).await?;
        times.push(start.elapsed());
    }
    drop(messages);
    scratch.delete().await?;
    Ok(times)
}

/// `samples` publishes of a journal-sized message (300 bytes) into a stream of their own, each timed
/// until its PubAck: what the write-behind journal waits for in place of a Postgres commit.
pub async fn pubacks(tag: &str, samples: usize) -> anyhow::Result<Vec<std::time::Duration>> {
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = async_nats::jetstream::new(client);
    let scratch = Scratch::create(&js, tag, "puback").await?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = std::time::Instant::now();
        js.publish(scratch.subject.clone(), "x".repeat(300).into())
            .await?
            .await?;
        times.push(start.elapsed());
    }
    scratch.delete().await?;
    Ok(times)
}

/// The next message of a pull consumer's stream; a missed idle heartbeat (the server slow to send one
/// while the machine is loaded) is only a warning there, and the stream goes on.
pub async fn next_message(
    messages: &mut async_nats::jetstream::consumer::pull::Stream,
) -> anyhow::Result<async_nats::jetstream::Message> {
    use async_nats::jetstream::consumer::pull::MessagesErrorKind;
    use futures::StreamExt;
    loop {
        match messages.next().await {
            Some(Ok(message)) => return Ok(message),
            Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the consumer ended"),
        }
    }
}

/// The messages the coordinator under `tag` has stored so far: its input, output and journal
/// streams' last sequence numbers added up (a purge of the journal keeps its numbering).
pub async fn stored_messages(client: &async_nats::Client, tag: &str) -> anyhow::Result<u64> {
    let subjects = gpu_coordinator_wire::Subjects::new(tag).map_err(anyhow::Error::msg)?;
    let js = async_nats::jetstream::new(client.clone());
    let mut total = 0;
    for name in [
        subjects.input_stream(),
        subjects.output_stream(),
        subjects.journal_stream(),
    ] {
        if let Ok(mut stream) = js.get_stream(&name).await {
            total += stream.info().await?.state.last_sequence;
        }
    }
    Ok(total)
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

/// A coordinator process, killed and waited for on drop (a bench that fails leaves none running).
pub struct Serving(pub std::process::Child);

impl Serving {
    /// SIGKILL, and wait for the process to go.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.kill();
    }
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
