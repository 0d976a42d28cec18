//! The composition root: the one place where the adapters are chosen, connected and handed to the
//! driver as [`Ports`], and where the tasks beside it (the HTTP API, the NVML sampler) are spawned under
//! one [`TaskTracker`] and stopped in order:
//!
//! 1. the HTTP API answers from the start (`/healthz`; the rest says the coordinator is starting);
//! 2. the backends `[backends]` names are opened (one line in the log says which): each server is
//!    connected, waited for with backoff, and readied (migrations, streams), which is also what keeps a
//!    coordinator warm before it leads; the embedded ones live in the data directory, which this
//!    process locks first;
//! 3. it stands by until it leads (Postgres's `leader` row,
//!    [`PgLeadership`](crate::adapters::postgres::PgLeadership), or the data directory's lock,
//!    [`DirLock`](crate::adapters::sqlite::DirLock)); then a driver starts for the term (the state
//!    restored) and runs until `shutdown`, or until the term is lost, when it stands by again;
//! 4. the HTTP API stops taking calls and drains, the sampler ends, and [`run`] returns once every task
//!    has.
//!
//! Choosing another adapter for a port (an embedded journal, another leadership) is a change here and
//! nowhere else in the driver.

pub mod audit;
mod backends;
pub mod gpus;
mod settings;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gpu_coordinator_wire::Subjects;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::adapters::http::{self, Backends, HttpSettings, HttpState};
use crate::adapters::nats_readers;
use crate::adapters::nvml::GpuProbe;
use crate::config::Config;
use crate::driver::{Driver, DriverHandle, Setup};
use crate::metrics::{Metrics, Recorder};
use crate::ports::{OutputLog, Ports};
use crate::retry::{is_deposed, with_retry};

use backends::Chosen;

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
        let bound = Duration::from_millis(config.preemption.ack_deadline_ms);
        let (coordinator_stop, finished) =
            stop_sidecars_first(shutdown, &sidecars_stop, &sidecar_tasks, bound);
        (coordinator_stop, Some(finished))
    };
    let tasks_stop = shutdown.child_token();
    let state = HttpState::new(
        HttpSettings::from(&config),
        subjects.clone(),
        metrics.clone(),
        tasks_stop.clone(),
    );
    let own_api = own_http_url(&http)?;
    let server = tracker.spawn(http::serve(http, state.clone()));
    let result = async {
        let chosen = Chosen::connect(&config, &subjects, &shutdown).await?;
        let mut gpus = gpus::probe(&config, extras.probe, &tracker, &tasks_stop).await;
        if let (true, Some(nats)) = (config.nodes.agents, chosen.nats.clone()) {
            let tasks = (&tracker, &tasks_stop);
            let feed = listen_to_node_agents(nats, &config, &subjects, &metrics, tasks);
            gpus.nodes = Some(feed);
        }
        if !sidecars.is_empty() {
            let sidecars = std::mem::take(&mut sidecars);
            spawn_sidecars(
                &config,
                sidecars,
                own_api.clone(),
                &gpus,
                &state,
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
        state.set_backends(backends_of(&chosen, &handle));
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
    drain(tracker, server).await;
    drop(finished);
    result
}

/// Orders the stop: the sidecars stop at `shutdown` (or when the guard answered is dropped, the
/// coordinator having ended first) and are waited for at most `bound`; the token answered, which stops
/// the coordinator, is cancelled after that.
fn stop_sidecars_first(
    shutdown: CancellationToken,
    sidecars_stop: &CancellationToken,
    sidecar_tasks: &TaskTracker,
    bound: Duration,
) -> (CancellationToken, DropGuard) {
    // At a stop the sidecars go first, while the coordinator still answers them: their engines
    // are put to sleep and their leases released, within the time a pause would have.
    let coordinator_stop = CancellationToken::new();
    let finished = CancellationToken::new();
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
    (coordinator_stop, finished.drop_guard())
}

/// Listens to the node agents' samples on NATS (`nodes.agents`): the feed the driver takes its
/// inventory from.
fn listen_to_node_agents(
    client: async_nats::Client,
    config: &Config,
    subjects: &Subjects,
    metrics: &Arc<Metrics>,
    (tracker, tasks_stop): (&TaskTracker, &CancellationToken),
) -> crate::ports::nodes::NodeFeed {
    let (tx, rx) = tokio::sync::mpsc::channel(crate::adapters::nats_nodes::WAITING);
    tracker.spawn(crate::adapters::nats_nodes::listen(
        client,
        subjects.clone(),
        tx,
        metrics.clone(),
        config.nodes.ttl_ms,
        tasks_stop.clone(),
    ));
    crate::ports::nodes::NodeFeed::new(rx)
}

/// Starts the engine sidecars of `[[engines]]` on their bound addresses.
fn spawn_sidecars(
    config: &Config,
    sidecars: crate::engines::Bound,
    own_api: String,
    gpus: &gpus::Gpus,
    state: &HttpState,
    sidecar_tasks: &TaskTracker,
    sidecars_stop: &CancellationToken,
) {
    // The sidecars are clients of this coordinator's own HTTP API, in either mode: the same
    // code as `gpu-coordinator engines` on another host.
    let coordinator = crate::engines::Coordinator {
        url: own_api,
        prefix: config.nats.prefix.clone(),
        tokens: config.http.tokens.clone(),
        host: crate::engines::Coordinator::host_of(config),
    };
    crate::engines::spawn(
        sidecars,
        coordinator,
        gpus.probe.clone(),
        http::Limits::from(&config.http),
        &state.engines(),
        sidecar_tasks,
        sidecars_stop,
    );
}

/// What the HTTP API reaches of the backends `chosen`, and the driver through `handle`.
fn backends_of(chosen: &Chosen, handle: &DriverHandle) -> Backends {
    let ports = &chosen.ports;
    Backends {
        gateway: chosen.gateway.clone(),
        journal: ports.journal.clone(),
        leases: ports.leases.clone(),
        leadership: ports.leadership.clone(),
        driver: Arc::new(handle.clone()),
        labels: chosen.labels,
    }
}

/// Stops taking HTTP calls and waits (at most [`DRAIN`]) for the tasks beside the driver; says how the
/// HTTP server ended, if it did.
async fn drain(tracker: TaskTracker, server: tokio::task::JoinHandle<std::io::Result<()>>) {
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
        let term_watch = watch_term(config, ports, term, &acting);
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
        let ran = run_term(setup, ports, term, handle).await;
        // The journal's writer stops before the leadership is handed on: still writing, it could
        // purge the stream while the next leader reads it back. A graceful stop lets it write what it
        // holds first.
        let finish = shutdown.is_cancelled() && !matches!(&ran, Err(e) if is_deposed(e));
        ports.journal.stand_down(finish).await;
        term_watch.abort();
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

/// Watches term `term` while its driver acts: once the leadership is lost, or the bus has been cut off
/// for most of a lease length (when it gives the leadership up), the journal stands down and `acting`
/// is cancelled.
fn watch_term(
    config: &Config,
    ports: &Ports,
    term: crate::ports::Term,
    acting: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn({
        let leadership = ports.leadership.clone();
        let (acting, output_log) = (acting.clone(), ports.output_log.clone());
        let journal = ports.journal.clone();
        let grace = Duration::from_millis(config.leader.ttl_ms).mul_f64(0.8);
        async move {
            tokio::select! {
                () = leadership.lost(term) => {
                    // Another may lead soon: nothing of this term writes the journal any more.
                    journal.stand_down(false).await;
                }
                () = cut_off(output_log.as_ref(), grace) => {
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
    })
}

/// Starts a driver for `term` and runs it until it stops, `handle` reaching it meanwhile.
async fn run_term(
    setup: Setup,
    ports: &Ports,
    term: crate::ports::Term,
    handle: &DriverHandle,
) -> anyhow::Result<()> {
    match Driver::start(setup, ports.clone(), term).await {
        Ok((driver, commands)) => {
            handle.attach(&driver);
            let ran = driver.run(commands).await;
            handle.detach();
            ran
        }
        Err(e) => Err(e),
    }
}

/// Resolves once the bus has been disconnected for `grace` in a row.
async fn cut_off(output_log: &dyn OutputLog, grace: Duration) {
    let mut every = tokio::time::interval(CONNECTION_CHECK);
    let mut away_since: Option<tokio::time::Instant> = None;
    loop {
        every.tick().await;
        if output_log.connected() {
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
