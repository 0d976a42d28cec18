//! The commands that hand over to the library: `serve`, `demo`, `migrate`, `audit`, and the signals
//! that stop them.

use std::time::Duration;

use anyhow::Context as _;
use gpu_coordinator::config::Config;
use tokio_util::sync::CancellationToken;

/// `audit`: exits 1 on a violation, after printing it.
pub async fn audit(config: Config, since: Option<&str>) -> anyhow::Result<()> {
    use gpu_coordinator::audit::Since;
    let since = match since {
        Some(text) => {
            Since::parse(text, gpu_coordinator::clock::now_ms()).map_err(anyhow::Error::msg)?
        }
        None => Since::Start,
    };
    match gpu_coordinator::app::audit::run(&config, since).await? {
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

pub async fn serve(config: Config) -> anyhow::Result<()> {
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

pub async fn demo(config: Config, duration: f64, speed: f64, seed: u64) -> anyhow::Result<()> {
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

pub async fn migrate(config: Config) -> anyhow::Result<()> {
    if config.backends.journal == gpu_coordinator::config::JournalBackend::Sqlite {
        let dir = config.embedded.dir();
        gpu_coordinator::adapters::sqlite::SqliteJournal::open(&dir)
            .await
            .with_context(|| format!("cannot migrate the embedded store in {}", dir.display()))?;
        tracing::info!(
            "migrations applied to the SQLite database in {}",
            dir.display()
        );
        return Ok(());
    }
    let store = gpu_coordinator::adapters::postgres::PgJournal::connect(&config.database.url)
        .await
        .context("cannot connect to Postgres (database.url)")?;
    store.migrate().await.context("cannot run the migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Cancels `token` on the first SIGINT (Ctrl-C) or SIGTERM, which starts a graceful stop.
pub async fn cancel_on_signal(token: CancellationToken) {
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
