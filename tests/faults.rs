//! The fault harness: randomized rounds against private servers (nats-server, redis-server, a Postgres
//! made with `initdb`), one to three coordinator processes, and client services driven by the client
//! crate, each recording the instants in which it used a GPU. Faults, chosen at random: `kill -9` of a
//! coordinator, restarts of NATS, Redis and Postgres, Postgres's disk full for a few seconds (its data
//! directory is on a small tmpfs that the harness mounts: it needs root), SIGSTOP of a coordinator
//! past a lease, a holder
//! stalled past its lease, a client cut off from NATS, the leader stopped gracefully (SIGTERM) while
//! Postgres is slowed, so that a standby (or its restart) takes over a journal stream that Postgres
//! lags behind (with Postgres written behind), a standby started with libfaketime preloaded, its clock
//! minutes off (it must never lead; the leader is then killed, and a sound coordinator takes over, or
//! is started again where the skewed one is left alone), hostile clients (in the half of the rounds
//! whose NATS runs with the permissions of `nats-auth`, everyone with its own credentials: a service
//! that asks for status answers onto another's inputs or the purge of the input stream, makes push
//! consumers onto another's release, publishes on another's subjects; the auditor pulls from, deletes
//! and makes the coordinator's input consumer), duplicated and reordered inputs (some stripped of
//! their fence), malformed inputs.
//!
//! After each round, once every service stopped and the coordinator is idle:
//! - the audit checker (`gpu-coordinator audit`) passes over the whole history;
//! - the services' own units of work never overlap beyond a GPU's capacity (a whole-GPU unit alone):
//!   the real mutual exclusion, as the services lived it;
//! - every request stored in the input stream (acknowledged to its service) has reached an end.
//!
//! One round in three (drawn by its seed), or every round with `--cluster`, runs on clusters instead
//! of the single nats-server and redis-server: three NATS nodes (the streams with three replicas, the
//! nodes not advertising each other, so that a service knows only its three proxies, one per node,
//! and `CutClient` cuts all three), a Redis master with a replica and three Sentinels, and a Postgres
//! primary with a synchronous standby (`database.url` naming both). Its faults add `kill -9` of the
//! NATS node that leads the input stream (started again after a while), of the Redis master (Sentinel
//! promotes the replica; the old master stays down for the rest of the round) and of the Postgres
//! primary (the standby promoted at once; once per round), in place of the single servers' restarts,
//! fills and slowing; hostile clients are not drawn there (no permissions).
//!
//! One round in three (those whose seed is a multiple of three), or every round with `--fleet`, runs a
//! fleet: the coordinators with `[nodes] agents = true` and no `[[gpus]]` of their own, and two or three
//! node agents (`gpu-coordinator agent` processes, simulated GPUs, ids `<host>/<id>`) in their place;
//! the round's workload starts once every host is heard. Its faults add `kill -9` of an agent (started
//! again after a while) and SIGSTOP of one past `nodes.ttl_ms` (then SIGCONT): while an agent is
//! silent, its host must be called unreachable once the TTL has passed, take no new grant, and be up
//! again once the agent is back. The checks after the round take the GPUs and their capacities from
//! the agents (the audit is given them as `[[gpus]]`: it knows no capacity of its own for a fleet's
//! GPUs), and every agent must still run.
//!
//! `cargo test --test faults` runs a short harness (CI). By hand, longer:
//! `cargo test --release --test faults -- --rounds 50 --secs 20 [--seed S] [--cluster] [--fleet]
//! [--timeline]`. Each round prints its seed and whether it ran on clusters or with a fleet (and, with
//! `--timeline`, each fault and what it did); `--rounds 1 --seed S` plays the same faults again (with
//! `--cluster` or `--fleet` where the round was forced onto clusters or a fleet).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpu_coordinator::audit::Since;
use gpu_coordinator::config::{Config, GpuConfig};
use gpu_coordinator::nats_auth::{self, Credentials};
use gpu_coordinator_client::{Client, ClientError, Lease, LeasePhase, RequestOptions, Worker};
use gpu_coordinator_test_support::{
    unique, NatsCluster, NatsServer, PgServer, Proxy, RedisSentinels, RedisServer, SmallDisk,
};
use gpu_coordinator_wire::{HostState, StatusDoc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GPUS: [(&str, u64); 2] = [("0", 24_000), ("1", 16_000)];
/// A host of a fleet round: its name and the GPUs (id, MB) its agent simulates.
type Host = (&'static str, &'static [(&'static str, u64)]);
/// The hosts of a fleet round: the first two, or all three.
const HOSTS: [Host; 3] = [
    ("h1", &[("0", 24_000)]),
    ("h2", &[("0", 16_000), ("1", 16_000)]),
    ("h3", &[("0", 24_000)]),
];
/// How often an agent samples (and so is heard), and how long a silent host stays reachable.
const AGENT_SAMPLE_MS: u64 = 200;
const HOST_TTL_MS: u64 = 1_500;
/// How late past the TTL the leader may still call a silent host up (its timer, on a loaded machine).
const HOST_TTL_SLACK: Duration = Duration::from_millis(2_000);
const SERVICES: [&str; 6] = ["chat", "voice", "asr", "diar", "embed", "tts"];
const LEASE_MS: u64 = 1_500;
const ACK_DEADLINE_MS: u64 = 700;
const TIMEOUT_MS: u64 = 4_000;
/// One unit of work on the GPU: far below the client's local margin (a tenth of the lease).
const UNIT: Duration = Duration::from_millis(10);
/// How long a round may take to settle once its faults stopped.
const SETTLE: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillCoordinator,
    RestartNats,
    RestartRedis,
    RestartPostgres,
    StallCoordinator,
    StallHolder,
    CutClient,
    SlowPostgresStopLeader,
    ClockOffsetStandby,
    HostileClients,
    FillPostgresDisk,
    /// Cluster rounds only: `kill -9` of the NATS node leading the input stream, restarted later.
    KillNatsStreamLeader,
    /// Cluster rounds only: `kill -9` of the Redis master; Sentinel promotes the replica.
    KillRedisMaster,
    /// Cluster rounds only: `kill -9` of the Postgres primary; its synchronous standby is promoted.
    KillPgPrimary,
    /// Fleet rounds only: `kill -9` of a node agent, started again after a while.
    KillAgent,
    /// Fleet rounds only: SIGSTOP of a node agent past the hosts' TTL, then SIGCONT.
    StallAgent,
}

const FAULTS: [Fault; 11] = [
    Fault::KillCoordinator,
    Fault::RestartNats,
    Fault::RestartRedis,
    Fault::RestartPostgres,
    Fault::StallCoordinator,
    Fault::StallHolder,
    Fault::CutClient,
    Fault::SlowPostgresStopLeader,
    Fault::ClockOffsetStandby,
    Fault::HostileClients,
    Fault::FillPostgresDisk,
];

/// The faults that only a fleet round plays, on its [`Fleet`] (a quarter of its draws).
const AGENT_FAULTS: [Fault; 2] = [Fault::KillAgent, Fault::StallAgent];

/// The faults that only a cluster round plays, on its [`ClusterServers`].
const CLUSTER_FAULTS: [Fault; 3] = [
    Fault::KillNatsStreamLeader,
    Fault::KillRedisMaster,
    Fault::KillPgPrimary,
];

struct Args {
    rounds: u64,
    secs: u64,
    seed: u64,
    /// `--cluster`: every round on clusters, not only those drawn.
    cluster: bool,
    /// `--fleet`: every round with node agents, not only those drawn.
    fleet: bool,
    /// `--timeline`: print each round's faults, and what each did, once it passed.
    timeline: bool,
}

impl Args {
    /// `--rounds N`, `--secs S`, `--seed X`, `--cluster`, `--fleet`, `--timeline`; anything else (a test filter, libtest flags)
    /// is ignored.
    fn parse() -> Args {
        let mut args = Args {
            rounds: 2,
            secs: 8,
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1),
            cluster: false,
            fleet: false,
            timeline: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let flag = match arg.as_str() {
                "--cluster" => Some(&mut args.cluster),
                "--fleet" => Some(&mut args.fleet),
                "--timeline" => Some(&mut args.timeline),
                _ => None,
            };
            if let Some(flag) = flag {
                *flag = true;
                continue;
            }
            let target = match arg.as_str() {
                "--rounds" => &mut args.rounds,
                "--secs" => &mut args.secs,
                "--seed" => &mut args.seed,
                _ => continue,
            };
            *target = it
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"));
        }
        args
    }
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let totals = runtime.block_on(run(&args));
    println!("{totals}");
}

async fn run(args: &Args) -> Totals {
    let pg_disk = SmallDisk::mount("faults_pg", PG_DISK);
    let mut servers = Servers {
        nats: NatsServer::start(),
        redis: RedisServer::start(),
        pg: PgServer::start_in(&pg_disk.dir),
        pg_disk,
    };
    let mut totals = Totals::default();
    for round in 0..args.rounds {
        let seed = args.seed.wrapping_add(round);
        println!("round {round}: seed {seed}");
        let length = Duration::from_secs(args.secs);
        match play(&mut servers, seed, length, args).await {
            Ok(stats) => {
                println!("round {round}: {stats}");
                if args.timeline {
                    println!("round {round}: faults:\n  {}", stats.timeline.join("\n  "));
                }
                totals.add(stats);
            }
            Err(failure) => {
                eprintln!(
                    "round {round} (seed {seed}) FAILED: {failure}\nreplay it: cargo test --test \
                     faults -- --rounds 1 --seed {seed}{}{}",
                    if args.cluster { " --cluster" } else { "" },
                    if args.fleet { " --fleet" } else { "" }
                );
                // The servers stop and Postgres's disk is unmounted before the process ends.
                drop(servers);
                std::process::exit(1);
            }
        }
    }
    totals
}

struct Servers {
    nats: NatsServer,
    redis: RedisServer,
    pg: PgServer,
    /// The disk of Postgres's data directory, WAL included, filled by [`Fault::FillPostgresDisk`]
    /// (dropped after the server).
    pg_disk: SmallDisk,
}

/// The size of Postgres's disk: its cluster (some 30 MiB) and a round's database, with room to spare.
const PG_DISK: &str = "160m";

/// What one round did.
#[derive(Debug, Default)]
struct RoundStats {
    /// It ran on [`ClusterServers`].
    cluster: bool,
    /// The hosts of its fleet (none where the coordinators had GPUs of their own).
    hosts: usize,
    coordinators: usize,
    write_behind: bool,
    /// NATS checked everyone's permissions (hostile clients may be drawn).
    secured: bool,
    faults: BTreeMap<String, u64>,
    requests: u64,
    grants: u64,
    preemptions: u64,
    revocations: u64,
    units: usize,
    outcomes: BTreeMap<String, u64>,
    /// Each fault played, when, and what it did (printed with `--timeline`).
    timeline: Vec<String>,
}

impl std::fmt::Display for RoundStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{} coordinator(s){}{}; faults {:?}; {} requests, {} grants, {} preemptions, {} revocations, \
             {} units of work; client outcomes {:?}; 0 violations, 0 lost requests",
            if self.cluster {
                "cluster round (3 NATS nodes, R3 streams; Redis with a replica and 3 Sentinels; Postgres with a synchronous standby), "
            } else {
                "single servers, "
            },
            if self.hosts > 0 {
                format!("a fleet of {} hosts (node agents), ", self.hosts)
            } else {
                String::new()
            },
            self.coordinators,
            if self.write_behind {
                ", Postgres written behind"
            } else {
                ""
            },
            if self.secured {
                ", NATS with per-service permissions"
            } else {
                ""
            },
            self.faults,
            self.requests,
            self.grants,
            self.preemptions,
            self.revocations,
            self.units,
            self.outcomes
        )
    }
}

#[derive(Debug, Default)]
struct Totals {
    rounds: u64,
    cluster_rounds: u64,
    fleet_rounds: u64,
    faults: BTreeMap<String, u64>,
    requests: u64,
    grants: u64,
    preemptions: u64,
    revocations: u64,
    units: usize,
}

impl Totals {
    fn add(&mut self, stats: RoundStats) {
        self.rounds += 1;
        self.cluster_rounds += u64::from(stats.cluster);
        self.fleet_rounds += u64::from(stats.hosts > 0);
        for (fault, n) in stats.faults {
            *self.faults.entry(fault).or_default() += n;
        }
        self.requests += stats.requests;
        self.grants += stats.grants;
        self.preemptions += stats.preemptions;
        self.revocations += stats.revocations;
        self.units += stats.units;
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "fault harness: {} rounds passed ({} on clusters, {} with a fleet of node agents)",
            self.rounds, self.cluster_rounds, self.fleet_rounds
        )?;
        writeln!(f, "faults injected: {:?}", self.faults)?;
        writeln!(
            f,
            "requests: {}, grants: {}, preemptions: {}, revocations: {}, units of work checked: {}",
            self.requests, self.grants, self.preemptions, self.revocations, self.units
        )?;
        write!(f, "violations: 0, lost requests: 0")
    }
}

// ----- one round ---------------------------------------------------------------------------------

async fn play(
    servers: &mut Servers,
    seed: u64,
    length: Duration,
    args: &Args,
) -> Result<RoundStats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let name = unique("faults");
    let mut config = round_config(servers, &name);
    // Every other round writes Postgres behind the JetStream journal stream.
    config.database.write_behind = seed % 2 == 1;
    // One round in three, or every one where `--cluster` forces it, runs on clusters.
    let cluster =
        (args.cluster || seed % 3 == 2).then(|| tokio::task::block_in_place(ClusterServers::start));
    // Another one in three, or every one where `--fleet` forces it, has node agents report the GPUs:
    // two hosts or three, by turns.
    let hosts: Vec<Host> = if args.fleet || seed.is_multiple_of(3) {
        HOSTS[..2 + (seed / 3 % 2) as usize].to_vec()
    } else {
        Vec::new()
    };
    if !hosts.is_empty() {
        config.gpus.clear();
        config.nodes.agents = true;
        config.nodes.ttl_ms = HOST_TTL_MS;
    }
    if let Some(cluster) = &cluster {
        cluster.configure(&mut config);
    }
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // Half of the rounds draw hostile clients among their faults: their NATS runs with the
    // permissions of `nats-auth`, on a server of their own, and everyone uses its own credentials.
    let users = if cluster.is_none() && rng.random_bool(0.5) {
        let (server, users) = secured_nats(&config.nats.prefix, &hosts, &dir)?;
        Some((std::mem::replace(&mut servers.nats, server), users))
    } else {
        None
    };
    let (plain, users) = match users {
        Some((plain, users)) => (Some(plain), Some(users)),
        None => (None, None),
    };
    let played = play_round(
        servers,
        &mut rng,
        config,
        dir,
        users,
        length,
        Topology { cluster, hosts },
    )
    .await;
    if let Some(plain) = plain {
        drop(std::mem::replace(&mut servers.nats, plain));
    }
    if played.is_ok() {
        // Postgres's disk holds a round's database, not every round's.
        drop_database(&servers.pg, &name).await?;
    }
    played
}

async fn play_round(
    servers: &mut Servers,
    rng: &mut StdRng,
    mut config: Config,
    dir: PathBuf,
    users: Option<BTreeMap<String, Credentials>>,
    length: Duration,
    Topology { cluster, hosts }: Topology,
) -> Result<RoundStats, String> {
    let port = servers.nats.port;
    let cluster_urls = cluster.as_ref().map(|c| c.nats.urls());
    let url = |user: &str| match (&users, &cluster_urls) {
        (Some(users), _) => users[user].url_at(&format!("127.0.0.1:{port}")),
        (None, Some(urls)) => urls.clone(),
        (None, None) => format!("nats://127.0.0.1:{port}"),
    };
    config.nats.url = url(nats_auth::COORDINATOR);
    let config_file = write_config(&config, &dir)?;
    let mut stats = RoundStats {
        cluster: cluster.is_some(),
        hosts: hosts.len(),
        coordinators: rng.random_range(1..=3),
        write_behind: config.database.write_behind,
        secured: users.is_some(),
        ..RoundStats::default()
    };
    let mut coordinators: Vec<Coordinator> = (0..stats.coordinators)
        .map(|i| Coordinator::start(&config_file, dir.join(format!("coordinator-{i}.log")), None))
        .collect();
    let nats = connect(&url(HARNESS)).await?;
    wait_status(&nats, &config.nats.prefix, Duration::from_secs(60), |_| {
        true
    })
    .await
    .ok_or("no coordinator answered status within 60 s")?;
    let fleet = (!hosts.is_empty()).then(|| Fleet {
        agents: hosts
            .iter()
            .map(|&(host, gpus)| {
                let url = url(&nats_auth::agent_user(host));
                let log = dir.join(format!("agent-{host}.log"));
                AgentProcess::start(&url, &config.nats.prefix, host, gpus, log)
            })
            .collect(),
        ttl: Duration::from_millis(HOST_TTL_MS),
    });
    if let Some(fleet) = &fleet {
        // The workload starts once the leader heard every host.
        wait_status(&nats, &config.nats.prefix, Duration::from_secs(60), |doc| {
            fleet
                .agents
                .iter()
                .all(|a| host_state(doc, &a.host) == Some(HostState::Up))
        })
        .await
        .ok_or("the leader did not hear every host within 60 s")?;
    }
    let mut round = Round {
        auditor: {
            let mut auditor = config.clone();
            auditor.nats.url = url(nats_auth::AUDITOR);
            // The audit knows the capacities of the GPUs it is given only: a fleet's are the agents'.
            if let Some(fleet) = &fleet {
                auditor.gpus = fleet
                    .gpus()
                    .into_iter()
                    .map(|(id, vram_mb)| GpuConfig { id, vram_mb })
                    .collect();
            }
            auditor
        },
        harness_url: url(HARNESS),
        config,
        config_file,
        dir,
        nats,
        users,
        port,
        skewed: Vec::new(),
        cluster,
        fleet,
    };
    let config = round.config.clone();

    // The services, each behind proxies of its own (to cut it off), on a thread of its own (to stall it).
    let mut services = Vec::new();
    for (i, svc) in SERVICES.iter().enumerate() {
        let proxy = Proxies::start(&round.nats_ports()).await;
        let shared = Arc::new(Shared::default());
        let spec = ServiceSpec {
            name: svc.to_string(),
            url: proxy.url(&round, svc),
            prefix: config.nats.prefix.clone(),
            // Half of the services follow pause orders; the others are revoked at the deadline.
            handles_pause: i % 2 == 0,
            seed: rng.random(),
        };
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a service runtime")
                    .block_on(service(spec, shared))
            })
        };
        services.push((proxy, shared, thread));
    }
    let chaos = Chaos::start(&round.harness_url, &config.nats.prefix, rng).await;

    // The faults, one after another, until the round's time is up.
    let started = Instant::now();
    let mut timeline = Vec::new();
    while started.elapsed() < length {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_200))).await;
        let fault = loop {
            // A quarter of a fleet round's draws silence an agent.
            let fault = if round.fleet.is_some() && rng.random_bool(0.25) {
                AGENT_FAULTS[rng.random_range(0..AGENT_FAULTS.len())]
            } else {
                match &round.cluster {
                    Some(cluster) => cluster.draw(rng),
                    None => FAULTS[rng.random_range(0..FAULTS.len())],
                }
            };
            // Hostile clients are drawn where NATS checks permissions.
            if fault != Fault::HostileClients || round.users.is_some() {
                break fault;
            }
        };
        *stats.faults.entry(format!("{fault:?}")).or_default() += 1;
        let at = time::OffsetDateTime::now_utc();
        let what = inject(
            fault,
            rng,
            servers,
            &mut round,
            &mut coordinators,
            &services,
        )
        .await;
        let failed = what.is_err();
        let what = what.unwrap_or_else(|e| format!("FAILED: {e}"));
        timeline.push(format!("{at} {fault:?} {what}"));
        if failed {
            return Err(format!(
                "{fault:?}: {what} (logs in {})\nfaults:\n  {}",
                round.dir.display(),
                timeline.join("\n  ")
            ));
        }
    }
    stats.timeline = timeline.clone();
    let timeline = format!("faults:\n  {}", timeline.join("\n  "));

    // Heal, stop the services, wait for the coordinator to be idle.
    chaos.stop();
    for (proxy, shared, _) in &services {
        proxy.restore();
        shared.stop.store(true, Ordering::SeqCst);
    }
    let mut units = Vec::new();
    for (proxy, shared, thread) in services {
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| format!("joining a service: {e}"))?;
        joined.map_err(|_| "a service thread panicked".to_string())?;
        units.extend(shared.units.lock().expect("units").drain(..));
        for (outcome, n) in shared.outcomes.lock().expect("outcomes").iter() {
            *stats.outcomes.entry(outcome.clone()).or_default() += n;
        }
        drop(proxy);
    }
    let idle = wait_status(&round.nats, &config.nats.prefix, SETTLE, |doc| {
        doc.queue_total == 0
            && doc.paused.is_empty()
            && doc.gpus.iter().all(|g| g.holders.is_empty())
    })
    .await;
    if idle.is_none() {
        return Err(format!(
            "the coordinator was not idle {SETTLE:?} after the services stopped (logs in {})\n{timeline}",
            round.dir.display()
        ));
    }

    // The checks.
    let summary = match gpu_coordinator::app::audit::run(&round.auditor, Since::Start).await {
        Ok(Ok(summary)) => summary,
        Ok(Err(violation)) => return Err(format!("audit: {violation}\n{timeline}")),
        Err(e) => return Err(format!("audit could not run: {e:#}")),
    };
    if summary.live > 0 || summary.unheard > 0 {
        return Err(format!(
            "requests without an end: {} still live, {} stored but never answered\n{summary}\n{timeline}",
            summary.live, summary.unheard
        ));
    }
    if let Some(fleet) = &mut round.fleet {
        let gone = fleet.gone();
        if !gone.is_empty() {
            return Err(format!(
                "node agents ended by themselves: {} (logs in {})\n{timeline}",
                gone.join("; "),
                round.dir.display()
            ));
        }
    }
    if let Err((e, ids)) = check_units(&units, &round.gpus()) {
        let history = history_of(&round.harness_url, &config.nats.prefix, &ids).await;
        return Err(format!("{e}\n{timeline}\n{history}"));
    }
    // A coordinator whose clock is off never led, in the whole round.
    for skewed in &round.skewed {
        let log = std::fs::read_to_string(&skewed.log).unwrap_or_default();
        if log.contains(LEADING) {
            return Err(format!(
                "the coordinator whose clock is off led ({}):\n{log}\n{timeline}",
                skewed.log.display()
            ));
        }
    }
    stats.requests = summary.requests;
    stats.grants = summary.grants + summary.resumes;
    stats.preemptions = summary.preemptions;
    stats.revocations = summary.revocations.values().sum();
    stats.units = units.len();
    drop(coordinators);
    drop(round.skewed);
    drop(round.fleet);
    let _ = std::fs::remove_dir_all(&round.dir);
    Ok(stats)
}

/// What a round runs on besides the single servers.
struct Topology {
    /// The clusters of a cluster round, in place of the single nats-server and redis-server.
    cluster: Option<ClusterServers>,
    /// The hosts whose node agents report the GPUs in a fleet round (none otherwise).
    hosts: Vec<Host>,
}

/// Drops the database of a round that passed (its coordinators are gone).
async fn drop_database(pg: &PgServer, name: &str) -> Result<(), String> {
    use sea_orm::ConnectionTrait as _;
    let db = sea_orm::Database::connect(pg.url("postgres"))
        .await
        .map_err(|e| format!("connect to Postgres: {e}"))?;
    db.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .map_err(|e| format!("dropping the database {name}: {e}"))?;
    db.close().await.ok();
    Ok(())
}

/// The user with every right that the harness itself connects as on a secured NATS (to ask for the
/// status, to duplicate inputs, to read the history, to watch the hostile clients' victims).
const HARNESS: &str = "harness";

/// What the log of a coordinator says when it starts to lead (at `info`).
const LEADING: &str = "leading in term";

/// What a fault may need of its round.
struct Round {
    /// The coordinators' configuration (its NATS URL with the coordinator's credentials).
    config: Config,
    config_file: PathBuf,
    /// The configuration of the auditor (its own credentials).
    auditor: Config,
    harness_url: String,
    dir: PathBuf,
    /// The harness's own connection.
    nats: async_nats::Client,
    /// Everyone's credentials where NATS checks permissions.
    users: Option<BTreeMap<String, Credentials>>,
    port: u16,
    /// The coordinators started with their clock off (the last one may run).
    skewed: Vec<Coordinator>,
    /// The clusters of a cluster round (the single servers are then unused, Postgres's aside).
    cluster: Option<ClusterServers>,
    /// The node agents of a fleet round (the coordinators then have no GPUs of their own).
    fleet: Option<Fleet>,
}

impl Round {
    /// The round's GPUs and their capacities in MB: the agents', else the configured ones.
    fn gpus(&self) -> Vec<(String, u64)> {
        match &self.fleet {
            Some(fleet) => fleet.gpus(),
            None => GPUS.iter().map(|(id, mb)| (id.to_string(), *mb)).collect(),
        }
    }

    /// The URL `user` connects with to NATS at `port` (the server's or a proxy's).
    fn url(&self, user: &str, port: u16) -> String {
        match &self.users {
            Some(users) => users[user].url_at(&format!("127.0.0.1:{port}")),
            None => format!("nats://127.0.0.1:{port}"),
        }
    }

    /// The client ports of the round's NATS servers: its cluster's nodes, or its one server.
    fn nats_ports(&self) -> Vec<u16> {
        match &self.cluster {
            Some(cluster) => (0..cluster.nats.size())
                .map(|i| cluster.nats.port(i))
                .collect(),
            None => vec![self.port],
        }
    }
}

/// A private nats-server with the configuration `nats-auth` writes for the six services and the agents
/// of `hosts` (in `dir`), plus the harness's own user, and everyone's credentials.
fn secured_nats(
    prefix: &str,
    hosts: &[Host],
    dir: &std::path::Path,
) -> Result<(NatsServer, BTreeMap<String, Credentials>), String> {
    use rand::distr::{Alphanumeric, SampleString};
    let services: Vec<String> = SERVICES.iter().map(ToString::to_string).collect();
    let hosts: Vec<String> = hosts.iter().map(|(host, _)| host.to_string()).collect();
    let mut generated = nats_auth::generate(prefix, &services, &hosts, "127.0.0.1:4222")
        .map_err(|e| format!("nats-auth: {e:#}"))?;
    let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
    let users = "  users = [\n";
    if !generated.conf.contains(users) {
        return Err(format!(
            "no users in the generated configuration:\n{}",
            generated.conf
        ));
    }
    generated.conf = generated.conf.replacen(
        users,
        &format!("{users}    {{ user: \"{HARNESS}\", password: \"{password}\" }}\n"),
        1,
    );
    generated.users.insert(
        HARNESS.to_owned(),
        Credentials {
            user: HARNESS.to_owned(),
            url: String::new(),
            password,
            http_token: None,
        },
    );
    let auth = dir.join("nats-auth");
    nats_auth::write(&auth, &generated).map_err(|e| format!("nats-auth: {e:#}"))?;
    let server = tokio::task::block_in_place(|| {
        NatsServer::start_with_conf(Some(auth.join("nats-server.conf")))
    });
    Ok((server, generated.users))
}

/// A connection to NATS at `url` (its credentials as the client crate reads them), with the plain
/// inbox prefix: the coordinator answers on the inboxes of the users it knows, and on `_INBOX`.
async fn connect(url: &str) -> Result<async_nats::Client, String> {
    gpu_coordinator_client::connect_options(url)?
        .custom_inbox_prefix("_INBOX")
        .connect(gpu_coordinator_client::server_addrs(url)?)
        .await
        .map_err(|e| format!("connect to NATS: {e}"))
}

fn round_config(servers: &Servers, name: &str) -> Config {
    let mut config = Config::default();
    config.nats.url = servers.nats.url();
    config.nats.prefix = format!("f{}", name.replace('_', "-"));
    config.redis.url = servers.redis.url();
    config.redis.key_prefix = name.to_string();
    config.database.url = servers.pg.url(name);
    config.lease.default_ms = LEASE_MS;
    config.preemption.ack_deadline_ms = ACK_DEADLINE_MS;
    config.request.default_timeout_ms = TIMEOUT_MS;
    config.http.listen = "127.0.0.1:0".into();
    config.gpus = GPUS
        .iter()
        .map(|(id, mb)| GpuConfig {
            id: id.to_string(),
            vram_mb: *mb,
        })
        .collect();
    config
}

/// The configuration as the TOML file `serve --config` reads.
fn write_config(config: &Config, dir: &std::path::Path) -> Result<PathBuf, String> {
    // A cluster round's Redis is found through its Sentinels (`redis.url` is then refused).
    let redis = if config.redis.sentinels.is_empty() {
        format!("url = \"{}\"", config.redis.url)
    } else {
        format!(
            "sentinels = {:?}\nmaster = \"{}\"",
            config.redis.sentinels, config.redis.master
        )
    };
    let mut text = format!(
        "[nats]\nurl = \"{}\"\nprefix = \"{}\"\nreplicas = {}\n\n[redis]\n{}\nkey_prefix = \"{}\"\n\n\
         [database]\nurl = \"{}\"\nwrite_behind = {}\n\n[lease]\ndefault_ms = {}\n\n[preemption]\nack_deadline_ms = {}\n\n\
         [request]\ndefault_timeout_ms = {}\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
        config.nats.url,
        config.nats.prefix,
        config.nats.replicas,
        redis,
        config.redis.key_prefix,
        config.database.url,
        config.database.write_behind,
        config.lease.default_ms,
        config.preemption.ack_deadline_ms,
        config.request.default_timeout_ms
    );
    for gpu in &config.gpus {
        text.push_str(&format!(
            "\n[[gpus]]\nid = \"{}\"\nvram_mb = {}\n",
            gpu.id, gpu.vram_mb
        ));
    }
    if config.nodes.agents {
        text.push_str(&format!(
            "\n[nodes]\nagents = true\nttl_ms = {}\n",
            config.nodes.ttl_ms
        ));
    }
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// The status document once `ready` holds for it, asking whichever coordinator leads.
async fn wait_status(
    nats: &async_nats::Client,
    prefix: &str,
    within: Duration,
    ready: impl Fn(&StatusDoc) -> bool,
) -> Option<StatusDoc> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        let asked = tokio::time::timeout(
            Duration::from_millis(500),
            nats.request(format!("{prefix}.status"), "".into()),
        )
        .await;
        if let Ok(Ok(msg)) = asked {
            if let Ok(doc) = serde_json::from_slice::<StatusDoc>(&msg.payload) {
                if ready(&doc) {
                    return Some(doc);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn inject(
    fault: Fault,
    rng: &mut StdRng,
    servers: &mut Servers,
    round: &mut Round,
    coordinators: &mut [Coordinator],
    services: &[(Proxies, Arc<Shared>, std::thread::JoinHandle<()>)],
) -> Result<String, String> {
    let pause =
        |lo: u64, hi: u64, rng: &mut StdRng| Duration::from_millis(rng.random_range(lo..hi));
    Ok(match fault {
        Fault::KillCoordinator => {
            let i = rng.random_range(0..coordinators.len());
            coordinators[i].kill();
            let down = pause(0, 1_000, rng);
            tokio::time::sleep(down).await;
            coordinators[i].restart();
            format!("coordinator {i}, down {down:?}")
        }
        Fault::RestartNats => {
            tokio::task::block_in_place(|| servers.nats.restart());
            String::new()
        }
        Fault::RestartRedis => {
            tokio::task::block_in_place(|| servers.redis.restart());
            String::new()
        }
        Fault::RestartPostgres => {
            tokio::task::block_in_place(|| servers.pg.stop());
            let down = pause(0, 1_500, rng);
            tokio::time::sleep(down).await;
            tokio::task::block_in_place(|| servers.pg.resume());
            format!("down {down:?}")
        }
        Fault::StallCoordinator => {
            let i = rng.random_range(0..coordinators.len());
            coordinators[i].signal("-STOP");
            tokio::time::sleep(Duration::from_millis(LEASE_MS * 2)).await;
            coordinators[i].signal("-CONT");
            format!("coordinator {i}")
        }
        Fault::StallHolder => {
            let i = rng.random_range(0..services.len());
            *services[i].1.stall.lock().expect("stall") = Some(Duration::from_millis(LEASE_MS * 2));
            SERVICES[i].to_string()
        }
        Fault::CutClient => {
            let i = rng.random_range(0..services.len());
            services[i].0.cut();
            let cut = pause(300, 3_000, rng);
            tokio::time::sleep(cut).await;
            services[i].0.restore();
            format!("{} for {cut:?}", SERVICES[i])
        }
        Fault::SlowPostgresStopLeader => {
            let slow = pause(100, 600, rng);
            let filling = pause(200, 1_500, rng);
            match slow_postgres_stop_leader(round, coordinators, slow, filling).await {
                Ok(what) => format!("each journal write {slow:?} slower for {filling:?}, {what}"),
                Err(e) => format!("not played: {e}"),
            }
        }
        Fault::FillPostgresDisk => {
            // Postgres refuses what must grow a file (`disk_full`); the leader retries its journal
            // writes until the filler goes.
            let noted = || {
                coordinators
                    .iter()
                    .map(|c| {
                        let log = std::fs::read_to_string(&c.log).unwrap_or_default();
                        log.matches("Postgres is full").count()
                    })
                    .sum::<usize>()
            };
            let before = noted();
            let filler = tokio::task::block_in_place(|| servers.pg_disk.fill(0));
            let full = pause(500, 3_000, rng);
            tokio::time::sleep(full).await;
            std::fs::remove_file(&filler).map_err(|e| format!("removing the filler: {e}"))?;
            // A WAL segment it could not make crashes Postgres, and its recovery then too: it shuts
            // down, and the operator starts it again.
            let restarted = tokio::task::block_in_place(|| {
                let until = Instant::now() + Duration::from_secs(20);
                while Instant::now() < until {
                    if !servers.pg.running() {
                        servers.pg.resume();
                        return Ok(true);
                    }
                    if servers.pg.accepting() {
                        return Ok(false);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err("Postgres neither accepts connections nor stopped within 20 s".to_string())
            })?;
            format!(
                "full for {full:?}, {} refusal(s) noted in the coordinators' logs{}",
                noted() - before,
                if restarted {
                    "; Postgres crashed (its WAL could not grow) and was started again"
                } else {
                    ""
                }
            )
        }
        Fault::ClockOffsetStandby => clock_offset_standby(rng, round, coordinators).await?,
        Fault::HostileClients => hostile_clients(rng, round).await?,
        Fault::KillNatsStreamLeader => kill_nats_stream_leader(rng, round).await?,
        Fault::KillRedisMaster => kill_redis_master(round).await?,
        Fault::KillPgPrimary => kill_pg_primary(round).await?,
        Fault::KillAgent => silence_agent(rng, round, false).await?,
        Fault::StallAgent => silence_agent(rng, round, true).await?,
    })
}

/// Slows the journal's writes to Postgres by `slow` each (a trigger on the `fence` row that every
/// batch raises), lets the journal stream fill for `filling` (with Postgres written behind, it holds
/// what Postgres does not yet), then stops the leader gracefully (SIGTERM), waits for its process to
/// end, and starts it again; Postgres is fast again once a coordinator leads.
async fn slow_postgres_stop_leader(
    round: &Round,
    coordinators: &mut [Coordinator],
    slow: Duration,
    filling: Duration,
) -> Result<String, String> {
    use sea_orm::ConnectionTrait as _;
    let (config, nats) = (&round.config, &round.nats);
    let db = sea_orm::Database::connect(&config.database.url)
        .await
        .map_err(|e| format!("connect to Postgres: {e}"))?;
    let slowness = |ms: u128| {
        format!(
            "CREATE TABLE IF NOT EXISTS harness_slowness (ms bigint NOT NULL); \
             DELETE FROM harness_slowness; INSERT INTO harness_slowness VALUES ({ms}); \
             CREATE OR REPLACE FUNCTION harness_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 PERFORM pg_sleep(COALESCE((SELECT max(ms) FROM harness_slowness), 0) / 1000.0); \
                 RETURN NULL; END $$; \
             CREATE OR REPLACE TRIGGER harness_slow BEFORE INSERT ON fence \
                 FOR EACH STATEMENT EXECUTE FUNCTION harness_slow();"
        )
    };
    db.execute_unprepared(&slowness(slow.as_millis()))
        .await
        .map_err(|e| format!("slow Postgres: {e}"))?;
    tokio::time::sleep(filling).await;
    let leading = |doc: &StatusDoc| doc.leader.is_some();
    let stopped = match wait_status(nats, &config.nats.prefix, SETTLE, leading).await {
        Some(doc) => {
            let holder = doc.leader.map(|l| l.holder).unwrap_or_default();
            match coordinators.iter().position(|c| {
                c.pid()
                    .is_some_and(|pid| holder.contains(&format!("-{pid}-")))
            }) {
                Some(i) => {
                    let took = tokio::task::block_in_place(|| coordinators[i].stop_gracefully());
                    coordinators[i].restart();
                    format!("leader {i} stopped in {took:?}")
                }
                None => format!("the leader {holder} is none of this round's"),
            }
        }
        None => "no leader to stop".to_string(),
    };
    let led = wait_status(nats, &config.nats.prefix, SETTLE, leading).await;
    db.execute_unprepared(&slowness(0))
        .await
        .map_err(|e| format!("heal Postgres: {e}"))?;
    let _ = db.close().await;
    match led {
        Some(_) => Ok(stopped),
        None => Err(format!(
            "{stopped}; no coordinator led again within {SETTLE:?}"
        )),
    }
}

/// Starts a standby whose clock is `FAKETIME=±N m` off (libfaketime) (in place of the one an earlier draw
/// started), waits until it says that it does not lead, then kills the leader: a sound standby takes
/// over or, where the skewed one is the only one left, nobody leads until the killed one is back. The
/// skewed one runs on as a standby until the round ends; its log must never say that it led.
async fn clock_offset_standby(
    rng: &mut StdRng,
    round: &mut Round,
    coordinators: &mut [Coordinator],
) -> Result<String, String> {
    let minutes = rng.random_range(2..=30u32);
    let shift = format!("{}{minutes}m", if rng.random_bool(0.5) { "+" } else { "-" });
    if let Some(last) = round.skewed.last_mut() {
        last.kill();
    }
    let log = round.dir.join(format!("skewed-{}.log", round.skewed.len()));
    let skewed = tokio::task::block_in_place(|| {
        Coordinator::start(&round.config_file, log.clone(), Some(shift.clone()))
    });
    let skewed_pid = skewed.pid().unwrap_or_default();
    round.skewed.push(skewed);
    // It says so once it compared its clock with Postgres's.
    let until = Instant::now() + SETTLE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(LEADING) {
            return Err(format!("the coordinator {shift} off led:\n{text}"));
        }
        if text.contains("does not lead until the clocks agree") {
            break;
        }
        if Instant::now() >= until {
            return Err(format!(
                "the coordinator {shift} off did not say within {SETTLE:?} that it does not lead:\n{text}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let prefix = &round.config.nats.prefix;
    let is = |holder: &str, pid: u32| holder.contains(&format!("-{pid}-"));
    let leader = |doc: StatusDoc| doc.leader.map(|l| l.holder);
    let Some(holder) = wait_status(&round.nats, prefix, SETTLE, |d| d.leader.is_some())
        .await
        .and_then(leader)
    else {
        return Err(format!("nobody led within {SETTLE:?}"));
    };
    if is(&holder, skewed_pid) {
        return Err(format!("the coordinator {shift} off leads: {holder}"));
    }
    let Some(i) = coordinators
        .iter()
        .position(|c| c.pid().is_some_and(|pid| is(&holder, pid)))
    else {
        return Ok(format!(
            "{shift} off; the leader {holder} is none of this round's"
        ));
    };
    coordinators[i].kill();
    let what = if coordinators.len() > 1 {
        // A sound standby takes over.
        let next = wait_status(&round.nats, prefix, SETTLE, |d| {
            d.leader.as_ref().is_some_and(|l| l.holder != holder)
        })
        .await
        .and_then(leader);
        coordinators[i].restart();
        match next {
            Some(next) if is(&next, skewed_pid) => {
                return Err(format!("the coordinator {shift} off took over: {next}"))
            }
            Some(next) => format!("{shift} off; leader {i} killed, {next} took over"),
            None => return Err(format!("nobody took over from {holder} within {SETTLE:?}")),
        }
    } else {
        // Left alone, the skewed one does not lead: nobody answers until a sound one is back.
        let down = Duration::from_millis(rng.random_range(500..2_500));
        if let Some(doc) = wait_status(&round.nats, prefix, down, |d| d.leader.is_some()).await {
            return Err(format!(
                "with only the coordinator {shift} off left, {} led",
                leader(doc).unwrap_or_default()
            ));
        }
        coordinators[i].restart();
        format!("{shift} off; the only sound coordinator killed, nobody led for {down:?}")
    };
    // The round goes on through a sound coordinator.
    match wait_status(&round.nats, prefix, SETTLE, |d| d.leader.is_some())
        .await
        .and_then(leader)
    {
        Some(next) if is(&next, skewed_pid) => {
            Err(format!("{what}; the coordinator {shift} off leads: {next}"))
        }
        Some(_) => Ok(what),
        None => Err(format!("{what}; nobody led again within {SETTLE:?}")),
    }
}

/// A service turned hostile (one of the six, with its own credentials) and the auditor, for a while,
/// over and over: status questions whose reply subject is another service's input or the purge of the
/// input stream, a push consumer delivering onto another service's release, publishes on another
/// service's inputs, replies, orders and events; the auditor pulls from, deletes and makes the
/// coordinator's input consumer, and makes push consumers. Every publish must be refused by the
/// server, every consumer left unmade, no status answer stored as an input, the input stream never
/// purged; the round's checks then say that nothing else was lost or broken.
async fn hostile_clients(rng: &mut StdRng, round: &Round) -> Result<String, String> {
    use async_nats::jetstream::consumer;
    use futures::{FutureExt as _, StreamExt as _};
    let h = rng.random_range(0..SERVICES.len());
    let v = (h + rng.random_range(1..SERVICES.len())) % SERVICES.len();
    let (hostile, victim) = (SERVICES[h], SERVICES[v]);
    let lasting = Duration::from_millis(rng.random_range(500..2_000));
    let prefix = &round.config.nats.prefix;
    let subjects = gpu_coordinator_wire::Subjects::new(prefix).map_err(|e| e.to_string())?;
    let (input, output) = (subjects.input_stream(), subjects.output_stream());
    let service = Intruder::connect(&round.url(hostile, round.port)).await?;
    let auditor = Intruder::connect(&round.url(nats_auth::AUDITOR, round.port)).await?;
    let harness = async_nats::jetstream::new(round.nats.clone());
    let first_input = |js: async_nats::jetstream::Context, input: String| async move {
        let mut stream = js.get_stream(&input).await.map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        Ok::<u64, String>(info.state.first_sequence)
    };
    let first = first_input(harness.clone(), input.clone()).await?;
    let mut watched = round
        .nats
        .subscribe(format!("{prefix}.*.{victim}"))
        .await
        .map_err(|e| format!("watch {victim}'s inputs: {e}"))?;
    round.nats.flush().await.map_err(|e| e.to_string())?;

    let victims_inputs = [
        subjects.request(victim),
        subjects.release(victim),
        subjects.renew(victim),
        subjects.ack(victim),
        subjects.cancel(victim),
    ];
    let mut refused_publishes = victims_inputs.to_vec();
    refused_publishes.extend([
        subjects.reply(victim),
        subjects.control(victim),
        subjects.event(gpu_coordinator_wire::EventKind::Granted, victim),
    ]);
    let consumer = gpu_coordinator::adapters::nats::CONSUMER;
    let auditor_refused = [
        format!("$JS.API.CONSUMER.MSG.NEXT.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.DELETE.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{input}"),
        format!("$JS.API.CONSUMER.CREATE.{output}.x"),
    ];
    let push = |deliver_subject: String, filter_subject: String| consumer::push::Config {
        deliver_subject,
        filter_subject,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let started = Instant::now();
    let mut tries = 0usize;
    while tries == 0 || started.elapsed() < lasting {
        tries += 1;
        for reply in victims_inputs
            .iter()
            .cloned()
            .chain([format!("$JS.API.STREAM.PURGE.{input}")])
        {
            service
                .client
                .publish_with_reply(subjects.status(), reply, r#"{"limit":0}"#.into())
                .await
                .map_err(|e| format!("{hostile} asks for the status: {e}"))?;
        }
        for subject in &refused_publishes {
            // A release without a request id would release every lease of the victim.
            service.publish(subject, "{}").await?;
        }
        for subject in &auditor_refused {
            auditor.publish(subject, r#"{"batch":1}"#).await?;
        }
        let pushed_by_service = async {
            let stream = service
                .js
                .get_stream(&output)
                .await
                .map_err(|e| e.to_string())?;
            // A refused call is never answered.
            let made =
                stream.create_consumer(push(subjects.release(victim), subjects.reply(hostile)));
            Ok::<bool, String>(matches!(
                tokio::time::timeout(REFUSED, made).await,
                Ok(Ok(_))
            ))
        };
        let pushed_by_auditor = async {
            let stream = auditor
                .js
                .get_stream(&output)
                .await
                .map_err(|e| e.to_string())?;
            let made = stream.create_consumer(push(subjects.reply(victim), String::new()));
            Ok::<bool, String>(matches!(
                tokio::time::timeout(REFUSED, made).await,
                Ok(Ok(_))
            ))
        };
        let (by_service, by_auditor) = tokio::join!(pushed_by_service, pushed_by_auditor);
        if by_service? {
            return Err(format!(
                "{hostile} made a push consumer onto {victim}'s release"
            ));
        }
        if by_auditor? {
            return Err(format!(
                "the auditor made a push consumer onto {victim}'s replies"
            ));
        }
    }

    // Every publish refused, once per try; every consumer creation too.
    let until = Instant::now() + SETTLE;
    let unrefused = || {
        let mut missing: Vec<String> = refused_publishes
            .iter()
            .filter(|s| service.refusals(&format!("\"{s}\"")) < tries)
            .map(|s| format!("{hostile} on {s}"))
            .collect();
        missing.extend(
            auditor_refused
                .iter()
                .filter(|s| auditor.refusals(&format!("\"{s}\"")) < tries)
                .map(|s| format!("the auditor on {s}")),
        );
        if service.refusals("\"$JS.API.CONSUMER.") < tries {
            missing.push(format!("{hostile}'s push consumers"));
        }
        // Its own six, and the push consumers.
        if auditor.refusals("\"$JS.API.CONSUMER.") < tries * (auditor_refused.len() + 1) {
            missing.push("the auditor's push consumers".into());
        }
        missing
    };
    loop {
        let missing = unrefused();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= until {
            return Err(format!(
                "not refused within {SETTLE:?}: {}",
                missing.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The coordinator handles status questions in order: once the hostile service's own question is
    // answered, anything published for the ones before it was sent, and reaches the harness before the
    // answer to its flush.
    let until = Instant::now() + SETTLE;
    loop {
        let asked = tokio::time::timeout(
            Duration::from_secs(2),
            service.client.request(subjects.status(), "".into()),
        )
        .await;
        if matches!(asked, Ok(Ok(_))) {
            break;
        }
        if Instant::now() >= until {
            return Err(format!(
                "{hostile}'s own status question got no answer within {SETTLE:?}"
            ));
        }
    }
    round.nats.flush().await.map_err(|e| e.to_string())?;
    while let Some(Some(msg)) = watched.next().now_or_never() {
        let body: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
        if body.get("gpus").is_some() {
            return Err(format!("a status answer was stored as {}", msg.subject));
        }
    }
    let now_first = first_input(harness.clone(), input.clone()).await?;
    if now_first != first {
        return Err(format!(
            "the input stream was purged: it began at #{first}, now at #{now_first}"
        ));
    }
    for stream in [&input, &output] {
        let stream = harness
            .get_stream(stream)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(|e| format!("list the consumers: {e}"))?;
            if let Some(deliver) = &info.config.deliver_subject {
                return Err(format!(
                    "a push consumer {} delivers onto {deliver}",
                    info.name
                ));
            }
        }
    }
    Ok(format!(
        "{hostile} and the auditor against {victim}: {tries} tries over {:?}, all refused",
        started.elapsed()
    ))
}

/// How long a hostile client waits for the answer to a JetStream call that the server refuses (and so
/// never answers); one made all the same is found among the streams' consumers.
const REFUSED: Duration = Duration::from_millis(500);

/// A raw connection as one user, recording the permission violations the server reports to it.
struct Intruder {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    violations: Arc<Mutex<Vec<String>>>,
}

impl Intruder {
    async fn connect(url: &str) -> Result<Intruder, String> {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let seen = violations.clone();
        let client = gpu_coordinator_client::connect_options(url)?
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().expect("violations").push(e.to_string());
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| format!("an intruder connects: {e}"))?;
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        Ok(Intruder {
            client,
            js,
            violations,
        })
    }

    async fn publish(&self, subject: &str, body: &'static str) -> Result<(), String> {
        self.client
            .publish(subject.to_owned(), body.into())
            .await
            .map_err(|e| format!("publish on {subject}: {e}"))
    }

    /// How many permission violations the server reported naming `quoted` (a subject in quotes, or
    /// the start of one).
    fn refusals(&self, quoted: &str) -> usize {
        self.violations
            .lock()
            .expect("violations")
            .iter()
            .filter(|v| v.contains("Permissions Violation") && v.contains(quoted))
            .count()
    }
}

/// A coordinator process (`serve --config`), its stderr kept in a log file; with libfaketime preloaded
/// (`FAKETIME=<shift>`) when its clock is to be off.
struct Coordinator {
    config: PathBuf,
    log: PathBuf,
    shift: Option<String>,
    child: Option<Child>,
}

impl Coordinator {
    fn start(config: &std::path::Path, log: PathBuf, shift: Option<String>) -> Coordinator {
        let mut coordinator = Coordinator {
            config: config.to_path_buf(),
            log,
            shift,
            child: None,
        };
        coordinator.restart();
        coordinator
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a coordinator log file");
        let binary = env!("CARGO_BIN_EXE_gpu-coordinator");
        let mut command = match &self.shift {
            Some(shift) => {
                let mut command = Command::new(binary);
                command
                    .env("LD_PRELOAD", gpu_coordinator_test_support::libfaketime())
                    .env("FAKETIME", shift);
                // Says when it starts to lead: it must not.
                command.env("RUST_LOG", "warn,gpu_coordinator::app=info");
                command
            }
            None => {
                let mut command = Command::new(binary);
                command.env("RUST_LOG", "warn");
                command
            }
        };
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start gpu-coordinator serve");
        self.child = Some(child);
    }

    /// The coordinator's process id, while it runs.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, and waits for the process to end (a minute at most, then SIGKILL); answers how long
    /// it took.
    fn stop_gracefully(&mut self) -> Duration {
        let started = Instant::now();
        self.signal("-TERM");
        if let Some(mut child) = self.child.take() {
            while started.elapsed() < Duration::from_secs(60) {
                if !matches!(child.try_wait(), Ok(None)) {
                    return started.elapsed();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        started.elapsed()
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        let Some(child) = &self.child else {
            return;
        };
        let pid = child.id();
        let _ = Command::new("kill")
            .arg(signal)
            .arg(pid.to_string())
            .status();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
    }
}

// ----- fleet rounds ------------------------------------------------------------------------------

/// The node agents of a fleet round, one per host.
struct Fleet {
    agents: Vec<AgentProcess>,
    /// How long the coordinators let a silent host stay reachable (`nodes.ttl_ms`).
    ttl: Duration,
}

impl Fleet {
    /// Every GPU the agents report, as the coordinators name it (`<host>/<id>`), with its MB.
    fn gpus(&self) -> Vec<(String, u64)> {
        self.agents
            .iter()
            .flat_map(|a| {
                a.gpus
                    .iter()
                    .map(|(id, mb)| (format!("{}/{id}", a.host), *mb))
            })
            .collect()
    }

    /// The agents whose process ended without the harness ending it, with how.
    fn gone(&mut self) -> Vec<String> {
        self.agents
            .iter_mut()
            .filter_map(|a| {
                let ended = a.child.as_mut()?.try_wait().ok()??;
                Some(format!("{} ({ended}, log {})", a.host, a.log.display()))
            })
            .collect()
    }
}

/// A node agent (`gpu-coordinator agent`) as a process of its own, simulating its host's GPUs; its
/// stderr kept in a log file.
struct AgentProcess {
    host: String,
    gpus: &'static [(&'static str, u64)],
    url: String,
    prefix: String,
    log: PathBuf,
    child: Option<Child>,
}

impl AgentProcess {
    fn start(
        url: &str,
        prefix: &str,
        host: &str,
        gpus: &'static [(&'static str, u64)],
        log: PathBuf,
    ) -> AgentProcess {
        let mut agent = AgentProcess {
            host: host.to_owned(),
            gpus,
            url: url.to_owned(),
            prefix: prefix.to_owned(),
            log,
            child: None,
        };
        agent.restart();
        agent
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("an agent log file");
        let gpus: Vec<String> = self
            .gpus
            .iter()
            .map(|(id, mb)| format!("{{id=\"{id}\",vram_mb={mb}}}"))
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
            .arg("agent")
            .env("GPU_COORDINATOR_NATS__URL", &self.url)
            .env("GPU_COORDINATOR_NATS__PREFIX", &self.prefix)
            .env("GPU_COORDINATOR_AGENT__HOST", &self.host)
            .env("GPU_COORDINATOR_NVML__ENABLED", "false")
            .env(
                "GPU_COORDINATOR_NVML__SAMPLE_MS",
                AGENT_SAMPLE_MS.to_string(),
            )
            .env("GPU_COORDINATOR_GPUS", format!("[{}]", gpus.join(",")))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start gpu-coordinator agent");
        self.child = Some(child);
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(signal)
                .arg(child.id().to_string())
                .status();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
    }
}

/// The state of `host` in `status`, where its leader heard it.
fn host_state(status: &StatusDoc, host: &str) -> Option<HostState> {
    status
        .hosts
        .iter()
        .find(|h| h.host == host)
        .map(|h| h.state)
}

/// The holders of `host`'s GPUs in `status`: (request id, fence).
fn host_holders(status: &StatusDoc, host: &str) -> BTreeMap<String, u64> {
    status
        .gpus
        .iter()
        .filter(|g| g.id.split_once('/').is_some_and(|(h, _)| h == host))
        .flat_map(|g| g.holders.iter().map(|h| (h.request_id.clone(), h.fence)))
        .collect()
}

/// Silences one agent: `kill -9`, started again after a while (which may be shorter than the TTL), or
/// (`stall`) SIGSTOP past the TTL, then SIGCONT; [`watch_silent_host`] checks the leader meanwhile.
/// Once the agent is back, its host must be up again.
async fn silence_agent(rng: &mut StdRng, round: &mut Round, stall: bool) -> Result<String, String> {
    let fleet = round.fleet.as_mut().ok_or("not a fleet round")?;
    let i = rng.random_range(0..fleet.agents.len());
    let ttl = fleet.ttl;
    let silent = if stall {
        ttl + Duration::from_millis(rng.random_range(500..3_000))
    } else {
        Duration::from_millis(rng.random_range(0..(ttl.as_millis() as u64 * 2 + 1_000)))
    };
    let agent = &mut fleet.agents[i];
    let host = agent.host.clone();
    if stall {
        agent.signal("-STOP");
    } else {
        agent.kill();
    }
    let what = format!(
        "{host}'s agent {} for {silent:?}",
        if stall { "stopped" } else { "killed" }
    );
    let watched = watch_silent_host(round, &host, ttl, silent).await;
    let agent = &mut round.fleet.as_mut().ok_or("not a fleet round")?.agents[i];
    if stall {
        agent.signal("-CONT");
    } else {
        agent.restart();
    }
    let watched = watched.map_err(|e| format!("{what}: {e}"))?;
    let back = Instant::now();
    let up = wait_status(&round.nats, &round.config.nats.prefix, SETTLE, |doc| {
        host_state(doc, &host) == Some(HostState::Up)
    })
    .await;
    match up {
        Some(_) => Ok(format!(
            "{what}: {watched}; up again {:?} after it was back",
            back.elapsed()
        )),
        None => Err(format!(
            "{what}: {watched}; its host not up within {SETTLE:?} after the agent was back"
        )),
    }
}

/// Reads the leader's status over and over while `host`'s agent is silent (for `silent`, since now):
/// once the TTL (and [`HOST_TTL_SLACK`]) has passed, the host must not be called up; once it is
/// called unreachable (or not known, by a leader that took over meanwhile), every holder seen on its
/// GPUs (request and fence) must have held there when it was first called so, the same leader
/// answering: its holders keep their leases (and may end), no new one comes. Says what it saw.
async fn watch_silent_host(
    round: &Round,
    host: &str,
    ttl: Duration,
    silent: Duration,
) -> Result<String, String> {
    let since = Instant::now();
    let prefix = &round.config.nats.prefix;
    let leader = |doc: &StatusDoc| doc.leader.as_ref().map(|l| (l.holder.clone(), l.term));
    // Since the host was last called up: when it was first called unreachable, by which leader (name
    // and term), and its holders then.
    type Unreachable = (Duration, Option<(String, u64)>, BTreeMap<String, u64>);
    let mut first: Option<Unreachable> = None;
    // How many status answers called the host up, unreachable, or did not know it.
    let mut answers = [0; 3];
    while since.elapsed() < silent {
        let asked = Instant::now();
        let doc = wait_status(&round.nats, prefix, Duration::from_millis(300), |_| true).await;
        if let Some(doc) = doc {
            // The host was silent since `since`, at least as long as the answer took to come.
            let silent_for = asked - since;
            match host_state(&doc, host) {
                Some(HostState::Up) if silent_for > ttl + HOST_TTL_SLACK => {
                    return Err(format!(
                        "silent for {silent_for:?} (TTL {ttl:?}), and its host is still up: {:?}",
                        doc.hosts
                    ));
                }
                Some(HostState::Up) => {
                    answers[0] += 1;
                    first = None;
                }
                // A leader that has not heard the host (one that took over meanwhile) grants nothing
                // there either.
                state @ (Some(HostState::Unreachable) | None) => {
                    answers[if state.is_some() { 1 } else { 2 }] += 1;
                    let holders = host_holders(&doc, host);
                    match &first {
                        Some((after, by, before)) if *by == leader(&doc) => {
                            let new: Vec<String> = holders
                                .iter()
                                .filter(|(id, fence)| before.get(*id) != Some(*fence))
                                .map(|(id, fence)| format!("{id} (fence {fence})"))
                                .collect();
                            if !new.is_empty() {
                                return Err(format!(
                                    "new holders on {host}, unreachable since +{after:?}: {}; \
                                     holders then: {before:?}; GPUs now: {:?}",
                                    new.join(", "),
                                    doc.gpus
                                ));
                            }
                        }
                        _ => first = Some((since.elapsed(), leader(&doc), holders)),
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(match first {
        Some((after, _, before)) => format!(
            "unreachable (or unknown) after {after:?}, {} holder(s) then, none new (status answers: {} calling \
             it unreachable, {} not knowing it)",
            before.len(),
            answers[1],
            answers[2]
        ),
        None => format!(
            "never called unreachable (status answers: {} up, {} unreachable, {} not knowing it)",
            answers[0], answers[1], answers[2]
        ),
    })
}

// ----- cluster rounds ----------------------------------------------------------------------------

/// The clusters a cluster round runs on, in place of the single nats-server and redis-server: three
/// NATS nodes that do not advertise each other to clients (a service knows only its proxies, one per
/// node, so that `CutClient` cuts it off the whole cluster), the coordinators' streams with three
/// replicas; a Redis master with a replica and three Sentinels, found by the coordinators through the
/// Sentinels; a Postgres primary with a synchronous standby, `database.url` naming both. Made anew for
/// each cluster round, removed with it.
struct ClusterServers {
    nats: NatsCluster,
    redis: RedisSentinels,
    /// Sentinel promoted the replica: the old master stays down for the rest of the round, and the
    /// new one has no replica to promote in turn.
    redis_failed_over: bool,
    pg: PgServer,
    /// Replays the primary's writes, synchronously: a commit is acknowledged once it has it.
    pg_standby: PgServer,
    /// The primary was killed and the standby promoted: the round goes on with no standby left.
    pg_failed_over: bool,
}

impl ClusterServers {
    /// Starts both clusters side by side (blocking: each waits until it is ready).
    fn start() -> ClusterServers {
        let (nats, redis, (pg, pg_standby)) = std::thread::scope(|s| {
            let nats = s.spawn(|| NatsCluster::start_unadvertised(3));
            let pg = s.spawn(|| {
                let primary = PgServer::start();
                let standby = primary.standby();
                // On the primary only (ALTER SYSTEM, after the base backup): the promoted standby
                // waits for no standby of its own.
                primary.set_synchronous(true);
                (primary, standby)
            });
            let redis = RedisSentinels::start();
            (
                nats.join().expect("the NATS cluster starts"),
                redis,
                pg.join().expect("Postgres and its standby start"),
            )
        });
        ClusterServers {
            nats,
            redis,
            redis_failed_over: false,
            pg,
            pg_standby,
            pg_failed_over: false,
        }
    }

    /// The coordinators' configuration on these clusters.
    fn configure(&self, config: &mut Config) {
        config.nats.url = self.nats.urls();
        config.nats.replicas = self.nats.size();
        config.redis.sentinels = self.redis.addrs();
        config.redis.master = self.redis.name.clone();
        // The round's database, on the primary and its standby.
        let database = config
            .database
            .url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        config.database.url = format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}",
            self.pg.port, self.pg_standby.port
        );
    }

    /// A fault for this round: half of the draws one of the clusters', the others one of the faults
    /// that apply here (not the single servers' restarts, fills or slowing, not hostile clients: NATS
    /// checks no permissions here).
    fn draw(&self, rng: &mut StdRng) -> Fault {
        loop {
            let fault = if rng.random_bool(0.5) {
                CLUSTER_FAULTS[rng.random_range(0..CLUSTER_FAULTS.len())]
            } else {
                FAULTS[rng.random_range(0..FAULTS.len())]
            };
            let applies = match fault {
                Fault::RestartNats
                | Fault::RestartRedis
                | Fault::RestartPostgres
                | Fault::FillPostgresDisk
                | Fault::SlowPostgresStopLeader
                | Fault::HostileClients => false,
                Fault::KillRedisMaster => !self.redis_failed_over,
                Fault::KillPgPrimary => !self.pg_failed_over,
                _ => true,
            };
            if applies {
                return fault;
            }
        }
    }
}

/// A service's way to NATS: a [`Proxy`] in front of each of the round's servers (one, or a cluster's
/// three), its client given all of them, so that the harness can cut it off every server at once.
struct Proxies(Vec<Proxy>);

impl Proxies {
    async fn start(ports: &[u16]) -> Proxies {
        let mut proxies = Vec::new();
        for &port in ports {
            proxies.push(Proxy::start(port).await);
        }
        Proxies(proxies)
    }

    /// The URL `user` connects with: every proxy, separated by commas.
    fn url(&self, round: &Round, user: &str) -> String {
        let urls: Vec<String> = self.0.iter().map(|p| round.url(user, p.port)).collect();
        urls.join(",")
    }

    fn cut(&self) {
        self.0.iter().for_each(Proxy::cut);
    }

    fn restore(&self) {
        self.0.iter().for_each(Proxy::restore);
    }
}

/// Kills (SIGKILL) the NATS node that leads the input stream, as the stream's info names it
/// (`cluster.leader`), leaves it down for a while, and starts it again on its store, waiting until it
/// is healthy (back in the cluster, current with the meta leader). The coordinators and the services'
/// clients fail over to the two nodes left; the stream elects another leader.
async fn kill_nats_stream_leader(rng: &mut StdRng, round: &mut Round) -> Result<String, String> {
    let input = gpu_coordinator_wire::Subjects::new(&round.config.nats.prefix)
        .map_err(|e| e.to_string())?
        .input_stream();
    let cluster = round.cluster.as_mut().ok_or("not a cluster round")?;
    let js = async_nats::jetstream::new(round.nats.clone());
    // A stream electing its leader (after an earlier kill) names none for a while.
    let until = Instant::now() + SETTLE;
    let leader = loop {
        let info = async {
            let mut stream = js.get_stream(&input).await.map_err(|e| e.to_string())?;
            let info = stream.info().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(info.cluster.as_ref().and_then(|c| c.leader.clone()))
        };
        let why = match info.await {
            Ok(Some(leader)) => break leader,
            Ok(None) => "it names no leader".to_owned(),
            Err(e) => e,
        };
        if Instant::now() >= until {
            return Err(format!("no leader of {input} within {SETTLE:?}: {why}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let i = cluster
        .nats
        .index_of(&leader)
        .ok_or_else(|| format!("{input}'s leader {leader} is none of the cluster's nodes"))?;
    tokio::task::block_in_place(|| cluster.nats.kill(i));
    let down = Duration::from_millis(rng.random_range(500..3_000));
    tokio::time::sleep(down).await;
    let started = Instant::now();
    // A node that is not healthy in time fails the round (with its replay), not the harness.
    let restarted = tokio::task::block_in_place(|| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cluster.nats.restart(i)))
    });
    if let Err(panic) = restarted {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(ToString::to_string))
            .unwrap_or_default();
        return Err(format!(
            "{leader} (leader of {input}) killed, down {down:?}, not back: {why}"
        ));
    }
    Ok(format!(
        "{leader} (leader of {input}) down {down:?}, healthy again {:?} after its start",
        started.elapsed()
    ))
}

/// Kills (SIGKILL) the Redis master and waits until the Sentinels name the replica as the master; the
/// coordinators follow them there. The old master stays down for the rest of the round.
async fn kill_redis_master(round: &mut Round) -> Result<String, String> {
    let cluster = round.cluster.as_mut().ok_or("not a cluster round")?;
    if cluster.redis_failed_over {
        return Err("the round's Redis master was killed already".into());
    }
    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.redis.kill_master());
    cluster.redis_failed_over = true;
    let replica = cluster.redis.replica.port;
    loop {
        let named = tokio::task::block_in_place(|| cluster.redis.master_port());
        if named == Some(replica) {
            break;
        }
        if started.elapsed() >= SETTLE {
            return Err(format!(
                "the Sentinels did not promote the replica (port {replica}) within {SETTLE:?}: \
                 they name {named:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(format!(
        "Sentinel promoted the replica {:?} after the kill",
        started.elapsed()
    ))
}

/// Kills (SIGKILL) the Postgres primary and promotes its synchronous standby at once, as a failover
/// manager would; the coordinators move their pools to it by themselves. Once per round: the promoted
/// standby has no standby of its own.
async fn kill_pg_primary(round: &mut Round) -> Result<String, String> {
    let cluster = round.cluster.as_mut().ok_or("not a cluster round")?;
    if cluster.pg_failed_over {
        return Err("the round's Postgres primary was killed already".into());
    }
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        cluster.pg.kill();
        cluster.pg_standby.promote();
    });
    cluster.pg_failed_over = true;
    Ok(format!(
        "the standby (port {}) was promoted {:?} after the kill of the primary (port {})",
        cluster.pg_standby.port,
        started.elapsed(),
        cluster.pg.port
    ))
}

// ----- the services ------------------------------------------------------------------------------

struct ServiceSpec {
    name: String,
    url: String,
    prefix: String,
    handles_pause: bool,
    seed: u64,
}

/// What a service shares with the harness.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// A stall to play at the next unit of work: the whole service (its runtime) stops, as if
    /// SIGSTOPped.
    stall: Mutex<Option<Duration>>,
    units: Mutex<Vec<Unit>>,
    outcomes: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn count(&self, outcome: &str) {
        *self
            .outcomes
            .lock()
            .expect("outcomes")
            .entry(outcome.to_string())
            .or_default() += 1;
    }
}

/// One unit of work a service did on a GPU, believing it held it.
#[derive(Debug, Clone)]
struct Unit {
    service: String,
    request_id: String,
    fence: u64,
    gpu: String,
    vram_mb: u64,
    whole: bool,
    start: Instant,
    end: Instant,
}

async fn service(spec: ServiceSpec, shared: Arc<Shared>) {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let client = loop {
        match Client::connect(&spec.url, &spec.prefix, &spec.name).await {
            Ok(client) => break client,
            Err(_) if !shared.stop.load(Ordering::SeqCst) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(_) => return,
        }
    };
    // The GPU, as the service uses it: a unit of work holds it; `on_pause` waits for the unit.
    let gpu = Arc::new(tokio::sync::Mutex::new(()));
    let mut worker = Worker::new(&client);
    if spec.handles_pause {
        let held = gpu.clone();
        worker = worker
            .on_pause(move |_| {
                let held = held.clone();
                async move {
                    let _unit_done = held.lock().await;
                }
            })
            .on_resume(|_| async {});
    }
    let mut n = 0u64;
    while !shared.stop.load(Ordering::SeqCst) {
        n += 1;
        let priority = rng.random_range(0..=2u8);
        let whole = rng.random_bool(0.1);
        let mut options = RequestOptions::new(priority)
            .request_id(format!("{}-r{n}", spec.name))
            .lease_ms(LEASE_MS)
            .timeout_ms(TIMEOUT_MS)
            .preemptible(priority > 0);
        if !whole {
            options = options.vram_mb(rng.random_range(2..=14u64) * 1_000);
        }
        let hold = Duration::from_millis(rng.random_range(50..400));
        match worker.request(options).await {
            Ok(lease) => {
                shared.count("granted");
                work(&spec.name, &lease, whole, hold, &gpu, &shared).await;
                if lease.is_revoked() {
                    shared.count("revoked or lost");
                } else {
                    match tokio::time::timeout(Duration::from_secs(10), lease.release()).await {
                        Ok(Ok(())) => shared.count("released"),
                        Ok(Err(ClientError::Revoked)) => shared.count("revoked or lost"),
                        _ => shared.count("release unconfirmed"),
                    }
                }
            }
            Err(ClientError::TimedOut) => shared.count("timed out"),
            Err(ClientError::Rejected { .. }) => shared.count("rejected"),
            Err(_) => {
                shared.count("client error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Works on the lease for `hold`, a unit at a time, each after checking that the lease is usable.
async fn work(
    service: &str,
    lease: &Lease,
    whole: bool,
    hold: Duration,
    gpu: &tokio::sync::Mutex<()>,
    shared: &Shared,
) {
    let started = Instant::now();
    while started.elapsed() < hold {
        let stall = shared.stall.lock().expect("stall").take();
        if let Some(stall) = stall {
            // The whole service stops (its runtime's only thread sleeps), as under SIGSTOP.
            std::thread::sleep(stall);
        }
        let unit = gpu.lock().await;
        if lease.usable() {
            let start = Instant::now();
            shared.units.lock().expect("units").push(Unit {
                service: service.to_string(),
                request_id: lease.request_id().to_string(),
                fence: lease.fence(),
                gpu: lease.gpu(),
                vram_mb: lease.vram_mb().unwrap_or(0),
                whole,
                start,
                end: start + UNIT,
            });
            tokio::time::sleep(UNIT).await;
            drop(unit);
            continue;
        }
        drop(unit);
        match lease.phase() {
            LeasePhase::Revoked | LeasePhase::Released => return,
            // Active but not usable: the local expiry came; the lease task gives it up.
            LeasePhase::Active => {
                let _ = tokio::time::timeout(Duration::from_secs(5), lease.revoked()).await;
                return;
            }
            LeasePhase::Pausing | LeasePhase::Paused | LeasePhase::Resuming => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
        }
    }
}

/// Whether the services' units of work ever overlapped beyond a GPU's capacity, or beside a whole-GPU
/// unit.
fn check_units(units: &[Unit], gpus: &[(String, u64)]) -> Result<(), (String, Vec<String>)> {
    if let Some(unit) = units
        .iter()
        .find(|u| !gpus.iter().any(|(gpu, _)| *gpu == u.gpu))
    {
        let known: Vec<&str> = gpus.iter().map(|(gpu, _)| gpu.as_str()).collect();
        return Err((
            format!(
                "{} ({}, fence {}) worked on GPU `{}`, none of the round's {known:?} (at {})",
                unit.request_id,
                unit.service,
                unit.fence,
                unit.gpu,
                wall(unit.start)
            ),
            vec![unit.request_id.clone()],
        ));
    }
    for (gpu, capacity) in gpus {
        let capacity = *capacity;
        let mut edges: Vec<(Instant, bool, &Unit)> = units
            .iter()
            .filter(|u| u.gpu == *gpu)
            .flat_map(|u| [(u.start, true, u), (u.end, false, u)])
            .collect();
        // Ends before starts at the same instant: back-to-back units do not overlap.
        edges.sort_by_key(|(at, starts, _)| (*at, *starts));
        let mut open: Vec<&Unit> = Vec::new();
        for (_, starts, unit) in edges {
            if !starts {
                if let Some(i) = open.iter().position(|u| std::ptr::eq(*u, unit)) {
                    open.swap_remove(i);
                }
                continue;
            }
            open.push(unit);
            // A whole-GPU lease holds whichever GPU it is on (a resume may move it).
            let used: u64 = open
                .iter()
                .map(|u| if u.whole { capacity } else { u.vram_mb })
                .sum();
            let whole = open.iter().any(|u| u.whole);
            if used > capacity || (whole && open.len() > 1) {
                let first = open.iter().map(|u| u.start).min().unwrap_or(unit.start);
                let who: Vec<String> = open
                    .iter()
                    .map(|u| {
                        format!(
                            "{} ({}, fence {}, {} MB{}, a unit from +{:?})",
                            u.request_id,
                            u.service,
                            u.fence,
                            u.vram_mb,
                            if u.whole { ", whole GPU" } else { "" },
                            u.start - first
                        )
                    })
                    .collect();
                return Err((
                    format!(
                        "services used GPU {gpu} ({capacity} MB) at once (at {}): {}",
                        wall(unit.start),
                        who.join(", ")
                    ),
                    open.iter().map(|u| u.request_id.clone()).collect(),
                ));
            }
        }
    }
    Ok(())
}

/// An instant of this process as the wall clock read it.
fn wall(at: Instant) -> time::OffsetDateTime {
    let now = Instant::now();
    let wall = time::OffsetDateTime::now_utc();
    if at <= now {
        wall - (now - at)
    } else {
        wall + (at - now)
    }
}

/// The messages of both streams that name one of `ids`, in stream order, to show with a failure.
async fn history_of(url: &str, prefix: &str, ids: &[String]) -> String {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt;
    let Ok(client) = connect(url).await else {
        return "(history unavailable: NATS)".into();
    };
    let js = async_nats::jetstream::new(client);
    let subjects = gpu_coordinator_wire::Subjects::new(prefix).expect("a prefix");
    let mut lines = Vec::new();
    for stream in [subjects.input_stream(), subjects.output_stream()] {
        let Ok(mut handle) = js.get_stream(&stream).await else {
            continue;
        };
        let last = handle
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .unwrap_or(0);
        let Ok(consumer) = handle.create_consumer(OrderedConfig::default()).await else {
            continue;
        };
        let Ok(mut messages) = consumer.messages().await else {
            continue;
        };
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_secs(2), messages.next()).await
        {
            let info = msg.info().ok().map(|i| (i.stream_sequence, i.published));
            let text = String::from_utf8_lossy(&msg.payload).to_string();
            if ids.iter().any(|id| text.contains(&format!("\"{id}\""))) {
                let (seq, at) = info.unwrap_or((0, time::OffsetDateTime::UNIX_EPOCH));
                lines.push(format!("  {stream} #{seq} {at} {} {text}", msg.subject));
            }
            if info.is_some_and(|(seq, _)| seq >= last) {
                break;
            }
        }
    }
    format!("history of {}:\n{}", ids.join(", "), lines.join("\n"))
}

// ----- duplicated, reordered and malformed inputs ------------------------------------------------

/// Publishes copies of real inputs late (some acknowledgements stripped of their fence), and
/// malformed inputs, for as long as it runs.
struct Chaos {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Chaos {
    async fn start(url: &str, prefix: &str, rng: &mut StdRng) -> Chaos {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let client = connect(url).await.expect("connect the chaos publisher");
        let prefix = prefix.to_owned();
        if rng.random_bool(0.6) {
            tasks.push(tokio::spawn(duplicate(
                client.clone(),
                prefix.clone(),
                rng.random(),
                stop.clone(),
            )));
        }
        if rng.random_bool(0.6) {
            tasks.push(tokio::spawn(malformed(
                client,
                prefix,
                rng.random(),
                stop.clone(),
            )));
        }
        Chaos { stop, tasks }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.abort();
        }
    }
}

async fn duplicate(client: async_nats::Client, prefix: String, seed: u64, stop: Arc<AtomicBool>) {
    use futures::StreamExt;
    let mut rng = StdRng::seed_from_u64(seed);
    let js = async_nats::jetstream::new(client.clone());
    let Ok(mut inputs) = client.subscribe(format!("{prefix}.*.*")).await else {
        return;
    };
    while let Some(msg) = inputs.next().await {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let kind = msg.subject.split('.').rev().nth(1).unwrap_or_default();
        if !["request", "release", "renew", "ack"].contains(&kind) || !rng.random_bool(0.2) {
            continue;
        }
        let mut payload = msg.payload.clone();
        let mut delay = Duration::from_millis(rng.random_range(0..800));
        if kind == "ack" && rng.random_bool(0.5) {
            // A copy without its fence, right behind the original (a retry of a fence-less client):
            // matched to the pause ordered before it was stored. (A late one could not be told from
            // the answer to a newer pause: that is what the fence is for.)
            if let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(&payload) {
                if let Some(map) = body.as_object_mut() {
                    map.remove("fence");
                }
                payload = serde_json::to_vec(&body).unwrap_or_default().into();
                delay = Duration::ZERO;
            }
        }
        let (js, subject) = (js.clone(), msg.subject.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = js.publish(subject, payload).await;
        });
    }
}

async fn malformed(client: async_nats::Client, prefix: String, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let js = async_nats::jetstream::new(client);
    // Each invalid for every kind of input, or naming a request no service made: none may change
    // what the services hold (a valid `release` without a request id would release a service's
    // every lease, as its restart asks: not a malformed input).
    let bodies: [&[u8]; 7] = [
        b"{",
        b"\x81\xa1a\xc1",
        br#"{"request_id":5}"#,
        br#"{"request_id":"chaos-1","fence":"one"}"#,
        br#"{"request_id":"chaos-2","priority":999}"#,
        br#"{"request_id":"chaos-3","action":"dance"}"#,
        br#"{"request_id":"chaos-4","priority":0,"vram_mb":999999999}"#,
    ];
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
        let kind = ["request", "release", "renew", "ack", "cancel"][rng.random_range(0..5)];
        let svc = SERVICES[rng.random_range(0..SERVICES.len())];
        let body = bodies[rng.random_range(0..bodies.len())];
        let _ = js
            .publish(format!("{prefix}.{kind}.{svc}"), body.to_vec().into())
            .await;
    }
}
