//! A fleet: 100 node agents with 8 simulated GPUs each (800 GPUs), and 2,000 services cycling
//! request -> grant -> release (64 MB each, so VRAM never makes them wait and the figures are the
//! coordinator's own), beside the same bench with one host of 8 GPUs, in the same run:
//!
//! - grant p50 / p99 (request published -> `granted` reply), fleet and one host, and their ratio
//!   (goal: <= 1.5x);
//! - sustained cycles/s, beside the bus's own ceiling for the messages a cycle stores plus the
//!   agents' samples (as the throughput bench prints it; goal: >= 50% of it);
//! - the coordinator's CPU seconds per 1,000 grants and its RSS (it runs as its own process);
//! - the scheduler's cost per input at 800 GPUs beside 8 (the core alone, no I/O).
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench fleet [-- SECONDS]` (default 10).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpu_coordinator::config::{Config, GpuConfig};
use gpu_coordinator_core::{HostGpu, Input, SchedConfig, Scheduler};
use gpu_coordinator_wire::{
    Encoding, Inbound, Outcome, ReleaseMsg, Reply, RequestMsg, StatusDoc, VramSource,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const HOSTS: usize = 100;
const GPUS_PER_HOST: usize = 8;
const SERVICES: usize = 2_000;
const VRAM_MB: u64 = 64;
const SAMPLE_MS: u64 = 1_000;

/// What one run measured.
struct Run {
    grants: Vec<Duration>,
    cycles_per_s: f64,
    messages_per_cycle: f64,
    cpu_s_per_1000: f64,
    /// The same for this process (the services and the agents) and for the shared nats-server.
    bench_cpu_s_per_1000: f64,
    nats_cpu_s_per_1000: f64,
    rss_mb: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = common::number_arg(10);
    let run = Duration::from_secs(seconds);
    let fleet = measure(run, HOSTS).await?;
    let one = measure(run, 1).await?;
    eprintln!("the bus's own ceiling ...");
    let bus = async_nats::connect("nats://127.0.0.1:4222").await?;
    let ceiling = tokio::time::timeout(
        Duration::from_secs(180),
        common::bus_ceiling(&bus, &format!("benchf{}c", std::process::id()), 100_000),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the bus's ceiling took over 3 minutes"))??;
    eprintln!("the scheduler alone ...");
    let (core_fleet, core_one) = scheduler_cost();
    println!(
        "{SERVICES} services cycling {VRAM_MB} MB requests, {seconds} s each, {} cores:",
        std::thread::available_parallelism()?
    );
    let p = |runs: &Run, q: f64| {
        let mut sorted = runs.grants.clone();
        sorted.sort();
        common::quantile(&sorted, q).as_secs_f64() * 1000.0
    };
    // The agents' samples take the bus too: one message per host per sample interval.
    let samples_per_s = |hosts: usize| hosts as f64 * 1000.0 / SAMPLE_MS as f64;
    for (name, hosts, r) in [("fleet", HOSTS, &fleet), ("one host", 1, &one)] {
        let allowed = (ceiling - samples_per_s(hosts)) / r.messages_per_cycle;
        println!(
            "  {name:<9} {hosts:>3} host(s), {:>3} GPUs: grant p50 {:.2} ms, p99 {:.2} ms ({} grants); \
             {:.0} cycles/s, {:.1} messages stored a cycle and {:.0} samples/s, so the bus alone \
             allows {allowed:.0} cycles/s ({:.0}% of it); CPU s per 1,000 grants: coordinator {:.2} \
             (RSS {:.1} MB), nats-server {:.2}, the services and agents {:.2}",
            hosts * GPUS_PER_HOST,
            p(r, 0.5),
            p(r, 0.99),
            r.grants.len(),
            r.cycles_per_s,
            r.messages_per_cycle,
            samples_per_s(hosts),
            100.0 * r.cycles_per_s / allowed,
            r.cpu_s_per_1000,
            r.rss_mb,
            r.nats_cpu_s_per_1000,
            r.bench_cpu_s_per_1000,
        );
    }
    println!(
        "  fleet / one host: grant p50 {:.2}x, p99 {:.2}x (goal <= 1.5x)",
        p(&fleet, 0.5) / p(&one, 0.5),
        p(&fleet, 0.99) / p(&one, 0.99)
    );
    println!("  the bus alone {ceiling:.0} messages/s stored and delivered");
    println!(
        "  scheduler cost per input (core alone, {SERVICES} holders): {:.1} µs at {} GPUs, {:.1} µs \
         at {GPUS_PER_HOST} GPUs ({:.2}x); a host's sample {:.1} µs",
        core_fleet.0,
        HOSTS * GPUS_PER_HOST,
        core_one.0,
        core_fleet.0 / core_one.0,
        core_fleet.1
    );
    Ok(())
}

/// One run: a coordinator process with node agents, `hosts` agents in this process, the services
/// cycling for `run`.
async fn measure(run: Duration, hosts: usize) -> anyhow::Result<Run> {
    let tag = format!("benchf{}h{hosts}", std::process::id());
    let mut command = common::serve_command(&tag);
    command
        .env("GPU_COORDINATOR_NODES__AGENTS", "true")
        .env("GPU_COORDINATOR_QUEUE__MAX_PER_SERVICE", "100")
        .env(
            "GPU_COORDINATOR_NATS__MAX_BYTES",
            (256_i64 << 20).to_string(),
        )
        .env("RUST_LOG", "error");
    eprintln!("{hosts} host(s): starting the coordinator ...");
    let mut serving = common::Serving(command.spawn()?);
    let client = common::nats_connect("nats://127.0.0.1:4222").await?;
    tokio::time::timeout(Duration::from_secs(60), common::wait_status(&client, &tag))
        .await
        .map_err(|_| anyhow::anyhow!("the coordinator did not answer status within 60 s"))?;
    eprintln!("{hosts} host(s): starting the agents ...");
    let stop_agents = CancellationToken::new();
    for h in 0..hosts {
        tokio::spawn(gpu_coordinator::agent::run(
            agent_config(&tag, h),
            stop_agents.clone(),
        ));
    }
    wait_hosts(&client, &tag, hosts).await?;
    eprintln!("{hosts} host(s): cycling ...");
    let pid = serving.id();
    let stored = common::stored_messages(&client, &tag).await?;
    let nats = nats_server_pid();
    let (cpu, own, nats_cpu) = (
        cpu_seconds(pid),
        cpu_seconds(std::process::id()),
        nats.map_or(0.0, cpu_seconds),
    );
    let (grants, cycles, elapsed) = cycle(&client, &tag, run).await?;
    let cpu = cpu_seconds(pid) - cpu;
    let own = cpu_seconds(std::process::id()) - own;
    let nats_cpu = nats.map_or(0.0, cpu_seconds) - nats_cpu;
    let stored = common::stored_messages(&client, &tag).await? - stored;
    let rss_mb = common::rss_mb(pid);
    stop_agents.cancel();
    serving.kill();
    eprintln!("{hosts} host(s): cleaning up ...");
    if tokio::time::timeout(Duration::from_secs(60), common::forget(&client, &tag))
        .await
        .is_err()
    {
        eprintln!("cleaning up {tag} took over 60 s; going on");
    }
    Ok(Run {
        cpu_s_per_1000: cpu / grants.len().max(1) as f64 * 1000.0,
        bench_cpu_s_per_1000: own / grants.len().max(1) as f64 * 1000.0,
        nats_cpu_s_per_1000: nats_cpu / grants.len().max(1) as f64 * 1000.0,
        messages_per_cycle: stored as f64 / cycles.max(1) as f64,
        cycles_per_s: cycles as f64 / elapsed.as_secs_f64(),
        grants,
        rss_mb,
    })
}

/// The agent of host `h{h}` under `tag`: 8 simulated GPUs of 24 GB.
fn agent_config(tag: &str, h: usize) -> Config {
    let mut config = Config::default();
    config.nats.prefix = tag.to_owned();
    config.nvml.enabled = false;
    config.nvml.sample_ms = SAMPLE_MS;
    config.agent.host = Some(format!("h{h}"));
    config.gpus = (0..GPUS_PER_HOST)
        .map(|i| GpuConfig {
            id: i.to_string(),
            vram_mb: 24_576,
        })
        .collect();
    config
}

/// Waits until the coordinator under `tag` has heard `hosts` hosts.
async fn wait_hosts(client: &async_nats::Client, tag: &str, hosts: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let answer = client.request(format!("{tag}.status"), "".into()).await?;
        let doc: StatusDoc = serde_json::from_slice(&answer.payload)?;
        if doc.hosts.len() == hosts && doc.gpus.len() == hosts * GPUS_PER_HOST {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{} of {hosts} hosts heard after 60 s",
            doc.hosts.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The services cycling for `run` over one connection: each publishes a request, waits for its
/// `granted` reply, publishes the release and goes again. Answers the grant latencies, the cycles
/// and the time taken.
async fn cycle(
    client: &async_nats::Client,
    tag: &str,
    run: Duration,
) -> anyhow::Result<(Vec<Duration>, u64, Duration)> {
    type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>;
    let waiting: Waiting = Arc::new(Mutex::new(HashMap::new()));
    let mut replies = client.subscribe(format!("{tag}.reply.*")).await?;
    client.flush().await?;
    let router = tokio::spawn({
        let waiting = waiting.clone();
        async move {
            while let Some(message) = replies.next().await {
                let Ok(reply) = serde_json::from_slice::<Reply>(&message.payload) else {
                    continue;
                };
                if reply.outcome == Outcome::Granted || reply.outcome == Outcome::Rejected {
                    if let Some(tx) = waiting.lock().unwrap().remove(&reply.request_id) {
                        let _ = tx.send(reply);
                    }
                }
            }
        }
    });
    let cycles = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SERVICES {
        let (client, waiting, cycles) = (client.clone(), waiting.clone(), cycles.clone());
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut grants = Vec::new();
            let mut n = 0u64;
            while start.elapsed() < run {
                let id = format!("s{s}-{n}");
                n += 1;
                let (tx, rx) = oneshot::channel();
                waiting.lock().unwrap().insert(id.clone(), tx);
                let body = format!(r#"{{"request_id":"{id}","priority":1,"vram_mb":{VRAM_MB}}}"#);
                let asked = Instant::now();
                client
                    .publish(format!("{tag}.request.s{s}"), body.into())
                    .await?;
                let reply = tokio::time::timeout(Duration::from_secs(60), rx).await??;
                anyhow::ensure!(reply.outcome == Outcome::Granted, "{id}: {reply:?}");
                grants.push(asked.elapsed());
                let fence = reply.fence.unwrap_or_default();
                let release = format!(r#"{{"request_id":"{id}","fence":{fence}}}"#);
                client
                    .publish(format!("{tag}.release.s{s}"), release.into())
                    .await?;
                cycles.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(grants)
        }));
    }
    let mut grants = Vec::new();
    for t in tasks {
        grants.extend(t.await??);
    }
    let elapsed = start.elapsed();
    router.abort();
    Ok((grants, cycles.load(Ordering::Relaxed), elapsed))
}

/// The shared nats-server on port 4222, for its CPU seconds.
fn nats_server_pid() -> Option<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", "nats-server .*-p 4222"])
        .output()
        .ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The scheduler alone: per input, µs, for a release followed by a request with `SERVICES` holders on
/// 800 GPUs and on 8; and a host's sample at 800 GPUs.
fn scheduler_cost() -> ((f64, f64), (f64, f64)) {
    (core_cost(HOSTS), core_cost(1))
}

fn core_cost(hosts: usize) -> (f64, f64) {
    const M: usize = 20_000;
    let config = SchedConfig {
        host_ttl_ms: Some(3_600_000),
        max_per_service: 100,
        ..SchedConfig::default()
    };
    let mut sched = Scheduler::new(config, Vec::new());
    let mut now = 1_700_000_000_000u64;
    let sample = |h: usize, heard_at: u64| Input::HostSample {
        host: format!("h{h}"),
        heard_at,
        gpus: (0..GPUS_PER_HOST)
            .map(|i| HostGpu {
                id: i.to_string(),
                uuid: None,
                total_mb: 24_576,
                used_mb: 0,
                source: VramSource::Config,
            })
            .collect(),
    };
    for h in 0..hosts {
        sched.handle_input(sample(h, now), now);
    }
    let request = |s: usize, n: usize| Input::Inbound {
        service: format!("s{s}"),
        encoding: Encoding::Json,
        input: Inbound::Request(RequestMsg {
            request_id: Some(format!("s{s}-{n}")),
            service_id: None,
            priority: 1,
            timeout_ms: None,
            lease_ms: Some(3_600_000),
            vram_mb: Some(VRAM_MB),
            gpu: None,
            host: None,
            preemptible: None,
            pause_ms: None,
        }),
    };
    for s in 0..SERVICES {
        sched.handle_input(request(s, 0), now);
    }
    while sched.poll_action().is_some() {}
    let start = Instant::now();
    for i in 0..M {
        let s = i % SERVICES;
        let round = i / SERVICES;
        let id = format!("s{s}-{round}");
        let fence = sched.record(&id).and_then(|r| r.fence).map(|f| f.0);
        now += 1;
        sched.handle_input(
            Input::Inbound {
                service: format!("s{s}"),
                encoding: Encoding::Json,
                input: Inbound::Release(ReleaseMsg {
                    request_id: Some(id),
                    fence,
                }),
            },
            now,
        );
        sched.handle_input(request(s, round + 1), now);
        while sched.poll_action().is_some() {}
    }
    let per_input = start.elapsed().as_secs_f64() * 1e6 / (2 * M) as f64;
    let start = Instant::now();
    const SAMPLES: usize = 2_000;
    for i in 0..SAMPLES {
        now += 1;
        sched.handle_input(sample(i % hosts, now), now);
        while sched.poll_action().is_some() {}
    }
    let per_sample = start.elapsed().as_secs_f64() * 1e6 / SAMPLES as f64;
    (per_input, per_sample)
}
