//! `[http]`: the HTTP API's address, tokens and limits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `http.listen`, default `127.0.0.1:8080`.
    pub listen: String,
    /// `[http.tokens]`: bearer token -> service id, or `"*"` for an operator, who may read everything
    /// (status, events, metrics, any service's control stream) but acts for no service. A service's
    /// token reads only its own service's entries of the status and the events, and not the metrics.
    /// Empty: no authentication.
    pub tokens: std::collections::BTreeMap<String, String>,
    /// `http.max_wait_ms`: the longest a `POST /gpu/request` long poll waits, default 300000 (5 min);
    /// a request still queued then is answered 202 `queued` and stays queued (ask again by its id).
    pub max_wait_ms: u64,
    /// `http.max_streams_per_service`: long-lived streams (control streams, event streams, SSE or JSON
    /// lines) each service's token may hold open, default 16; the operator (an operator token, or
    /// anyone when no tokens are configured) has as many of its own for its streams.
    pub max_streams_per_service: usize,
    /// `http.max_streams`: the services' long-lived streams in all, default 1024 (the operator's are
    /// apart, so that services that fill theirs cannot lock its page out).
    pub max_streams: usize,
    /// `http.max_body_bytes`: the largest request body, default 65536.
    pub max_body_bytes: usize,
    /// `http.header_read_timeout_ms`: how long a connection may take to send a request's headers, and
    /// how long a kept-alive connection may stay idle between requests, default 10000; then it is
    /// closed. A client that trickles its headers would otherwise hold its connection for ever.
    pub header_read_timeout_ms: u64,
    /// `http.max_connections`: the most connections served at once, default 1024. Beyond it the
    /// coordinator stops accepting (new ones wait in the kernel's backlog) until one closes, so that
    /// clients cannot take every file descriptor and starve its own connections to NATS, Redis and
    /// Postgres. Each open stream and long poll holds one.
    pub max_connections: usize,
}
impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_owned(),
            tokens: BTreeMap::new(),
            max_wait_ms: 300_000,
            max_streams_per_service: 16,
            max_streams: 1024,
            max_body_bytes: 65_536,
            header_read_timeout_ms: 10_000,
            max_connections: 1024,
        }
    }
}
/// `[http.tokens]` holds secrets: `Debug` shows each token as `***`, so that the configuration can be
/// logged.
impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("tokens", &crate::telemetry::SecretKeys(&self.tokens))
            .field("max_wait_ms", &self.max_wait_ms)
            .field("max_streams_per_service", &self.max_streams_per_service)
            .field("max_streams", &self.max_streams)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}
