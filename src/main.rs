//! The `gpu-coordinator` command: parses the command line, loads the configuration, sets up logging and
//! signals, and hands over to the library. Errors are reported here with their context (`anyhow`); nothing
//! below this edge exits the process.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gpu_coordinator::config::Config;
use gpu_coordinator::telemetry::{self, LogFormat};
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
    Serve,
    /// Create or update the Postgres schema, then exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let config = load_config(&cli)?;
    match cli.command {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
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
    tracing::info!(http = %local, nats = %config.nats.url, prefix = %config.nats.prefix, "starting");

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    gpu_coordinator::driver::run(config, listener, shutdown)
        .await
        .context("the coordinator stopped with an error")?;
    tracing::info!("stopped");
    Ok(())
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = gpu_coordinator::adapters::postgres::PgStore::connect(&config.database.url)
        .await
        .context("cannot connect to Postgres (database.url)")?;
    store.migrate().await.context("cannot run the migrations")?;
    tracing::info!("migrations applied");
    Ok(())
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
