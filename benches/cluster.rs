//! The distributed mode on clusters of private servers (test-support's, never the machine's shared
//! NATS or Postgres; the shared Redis keeps the leases), in one run:
//!
//! 1. free-GPU grant latency with `nats.replicas = 1` beside `nats.replicas = 3`: two coordinators on
//!    one 3-node NATS cluster (prefixes of their own, one private Postgres), CYCLES request -> grant ->
//!    release cycles each in alternating runs of CHUNK; p50/p99/max and the R3/R1 ratios;
//! 2. takeover after `kill -9` of the NATS node leading the R3 input stream, while a service publishes
//!    a request every PACE (each retried under its message id until JetStream acknowledges it, a
//!    PubAck waited for ACK_WAIT) and releases each grant: from the kill to the first acknowledged
//!    input, to the grant of the first request published after the kill, and to the answer of every
//!    request acknowledged before and during the outage; NATS_ROUNDS kills, the node started again
//!    between them;
//! 3. takeover after `kill -9` of the Postgres primary with a synchronous standby, which the bench
//!    promotes (`pg_ctl promote`) right after the kill, the coordinator's `database.url` naming both:
//!    the same times, the promotion's own printed apart; PG_ROUNDS primaries, each with a standby of
//!    its own; and the grant latency with the synchronous standby before the first kill.
//!
//! Grants are seen on a NATS connection to a node that is not killed, as the coordinator publishes
//! them. The private Postgres runs with `fsync = off` (test-support's), so its commits are cheaper
//! than a durable server's. `cargo bench --bench cluster`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use backon::{ConstantBuilder, Retryable};
use futures::StreamExt;
use gpu_coordinator::config::Config;
use gpu_coordinator_test_support::{NatsCluster, PgServer};
use gpu_coordinator_wire::{Outcome, Reply, Subjects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Grant cycles per coordinator in part 1, in alternating runs of CHUNK (after WARMUP each).
const CYCLES: usize = 2_000;
const CHUNK: usize = 200;
const WARMUP: usize = 50;
/// Grant cycles with the synchronous standby, part 3.
const SYNC_CYCLES: usize = 500;
/// Kills of a NATS node, and of a Postgres primary.
const NATS_ROUNDS: usize = 3;
const PG_ROUNDS: usize = 2;
/// The service's pace, and how long each of its publishes waits for the PubAck before it is sent
/// again (under the same message id: stored once).
const PACE: Duration = Duration::from_millis(20);
const ACK_WAIT: Duration = Duration::from_millis(250);
/// Grants seen before a kill, so that the service runs steadily when it comes.
const STEADY: usize = 20;
/// How long any wait of the bench may take before it fails.
const DEADLINE: Duration = Duration::from_secs(90);
/// Each stream's `max_bytes`: JetStream sets it aside on every replica's store up front.
const STREAM_BYTES: i64 = 64 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let began = Instant::now();
    let tag = format!("cluster{}", std::process::id());
    let (cluster, pg) = blocking(|| (NatsCluster::start(3), PgServer::start())).await?;
    let cluster = Arc::new(Mutex::new(cluster));
    let urls = cluster.lock().expect("the cluster").urls();
    println!(
        "cluster bench: 3 nats-server nodes ({}), a private Postgres (fsync = off), the shared \
         Redis; {} cores",
        nats_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. R1 beside R3 on the same cluster.
    let r1 = common::Bench::start_config(config(&format!("{tag}r1"), &urls, 1, &pg)).await?;
    let r3 = common::Bench::start_config(config(&format!("{tag}r3"), &urls, 3, &pg)).await?;
    let mut placed = Vec::new();
    for bench in [&r1, &r3] {
        let subjects = subjects(&bench.config)?;
        let js = jetstream::new(bench.client.clone());
        let (replicas, leader) = placement(&js, &subjects.input_stream()).await?;
        placed.push(format!(
            "R{replicas} led by {}",
            leader.as_deref().unwrap_or("?")
        ));
    }
    let mut c1 = common::Cycles::new(&r1.client, &r1.config.nats.prefix).await?;
    let mut c3 = common::Cycles::new(&r3.client, &r3.config.nats.prefix).await?;
    c1.run(WARMUP).await?;
    c3.run(WARMUP).await?;
    let (mut g1, mut y1, mut g3, mut y3) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CYCLES / CHUNK {
        let (g, y) = c1.run(CHUNK).await?;
        g1.extend(g);
        y1.extend(y);
        let (g, y) = c3.run(CHUNK).await?;
        g3.extend(g);
        y3.extend(y);
    }
    println!(
        "1. free-GPU grant latency, {CYCLES} cycles each in alternating runs of {CHUNK} \
         (input streams: {}):",
        placed.join(", ")
    );
    common::percentiles("R1 request -> granted reply", g1.clone());
    common::percentiles("R1 request -> released reply (cycle)", y1);
    common::percentiles("R3 request -> granted reply", g3.clone());
    common::percentiles("R3 request -> released reply (cycle)", y3);
    let (p1, p3) = (sorted(g1), sorted(g3));
    let ratio =
        |p: f64| common::quantile(&p3, p).as_secs_f64() / common::quantile(&p1, p).as_secs_f64();
    println!(
        "R3 / R1 grant: p50 {:.2}x, p99 {:.2}x",
        ratio(0.50),
        ratio(0.99)
    );
    r1.end().await?;

    // 2. kill -9 of the NATS node leading the R3 input stream.
    println!(
        "2. kill -9 of the NATS node leading the R3 input stream; a service publishing a request \
         every {PACE:?} (PubAck waited {ACK_WAIT:?}, then sent again), releasing each grant; \
         times from the kill:"
    );
    let subjects = subjects(&r3.config)?;
    let js = jetstream::new(r3.client.clone());
    let mut nats_takeovers = Vec::new();
    for round in 0..NATS_ROUNDS {
        let (_, leader) = placement(&js, &subjects.input_stream()).await?;
        let leader = leader.ok_or_else(|| anyhow::anyhow!("the input stream has no leader"))?;
        let (_, output_leader) = placement(&js, &subjects.output_stream()).await?;
        let (victim, observer_url) = {
            let cluster = cluster.lock().expect("the cluster");
            let victim = cluster
                .index_of(&leader)
                .ok_or_else(|| anyhow::anyhow!("{leader} is not a node of the cluster"))?;
            (victim, cluster.url((victim + 1) % cluster.size()))
        };
        let mut service = Service::start(
            &urls,
            &observer_url,
            &r3.config.nats.prefix,
            &format!("n{round}"),
        )
        .await?;
        service.steady().await?;
        let nodes = cluster.clone();
        blocking(move || nodes.lock().expect("the cluster").kill(victim)).await?;
        let takeover = service.takeover(Instant::now()).await?;
        service.stop().await?;
        let nodes = cluster.clone();
        let back = blocking(move || {
            let start = Instant::now();
            nodes.lock().expect("the cluster").restart(victim);
            start.elapsed()
        })
        .await?;
        let also = if output_leader.as_deref() == Some(leader.as_str()) {
            ", the output stream's too"
        } else {
            ""
        };
        println!(
            "  kill {}: {leader} (leader of the input stream{also}): {takeover}; the node healthy \
             again {:.1} s after its restart",
            round + 1,
            back.as_secs_f64()
        );
        nats_takeovers.push(takeover);
    }
    Takeover::summary(&nats_takeovers);
    r3.end().await?;
    blocking(move || drop(pg)).await?;

    // 3. kill -9 of the Postgres primary, its synchronous standby promoted.
    println!(
        "3. kill -9 of the Postgres primary with a synchronous standby (synchronous_standby_names \
         = '*'), promoted by the bench right after the kill (pg_ctl promote -w, its time apart); \
         R3 streams; the same service; times from the kill:"
    );
    let mut pg_takeovers = Vec::new();
    for round in 0..PG_ROUNDS {
        let (primary, standby) = blocking(|| {
            let primary = PgServer::start();
            let standby = primary.standby();
            primary.set_synchronous(true);
            (Arc::new(primary), Arc::new(standby))
        })
        .await?;
        let prefix = format!("{tag}pg{round}");
        let mut config = config(&prefix, &urls, 3, &primary);
        config.database.url = format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/gpu_{prefix}",
            primary.port, standby.port
        );
        let bench = common::Bench::start_config(config).await?;
        if round == 0 {
            let mut cycles = common::Cycles::new(&bench.client, &prefix).await?;
            cycles.run(WARMUP).await?;
            let (grant, cycle) = cycles.run(SYNC_CYCLES).await?;
            common::percentiles("  R3, synchronous standby: request -> granted", grant);
            common::percentiles("  R3, synchronous standby: cycle", cycle);
        }
        let observer_url = cluster.lock().expect("the cluster").url(0);
        let mut service =
            Service::start(&urls, &observer_url, &prefix, &format!("p{round}")).await?;
        service.steady().await?;
        let dead = primary.clone();
        blocking(move || dead.kill()).await?;
        let killed = Instant::now();
        let promoted = standby.clone();
        let promotion = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            promoted.promote();
            start.elapsed()
        });
        let takeover = service.takeover(killed).await?;
        let promotion = promotion.await?;
        service.stop().await?;
        bench.end().await?;
        blocking(move || drop((primary, standby))).await?;
        println!(
            "  kill {}: {takeover}; the promotion took {:.2} s",
            round + 1,
            promotion.as_secs_f64()
        );
        pg_takeovers.push(takeover);
    }
    Takeover::summary(&pg_takeovers);
    blocking(move || drop(cluster)).await?;
    println!(
        "the whole bench took {:.0} s",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A coordinator's configuration under `prefix` (subjects, Redis keys, database `gpu_<prefix>` on
/// `pg`) on the NATS cluster `urls` with streams of `replicas`, one GPU of 24 GB.
fn config(prefix: &str, urls: &str, replicas: usize, pg: &PgServer) -> Config {
    let mut config = Config::default();
    config.nats.url = urls.to_owned();
    config.nats.replicas = replicas;
    config.nats.prefix = prefix.to_owned();
    config.nats.max_bytes = STREAM_BYTES;
    config.redis.key_prefix = prefix.to_owned();
    config.database.url = pg.url(&format!("gpu_{prefix}"));
    config.gpus = common::gpus_of_24gb(1);
    config
}

fn subjects(config: &Config) -> anyhow::Result<Subjects> {
    Subjects::new(&config.nats.prefix).map_err(anyhow::Error::msg)
}

/// Runs `work` (a server's start, kill or promotion) off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(work).await?)
}

/// A stream's configured replicas and the server that leads it now.
async fn placement(js: &jetstream::Context, name: &str) -> anyhow::Result<(usize, Option<String>)> {
    let mut stream = js.get_stream(name).await?;
    let info = stream.info().await?;
    Ok((
        info.config.num_replicas,
        info.cluster.as_ref().and_then(|c| c.leader.clone()),
    ))
}

fn sorted(mut samples: Vec<Duration>) -> Vec<Duration> {
    samples.sort();
    samples
}

/// `nats-server --version`, as the bench's nodes run it.
fn nats_version() -> String {
    std::process::Command::new(std::env::var("NATS_SERVER").unwrap_or("nats-server".into()))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "nats-server".to_owned())
}

/// What a [`Service`] saw: each request's publish and acknowledgement, and its grant.
#[derive(Default)]
struct Seen {
    /// Request `n`: when its first publish was sent, and when JetStream acknowledged it.
    sent: Vec<(Instant, Option<Instant>)>,
    /// When request `n`'s grant was seen.
    granted: HashMap<usize, Instant>,
}

/// A service under a coordinator's prefix: requests for 1 MB (`<label>-<n>`, service `load`)
/// published one every PACE into the input stream through a connection to the cluster's list,
/// each sent again under its message id until JetStream acknowledges it; and an observer on a
/// connection to one node that records each grant and publishes its release at once (a release
/// lost in an outage leaves 1 MB held until its lease ends).
struct Service {
    seen: Arc<Mutex<Seen>>,
    /// Bumped at each acknowledgement and grant.
    changed: watch::Receiver<u64>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    async fn start(
        publish_url: &str,
        observe_url: &str,
        prefix: &str,
        label: &str,
    ) -> anyhow::Result<Service> {
        let subjects = Subjects::new(prefix).map_err(anyhow::Error::msg)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (bump, changed) = watch::channel(0u64);
        let bump = Arc::new(bump);
        let stop = CancellationToken::new();

        let observer = common::nats_connect(observe_url).await?;
        let mut replies = observer.subscribe(subjects.reply("load")).await?;
        observer.flush().await?;
        let release = subjects.release("load");
        let numbered = format!("{label}-");
        let (observed, observed_bump) = (seen.clone(), bump.clone());
        let observing = tokio::spawn(async move {
            while let Some(msg) = replies.next().await {
                let Ok(reply) = serde_json::from_slice::<Reply>(&msg.payload) else {
                    continue;
                };
                let n = reply
                    .request_id
                    .strip_prefix(&numbered)
                    .and_then(|n| n.parse::<usize>().ok());
                let (Some(n), Outcome::Granted) = (n, reply.outcome) else {
                    continue;
                };
                let at = Instant::now();
                observed
                    .lock()
                    .expect("what the service saw")
                    .granted
                    .entry(n)
                    .or_insert(at);
                observed_bump.send_modify(|c| *c += 1);
                let fence = reply.fence.unwrap_or_default();
                let body = format!(r#"{{"request_id":"{}","fence":{fence}}}"#, reply.request_id);
                observer.publish(release.clone(), body.into()).await?;
            }
            anyhow::Ok(())
        });

        let client = common::nats_connect(publish_url).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_WAIT)
            .build(client);
        let subject = subjects.request("load");
        let (published, label, stopped) = (seen.clone(), label.to_owned(), stop.clone());
        let publishing = tokio::spawn(async move {
            let mut pace = tokio::time::interval(PACE);
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0usize.. {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    _ = pace.tick() => {}
                }
                let id = format!("{label}-{n}");
                let body = format!(r#"{{"request_id":"{id}","priority":1,"vram_mb":1}}"#);
                published
                    .lock()
                    .expect("what the service saw")
                    .sent
                    .push((Instant::now(), None));
                let publish = || async {
                    let message = jetstream::message::PublishMessage::build()
                        .payload(body.clone().into())
                        .message_id(&id);
                    js.send_publish(subject.clone(), message).await?.await
                };
                let stored = publish.retry(
                    ConstantBuilder::default()
                        .with_delay(Duration::from_millis(10))
                        .without_max_times(),
                );
                tokio::select! {
                    () = stopped.cancelled() => break,
                    stored = stored => { stored?; }
                }
                published.lock().expect("what the service saw").sent[n].1 = Some(Instant::now());
                bump.send_modify(|c| *c += 1);
            }
            anyhow::Ok(())
        });
        Ok(Service {
            seen,
            changed,
            stop,
            tasks: vec![observing, publishing],
        })
    }

    /// Waits until `found` answers something of what the service saw, for at most [`DEADLINE`].
    async fn wait_for<T>(
        &mut self,
        what: &str,
        found: impl Fn(&Seen) -> Option<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(answer) = found(&self.seen.lock().expect("what the service saw")) {
                return Ok(answer);
            }
            let left = DEADLINE.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, self.changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => anyhow::bail!("{what}: the service stopped"),
                Err(_) => anyhow::bail!("{what}: not within {DEADLINE:?}"),
            }
        }
    }

    /// Waits until [`STEADY`] requests were granted.
    async fn steady(&mut self) -> anyhow::Result<()> {
        self.wait_for("the service running", |s| {
            (s.granted.len() >= STEADY).then_some(())
        })
        .await
    }

    /// The times from `killed` to the first input acknowledged after it, to the grant of the first
    /// request published after it, and to the last grant of the requests acknowledged until then
    /// (before and during the outage).
    async fn takeover(&mut self, killed: Instant) -> anyhow::Result<Takeover> {
        let acked = self
            .wait_for("an input acknowledged after the kill", |s| {
                s.sent.iter().filter_map(|(_, a)| *a).find(|a| *a > killed)
            })
            .await?;
        let granted = self
            .wait_for("a request published after the kill granted", |s| {
                s.sent
                    .iter()
                    .enumerate()
                    .filter(|(_, (sent, _))| *sent > killed)
                    .find_map(|(n, _)| s.granted.get(&n).copied())
            })
            .await?;
        // Every request acknowledged before that grant: before the kill, and during the outage.
        let wanted: Vec<usize> = {
            let seen = self.seen.lock().expect("what the service saw");
            (seen.sent.iter().enumerate())
                .filter(|(_, (_, a))| a.is_some_and(|a| a <= granted))
                .map(|(n, _)| n)
                .collect()
        };
        let during = {
            let seen = self.seen.lock().expect("what the service saw");
            (wanted.iter())
                .filter(|&&n| seen.sent[n].1.is_some_and(|a| a > killed))
                .count()
        };
        let pending_at_kill = {
            let seen = self.seen.lock().expect("what the service saw");
            (wanted.iter())
                .filter(|&&n| seen.sent[n].1.is_some_and(|a| a <= killed))
                .filter(|&&n| seen.granted.get(&n).is_none_or(|g| *g > killed))
                .count()
        };
        let last = self
            .wait_for(
                "every request acknowledged before and during the outage granted",
                |s| {
                    let grants: Option<Vec<Instant>> =
                        wanted.iter().map(|n| s.granted.get(n).copied()).collect();
                    grants.map(|g| g.into_iter().max().unwrap_or(granted))
                },
            )
            .await?;
        Ok(Takeover {
            acked: acked - killed,
            granted: granted - killed,
            all: last.max(granted) - killed,
            wanted: wanted.len(),
            during,
            pending_at_kill,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let mut tasks = self.tasks.into_iter();
        let (observing, publishing) = (tasks.next(), tasks.next());
        if let Some(publishing) = publishing {
            publishing.await??;
        }
        if let Some(observing) = observing {
            observing.abort();
        }
        Ok(())
    }
}

/// One kill's times, from the kill.
struct Takeover {
    /// To the first input JetStream acknowledged after it.
    acked: Duration,
    /// To the grant of the first request published after it.
    granted: Duration,
    /// To the grant of the last of the requests acknowledged before that grant.
    all: Duration,
    /// How many those were, how many of them were acknowledged after the kill, and how many had been
    /// acknowledged before it but not yet granted.
    wanted: usize,
    during: usize,
    pending_at_kill: usize,
}

impl std::fmt::Display for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inputs acknowledged again {:.2} s, next grant {:.2} s, all {} acknowledged answered \
             {:.2} s ({} acknowledged during the outage, {} waiting at the kill)",
            self.acked.as_secs_f64(),
            self.granted.as_secs_f64(),
            self.wanted,
            self.all.as_secs_f64(),
            self.during,
            self.pending_at_kill,
        )
    }
}

impl Takeover {
    /// The range of each time over the kills.
    fn summary(kills: &[Takeover]) {
        let range = |time: fn(&Takeover) -> Duration| {
            let secs: Vec<f64> = kills.iter().map(|k| time(k).as_secs_f64()).collect();
            let (min, max) = secs
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
            format!("{min:.2}-{max:.2} s")
        };
        println!(
            "  over {} kills: inputs acknowledged again {}, next grant {}, every acknowledged \
             request answered {}",
            kills.len(),
            range(|k| k.acked),
            range(|k| k.granted),
            range(|k| k.all),
        );
    }
}
