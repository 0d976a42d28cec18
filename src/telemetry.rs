//! Logging: `tracing` events to stderr, readable text in a terminal or one JSON object per line for a log
//! collector. The filter comes from `RUST_LOG` (default `info`). This module only sets up the subscriber;
//! what is logged is decided where it happens.

use tracing_subscriber::filter::{EnvFilter, LevelFilter};

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Call once, at start; a second call leaves the first subscriber in place.
pub fn init(format: LogFormat) {
    init_with_default(format, LevelFilter::INFO)
}

/// As [`init`], with another level when `RUST_LOG` is not set (the demo keeps its timeline readable with
/// `warn`).
pub fn init_with_default(format: LogFormat, default: LevelFilter) {
    // An unparsable `RUST_LOG` directive is skipped (and reported on stderr) rather than silencing logs.
    // Without `RUST_LOG`, the libraries' own chatter (each NATS connect, Postgres notices such as
    // "relation already exists, skipping") stays out: the coordinator says what it connected to itself.
    let filter = match std::env::var("RUST_LOG") {
        Ok(_) => EnvFilter::builder()
            .with_default_directive(default.into())
            .from_env_lossy(),
        Err(_) => EnvFilter::builder()
            .with_default_directive(default.into())
            .parse_lossy("async_nats=warn,sqlx=warn,sea_orm_migration=warn")
            .add_directive(default.into()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // Only fails when a subscriber is already installed (tests, or a second call): keep that one.
    let _ = result;
}
