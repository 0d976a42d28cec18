//! Accepting and serving connections, in place of `axum::serve`, which sets neither a time limit on a
//! request's headers nor a limit on connections: a client that opens connections and trickles half a
//! header into each would hold them for ever, until the process has no file descriptor left and the
//! coordinator's own connections to NATS, Redis and Postgres fail.
//!
//! Here a connection is accepted only with one of `http.max_connections` permits, given back when it
//! closes: at the limit the coordinator stops accepting, and new connections wait in the kernel's
//! backlog (they cost it no descriptor) until one closes. Each connection is HTTP/1.1 with hyper's
//! header-read timeout (`http.header_read_timeout_ms`): the headers of each request, and the idle wait
//! before a kept-alive connection's next request, must come within it, or the connection is closed. A
//! response being written (an event stream, a long poll) is not under it.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What bounds the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a connection may take to send a request's headers, and stay idle between requests.
    pub header_read_timeout: Duration,
    /// The most connections served at once.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` is cancelled; then accepts no more, asks every connection
/// to close once its response is written (long polls and event streams end at the stop themselves),
/// and returns when all have closed.
pub(crate) async fn serve(
    mut listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // The permit before the accept: at the limit, the next connection stays in the backlog.
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed; were it, nothing more could be served.
                Err(_) => break,
            },
        };
        // axum's accept retries what fails (a connection reset before it was taken, no descriptor
        // left), waiting a moment after an error that is not the connection's own.
        let (stream, remote) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
        };
        // Each write goes out at once: a streamed answer's first chunk must not wait behind the
        // headers for the client's ACK (Nagle's algorithm, up to 40 ms with a delayed ACK).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%remote, "TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let result = tokio::select! {
                    result = conn.as_mut() => result,
                    () = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                // A header that did not come in time, a client that went away: the client's
                // doing, not worth more than a debug line.
                if let Err(e) = result {
                    tracing::debug!(%remote, "HTTP connection ended: {e}");
                }
            }
            // The connection's socket is closed above, before its permit goes back: the limit counts
            // descriptors, not tasks.
            drop(permit);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
