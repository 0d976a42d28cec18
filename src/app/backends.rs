//! The backends `[backends]` names, connected and ready: the journal, the lease store, the bus and its
//! gateway, and the leadership, each server waited for with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gpu_coordinator_wire::Subjects;
use tokio_util::sync::CancellationToken;

use super::CONNECTION_NAME;
use crate::adapters::http::Labels;
use crate::adapters::memory::{Faults, MemLeases, Trace};
use crate::adapters::nats::{NatsBus, NatsSettings};
use crate::adapters::nats_gateway::NatsGateway;
use crate::adapters::postgres::{PgJournal, PgLeadership};
use crate::adapters::redis::RedisLeases;
use crate::adapters::sqlite::{DirLock, SqliteBus, SqliteJournal};
use crate::adapters::write_behind::WriteBehind;
use crate::config::{BusBackend, Config, JournalBackend, LeasesBackend};
use crate::ports::{Gateway, InputLog, Journal, Leadership, Leases, OutputLog, Ports};
use crate::retry::with_retry;
use crate::telemetry::redact_url;

/// The bus as the driver sees it: the input log and the output log, most often one adapter.
type Logs = (Arc<dyn InputLog>, Arc<dyn OutputLog>);

/// The journal, the bus's logs and the gateway, their writes refused for lack of space noted in one
/// place, and the servers' names for `/readyz`.
struct Watched {
    journal: Arc<dyn Journal>,
    input_log: Arc<dyn InputLog>,
    output_log: Arc<dyn OutputLog>,
    gateway: Arc<dyn Gateway>,
    labels: Labels,
}

/// The adapters chosen by `[backends]`, connected and ready: the ports, the gateway of the HTTP API,
/// and what each is called.
pub(super) struct Chosen {
    pub(super) ports: Ports,
    pub(super) gateway: Arc<dyn Gateway>,
    pub(super) labels: Labels,
    /// This coordinator's name as its leadership knows it.
    pub(super) holder: String,
    /// The NATS connection, when the bus is NATS: it also makes the services' readers.
    pub(super) nats: Option<async_nats::Client>,
}

/// The journal of `[backends] journal`, and the leadership that goes with it.
struct Journaled {
    journal: Arc<dyn Journal>,
    leadership: Arc<dyn Leadership>,
    /// This coordinator's name as its leadership knows it.
    holder: String,
    /// Postgres, when `database.write_behind` has it written behind JetStream.
    behind: Option<PgJournal>,
    /// Postgres's leadership, whose terms go above the lease store's too.
    pg_leadership: Option<Arc<PgLeadership>>,
}

impl Chosen {
    /// Opens what `[backends]` names: the SQLite database when the journal or the bus is embedded (once
    /// this process holds the data directory's lock), Postgres, Redis and NATS otherwise, each server
    /// waited for with backoff; runs the migrations and makes the streams. Says in one line what runs
    /// on what.
    pub(super) async fn connect(
        config: &Config,
        subjects: &Subjects,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Chosen> {
        let chosen = &config.backends;
        let mut lines = Vec::new();
        let (sqlite, dir_lock) = Self::open_data_dir(config, shutdown).await?;
        let Journaled {
            journal,
            leadership,
            holder,
            behind,
            pg_leadership,
        } = Self::connect_journal(config, shutdown, sqlite.as_ref(), dir_lock, &mut lines).await?;
        let leases = Self::connect_leases(config, shutdown, &mut lines).await?;
        if let Some(leadership) = pg_leadership {
            leadership.terms_above(leases.clone());
        }
        let (logs, gateway, journal, nats) = Self::connect_bus(
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
            input_log,
            output_log,
            gateway,
            labels,
        } = Self::watched(chosen, journal, logs, gateway);
        Ok(Chosen {
            ports: Ports {
                journal,
                leases,
                input_log,
                output_log,
                leadership,
            },
            gateway,
            labels,
            holder,
            nats,
        })
    }

    /// The journal of `[backends] journal` and the leadership that goes with it: Postgres (migrated)
    /// and its `leader` row, or the embedded store and the data directory's lock.
    async fn connect_journal(
        config: &Config,
        shutdown: &CancellationToken,
        sqlite: Option<&SqliteJournal>,
        dir_lock: Option<Arc<DirLock>>,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<Journaled> {
        let mut behind = None;
        // Its terms go above the lease store's too (see `PgLeadership::terms_above`).
        let mut pg_leadership = None;
        let (journal, leadership, holder): (Arc<dyn Journal>, Arc<dyn Leadership>, String) =
            match config.backends.journal {
                JournalBackend::Postgres => {
                    let db_url = config.database.url.clone();
                    let pg = with_retry(
                        &format!("Postgres at {}", redact_url(&db_url)),
                        shutdown,
                        || PgJournal::connect(&db_url),
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
                    let store = sqlite.cloned().expect("opened above for a SQLite journal");
                    lines.push(format!("journal: SQLite {}", store.file().display()));
                    let lock = dir_lock.expect("taken above for a SQLite journal");
                    let holder = lock
                        .leader()
                        .await
                        .map(|(_, holder)| holder)
                        .unwrap_or_default();
                    (Arc::new(store), lock, holder)
                }
            };
        Ok(Journaled {
            journal,
            leadership,
            holder,
            behind,
            pg_leadership,
        })
    }

    /// The embedded store and the data directory's lock, when anything lives in the data directory:
    /// opened by the process that holds the directory's lock, so that two never migrate or write it
    /// at once.
    async fn open_data_dir(
        config: &Config,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(Option<SqliteJournal>, Option<Arc<DirLock>>)> {
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
        let store = SqliteJournal::open(&dir)
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
                        RedisLeases::connect(&redis_url, &prefix)
                    })
                    .await?
                } else {
                    let server = format!("Redis master `{master}` through Sentinel");
                    with_retry(&server, shutdown, || {
                        RedisLeases::connect_sentinel(sentinels, master, &prefix)
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
        (mut journal, mut behind): (Arc<dyn Journal>, Option<PgJournal>),
        sqlite: Option<&SqliteJournal>,
        lines: &mut Vec<String>,
    ) -> anyhow::Result<(
        Logs,
        Arc<dyn Gateway>,
        Arc<dyn Journal>,
        Option<async_nats::Client>,
    )> {
        let mut nats = None;
        let (logs, gateway): (Logs, Arc<dyn Gateway>) = match config.backends.bus {
            BusBackend::Nats => {
                // A NATS URL may carry a token as its user: its own redaction hides that too.
                let nats_url = gpu_coordinator_client::redact(&config.nats.url);
                // A URL that cannot be parsed stops the start; a server that does not answer is
                // waited for.
                let settings = NatsSettings::from(&config.nats);
                crate::adapters::nats::servers(&settings)?;
                let bus = with_retry(&format!("NATS at {nats_url}"), shutdown, || {
                    NatsBus::connect(&settings, subjects.clone(), CONNECTION_NAME)
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
                    journal = write_behind(config, subjects, shutdown, pg, &bus, lines).await?;
                }
                let gateway = NatsGateway::new(bus.client().clone(), subjects);
                nats = Some(bus.client().clone());
                let bus = Arc::new(bus);
                ((bus.clone(), bus), Arc::new(gateway))
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
                let logs = Arc::new(bus.clone());
                ((logs.clone(), logs), Arc::new(bus))
            }
        };
        Ok((logs, gateway, journal, nats))
    }

    /// The journal, the output log and the gateway wrapped so that writes refused for lack of space are
    /// noted in one place (`/readyz` and the status document say which store is full until it takes
    /// writes again), and the servers' names for `/readyz`.
    fn watched(
        chosen: &crate::config::BackendsConfig,
        journal: Arc<dyn Journal>,
        (input_log, output_log): Logs,
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
        let output_log = crate::storage::watch_output_log(output_log, bus_name, storage.clone());
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
            input_log,
            output_log,
            gateway,
            labels,
        }
    }
}

/// The Postgres journal written behind a JetStream stream on `bus` (`database.write_behind`).
async fn write_behind(
    config: &Config,
    subjects: &Subjects,
    shutdown: &CancellationToken,
    pg: PgJournal,
    bus: &NatsBus,
    lines: &mut Vec<String>,
) -> anyhow::Result<Arc<dyn Journal>> {
    let client = bus.client().clone();
    let stream = subjects.journal_stream();
    let journal = with_retry("the journal stream", shutdown, || {
        WriteBehind::replicated(
            pg.clone(),
            client.clone(),
            stream.clone(),
            subjects.journal(),
            config.nats.replicas,
        )
    })
    .await?;
    lines.push(format!(
        "Postgres written behind the JetStream stream {stream} (database.write_behind)"
    ));
    Ok(Arc::new(journal))
}
