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

/// A map keyed by secrets (bearer tokens), for `Debug`: each key written `***`, its value shown.
pub struct SecretKeys<'a, V>(pub &'a std::collections::BTreeMap<String, V>);

impl<V: std::fmt::Debug> std::fmt::Debug for SecretKeys<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.values().map(|value| ("***", value)))
            .finish()
    }
}

/// `url` without the password of its user info, for logs and messages: `redis://:secret@host` becomes
/// `redis://host`, `postgres://user:secret@host/db` becomes `postgres://user@host/db`; a query parameter
/// that carries a secret (`?password=...`, `sslpassword`, `token`, `secret`) reads `***`. Anything that
/// is not a URL comes back as it is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let mut out = match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            let host = &rest[at + 1..];
            if user.is_empty() {
                format!("{}{host}", &url[..scheme_end])
            } else {
                format!("{}{user}@{host}", &url[..scheme_end])
            }
        }
        None => url.to_owned(),
    };
    if let Some(query_start) = out.find('?') {
        let (head, tail) = out.split_at(query_start + 1);
        let (query, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
        let query = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if secret_key(key) => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out = format!("{head}{query}{fragment}");
    }
    out
}

/// Whether a URL's query parameter holds a secret.
fn secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "passwd", "secret", "token"]
        .iter()
        .any(|word| key.contains(word))
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redact_drops_the_password_only() {
        assert_eq!(redact_url("redis://:secret@h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://u:secret@h:6379"), "redis://u@h:6379");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u@h:5432/db?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("nats://svc:p%40ss@h:4222"), "nats://svc@h:4222");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("postgres://u:secret@h/db?sslmode=require&password=p2&sslpassword=p3#f"),
            "postgres://u@h/db?sslmode=require&password=***&sslpassword=***#f"
        );
        assert_eq!(redact_url("redis://h/0?token=t"), "redis://h/0?token=***");
    }
}
