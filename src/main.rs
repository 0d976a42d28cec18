//! The `gpu-coordinator` command: parses the command line, loads the configuration, sets up logging and
//! signals, and hands over to the library. Errors are reported here with their context (`anyhow`); nothing
//! below this edge exits the process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gpu_coordinator::config::Config;
use gpu_coordinator::engines::EngineView;
use gpu_coordinator::telemetry::{self, LogFormat};
use gpu_coordinator_wire::{HolderState, StatusDoc, VramSource};
use tokio_util::sync::CancellationToken;

/// A preemptive priority semaphore for sharing GPUs between AI services, over NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "gpu-coordinator", version, about)]
struct Cli {
    /// TOML configuration file. Without it: the defaults, then `GPU_COORDINATOR_*` environment variables.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How log lines are written; the filter comes from `RUST_LOG` (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator until SIGINT or SIGTERM.
    Serve {
        /// Run with no server: the journal in SQLite, the leases in this process, the bus embedded
        /// (services use the HTTP API). The same as `[backends]` journal = "sqlite", leases = "memory",
        /// bus = "embedded".
        #[arg(long)]
        embedded: bool,
        /// Where the embedded backends keep their data (`embedded.data_dir`; default: the user's data
        /// directory, printed at start).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Run the engine sidecars of `[[engines]]` alone, on a GPU host: each stands in front of its
    /// inference server and asks the coordinator (`[sidecar] coordinator`: its HTTP API, or NATS) for
    /// the GPU as any service does. `[sidecar] listen` serves `/gpu/engines` and `/metrics`.
    Engines,
    /// Create or update the schema (Postgres, or SQLite with `backends.journal = "sqlite"`), then exit.
    Migrate,
    /// Play the story live: a coordinator of its own (embedded, no server needed), a background ASR
    /// worker, a chat service and a diarization job sharing one simulated 24 GB GPU over the HTTP API,
    /// with a timeline and a summary. Exits non-zero on a protocol error.
    Demo {
        /// Run the demo's coordinator on the configured NATS, Redis and Postgres instead (also the
        /// default when `--config` is given).
        #[arg(long)]
        distributed: bool,
        /// Story time to play, in seconds.
        #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
        duration: f64,
        /// How many times faster than the clock the story runs.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Seed of the random chat arrivals.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Show what the coordinator sees on this machine, with no server needed: the GPUs it would manage
    /// (from NVML, else the configuration), their VRAM and what processes use of it.
    Gpus {
        /// Print the status document and the processes as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Replay the output stream and check its history: never two holders beyond a GPU's capacity, a
    /// whole-GPU holder alone, fences strictly rising, no grant while a holder is pausing, every request
    /// ended at most once, every grant reply with its event. Prints a summary and exits 0, or prints the
    /// first violation with the records that show it and exits 1.
    Audit {
        /// Start at this RFC 3339 instant, or this span back from now (`90s`, `15m`, `2h`, `7d`).
        /// Default: the first message the stream keeps.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
    },
    /// Write a nats-server configuration with per-service permissions (`DIR/nats-server.conf`), the
    /// users' random passwords and URLs and the services' HTTP tokens (`DIR/users.json`), and the
    /// coordinator's environment (`DIR/coordinator.env`): one user per service, `coordinator` and a
    /// read-only `auditor`. A service may publish only its own inputs and read only its own answers.
    NatsAuth {
        /// The services, comma-separated (e.g. `chat,asr,diar`).
        #[arg(long, value_delimiter = ',', required = true)]
        services: Vec<String>,
        /// Where to write the three files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The subject prefix the permissions cover (default: the configuration's `nats.prefix`).
        #[arg(long)]
        prefix: Option<String>,
        /// The NATS host and port written into each user's URL in `users.json` (a cluster's servers
        /// separated by commas: each gets the credentials).
        #[arg(long, default_value = "127.0.0.1:4222")]
        host: String,
    },
    /// Show the GPUs (VRAM and its source), the holders and the queue of a running coordinator; over
    /// HTTP, also its engine sidecars (`GET /gpu/engines`), when it runs any.
    Status {
        /// Print the status document as JSON, for scripts; over HTTP, with an `engines` key when
        /// `GET /gpu/engines` answered.
        #[arg(long)]
        json: bool,
        /// Ask the HTTP API at this base URL (e.g. `http://127.0.0.1:8080`) instead of NATS
        /// (`<nats.prefix>.status` at `nats.url`).
        #[arg(long, value_name = "URL")]
        http: Option<String>,
        /// The bearer token for `--http` when `[http.tokens]` is configured.
        #[arg(long, env = "GPU_COORDINATOR_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

/// `audit`: exits 1 on a violation, after printing it.
async fn audit(config: Config, since: Option<&str>) -> anyhow::Result<()> {
    use gpu_coordinator::audit::{self, Since};
    let since = match since {
        Some(text) => {
            Since::parse(text, gpu_coordinator::clock::now_ms()).map_err(anyhow::Error::msg)?
        }
        None => Since::Start,
    };
    match audit::run(&config, since).await? {
        Ok(summary) => {
            println!("{summary}");
            Ok(())
        }
        Err(violation) => {
            print!("{violation}");
            std::process::exit(1);
        }
    }
}

/// How long `status` waits for an answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        // The demo's output is its timeline, the status command's its table: only warnings beside them.
        Command::Demo { .. }
        | Command::Status { .. }
        | Command::Gpus { .. }
        | Command::Audit { .. } => telemetry::init_with_default(
            cli.log_format,
            tracing_subscriber::filter::LevelFilter::WARN,
        ),
        _ => telemetry::init(cli.log_format),
    }
    let config = load_config(&cli)?;
    match cli.command {
        Command::Serve { embedded, data_dir } => {
            let mut config = config;
            if embedded {
                config.backends = gpu_coordinator::config::BackendsConfig::embedded();
            }
            if let Some(dir) = data_dir {
                config.embedded.data_dir = dir.display().to_string();
            }
            serve(config).await
        }
        Command::Migrate => migrate(config).await,
        Command::Engines => {
            anyhow::ensure!(
                !config.engines.is_empty(),
                "no [[engines]] in the configuration: nothing to run (see docs/engines.md, and \
                 examples/box.toml)"
            );
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            gpu_coordinator::engines::run_alone(config, shutdown).await
        }
        Command::Audit { since } => audit(config, since.as_deref()).await,
        Command::NatsAuth {
            services,
            out,
            prefix,
            host,
        } => {
            let prefix = prefix.unwrap_or(config.nats.prefix);
            let generated = gpu_coordinator::nats_auth::generate(&prefix, &services, &host)?;
            gpu_coordinator::nats_auth::write(&out, &generated)?;
            println!(
                "wrote {0}/nats-server.conf, {0}/users.json and {0}/coordinator.env ({1} users, \
                 subjects under `{prefix}.`)\n\
                 start NATS with: nats-server -c {0}/nats-server.conf\n\
                 each user's URL (and each service's HTTP token) is in users.json; the coordinator's \
                 settings are in coordinator.env (`set -a; . {0}/coordinator.env`)",
                out.display(),
                generated.users.len()
            );
            Ok(())
        }
        Command::Demo {
            distributed,
            duration,
            speed,
            seed,
        } => {
            let mut config = config;
            if !distributed && cli.config.is_none() {
                config.backends = gpu_coordinator::config::BackendsConfig::embedded();
            }
            demo(config, duration, speed, seed).await
        }
        Command::Gpus { json } => {
            let (doc, samples) = gpu_coordinator::app::gpus::local_status(&config);
            if json {
                let processes: Vec<serde_json::Value> = samples
                    .iter()
                    .flat_map(|d| {
                        d.processes.iter().map(move |p| {
                            serde_json::json!({"gpu_index": d.index, "gpu_name": d.name, "pid": p.pid, "used_mb": p.used_mb})
                        })
                    })
                    .collect();
                let out = serde_json::json!({"status": doc, "processes": processes});
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).context("cannot write the view as JSON")?
                );
            } else {
                print!("{}", render_status(&doc, &[]));
                for d in &samples {
                    println!(
                        "\nNVML device {} ({}, {}): {} MB total, {} MB used",
                        d.index, d.name, d.uuid, d.total_mb, d.used_mb
                    );
                    for p in &d.processes {
                        println!("  pid {:<8} {} MB", p.pid, p.used_mb);
                    }
                }
            }
            Ok(())
        }
        Command::Status { json, http, token } => {
            let base = match http {
                Some(url) => Some(url),
                // With no NATS, the coordinator answers over HTTP only.
                None if config.backends.bus == gpu_coordinator::config::BusBackend::Embedded => {
                    Some(format!("http://{}", config.http.listen))
                }
                None => None,
            };
            let (doc, engines) = match &base {
                Some(base) => {
                    let doc = status_over_http(base, token.as_deref()).await?;
                    (doc, engines_over_http(base, token.as_deref()).await)
                }
                // The sidecars' figures are served over HTTP only.
                None => (status_over_nats(&config).await?, None),
            };
            if json {
                let mut out =
                    serde_json::to_value(&doc).context("cannot write the status as JSON")?;
                if let (Some(engines), Some(fields)) = (&engines, out.as_object_mut()) {
                    fields.insert(
                        "engines".to_owned(),
                        serde_json::to_value(engines)
                            .context("cannot write the engines as JSON")?,
                    );
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out)
                        .context("cannot write the status as JSON")?
                );
            } else {
                print!(
                    "{}",
                    render_status(&doc, engines.as_deref().unwrap_or_default())
                );
            }
            Ok(())
        }
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let config = Config::load(cli.config.as_deref()).with_context(|| match &cli.config {
        Some(path) => format!("cannot load the configuration from {}", path.display()),
        None => "cannot load the configuration".to_owned(),
    })?;
    tracing::debug!(?config, "configuration loaded");
    Ok(config)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    let local = listener
        .local_addr()
        .context("cannot read the HTTP listener's address")?;
    tracing::info!(http = %local, prefix = %config.nats.prefix, "starting");
    if config.backends.uses_data_dir() {
        tracing::info!(
            "data directory: {} (embedded.data_dir)",
            config.embedded.dir().display()
        );
    }

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    gpu_coordinator::app::run(config, listener, shutdown)
        .await
        .context("the coordinator stopped with an error")?;
    tracing::info!("stopped");
    Ok(())
}

async fn demo(config: Config, duration: f64, speed: f64, seed: u64) -> anyhow::Result<()> {
    anyhow::ensure!(
        duration.is_finite() && duration > 0.0,
        "--duration must be a positive number of seconds"
    );
    anyhow::ensure!(
        speed.is_finite() && speed > 0.0,
        "--speed must be greater than 0"
    );
    let options = gpu_coordinator::demo::DemoOptions {
        duration: Duration::from_secs_f64(duration),
        speed,
        seed,
    };
    let summary = gpu_coordinator::demo::run(config, options).await?;
    println!("{summary}");
    anyhow::ensure!(summary.ok(), "the demo saw a protocol error");
    Ok(())
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    if config.backends.journal == gpu_coordinator::config::JournalBackend::Sqlite {
        let dir = config.embedded.dir();
        gpu_coordinator::adapters::sqlite::SqliteStore::open(&dir)
            .await
            .with_context(|| format!("cannot migrate the embedded store in {}", dir.display()))?;
        tracing::info!(
            "migrations applied to the SQLite database in {}",
            dir.display()
        );
        return Ok(());
    }
    let store = gpu_coordinator::adapters::postgres::PgStore::connect(&config.database.url)
        .await
        .context("cannot connect to Postgres (database.url)")?;
    store.migrate().await.context("cannot run the migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn status_over_nats(config: &Config) -> anyhow::Result<StatusDoc> {
    let url = &config.nats.url;
    let client = gpu_coordinator::adapters::nats::options(&config.nats)
        .await?
        .name("gpu-coordinator status")
        .connection_timeout(STATUS_TIMEOUT)
        .connect(gpu_coordinator::adapters::nats::servers(&config.nats)?)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} (nats.url)",
                gpu_coordinator_client::redact(url)
            )
        })?;
    let subject = format!("{}.status", config.nats.prefix);
    let msg = tokio::time::timeout(STATUS_TIMEOUT, client.request(subject.clone(), "".into()))
        .await
        .with_context(|| format!("no answer on {subject} within {STATUS_TIMEOUT:?}"))?
        .with_context(|| {
            format!("no coordinator answers on {subject} (is it running, with this nats.prefix?)")
        })?;
    serde_json::from_slice(&msg.payload)
        .with_context(|| format!("the answer on {subject} is not a status document"))
}

async fn status_over_http(base: &str, token: Option<&str>) -> anyhow::Result<StatusDoc> {
    get_over_http(base, "/gpu/status", token, "a status document").await
}

/// The engine sidecars of the coordinator at `base` (`GET /gpu/engines`); `None` when the call fails
/// (a coordinator from before the sidecars answers 404): the status is worth showing without them.
async fn engines_over_http(base: &str, token: Option<&str>) -> Option<Vec<EngineView>> {
    match get_over_http(base, "/gpu/engines", token, "a list of engines").await {
        Ok(engines) => Some(engines),
        Err(e) => {
            tracing::debug!("no engines shown: {e:#}");
            None
        }
    }
}

/// `GET base + path` with the bearer token, its JSON answer read as `what`; an error answer's
/// `error` field in the message.
async fn get_over_http<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    token: Option<&str>,
    what: &str,
) -> anyhow::Result<T> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        .build()
        .context("cannot make an HTTP client")?;
    let mut request = client.get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("cannot read the answer of {url}"))?;
    if !status.is_success() {
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        anyhow::bail!("{url} answered {status}: {error}");
    }
    serde_json::from_slice(&body).with_context(|| format!("the answer of {url} is not {what}"))
}

/// The status document as tables: GPUs, the engine sidecars (when there are any), holders, queue.
fn render_status(doc: &StatusDoc, engines: &[EngineView]) -> String {
    let source = |s: VramSource| match s {
        VramSource::Nvml => "nvml",
        VramSource::Config => "config",
    };
    let mut out = format!(
        "Status at {} (VRAM figures from {})\n",
        doc.at,
        match doc.vram_source {
            VramSource::Nvml => "NVML",
            VramSource::Config => "the configuration",
        }
    );
    if let Some(leader) = &doc.leader {
        let standbys = if leader.standbys.is_empty() {
            "none".to_owned()
        } else {
            leader.standbys.join(", ")
        };
        out.push_str(&format!(
            "Leader {} (term {}); standbys: {standbys}\n",
            leader.holder, leader.term
        ));
    }
    out.push_str("\nGPUs\n");
    out.push_str(&table(
        &[
            "GPU",
            "TOTAL MB",
            "USED MB",
            "FREE MB",
            "EXTERNAL MB",
            "SOURCE",
            "HOLDERS",
        ],
        doc.gpus
            .iter()
            .map(|g| {
                vec![
                    g.id.clone(),
                    g.total_mb.to_string(),
                    g.used_mb.to_string(),
                    g.free_mb.to_string(),
                    g.external_mb.to_string(),
                    source(g.vram_source).to_owned(),
                    g.holders.len().to_string(),
                ]
            })
            .collect(),
    ));
    if !engines.is_empty() {
        out.push_str("\nEngines\n");
        out.push_str(&render_engines(engines));
    }
    if !doc.services.is_empty() {
        let mb = |mb: Option<u64>| mb.map_or_else(|| "-".to_owned(), |mb| mb.to_string());
        out.push_str("\nServices (VRAM)\n");
        out.push_str(&table(
            &[
                "SERVICE",
                "USED MB",
                "GUARANTEED MB",
                "BORROWED MB",
                "MAX MB",
            ],
            doc.services
                .iter()
                .map(|s| {
                    vec![
                        s.service_id.clone(),
                        s.used_mb.to_string(),
                        mb(s.guaranteed_vram_mb),
                        s.borrowed_mb.to_string(),
                        mb(s.max_vram_mb),
                    ]
                })
                .collect(),
        ));
    }
    out.push_str("\nHolders\n");
    out.push_str(&table(
        &[
            "GPU", "REQUEST", "SERVICE", "PRIO", "VRAM MB", "FENCE", "STATE", "GRANTED", "EXPIRES",
        ],
        doc.gpus
            .iter()
            .flat_map(|g| g.holders.iter().map(move |h| (g, h)))
            .map(|(g, h)| {
                let state = match h.state {
                    HolderState::Active => "active",
                    HolderState::Pausing => "pausing",
                };
                let state = if h.preemptible {
                    state.to_owned()
                } else {
                    format!("{state}, not preemptible")
                };
                vec![
                    g.id.clone(),
                    h.request_id.clone(),
                    h.service_id.clone(),
                    h.priority.to_string(),
                    h.vram_mb.to_string(),
                    h.fence.to_string(),
                    state,
                    h.granted_at.clone(),
                    h.expires_at.clone(),
                ]
            })
            .collect(),
    ));
    out.push_str("\nQueue (grant order)\n");
    out.push_str(&table(
        &[
            "POS",
            "REQUEST",
            "SERVICE",
            "PRIO",
            "VRAM MB",
            "GPU",
            "STATE",
            "SINCE",
            "EST. WAIT",
        ],
        doc.queue
            .iter()
            .map(|q| {
                let paused_on = doc
                    .paused
                    .iter()
                    .find(|p| p.request_id == q.request_id)
                    .map(|p| format!("paused (GPU {})", p.gpu));
                vec![
                    q.position.to_string(),
                    q.request_id.clone(),
                    q.service_id.clone(),
                    q.priority.to_string(),
                    q.vram_mb
                        .map_or_else(|| "whole GPU".to_owned(), |mb| mb.to_string()),
                    q.gpu.clone().unwrap_or_else(|| "any".to_owned()),
                    match (q.paused, paused_on) {
                        (true, Some(on)) => on,
                        (true, None) => "paused".to_owned(),
                        (false, _) => "queued".to_owned(),
                    },
                    q.requested_at.clone(),
                    q.estimated_wait_ms.map_or_else(|| "-".to_owned(), human_ms),
                ]
            })
            .collect(),
    ));
    let listed = doc.queue.len() as u64;
    if doc.queue_total > listed {
        out.push_str(&format!(
            "  ({listed} of {} listed, from position {}; by priority: {})\n",
            doc.queue_total,
            doc.queue_offset + 1,
            doc.queue_counts
                .iter()
                .map(|c| format!(
                    "{} -> {} queued, {} paused{}",
                    c.priority,
                    c.queued,
                    c.paused,
                    c.gpu
                        .as_ref()
                        .map(|g| format!(" (GPU {g})"))
                        .unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    out
}

/// The engine sidecars as a table: what each engine is doing, the requests waiting for the GPU in
/// its sidecar and in flight, and its last sleep and wake times.
fn render_engines(engines: &[EngineView]) -> String {
    let ms = |d: Option<u64>| d.map_or_else(|| "-".to_owned(), |ms| ms.to_string());
    table(
        &[
            "SERVICE",
            "KIND",
            "STATE",
            "WAITING",
            "IN FLIGHT",
            "LAST SLEEP MS",
            "LAST WAKE MS",
        ],
        engines
            .iter()
            .map(|e| {
                vec![
                    e.service.clone(),
                    e.kind.clone(),
                    e.state.as_str().to_owned(),
                    e.waiting.to_string(),
                    e.in_flight.to_string(),
                    ms(e.last_sleep_ms),
                    ms(e.last_wake_ms),
                ]
            })
            .collect(),
    )
}

/// Left-aligned columns two spaces apart; `(none)` for no rows.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    if rows.is_empty() {
        return "  (none)\n".to_owned();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .into_iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// `850 ms`, `12.3 s`, `4 min 05 s`.
fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// Cancels `token` on the first SIGINT (Ctrl-C) or SIGTERM, which starts a graceful stop.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received, stopping"),
        _ = term => tracing::info!("SIGTERM received, stopping"),
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator::engines::EngineState;
    use gpu_coordinator_wire::{GpuStatus, HolderStatus, PausedStatus, QueueEntry};

    #[test]
    fn the_status_table_shows_gpus_holders_and_queue() {
        let doc = StatusDoc {
            leader: None,
            storage_full: None,
            queue_total: 2,
            queue_offset: 0,
            queue_counts: vec![],
            services: vec![gpu_coordinator_wire::ServiceStatus {
                service_id: "chat".into(),
                used_mb: 20_000,
                borrowed_mb: 4_000,
                guaranteed_vram_mb: Some(16_000),
                max_vram_mb: None,
            }],
            at: "2026-11-26T14:00:00.000Z".into(),
            vram_source: VramSource::Config,
            gpus: vec![GpuStatus {
                id: "0".into(),
                total_mb: 24_576,
                used_mb: 20_000,
                free_mb: 4_576,
                external_mb: 0,
                vram_source: VramSource::Config,
                holders: vec![HolderStatus {
                    request_id: "chat-1".into(),
                    service_id: "chat".into(),
                    priority: 0,
                    fence: 7,
                    vram_mb: 20_000,
                    granted_at: "2026-11-26T13:59:50.000Z".into(),
                    expires_at: "2026-11-26T14:00:20.000Z".into(),
                    state: HolderState::Active,
                    preemptible: true,
                    pause_ms: None,
                }],
            }],
            paused: vec![PausedStatus {
                request_id: "asr-1".into(),
                service_id: "asr".into(),
                priority: 2,
                gpu: "0".into(),
                vram_mb: 16_000,
                paused_at: "2026-11-26T13:59:50.000Z".into(),
            }],
            queue: vec![
                QueueEntry {
                    position: 1,
                    request_id: "tts-1".into(),
                    service_id: "tts".into(),
                    priority: 1,
                    vram_mb: None,
                    gpu: None,
                    requested_at: "2026-11-26T13:59:55.000Z".into(),
                    paused: false,
                    timeout_at: None,
                    estimated_wait_ms: Some(20_000),
                },
                QueueEntry {
                    position: 2,
                    request_id: "asr-1".into(),
                    service_id: "asr".into(),
                    priority: 2,
                    vram_mb: Some(16_000),
                    gpu: None,
                    requested_at: "2026-11-26T13:59:00.000Z".into(),
                    paused: true,
                    timeout_at: None,
                    estimated_wait_ms: Some(125_000),
                },
            ],
        };
        let text = render_status(&doc, &[]);
        assert!(
            text.contains("VRAM figures from the configuration"),
            "{text}"
        );
        assert!(
            text.contains("  0    24576     20000    4576     0            config  1"),
            "{text}"
        );
        assert!(
            text.contains("chat-1   chat     0     20000    7      active"),
            "{text}"
        );
        assert!(
            text.contains("1    tts-1    tts      1     whole GPU  any  queued"),
            "{text}"
        );
        assert!(text.contains("paused (GPU 0)"), "{text}");
        assert!(
            text.contains("Services (VRAM)")
                && text.contains("chat     20000    16000          4000         -"),
            "{text}"
        );
        assert!(
            text.contains("20.0 s") && text.contains("2 min 05 s"),
            "{text}"
        );
        let empty = render_status(
            &StatusDoc {
                leader: None,
                storage_full: None,
                gpus: vec![],
                paused: vec![],
                queue: vec![],
                services: vec![],
                ..doc
            },
            &[],
        );
        assert_eq!(empty.matches("(none)").count(), 3, "{empty}");
        assert!(!empty.contains("Services"), "{empty}");
        // A long queue says how much of it is listed.
        let long = render_status(
            &StatusDoc {
                queue_total: 100_000,
                queue_counts: vec![gpu_coordinator_wire::QueueCount {
                    priority: 1,
                    gpu: None,
                    queued: 100_000,
                    paused: 0,
                }],
                ..empty_doc_with_one_entry()
            },
            &[],
        );
        assert!(
            long.contains(
                "(1 of 100000 listed, from position 1; by priority: 1 -> 100000 queued, 0 paused)"
            ),
            "{long}"
        );
    }

    #[test]
    fn the_engines_table_follows_the_gpus_and_only_when_there_are_engines() {
        let engine = |service: &str, state, wake: Option<u64>| EngineView {
            service: service.into(),
            kind: "vllm".into(),
            listen: "127.0.0.1:8000".into(),
            state,
            in_flight: 2,
            waiting: 3,
            sleeps: 1,
            wakes: u64::from(wake.is_some()),
            last_sleep_ms: Some(850),
            last_wake_ms: wake,
        };
        let engines = [
            engine("chat", EngineState::Awake, Some(1_234)),
            engine("asr", EngineState::GoingToSleep, None),
        ];
        let text = render_status(&empty_doc_with_one_entry(), &engines);
        let (gpus, engines_at, holders) = (
            text.find("\nGPUs\n").expect(&text),
            text.find("\nEngines\n").expect(&text),
            text.find("\nHolders\n").expect(&text),
        );
        assert!(gpus < engines_at && engines_at < holders, "{text}");
        assert!(
            text.contains(
                "  SERVICE  KIND  STATE           WAITING  IN FLIGHT  LAST SLEEP MS  LAST WAKE MS\n\
                 \x20 chat     vllm  awake           3        2          850            1234\n\
                 \x20 asr      vllm  going_to_sleep  3        2          850            -\n"
            ),
            "{text}"
        );
        let without = render_status(&empty_doc_with_one_entry(), &[]);
        assert!(!without.contains("Engines"), "{without}");
    }

    fn empty_doc_with_one_entry() -> StatusDoc {
        StatusDoc {
            leader: None,
            storage_full: None,
            at: "2026-11-26T14:00:00.000Z".into(),
            vram_source: VramSource::Config,
            gpus: vec![],
            paused: vec![],
            queue: vec![QueueEntry {
                position: 1,
                request_id: "q-1".into(),
                service_id: "q".into(),
                priority: 1,
                vram_mb: None,
                gpu: None,
                requested_at: "2026-11-26T13:59:55.000Z".into(),
                paused: false,
                timeout_at: None,
                estimated_wait_ms: None,
            }],
            queue_total: 1,
            queue_offset: 0,
            queue_counts: vec![],
            services: vec![],
        }
    }
}
