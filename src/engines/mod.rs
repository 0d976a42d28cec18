//! Engine sidecars: inference servers that were not written against the coordinator's client (vLLM,
//! SGLang, Ollama, llama.cpp, Triton, any process) made preemptible without a line of their code.
//!
//! Each `[[engines]]` entry gets a sidecar: an HTTP reverse proxy on `listen` in front of the engine at
//! `upstream` ([`proxy`]), a [`gate`] that lets requests through only while the engine is awake under
//! a usable lease, the engine's own sleep and wake switch ([`switch`]), and a controller
//! ([`sidecar`]) that is a client of the coordinator like any service: it asks for the GPU when a
//! request comes (or always), wakes the engine once granted, puts it to sleep when paused, revoked
//! or idle, and acknowledges a pause only once the engine confirmed its memory is free.
//!
//! The sidecars run inside `serve` (talking to the coordinator's own HTTP API, in either mode) or
//! alone under `gpu-coordinator engines` on a GPU host (over the coordinator's HTTP API or NATS):
//! the same code either way. [`board`] shows them to operators.

pub mod board;
pub mod config;
pub mod gate;
pub mod proxy;
pub mod sidecar;
pub mod switch;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gpu_coordinator_client::Client;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use board::{Board, EngineState, EngineView};
pub use config::{EngineConfig, EngineKind, SidecarConfig, Want};

use crate::adapters::http::Limits;
use crate::adapters::nvml::{GpuProbe, NvmlProbe};
use crate::config::Config;

/// How a sidecar reaches the coordinator.
#[derive(Debug, Clone)]
pub struct Coordinator {
    /// `http://…` (the HTTP API) or a NATS URL.
    pub url: String,
    /// The subject prefix (NATS only).
    pub prefix: String,
    /// `[http.tokens]`: token to service, to find a service's token when its engine names none.
    pub tokens: std::collections::BTreeMap<String, String>,
    /// With node agents: this host, named in the requests of engines that name no GPU, so that
    /// each engine is granted a GPU of its own host ([`Coordinator::host_of`]).
    pub host: Option<String>,
}

impl Coordinator {
    /// For `gpu-coordinator engines`: `[sidecar] coordinator`, else `nats.url`.
    pub fn from_config(config: &Config) -> Coordinator {
        Coordinator {
            url: config
                .sidecar
                .coordinator
                .clone()
                .unwrap_or_else(|| config.nats.url.clone()),
            prefix: config.nats.prefix.clone(),
            tokens: config.http.tokens.clone(),
            host: Coordinator::host_of(config),
        }
    }

    /// The host the sidecars' engines run on, when they run in a fleet: `sidecar.host`, else, with
    /// `nodes.agents = true`, this machine's agent's name (`agent.host`, else the hostname).
    pub fn host_of(config: &Config) -> Option<String> {
        config
            .sidecar
            .host
            .clone()
            .or_else(|| config.nodes.agents.then(|| config.agent.host_name()))
    }

    fn token_of(&self, engine: &EngineConfig) -> Option<String> {
        engine.token.clone().or_else(|| {
            self.tokens
                .iter()
                .find(|(_, service)| **service == engine.service)
                .map(|(token, _)| token.clone())
        })
    }
}

/// The listeners of the sidecars, bound before anything else starts, so that an address in use
/// stops the start with the key that names it.
#[derive(Default)]
pub struct Bound {
    engines: Vec<(EngineConfig, TcpListener)>,
}

impl Bound {
    pub async fn bind(engines: &[EngineConfig]) -> anyhow::Result<Bound> {
        let mut bound = Vec::new();
        for (i, engine) in engines.iter().enumerate() {
            let listener = TcpListener::bind(&engine.listen)
                .await
                .with_context(|| format!("engines[{i}].listen: binding {}", engine.listen))?;
            bound.push((engine.clone(), listener));
        }
        Ok(Bound { engines: bound })
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// The address each sidecar listens on, in the order of `[[engines]]`.
    pub fn addresses(&self) -> Vec<std::net::SocketAddr> {
        self.engines
            .iter()
            .filter_map(|(_, l)| l.local_addr().ok())
            .collect()
    }
}

/// Runs every sidecar on `tracker` until `stop`; returns at once. Their figures go on `board`.
pub(crate) fn spawn(
    bound: Bound,
    coordinator: Coordinator,
    probe: Option<Arc<dyn GpuProbe>>,
    limits: Limits,
    board: &Board,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) {
    for (engine, listener) in bound.engines {
        let gate = gate::Gate::new();
        let stats = board.add(
            &engine.service,
            engine.kind.as_str(),
            &engine.listen,
            Arc::clone(&gate),
        );
        let proxy = proxy::Proxy::new(
            Arc::clone(&gate),
            &engine.upstream,
            Duration::from_millis(engine.max_wait_ms),
            &engine.service,
        );
        tracing::info!(
            service = engine.service,
            kind = engine.kind.as_str(),
            listen = engine.listen,
            upstream = engine.upstream,
            "engine sidecar"
        );
        tracker.spawn(crate::adapters::http::server::serve(
            listener,
            proxy.router(),
            limits,
            stop.clone(),
        ));
        let token = coordinator.token_of(&engine);
        let mut engine = engine;
        // An engine that names no GPU asks for one of its own host's, in a fleet.
        let host = coordinator.host.clone().filter(|_| engine.gpu.is_none());
        engine.host = host;
        let sidecar = sidecar::Sidecar::new(engine, gate, stats, probe.clone());
        let coordinator = coordinator.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            let Some(client) = connect(&coordinator, &sidecar.engine.service, token, &stop).await
            else {
                return;
            };
            sidecar.run(client, stop).await;
        });
    }
}

/// The waits between tries of an engine or a coordinator that failed: the driver's (doubling with
/// jitter, up to 5 s apart, without end), from 100 ms.
pub(crate) fn backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder as _;
    crate::retry::backoff()
        .with_min_delay(Duration::from_millis(100))
        .build()
}

/// The next wait of `waits` (never ends: built without a maximum of tries).
pub(crate) fn next_wait(waits: &mut backon::ExponentialBackoff) -> Duration {
    waits.next().unwrap_or(Duration::from_secs(5))
}

/// Connects as `service`, waiting with backoff for a coordinator that is not there yet.
async fn connect(
    coordinator: &Coordinator,
    service: &str,
    token: Option<String>,
    stop: &CancellationToken,
) -> Option<Client> {
    let mut waits = backoff();
    loop {
        let delay = next_wait(&mut waits);
        let attempt = Client::connect_url(
            &coordinator.url,
            &coordinator.prefix,
            service,
            token.as_deref(),
        );
        tokio::select! {
            client = attempt => match client {
                Ok(client) => return Some(client),
                Err(e) => tracing::warn!(
                    service,
                    "connecting to the coordinator at {}: {e}; trying again in {delay:?}",
                    crate::telemetry::redact_url(&coordinator.url)
                ),
            },
            () = stop.cancelled() => return None,
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return None,
        }
    }
}

/// `gpu-coordinator engines`: the sidecars alone, until `stop`; then they put their engines to sleep
/// and give the GPU back. With `[sidecar] listen`, `/gpu/engines` and `/metrics` are served there.
pub async fn run_alone(config: Config, stop: CancellationToken) -> anyhow::Result<()> {
    let bound = Bound::bind(&config.engines).await?;
    let admin = match &config.sidecar.listen {
        Some(listen) => Some(
            TcpListener::bind(listen)
                .await
                .with_context(|| format!("sidecar.listen: binding {listen}"))?,
        ),
        None => None,
    };
    let board = Board::default();
    let tracker = TaskTracker::new();
    let limits = Limits::from(&config.http);
    // NVML, where there is a driver, for the freed-VRAM check after each sleep.
    let probe: Option<Arc<dyn GpuProbe>> = if config.nvml.enabled {
        match tokio::task::spawn_blocking(NvmlProbe::init).await {
            Ok(Ok(probe)) => Some(Arc::new(probe)),
            _ => {
                tracing::info!("no NVML here: sleeps are confirmed by the engines' own APIs only");
                None
            }
        }
    } else {
        None
    };
    spawn(
        bound,
        Coordinator::from_config(&config),
        probe,
        limits,
        &board,
        &tracker,
        &stop,
    );
    if let Some(listener) = admin {
        tracker.spawn(crate::adapters::http::server::serve(
            listener,
            board::router(board.clone()),
            limits,
            stop.clone(),
        ));
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
