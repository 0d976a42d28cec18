//! The driver: the one task that owns the scheduler. It turns JetStream inputs, timer wake-ups, status
//! requests, NVML samples and commands into scheduler inputs, and carries out the scheduler's actions
//! through the adapters, in the order that keeps every effect durable before it is acknowledged:
//!
//! 1. persist the changed requests, the highest fence, the position of the last input and the messages
//!    to publish (the outbox) in one Postgres statement, while the lease changes go to Redis (a refused
//!    lease goes back to the scheduler as an input);
//! 2. publish replies, control orders and events under their outbox ids, and wait for their PubAcks
//!    (the next statement deletes those rows);
//! 3. acknowledge the inputs (an invalid input is terminated, never redelivered).
//!
//! At start the outbox left by a crash is published again, and the input consumer is made anew from
//! the input after the last one handled, so inputs are handled once and in order.
//!
//! A server that goes away is waited for with backoff: the loop stops taking inputs until it is back.
//! Every action also goes to the metrics recorder. [`run`] serves the HTTP API beside the loop; its
//! handlers publish inputs to JetStream and ask this task for the status, never touching the scheduler.
//! Nothing here decides who gets a GPU.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream::AckKind;
use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use gpu_coordinator_core::{
    Action, Fence, GpuSpec, Input, Lease, LeaseOp, Millis, RequestRecord, Scheduler, Snapshot,
};
use gpu_coordinator_wire::{codec, decode_input, Encoding, Subjects, VramSource};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::adapters::http::{self, Backends, HttpState};
use crate::adapters::nats::{content_type, Bus, Outbound};
use crate::adapters::nvml::{self, DeviceSample, GpuProbe, NvmlProbe};
use crate::adapters::postgres::{Batch, OutboxRow, PgStore};
use crate::adapters::redis::{LeaseOutcome, LeaseStore};
use crate::config::Config;
use crate::metrics::{Metrics, Recorder};

/// How many inputs one batch takes at most: they share one Postgres commit.
const MAX_BATCH: usize = 256;

/// How often the driver checks that Redis holds exactly the scheduler's leases.
const EPOCH_CHECK: Duration = Duration::from_secs(1);

/// At shutdown, how long an operation in flight may take to finish before it is abandoned.
const SETTLE_AT_STOP: Duration = Duration::from_secs(2);

/// How long the HTTP server may take to finish the calls in flight after the driver stopped.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// The GPU assumed when neither the configuration nor NVML names one.
pub const DEFAULT_GPU_MB: u64 = 24_576;

/// Milliseconds since the Unix epoch, the scheduler's `now`.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What other tasks (HTTP handlers, operators) ask of the driver.
pub enum Command {
    /// The status document.
    Status(oneshot::Sender<gpu_coordinator_wire::StatusDoc>),
}

/// A handle to send the driver commands.
#[derive(Clone)]
pub struct DriverHandle {
    tx: mpsc::Sender<Command>,
}

impl DriverHandle {
    /// The status document, or `None` when the driver has stopped.
    pub async fn status(&self) -> Option<gpu_coordinator_wire::StatusDoc> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Status(tx)).await.ok()?;
        rx.await.ok()
    }
}

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

/// [`run`] with [`Extras`]. The HTTP API answers from the start (`/healthz`; the rest says it is
/// starting) and stops with the coordinator.
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
    let http_stop = shutdown.child_token();
    let state = HttpState::new(&config, subjects, metrics.clone(), http_stop.clone());
    let server = tokio::spawn(http::serve(http, state.clone()));
    let result = async {
        let (driver, commands) =
            Driver::start_with(&config, shutdown.clone(), metrics, extras).await?;
        state.set_backends(driver.backends());
        driver.run(commands).await
    }
    .await;
    http_stop.cancel();
    match tokio::time::timeout(HTTP_DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!("the HTTP server failed: {e}"),
        Ok(Err(e)) => tracing::error!("the HTTP server task failed: {e}"),
        Err(_) => tracing::warn!("HTTP calls still in flight after {HTTP_DRAIN:?}; dropping them"),
    }
    result
}

/// Retries `op` with exponential backoff (up to 5 s apart) until it succeeds or `shutdown` is
/// cancelled, logging each failure with `what`.
async fn with_retry<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    op: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error,
{
    let attempt = op
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
        )
        .notify(|e, wait| tracing::warn!("{what}: {}; retrying in {wait:?}", causes(e)));
    tokio::pin!(attempt);
    tokio::select! {
        result = &mut attempt => result.map_err(|e| anyhow::anyhow!("{what}: {}", causes(&e))),
        _ = shutdown.cancelled() => {
            // Work in flight settles (a publish waiting for its PubAck); a server that is away is not
            // waited for.
            match tokio::time::timeout(SETTLE_AT_STOP, &mut attempt).await {
                Ok(result) => result.map_err(|e| anyhow::anyhow!("{what}: {}", causes(&e))),
                Err(_) => anyhow::bail!("{what}: stopped while waiting for the server"),
            }
        }
    }
}

/// An error with its causes, `outer: inner: root`, so that a log line says what really failed.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The GPUs to manage: the configured ones, else one default GPU (said clearly).
pub fn inventory(config: &Config) -> Vec<GpuSpec> {
    if !config.gpus.is_empty() {
        return config
            .gpus
            .iter()
            .map(|g| GpuSpec {
                id: g.id.clone(),
                total_mb: g.vram_mb,
            })
            .collect();
    }
    tracing::warn!(
        "no [[gpus]] configured and no GPU found through NVML: managing one GPU `0` of {DEFAULT_GPU_MB} MB"
    );
    vec![GpuSpec {
        id: "0".into(),
        total_mb: DEFAULT_GPU_MB,
    }]
}

/// What the coordinator would see at start on this machine, without any server: the GPUs it would
/// manage (NVML's, else the configured ones, else the default) and the status document it would start
/// from, with the VRAM that processes use outside any lease; and NVML's samples, when NVML is there.
pub fn local_status(config: &Config) -> (gpu_coordinator_wire::StatusDoc, Vec<DeviceSample>) {
    let samples = if config.nvml.enabled {
        NvmlProbe::init()
            .ok()
            .and_then(|probe| probe.devices().ok())
    } else {
        None
    };
    let found = nvml::inventory(&config.gpus, samples.as_deref());
    let gpus = if found.gpus.is_empty() {
        inventory(config)
    } else {
        found.gpus.clone()
    };
    let mut sched = Scheduler::new(config.sched_config(), gpus);
    sched.set_vram_source(found.source);
    let now = now_ms();
    if let Some(samples) = &samples {
        // No lease is held yet: everything NVML sees in use is outside the coordinator.
        for (gpu, used_mb) in nvml::external_usage(&found.devices, samples, |_| 0) {
            sched.handle_input(Input::ExternalVram { gpu, used_mb }, now);
        }
    }
    (sched.status(now), samples.unwrap_or_default())
}

/// Hides the password of a URL for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// What the driver keeps of NVML: which device each GPU is, and the last figure it fed the scheduler.
struct NvmlFeed {
    devices: BTreeMap<String, u32>,
    samples: mpsc::Receiver<Vec<DeviceSample>>,
    fed: HashMap<String, u64>,
}

/// The driver's state: the scheduler and the adapters.
pub struct Driver {
    sched: Scheduler,
    bus: Bus,
    pg: PgStore,
    leases: LeaseStore,
    subjects: Subjects,
    shutdown: CancellationToken,
    handle: DriverHandle,
    recorder: Recorder,
    nvml: Option<NvmlFeed>,
    /// The stream sequence of the last input whose effects are committed: inputs at or below it were
    /// handled before (a redelivery after a crash) and are only acknowledged.
    input_seq: u64,
    /// The last input of the batch being handled, committed with its effects.
    pending_input_seq: Option<u64>,
    /// The next outbox id.
    outbox_next: u64,
    /// Outbox rows up to this id are stored by JetStream; the next write deletes them.
    published_upto: Option<u64>,
    /// Makes this process's message ids unique: `<boot>-<outbox id>`.
    boot: String,
}

/// Asks the probe (the given one, else NVML when enabled) for the devices, saying once in the log where
/// the VRAM figures will come from.
async fn probe_devices(
    config: &Config,
    probe: Option<Arc<dyn GpuProbe>>,
) -> Option<(Arc<dyn GpuProbe>, Vec<DeviceSample>)> {
    let probe: Arc<dyn GpuProbe> = match probe {
        Some(p) => p,
        None if !config.nvml.enabled => {
            tracing::info!("nvml.enabled is false: VRAM figures come from the configuration");
            return None;
        }
        None => match tokio::task::spawn_blocking(NvmlProbe::init).await {
            Ok(Ok(p)) => Arc::new(p),
            Ok(Err(e)) => {
                tracing::warn!(
                    "{e}: running on the configured GPU capacities (vram_source \"config\")"
                );
                return None;
            }
            Err(e) => {
                tracing::warn!("NVML start failed ({e}): running on the configured GPU capacities");
                return None;
            }
        },
    };
    let query = probe.clone();
    match tokio::task::spawn_blocking(move || query.devices()).await {
        Ok(Ok(devices)) => {
            for d in &devices {
                tracing::info!(
                    "NVML device {}: {} ({}), {} MB, {} MB used",
                    d.index,
                    d.name,
                    d.uuid,
                    d.total_mb,
                    d.used_mb
                );
            }
            Some((probe, devices))
        }
        Ok(Err(e)) => {
            tracing::warn!(
                "{e}: running on the configured GPU capacities (vram_source \"config\")"
            );
            None
        }
        Err(e) => {
            tracing::warn!("NVML query failed ({e}): running on the configured GPU capacities");
            None
        }
    }
}

impl Driver {
    /// Connects to every server (waiting for each with backoff), runs the migrations, makes the streams,
    /// and restores the state persisted before a restart.
    pub async fn start(
        config: &Config,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Driver, mpsc::Receiver<Command>)> {
        Self::start_with(config, shutdown, Metrics::new(), Extras::default()).await
    }

    /// [`Driver::start`] recording into `metrics`, with [`Extras`].
    pub async fn start_with(
        config: &Config,
        shutdown: CancellationToken,
        metrics: Arc<Metrics>,
        extras: Extras,
    ) -> anyhow::Result<(Driver, mpsc::Receiver<Command>)> {
        let subjects = Subjects::new(&config.nats.prefix)
            .map_err(anyhow::Error::msg)
            .context("nats.prefix")?;
        let db_url = config.database.url.clone();
        let pg = with_retry(
            &format!("Postgres at {}", redact(&db_url)),
            &shutdown,
            || PgStore::connect(&db_url),
        )
        .await?;
        with_retry("Postgres migrations", &shutdown, || pg.migrate()).await?;
        tracing::info!(
            "Postgres connected at {}; migrations applied",
            redact(&db_url)
        );
        let redis_url = config.redis.url.clone();
        let prefix = config.redis.key_prefix.clone();
        let leases = with_retry(
            &format!("Redis at {}", redact(&redis_url)),
            &shutdown,
            || LeaseStore::connect(&redis_url, &prefix),
        )
        .await?;
        tracing::info!(
            "Redis connected at {} (keys under `{prefix}:`)",
            redact(&redis_url)
        );
        let nats_url = config.nats.url.clone();
        let bus = with_retry(&format!("NATS at {nats_url}"), &shutdown, || {
            Bus::connect(&nats_url, subjects.clone(), "gpu-coordinator")
        })
        .await?;
        let max_age = Duration::from_millis(config.nats.max_age_ms);
        with_retry("JetStream streams", &shutdown, || {
            bus.ensure_streams(max_age)
        })
        .await?;
        tracing::info!(
            "NATS connected at {nats_url}; streams {} and {} ready, subjects under `{}.`",
            subjects.input_stream(),
            subjects.output_stream(),
            subjects.prefix()
        );

        let probed = probe_devices(config, extras.probe).await;
        let found = nvml::inventory(&config.gpus, probed.as_ref().map(|(_, d)| d.as_slice()));
        if probed.is_some() && !config.gpus.is_empty() && found.source == VramSource::Config {
            tracing::warn!(
                "NVML sees the GPUs but none of the configured [[gpus]] ids is an NVML index or UUID: VRAM \
                 figures come from the configuration"
            );
        }
        let gpus = if found.gpus.is_empty() {
            inventory(config)
        } else {
            found.gpus.clone()
        };
        for g in &gpus {
            let source = if found.devices.contains_key(&g.id) {
                "NVML"
            } else {
                "configuration"
            };
            tracing::info!(
                "managing GPU {} with {} MB (VRAM from the {source})",
                g.id,
                g.total_mb
            );
        }
        let mut sched_config = config.sched_config();
        if found.source == VramSource::Nvml {
            // Only NVML can see a paused holder's VRAM really freed.
            sched_config.settle_ms = config.nvml.settle_ms;
        }
        let mut sched = Scheduler::new(sched_config, gpus);
        sched.set_vram_source(found.source);
        let nvml = match probed {
            Some((probe, _)) if !found.devices.is_empty() => {
                let (tx, samples) = mpsc::channel(4);
                let every = Duration::from_millis(config.nvml.sample_ms.max(1));
                nvml::spawn_sampler(probe, every, tx, shutdown.clone());
                Some(NvmlFeed {
                    devices: found.devices,
                    samples,
                    fed: HashMap::new(),
                })
            }
            _ => None,
        };
        let retain = config.queue.retain_ended;
        let loaded = with_retry("loading the queue from Postgres", &shutdown, || {
            pg.load_state(retain)
        })
        .await?;
        // Messages committed before a stop but perhaps not stored: published again, under their ids.
        if !loaded.outbox.is_empty() {
            let again: Vec<Outbound> = loaded.outbox.iter().map(outbound_of).collect();
            tracing::info!(
                "publishing {} message(s) left from before the restart",
                again.len()
            );
            publish(&bus, &again, &shutdown).await?;
        }
        let requests = loaded.records;
        let live_leases =
            with_retry("reading leases from Redis", &shutdown, || leases.leases()).await?;
        let redis_fence = with_retry("reading the fence from Redis", &shutdown, || {
            leases.max_fence()
        })
        .await?;
        with_retry("marking the Redis epoch", &shutdown, || {
            leases.ensure_epoch()
        })
        .await?;
        let restored = requests
            .iter()
            .filter(|r| r.phase != gpu_coordinator_core::Phase::Ended)
            .count();
        sched.restore(
            Snapshot {
                requests,
                max_fence: loaded.max_fence.max(redis_fence),
                leases: live_leases,
                max_seq: loaded.max_seq,
            },
            now_ms(),
        );
        tracing::info!(
            "restored {restored} live request(s); fences continue above {}",
            sched.last_fence().0
        );
        let (tx, rx) = mpsc::channel(1024);
        let mut driver = Driver {
            sched,
            bus,
            pg,
            leases,
            subjects,
            shutdown,
            handle: DriverHandle { tx },
            recorder: Recorder::new(metrics),
            nvml,
            input_seq: loaded.input_seq,
            pending_input_seq: None,
            outbox_next: loaded.outbox.last().map_or(1, |row| row.id + 1),
            published_upto: loaded.outbox.last().map(|row| row.id),
            boot: format!("{:016x}", rand::random::<u64>()),
        };
        driver.carry_out().await?;
        Ok((driver, rx))
    }

    /// A handle for commands (status) to this driver.
    pub fn handle(&self) -> DriverHandle {
        self.handle.clone()
    }

    /// The servers and a handle, for the HTTP API.
    pub fn backends(&self) -> Backends {
        Backends {
            bus: self.bus.clone(),
            pg: self.pg.clone(),
            leases: self.leases.clone(),
            driver: self.handle(),
        }
    }

    /// The event loop, until shutdown.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let mut inputs = None;
        self.reopen_inputs(&mut inputs).await?;
        let mut status = with_retry("subscribing to status", &shutdown, || {
            self.bus.status_requests()
        })
        .await?;
        let mut reconnects = self.bus.reconnects();
        let mut epoch = tokio::time::interval(EPOCH_CHECK);
        epoch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!("coordinator ready");
        loop {
            let wake = self
                .sched
                .poll_timeout()
                .map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wake) => {
                    self.sched.handle_timeout(now_ms());
                    self.carry_out().await?;
                }
                next = next_input(&mut inputs) => match next {
                    Some(Ok(first)) => {
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match inputs.as_mut().and_then(|s| s.next().now_or_never()) {
                                Some(Some(Ok(m))) => batch.push(m),
                                _ => break,
                            }
                        }
                        self.handle_batch(batch).await?;
                    }
                    Some(Err(e)) => tracing::warn!("input consumer: {e}"),
                    None => {
                        tracing::warn!("input consumer ended; reopening");
                        self.reopen_inputs(&mut inputs).await?;
                    }
                },
                Ok(()) = reconnects.changed() => {
                    tracing::info!("NATS reconnected; reopening the input consumer");
                    self.reopen_inputs(&mut inputs).await?;
                }
                Some(msg) = status.next() => self.answer_status(msg).await,
                Some(samples) = next_sample(&mut self.nvml) => self.handle_samples(samples).await?,
                Some(command) = commands.recv() => match command {
                    Command::Status(reply) => {
                        let _ = reply.send(self.sched.status(now_ms()));
                    }
                },
                _ = epoch.tick() => {
                    // Rows stored by JetStream leave the outbox within a second, busy or idle, so a
                    // restart much later does not publish them again past the duplicate window.
                    self.write_bookkeeping(None).await?;
                    self.check_redis_epoch().await?;
                }
            }
        }
        tracing::info!("stopping: intake closed, flushing NATS");
        // What JetStream stored need not be published again at the next start.
        if let Err(e) = self.write_bookkeeping(None).await {
            tracing::warn!("{e:#}");
        }
        if let Err(e) = self.bus.flush().await {
            tracing::warn!("{e}");
        }
        self.pg.close().await;
        Ok(())
    }

    /// (Re)opens the input consumer after the last input handled. The old message stream is dropped
    /// first, so that none of its pulls reaches the new consumer; a position that changed (a new
    /// database beside an old consumer, or an input stream made anew) is persisted before reading.
    async fn reopen_inputs(&mut self, inputs: &mut Option<InputStream>) -> anyhow::Result<()> {
        *inputs = None;
        let shutdown = self.shutdown.clone();
        let bus = self.bus.clone();
        let handled = self.input_seq;
        let after = with_retry("finding where the inputs go on", &shutdown, || {
            bus.input_position(handled)
        })
        .await?;
        if after != handled {
            self.input_seq = after;
            self.write_bookkeeping(Some(after)).await?;
        }
        *inputs = Some(
            with_retry("opening the input consumer", &shutdown, || {
                bus.open_inputs(after)
            })
            .await?,
        );
        Ok(())
    }

    /// Feeds a batch of inputs to the scheduler, makes their effects durable, then acknowledges them.
    async fn handle_batch(
        &mut self,
        batch: Vec<async_nats::jetstream::Message>,
    ) -> anyhow::Result<()> {
        let mut terminate = Vec::with_capacity(batch.len());
        let mut handled = self.input_seq;
        for msg in &batch {
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            if seq != 0 && seq <= handled {
                // Handled before (before a crash, or a redelivery in this very batch): acknowledge only.
                terminate.push(false);
                continue;
            }
            if seq != 0 {
                handled = seq;
                self.pending_input_seq = Some(seq);
            }
            let ct = content_type(msg.headers.as_ref());
            let input = match decode_input(
                &self.subjects,
                msg.subject.as_str(),
                ct,
                &msg.payload,
                seq,
            ) {
                Ok(d) => Input::Inbound {
                    service: d.service,
                    encoding: d.encoding,
                    input: d.input,
                },
                Err(rejection) => {
                    tracing::warn!(subject = %msg.subject, "rejected input: {}", rejection.error);
                    Input::Invalid(rejection)
                }
            };
            terminate.push(matches!(input, Input::Invalid(_)));
            self.sched.handle_input(input, now_ms());
        }
        self.carry_out().await?;
        if let Some(seq) = self.pending_input_seq.take() {
            // Nothing to write (every input in the batch was handled before): record it anyway, so
            // that the position survives.
            self.write_bookkeeping(Some(seq)).await?;
        }
        for (msg, term) in batch.iter().zip(terminate) {
            let kind = if term { AckKind::Term } else { AckKind::Ack };
            if let Err(e) = msg.ack_with(kind).await {
                tracing::warn!("acknowledging an input failed (it will be redelivered and answered again): {e}");
            }
        }
        Ok(())
    }

    /// Carries out every pending action: Postgres, then Redis, then NATS. Retries each server with
    /// backoff; gives up only at shutdown (the inputs then stay unacknowledged and are redelivered).
    async fn carry_out(&mut self) -> anyhow::Result<()> {
        loop {
            let mut records: Vec<RequestRecord> = Vec::new();
            let mut index: HashMap<String, usize> = HashMap::new();
            let mut fence: Option<Fence> = None;
            let mut lease_ops = Vec::new();
            let mut outputs = Vec::new();
            while let Some(action) = self.sched.poll_action() {
                self.recorder.observe(&action, now_ms());
                match action {
                    Action::Persist(rec) => match index.get(&rec.request_id) {
                        Some(&i) => records[i] = rec,
                        None => {
                            index.insert(rec.request_id.clone(), records.len());
                            records.push(rec);
                        }
                    },
                    Action::PersistFence(f) => {
                        fence = Some(fence.map_or(f, |old: Fence| old.max(f)))
                    }
                    Action::Lease(op) => lease_ops.push(op),
                    Action::Reply {
                        service,
                        encoding,
                        reply,
                    } => outputs.push((
                        self.subjects.reply(&service),
                        encoding,
                        codec::encode(encoding, &reply),
                    )),
                    Action::Control {
                        service,
                        encoding,
                        control,
                    } => {
                        tracing::info!(
                            service = %service, request_id = %control.request_id, fence = control.fence,
                            "{:?}: {}", control.action, control.reason
                        );
                        outputs.push((
                            self.subjects.control(&service),
                            encoding,
                            codec::encode(encoding, &control),
                        ))
                    }
                    Action::Event { encoding, event } => {
                        tracing::debug!(kind = event.kind.as_str(), service = %event.service_id, request_id = ?event.request_id, "event");
                        outputs.push((
                            self.subjects.event(event.kind, &event.service_id),
                            encoding,
                            codec::encode(encoding, &event),
                        ))
                    }
                }
            }
            if records.is_empty() && fence.is_none() && lease_ops.is_empty() && outputs.is_empty() {
                return Ok(());
            }
            let outbox: Vec<OutboxRow> = outputs
                .into_iter()
                .map(|(subject, encoding, payload)| {
                    let id = self.outbox_next;
                    self.outbox_next += 1;
                    OutboxRow {
                        id,
                        msg_id: format!("{}-{id}", self.boot),
                        subject,
                        msgpack: encoding == Encoding::MsgPack,
                        payload,
                    }
                })
                .collect();
            let batch = Batch {
                records: &records,
                max_fence: fence,
                input_seq: self.pending_input_seq.take(),
                outbox: &outbox,
                published_upto: self.published_upto.take(),
            };
            // Postgres and Redis are written concurrently: both finish before anything is published or
            // acknowledged, and a restart reconciles a crash between the two (a lease without its
            // grant in Postgres is released; a grant without its lease is written back).
            let pg = &self.pg;
            let leases = &self.leases;
            let shutdown = &self.shutdown;
            let persist = async {
                with_retry("persisting to Postgres", shutdown, || pg.write(&batch)).await?;
                anyhow::Ok(())
            };
            let mut lost = Vec::new();
            let lease = async {
                let mut refused = Vec::new();
                for op in &lease_ops {
                    let outcome =
                        with_retry("writing leases to Redis", shutdown, || leases.apply(op))
                            .await?;
                    if let (Some(why), LeaseOp::Acquire(lease) | LeaseOp::Restore(lease)) =
                        (outcome.refusal(), op)
                    {
                        refused.push((lease.request_id.clone(), lease.fence, why));
                    }
                    if let (LeaseOutcome::NotHeld, LeaseOp::Renew { request_id, .. }) =
                        (&outcome, op)
                    {
                        lost.push(request_id.clone());
                    }
                }
                anyhow::Ok(refused)
            };
            let (persisted, refused) = tokio::join!(persist, lease);
            persisted?;
            if let Some(seq) = batch.input_seq {
                self.input_seq = self.input_seq.max(seq);
            }
            let mut refused = refused?;
            // A renewed lease Redis no longer had (it ended there early): written back, or revoked
            // when the store refuses it.
            for request_id in lost {
                let Some(lease) = self
                    .sched
                    .leases()
                    .into_iter()
                    .find(|l| l.request_id == request_id)
                else {
                    continue;
                };
                tracing::warn!(%request_id, "Redis had lost a renewed lease; writing it back");
                let leases = &self.leases;
                let op = LeaseOp::Restore(lease.clone());
                let outcome = with_retry("writing leases to Redis", &self.shutdown, || {
                    leases.apply(&op)
                })
                .await?;
                if let Some(why) = outcome.refusal() {
                    refused.push((lease.request_id, lease.fence, why));
                }
            }
            for (request_id, fence, why) in refused {
                tracing::error!(%request_id, "Redis refused a lease: {why}");
                self.sched.handle_input(
                    Input::LeaseRefused {
                        request_id,
                        fence,
                        why,
                    },
                    now_ms(),
                );
            }
            if let Some(last) = outbox.last().map(|row| row.id) {
                let outputs: Vec<Outbound> = outbox.iter().map(outbound_of).collect();
                publish(&self.bus, &outputs, &self.shutdown).await?;
                self.published_upto = Some(last);
            }
        }
    }

    /// Writes what no batch of effects carried: the input position, when given, and the deletion of
    /// the outbox rows JetStream has stored. Nothing when there is neither.
    async fn write_bookkeeping(&mut self, input_seq: Option<u64>) -> anyhow::Result<()> {
        let batch = Batch {
            input_seq,
            published_upto: self.published_upto.take(),
            ..Batch::default()
        };
        let pg = &self.pg;
        with_retry("persisting to Postgres", &self.shutdown, || {
            pg.write(&batch)
        })
        .await?;
        if let Some(seq) = input_seq {
            self.input_seq = seq;
        }
        Ok(())
    }

    /// Feeds the scheduler the VRAM used outside its leases on each sampled GPU (NVML's used memory minus
    /// what the scheduler counts as held there). Every sample is fed, changed or not: an unchanged figure
    /// after a pause ACK is what tells the scheduler that the paused holder's VRAM was freed.
    async fn handle_samples(&mut self, samples: Vec<DeviceSample>) -> anyhow::Result<()> {
        let Some(feed) = self.nvml.as_mut() else {
            return Ok(());
        };
        let now = now_ms();
        let sched = &self.sched;
        let held = |gpu: &str| -> u64 { sched.held_mb(gpu) };
        let external = nvml::external_usage(&feed.devices, &samples, held);
        self.recorder
            .metrics()
            .set_processes(feed.devices.iter().filter_map(|(gpu, index)| {
                samples
                    .iter()
                    .find(|s| s.index == *index)
                    .map(|s| (gpu.as_str(), s))
            }));
        for (gpu, used_mb) in external {
            if feed.fed.get(&gpu) != Some(&used_mb) {
                tracing::debug!(gpu = %gpu, used_mb, "VRAM used outside the leases");
                feed.fed.insert(gpu.clone(), used_mb);
            }
            self.sched
                .handle_input(Input::ExternalVram { gpu, used_mb }, now);
        }
        self.carry_out().await
    }

    async fn answer_status(&mut self, msg: async_nats::Message) {
        let Some(reply_to) = msg.reply.clone() else {
            return;
        };
        let encoding = Encoding::from_content_type(content_type(msg.headers.as_ref()));
        let doc = self.sched.status(now_ms());
        if let Err(e) = self
            .bus
            .respond(reply_to, encoding, codec::encode(encoding, &doc))
            .await
        {
            tracing::warn!("answering status: {e}");
        }
    }

    /// When Redis lost its data (restart, flush), writes the live leases back so that no second holder
    /// can appear.
    async fn check_redis_epoch(&mut self) -> anyhow::Result<()> {
        match self.leases.ensure_epoch().await {
            Ok(false) => {}
            Ok(true) => tracing::warn!(
                "Redis lost its data (restart or flush); writing the live leases back"
            ),
            Err(e) => {
                tracing::warn!("checking Redis: {}", causes(&e));
                return Ok(());
            }
        }
        self.reconcile_leases().await
    }

    /// Makes Redis hold exactly the scheduler's leases: releases any other (a lease an old snapshot
    /// brought back, say) and writes back any missing one (Redis restarted empty or from an old
    /// snapshot); one the store refuses is revoked.
    async fn reconcile_leases(&mut self) -> anyhow::Result<()> {
        // What is due first: an expired lease ends in the scheduler as it ended in Redis.
        self.sched.handle_timeout(now_ms());
        self.carry_out().await?;
        let stored = match self.leases.leases().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!("reading leases from Redis: {}", causes(&e));
                return Ok(());
            }
        };
        let wanted = self.sched.leases();
        let now = now_ms();
        let same = |a: &Lease, b: &Lease| a.request_id == b.request_id && a.fence == b.fence;
        let stale: Vec<&Lease> = stored
            .iter()
            .filter(|l| !wanted.iter().any(|w| same(w, l)))
            .collect();
        let mut missing: Vec<&Lease> = wanted
            .iter()
            .filter(|w| w.expires_at > now && !stored.iter().any(|l| same(w, l)))
            .collect();
        // In fence order: the store refuses a fence below the highest it has seen.
        missing.sort_by_key(|l| l.fence);
        if stale.is_empty() && missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            "Redis disagreed with the coordinator: releasing {} lease(s) it should not hold, writing back {} it lost",
            stale.len(),
            missing.len()
        );
        for lease in stale {
            if let Err(e) = self.leases.release(&lease.request_id, lease.fence).await {
                tracing::warn!("releasing a stale lease in Redis: {}", causes(&e));
            }
        }
        for lease in missing {
            match self.leases.apply(&LeaseOp::Restore(lease.clone())).await {
                Ok(outcome) => {
                    if let Some(why) = outcome.refusal() {
                        tracing::error!(request_id = %lease.request_id, "Redis refused a lease: {why}");
                        self.sched.handle_input(
                            Input::LeaseRefused {
                                request_id: lease.request_id.clone(),
                                fence: lease.fence,
                                why,
                            },
                            now,
                        );
                    }
                }
                Err(e) => tracing::warn!("writing a lease back to Redis: {}", causes(&e)),
            }
        }
        self.carry_out().await
    }
}

/// The next NVML sample, or never when NVML is not in use.
async fn next_sample(nvml: &mut Option<NvmlFeed>) -> Option<Vec<DeviceSample>> {
    match nvml {
        Some(feed) => feed.samples.recv().await,
        None => std::future::pending().await,
    }
}

/// The message an outbox row is published as.
fn outbound_of(row: &OutboxRow) -> Outbound {
    Outbound {
        subject: row.subject.clone(),
        encoding: if row.msgpack {
            Encoding::MsgPack
        } else {
            Encoding::Json
        },
        payload: row.payload.clone().into(),
        msg_id: row.msg_id.clone(),
    }
}

/// The JetStream message stream of the input consumer.
type InputStream = async_nats::jetstream::consumer::pull::Stream;

/// The next input, or never while the consumer is being reopened.
async fn next_input(
    inputs: &mut Option<InputStream>,
) -> Option<<InputStream as futures::Stream>::Item> {
    match inputs {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Publishes messages in order, retrying with backoff from the first one not surely stored: after a
/// failure one at a time, so that order holds even across a reconnect (a `restart` never before its
/// `revoke`), and under their ids, so that JetStream keeps one copy of any sent twice.
async fn publish(
    bus: &Bus,
    outputs: &[Outbound],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    let done = AtomicUsize::new(0);
    let retried = AtomicBool::new(false);
    with_retry("publishing to JetStream", shutdown, || {
        let from = done.load(Relaxed);
        let pipelined = !retried.swap(true, Relaxed);
        let (done, rest) = (&done, &outputs[from..]);
        async move {
            bus.publish_in_order(rest, pipelined)
                .await
                .inspect_err(|failure| done.store(from + failure.stored, Relaxed))
        }
    })
    .await
}
