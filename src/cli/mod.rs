//! The command line: its commands and options, and which part of the library each hands over to.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gpu_coordinator::config::Config;
use gpu_coordinator::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

mod commands;
mod render;
mod status;

/// A preemptive priority semaphore for sharing GPUs between AI services, over NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "gpu-coordinator", version, about)]
pub struct Cli {
    /// TOML configuration file. Without it: the defaults, then `GPU_COORDINATOR_*` environment variables.
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How log lines are written; the filter comes from `RUST_LOG` (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Run a node agent on a GPU host, until SIGINT or SIGTERM: it publishes the host's GPUs (NVML,
    /// else `[[gpus]]` simulated) on `<nats.prefix>.node.<host>` every `nvml.sample_ms`, for a
    /// coordinator with `[nodes] agents = true`. `[agent] host` names the host (default: the
    /// machine's hostname); it reads `[nats]` as the coordinator does.
    Agent,
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
        /// The GPU hosts whose node agents report to the coordinator, comma-separated (e.g.
        /// `h1,h2`): one user `agent-<host>` each, which may publish only `<prefix>.node.<host>`.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
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

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let load = match cli.command {
        Command::Agent => Config::load_agent,
        _ => Config::load,
    };
    let config = load(cli.config.as_deref()).with_context(|| match &cli.config {
        Some(path) => format!("cannot load the configuration from {}", path.display()),
        None => "cannot load the configuration".to_owned(),
    })?;
    tracing::debug!(?config, "configuration loaded");
    Ok(config)
}

/// Parses the command line, sets up logging, loads the configuration and runs the command.
pub async fn run() -> anyhow::Result<()> {
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
    let mut config = load_config(&cli)?;
    match cli.command {
        Command::Serve { embedded, data_dir } => {
            if embedded {
                config.backends = gpu_coordinator::config::BackendsConfig::embedded();
            }
            if let Some(dir) = data_dir {
                config.embedded.data_dir = dir.display().to_string();
            }
            commands::serve(config).await
        }
        Command::Migrate => commands::migrate(config).await,
        Command::Engines => engines(config).await,
        Command::Agent => {
            let shutdown = CancellationToken::new();
            tokio::spawn(commands::cancel_on_signal(shutdown.clone()));
            gpu_coordinator::agent::run(config, shutdown).await
        }
        Command::Audit { since } => commands::audit(config, since.as_deref()).await,
        Command::NatsAuth {
            services,
            hosts,
            out,
            prefix,
            host,
        } => nats_auth(&config, &services, &hosts, &out, prefix, &host),
        Command::Demo {
            distributed,
            duration,
            speed,
            seed,
        } => {
            if !distributed && cli.config.is_none() {
                config.backends = gpu_coordinator::config::BackendsConfig::embedded();
            }
            commands::demo(config, duration, speed, seed).await
        }
        Command::Gpus { json } => status::gpus(&config, json),
        Command::Status { json, http, token } => {
            status::status(&config, json, http, token.as_deref()).await
        }
    }
}

/// `engines`: the sidecars of `[[engines]]`, alone, until SIGINT or SIGTERM.
async fn engines(config: Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        !config.engines.is_empty(),
        "no [[engines]] in the configuration: nothing to run (see docs/engines.md, and \
         examples/box.toml)"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(commands::cancel_on_signal(shutdown.clone()));
    gpu_coordinator::engines::run_alone(config, shutdown).await
}

/// `nats-auth`: writes the NATS configuration, the users and the coordinator's settings.
fn nats_auth(
    config: &Config,
    services: &[String],
    hosts: &[String],
    out: &std::path::Path,
    prefix: Option<String>,
    host: &str,
) -> anyhow::Result<()> {
    let prefix = prefix.unwrap_or_else(|| config.nats.prefix.clone());
    let generated = gpu_coordinator::nats_auth::generate(&prefix, services, hosts, host)?;
    gpu_coordinator::nats_auth::write(out, &generated)?;
    println!(
        "wrote {0}/nats-server.conf, {0}/users.json and {0}/coordinator.env ({1} users, \
         subjects under `{prefix}.`)\n\
         start NATS with: nats-server -c {0}/nats-server.conf\n\
         each user's URL (and each service's HTTP token) is in users.json; the coordinator's \
         settings are in coordinator.env (`set -a; . {0}/coordinator.env`)",
        out.display(),
        generated.users.len()
    );
    for host in &generated.hosts {
        println!(
            "the node agent of {host}: `set -a; . {}/agent-{host}.env; gpu-coordinator agent` on that host",
            out.display()
        );
    }
    Ok(())
}
