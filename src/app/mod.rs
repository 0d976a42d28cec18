//! The composition root: the one place where the adapters are chosen, connected and handed to the
//! driver as [`Ports`], and where the tasks beside it (the HTTP API, the NVML sampler) are spawned under
//! one [`TaskTracker`] and stopped in order:
//!
//! 1. the HTTP API answers from the start (`/healthz`; the rest says the coordinator is starting);
//! 2. the backends `[backends]` names are opened (one line in the log says which): each server is
//!    connected, waited for with backoff, and readied (migrations, streams), which is also what keeps a
//!    coordinator warm before it leads; the embedded ones live in the data directory, which this
//!    process locks first;
//! 3. it stands by until it leads (Postgres's `leader` row, [`PgLeadership`], or the data directory's
//!    lock, [`DirLock`]); then a driver starts
//!    for the term (the state restored) and runs until `shutdown`, or until the term is lost, when it
//!    stands by again;
//! 4. the HTTP API stops taking calls and drains, the sampler ends, and [`run`] returns once every task
//!    has.
//!
//! Choosing another adapter for a port (an embedded journal, another leadership) is a change here and
//! nowhere else in the driver.

pub mod gpus;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gpu_coordinator_wire::Subjects;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapters::http::{self, Backends, HttpState, Labels};
use crate::adapters::memory::{Faults, MemLeases, Trace};
use crate::adapters::nats::NatsBus;
use crate::adapters::nats_gateway::NatsGateway;
use crate::adapters::nats_readers;
use crate::adapters::nvml::GpuProbe;
use crate::adapters::postgres::{PgLeadership, PgStore, WriteBehind};
use crate::adapters::redis::LeaseStore;
use crate::adapters::sqlite::{DirLock, SqliteBus, SqliteStore};
use crate::config::{BusBackend, Config, JournalBackend, LeasesBackend};
use crate::driver::{Driver, DriverHandle, Setup};
use crate::metrics::{Metrics, Recorder};
use crate::ports::{Bus, Gateway, Journal, Leadership, Leases, Ports};
use crate::retry::{is_deposed, with_retry};
use crate::telemetry::redact_url;

/// How long the tasks beside the driver (HTTP calls in flight) may take to finish after it stopped.
const DRAIN: Duration = Duration::from_secs(5);

/// How often the leader looks at its NATS connection.
const CONNECTION_CHECK: Duration = Duration::from_millis(100);

/// The name the coordinator's NATS connection gives the server.
const CONNECTION_NAME: &str = "gpu-coordinator";

/// What [`run_with`] may be given beyond the configuration.
#[derive(Clone, Default)]
pub struct Extras {
    /// The GPU probe to use instead of NVML (tests pass a fake device). `None`: NVML, when
    /// `nvml.enabled` and a driver is there.
    pub probe: Option<Arc<dyn GpuProbe>>,
}

/// Runs the coordinator until `shutdown` is cancelled. `http` is the already-bound HTTP listener.
pub async fn run(
    config: Config,
    http: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(config, http, shutdown, Extras::default()).await
}

/// [`run`] with [`Extras`].
pub async fn run_with(
    config: Config,
    http: tokio::net::TcpListener,
    shutdown: CancellationToken,
    extras: Extras,
) -> anyhow::Result<()> {
    let subjects = Subjects::new(&config.nats.prefix)
        .map_err(anyhow::Error::msg)
        .context("nats.prefix")?;
    let metrics = Metrics::new();
    let tracker = TaskTracker::new();
    // The sidecars' addresses are taken before anything starts: one in use stops the start.
    let mut sidecars = crate::engines::Bound::bind(&config.engines).await?;
    let sidecar_tasks = TaskTracker::new();
    let sidecars_stop = CancellationToken::new();
    let (shutdown, finished) = if sidecars.is_empty() {
        (shutdown, None)
    } else {
        // At a stop the sidecars go first, while the coordinator still answers them: their engines
        // are put to sleep and their leases released, within the time a pause would have.
        let coordinator_stop = CancellationToken::new();
        let finished = CancellationToken::new();
        let bound = Duration::from_millis(config.preemption.ack_deadline_ms);
        tokio::spawn({
            let (sidecars_stop, sidecar_tasks) = (sidecars_stop.clone(), sidecar_tasks.clone());
            let (coordinator_stop, finished) = (coordinator_stop.clone(), finished.clone());
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = finished.cancelled() => {}
                }
                sidecars_stop.cancel();
                sidecar_tasks.close();
                if tokio::time::timeout(bound, sidecar_tasks.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("engine sidecars still stopping after {bound:?}; going on");
                }
                coordinator_stop.cancel();
            }
        });
        (coordinator_stop, Some(finished.drop_guard()))
    };
    let tasks_stop = shutdown.child_token();
    let state = HttpState::new(
        &config,
        subjects.clone(),
        metrics.clone(),
        tasks_stop.clone(),
    );
    let own_api = own_http_url(&http)?;
    let server = tracker.spawn(http::serve(http, state.clone()));
    let result = async {
        let chosen = Chosen::connect(&config, &subjects, &shutdown).await?;
        let mut gpus = gpus::probe(&config, extras.probe, &tracker, &tasks_stop).await;
        if let (true, Some(client)) = (config.nodes.agents, chosen.nats.clone()) {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::adapters::nats_nodes::WAITING);
            tracker.spawn(crate::adapters::nats_nodes::listen(
                client,
                subjects.clone(),
                tx,
                metrics.clone(),
                tasks_stop.clone(),
            ));
            gpus.nodes = Some(crate::ports::nodes::NodeFeed::new(rx));
        }
        if !sidecars.is_empty() {
            // The sidecars are clients of this coordinator's own HTTP API, in either mode: the same
            // code as `gpu-coordinator engines` on another host.
            let coordinator = crate::engines::Coordinator {
                url: own_api.clone(),
                prefix: config.nats.prefix.clone(),
                tokens: config.http.tokens.clone(),
                host: crate::engines::Coordinator::host_of(&config),
            };
            crate::engines::spawn(
                std::mem::take(&mut sidecars),
                coordinator,
                gpus.probe.clone(),
                http::server::Limits::from_config(&config.http),
                &state.engines(),
                &sidecar_tasks,
                &sidecars_stop,
            );
        }
        if let Some(client) = chosen.nats.clone() {
            tracker.spawn(nats_readers::serve(
                client,
                subjects.clone(),
                tasks_stop.clone(),
            ));
        }
        tracing::info!(
            "this coordinator is `{}`; standing by until it leads",
            chosen.holder
        );
        let ports = chosen.ports.clone();
        let handle = DriverHandle::default();
        state.set_backends(Backends {
            gateway: chosen.gateway.clone(),
            journal: ports.journal.clone(),
            leases: ports.leases.clone(),
            leadership: ports.leadership.clone(),
            driver: handle.clone(),
            labels: chosen.labels,
        });
        let led = lead(
            &config, &subjects, &gpus, &ports, &handle, &metrics, &shutdown,
        )
        .await;
        // Closed once, at the end: the drivers of successive terms share the connections.
        ports.journal.close().await;
        led
    }
    .await;
    tasks_stop.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        tracing::warn!("HTTP calls still in flight after {DRAIN:?}; dropping them");
    }
    if server.is_finished() {
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("the HTTP server failed: {e}"),
            Err(e) => tracing::error!("the HTTP server task failed: {e}"),
        }
    }
    drop(finished);
    result
}

/// The base URL of the HTTP API on `listener`, as a client on this machine calls it.
fn own_http_url(listener: &tokio::net::TcpListener) -> anyhow::Result<String> {
    let mut addr = listener.local_addr().context("http.listen")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}"))
}

/// Leads whenever it can, until `shutdown`: waits for the leadership, runs a driver for the term, and
/// stands by again when the term is lost (the driver stopped acting, or its writes were refused). A
/// graceful stop hands the leadership on.
async fn lead(
    config: &Config,
    subjects: &Subjects,
    gpus: &gpus::Gpus,
    ports: &Ports,
    handle: &DriverHandle,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let leadership = ports.leadership.clone();
    loop {
        let term = tokio::select! {
            term = with_retry("waiting for the leadership", shutdown, || leadership.acquire()) => term?,
            () = shutdown.cancelled() => return Ok(()),
        };
        tracing::info!("leading in term {}", term.0);
        // The driver acts until shutdown or until the term is lost: then even a wait for a server
        // (Postgres away) ends, within the trust window.
        let acting = shutdown.child_token();
        let watch_term = tokio::spawn({
            let (leadership, acting, bus) = (leadership.clone(), acting.clone(), ports.bus.clone());
            let journal = ports.journal.clone();
            let grace = Duration::from_millis(config.leader.ttl_ms).mul_f64(0.8);
            async move {
                tokio::select! {
                    () = leadership.lost(term) => {
                        // Another may lead soon: nothing of this term writes the journal any more.
                        journal.stand_down(false).await;
                    }
                    () = cut_off(bus.as_ref(), grace) => {
                        tracing::warn!(
                            "cut off from NATS for {grace:?}: giving the leadership of term {} up, so \
                             that a coordinator that reaches it takes over",
                            term.0
                        );
                        // At once, whatever the driver still waits for (its writes are this term's
                        // and refused once another leads), but after the journal's writer stopped:
                        // it would purge the stream while the next leader reads it.
                        journal.stand_down(false).await;
                        leadership.release(term).await;
                    }
                }
                acting.cancel();
            }
        });
        let setup = Setup {
            sched: gpus.scheduler(),
            subjects: subjects.clone(),
            recorder: Recorder::new(metrics.clone()),
            nvml: gpus.feed.clone(),
            nodes: gpus.nodes.clone(),
            retain_ended: config.queue.retain_ended,
            status_limit: config.queue.status_limit,
            shutdown: acting.clone(),
        };
        let ran = match Driver::start(setup, ports.clone(), term).await {
            Ok((driver, commands)) => {
                handle.attach(&driver);
                let ran = driver.run(commands).await;
                handle.detach();
                ran
            }
            Err(e) => Err(e),
        };
        // The journal's writer stops before the leadership is handed on: still writing, it could
        // purge the stream while the next leader reads it back. A graceful stop lets it write what it
        // holds first.
        let finish = shutdown.is_cancelled() && !matches!(&ran, Err(e) if is_deposed(e));
        ports.journal.stand_down(finish).await;
        watch_term.abort();
        leadership.release(term).await;
        match ran {
            Ok(()) if shutdown.is_cancelled() => return Ok(()),
            Err(e) if shutdown.is_cancelled() => return Err(e),
            Ok(()) => tracing::warn!("term {} ended; standing by", term.0),
            Err(e) if is_deposed(&e) => {
                tracing::warn!("another coordinator leads: {e:#}; standing by")
            }
            Err(e) if acting.is_cancelled() => {
                tracing::warn!("term {} lost while waiting: {e:#}; standing by", term.0)
            }
            Err(e) => return Err(e),
        }
        // A coordinator that just gave up (cut off from a server, say) leaves the others a lease
        // length to take over before it tries again.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(config.leader.ttl_ms)) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
}

/// Resolves once the bus has been disconnected for `grace` in a row.
async fn cut_off(bus: &dyn Bus, grace: Duration) {
    let mut every = tokio::time::interval(CONNECTION_CHECK);
    let mut away_since: Option<tokio::time::Instant> = None;
    loop {
        every.tick().await;
        if bus.connected() {
            away_since = None;
        } else if away_since
            .get_or_insert_with(tokio::time::Instant::now)
            .elapsed()
            >= grace
        {
            return;
        }
    }
}

/// The journal, the bus and the gateway, their writes refused for lack of space noted in one place,
/// and the servers' names for `/readyz`.
struct Watched {
    journal: Arc<dyn Journal>,
    bus: Arc<dyn Bus>,
    gateway: Arc<dyn Gateway>,
    labels: Labels,
}

/// The adapters chosen by `[backends]`, connected and ready: the ports, the gateway of the HTTP API,
/// and what each is called.
struct Chosen {
    ports: Ports,
    gateway: Arc<dyn Gateway>,
    labels: Labels,
    /// This coordinator's name as its leadership knows it.
    holder: String,
    /// The NATS connection, when the bus is NATS: it also makes the services' readers.
    nats: Option<async_nats::Client>,
}

impl Chosen {
    /// Opens what `[backends]` names: the SQLite database when the journal or the bus is embedded (once
    /// this process holds the data directory's lock), Postgres, Redis and NATS otherwise, each server
    /// waited for with backoff; runs the migrations and makes the streams. Says in one line what runs
    /// on what.
    async fn connect(
        config: &Config,
        subjects: &Subjects,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Chosen> {
        let chosen = &config.backends;
        let mut lines = Vec::new();
        let (sqlite, dir_lock) = Self::open_data_dir(config, shutdown).await?;
        let mut behind = None;
        // Its terms go above the lease store's too (see `PgLeadership::terms_above`).
        let mut pg_leadership = None;
        let (journal, leadership, holder): (Arc<dyn Journal>, Arc<dyn Leadership>, String) =
            match chosen.journal {
                JournalBackend::Postgres => {
                    let db_url = config.database.url.clone();
                    let pg = with_retry(
                        &format!("Postgres at {}", redact_url(&db_url)),
                        shutdown,
                        || PgStore::connect(&db_url),
                    )
                    .await?;
                    with_retry("Postgres migrations", shutdown, || pg.migrate()).await?;
                    lines.push(format!("journal: Postgres at {}", redact_url(&db_url)));
                    let leadership = PgLeadership::new(
                        pg.primary(),
                        Duration::from_millis(config.leader.ttl_ms),
                        Duration::from_millis(config.leader.poll_ms),
                    )
                    .with_max_clock_skew(Duration::from_millis(config.leader.max_clock_skew_ms));
                    let holder = leadership.holder().to_owned();
                    if config.database.write_behind {
                        behind = Some(pg.clone());
                    }
                    let leadership = Arc::new(leadership);
                    pg_leadership = Some(leadership.clone());
                    (Arc::new(pg), leadership, holder)
                }
                JournalBackend::Sqlite => {
                    let store = sqlite.clone().expect("opened above for a SQLite journal");
                    lines.push(format!("journal: SQLite {}", store.file().display()));
                    let lock = dir_lock.clone().expect("taken above for a SQLite journal");
                    let holder = lock
                        .leader()
                        .await
                        .map(|(_, holder)| holder)
                        .unwrap_or_default();
                    (Arc::new(store), lock, holder)
                }
            };
        let leases = Self::connect_leases(config, shutdown, &mut lines).await?;
        if let Some(leadership) = pg_leadership {
            leadership.terms_above(leases.clone());
        }
        let (bus, gateway, journal, nats) = Self::connect_bus(
            config,
            subjects,
            shutdown,
            (journal, behind),
            sqlite.as_ref(),
            &mut lines,
        )
        .await?;
        tracing::info!("backends: {}", lines.join("; "));
        let Watched {
            journal,
            bus,
            gateway,
            labels,
        } = Self::watched(chosen, journal, bus, gateway);
        Ok(Chosen {
            ports: Ports {
                journal,
                leases,
                bus,
                leadership,
            },
            gateway,
            labels,
            holder,
            nats,
        })
    }

    /// The embedded store and the data directory's lock, when anything lives in the data directory:
    /// opened by the process that holds the directory's lock, so that two never migrate or write it
    /// at once.
    async fn open_data_dir(
        config: &Config,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(Option<SqliteStore>, Option<Arc<DirLock>>)> {
        if !config.backends.uses_data_dir() {
            return Ok((None, None));
        }
        let dir = config.embedded.dir();
        let lock = Arc::new(DirLock::new(&dir));
        std::fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the data directory {} (embedded.data_dir)",
                dir.display()
            )
        })?;
        // Before the lock: on a network filesystem the lock itself is what cannot be trusted.
        crate::adapters::sqlite::check_local(&dir)?;
        tokio::select! {
            taken = lock.acquire() => { taken.context("locking the data directory")?; }
            () = shutdown.cancelled() => anyhow::bail!("stopped while waiting for the data directory's lock"),
        }
        let store = SqliteStore::open(&dir)
            .await
            .with_context(|| format!("cannot open the embedded store in {}", dir.display()))?;
        Ok((Some(store), Some(lock)))
    }

    /// The lease store of `[backends] leases`: Redis (at `redis.url`, or its master through the
    /// Sentinels), or in this process.
    async fn connect_leases(
        config: &Config,
        shutdown: &CancellationToken,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<Arc<dyn Leases>> {
        Ok(match config.backends.leases {
            LeasesBackend::Redis => {
                let redis_url = config.redis.url.clone();
                let prefix = config.redis.key_prefix.clone();
                let (sentinels, master) = (&config.redis.sentinels, &config.redis.master);
                let leases = if sentinels.is_empty() {
                    let server = format!("Redis at {}", redact_url(&redis_url));
                    with_retry(&server, shutdown, || {
                        LeaseStore::connect(&redis_url, &prefix)
                    })
                    .await?
                } else {
                    let server = format!("Redis master `{master}` through Sentinel");
                    with_retry(&server, shutdown, || {
                        LeaseStore::connect_sentinel(sentinels, master, &prefix)
                    })
                    .await?
                };
                lines.push(format!(
                    "leases: Redis at {} (keys under `{prefix}:`)",
                    leases.server()
                ));
                Arc::new(leases)
            }
            LeasesBackend::Memory => {
                lines.push("leases: in this process (the journal is the source of truth)".into());
                Arc::new(MemLeases::new(Trace::off(), Faults::default()))
            }
        })
    }

    /// The bus of `[backends] bus` and its gateway, with the journal written behind JetStream when
    /// `database.write_behind` gave Postgres (`behind`) to wrap; and NATS's client, when on NATS.
    async fn connect_bus(
        config: &Config,
        subjects: &Subjects,
        shutdown: &CancellationToken,
        (mut journal, mut behind): (Arc<dyn Journal>, Option<PgStore>),
        sqlite: Option<&SqliteStore>,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<(
        Arc<dyn Bus>,
        Arc<dyn Gateway>,
        Arc<dyn Journal>,
        Option<async_nats::Client>,
    )> {
        let mut nats = None;
        let (bus, gateway): (Arc<dyn Bus>, Arc<dyn Gateway>) = match config.backends.bus {
            BusBackend::Nats => {
                // A NATS URL may carry a token as its user: its own redaction hides that too.
                let nats_url = gpu_coordinator_client::redact(&config.nats.url);
                // A URL that cannot be parsed stops the start; a server that does not answer is
                // waited for.
                crate::adapters::nats::servers(&config.nats)?;
                let bus = with_retry(&format!("NATS at {nats_url}"), shutdown, || {
                    NatsBus::connect(&config.nats, subjects.clone(), CONNECTION_NAME)
                })
                .await?;
                // More replicas than the cluster has servers would never be placed: not retried.
                bus.check_replicas().await?;
                // The input stream, if missing, is made by the driver, which knows where its
                // numbering goes on.
                with_retry("JetStream streams", shutdown, || bus.ensure_streams(None)).await?;
                lines.push(format!(
                    "bus: NATS at {nats_url} (streams {} and {} of {} replica(s), subjects under \
                     `{}.`)",
                    subjects.input_stream(),
                    subjects.output_stream(),
                    config.nats.replicas,
                    subjects.prefix()
                ));
                if let Some(pg) = behind.take() {
                    let client = bus.client().clone();
                    let stream = subjects.journal_stream();
                    journal = Arc::new(
                        with_retry("the journal stream", shutdown, || {
                            WriteBehind::replicated(
                                pg.clone(),
                                client.clone(),
                                stream.clone(),
                                subjects.journal(),
                                config.nats.replicas,
                            )
                        })
                        .await?,
                    );
                    lines.push(format!(
                        "Postgres written behind the JetStream stream {stream} (database.write_behind)"
                    ));
                }
                let gateway = NatsGateway::new(bus.client().clone(), subjects);
                nats = Some(bus.client().clone());
                (Arc::new(bus), Arc::new(gateway))
            }
            BusBackend::Embedded => {
                let store = sqlite.expect("opened above for the embedded bus");
                let bus = SqliteBus::open(
                    store,
                    subjects,
                    config.embedded.keep_ms,
                    config.embedded.max_bytes,
                )
                .await
                .context("cannot open the embedded bus")?;
                lines.push(format!(
                    "bus: embedded in {} (inputs over HTTP only)",
                    store.file().display()
                ));
                (Arc::new(bus.clone()), Arc::new(bus))
            }
        };
        Ok((bus, gateway, journal, nats))
    }

    /// The journal, the bus and the gateway wrapped so that writes refused for lack of space are
    /// noted in one place (`/readyz` and the status document say which store is full until it takes
    /// writes again), and the servers' names for `/readyz`.
    fn watched(
        chosen: &crate::config::BackendsConfig,
        journal: Arc<dyn Journal>,
        bus: Arc<dyn Bus>,
        gateway: Arc<dyn Gateway>,
    ) -> Watched {
        let storage = crate::storage::Storage::default();
        let journal = crate::storage::watch_journal(
            journal,
            match chosen.journal {
                JournalBackend::Postgres => "Postgres",
                JournalBackend::Sqlite => "SQLite (the journal)",
            },
            storage.clone(),
        );
        let bus_name = match chosen.bus {
            BusBackend::Nats => "NATS JetStream (the output stream)",
            BusBackend::Embedded => "the embedded bus (its outputs)",
        };
        let bus = crate::storage::watch_bus(bus, bus_name, storage.clone());
        let gateway_name = match chosen.bus {
            BusBackend::Nats => "NATS JetStream (the input stream)",
            BusBackend::Embedded => "the embedded bus (its inputs)",
        };
        let gateway = crate::storage::watch_gateway(gateway, gateway_name, storage);
        let labels = Labels {
            bus: match chosen.bus {
                BusBackend::Nats => "NATS",
                BusBackend::Embedded => "the embedded bus",
            },
            leases: match chosen.leases {
                LeasesBackend::Redis => "Redis",
                LeasesBackend::Memory => "the in-process lease store",
            },
            journal: match chosen.journal {
                JournalBackend::Postgres => "Postgres",
                JournalBackend::Sqlite => "SQLite",
            },
        };
        Watched {
            journal,
            bus,
            gateway,
            labels,
        }
    }
}
