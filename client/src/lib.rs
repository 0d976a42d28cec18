//! The client library of the GPU Coordinator: how a service asks for a GPU, holds the lease, and
//! follows the coordinator's pause, resume and revoke orders. It speaks the wire contract
//! (`docs/protocol.md`), through the types of [`gpu_coordinator_wire`], over either of two
//! transports:
//!
//! - **NATS JetStream** ([`Client::connect`]): for a coordinator in the distributed mode, or any
//!   coordinator whose bus is NATS.
//! - **The HTTP API** ([`Client::connect_http`]): for a service without NATS, and for a coordinator
//!   in the embedded mode. Inputs are POSTs (a request is a long poll), orders come from the
//!   Server-Sent Events stream `GET /gpu/control/<service_id>`; a bearer token when the coordinator
//!   has `[http.tokens]`.
//!
//! [`Client::connect_url`] picks one from the URL. Everything after connecting (requests, leases
//! that renew themselves, workers, `release_all`, `status`) is the same over both.
//!
//! ```no_run
//! # async fn example() -> Result<(), gpu_coordinator_client::ClientError> {
//! use gpu_coordinator_client::{Client, RequestOptions};
//!
//! let client = Client::connect("nats://127.0.0.1:4222", "gpu", "chat").await?;
//! // or, over the HTTP API:
//! let client = Client::connect_http("http://127.0.0.1:8080", "chat", None).await?;
//!
//! let lease = client.request(RequestOptions::new(0).vram_mb(8_000)).await?;
//! // ... use GPU `lease.gpu()`; the lease renews itself meanwhile ...
//! lease.release().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Preemptible services use a [`Worker`], whose `on_pause` and `on_resume` handlers run when the
//! coordinator orders them; see its docs.
//!
//! # How answers come in over NATS
//!
//! Inputs (`request`, `renew`, `ack`, `release`) are JetStream publishes into `<PREFIX>_INPUT`,
//! each with a `Nats-Msg-Id` that stays the same across its retries, so a retry after a lost PubAck
//! is stored once.
//!
//! Answers are read from the stream `<PREFIX>_OUTPUT`, not from core subscriptions: two ephemeral
//! pull consumers per client, filtered to this service's `reply` and `control` subjects, starting at
//! the stream's next sequence when the client starts, and open before any request is sent. When
//! NATS restarts or the connection drops, each consumer is made anew from the last sequence it
//! handed on, so a grant or an order published meanwhile is still delivered, once. Messages are
//! handed to the waiting request or lease by `request_id`. The module `router` has the details.
//!
//! # How answers come in over HTTP
//!
//! Each POST answers with the coordinator's reply, which is handed to the waiting request or lease
//! exactly as a reply read from the output stream would be. A POST that cannot connect or gets a
//! 5xx is sent again with backoff until its deadline; a 4xx is an error with the server's sentence.
//! The control stream reconnects by itself with `Last-Event-ID`, so an order stored while it was cut
//! is delivered after the reconnect; while it is down the client is not ready and a new request
//! waits. Inputs are JSON whatever [`Client::with_encoding`] says. The module `http` has the
//! details, `sse` the parser of the stream.
//!
//! # Code map
//!
//! - `client`: [`Client`]: connecting, sending inputs with retries over either transport,
//!   [`Client::status`]; `client::request`: [`Client::request`] (waits for the grant).
//! - `router`: the table of who waits for which request id; `router::reading`: the consumers on the
//!   output stream.
//! - `http`: the HTTP transport: POSTs of inputs, the reader of the control stream; `sse` parses it.
//! - `lease`: [`Lease`], the handle, and the task that keeps a lease alive; `lease::machine` is the
//!   lease as a state machine without I/O (when to renew, what to acknowledge with which fence),
//!   tested with plain unit tests, one file per kind of input (replies, orders, timers, ending).
//! - `worker`: [`Worker`], requests whose leases run `on_pause` and `on_resume` handlers.
//! - `options`: [`RequestOptions`], request ids and message ids.
//! - `error`: [`ClientError`].
//!
//! # Invariants
//!
//! - No input about a request is published before the client reads the output stream from a point
//!   before it (over HTTP: before the control stream is open): no answer can be missed.
//! - Every `renew`, `ack` and `release` of a lease carries the lease's current fence, so the
//!   coordinator rejects anything a lease sends after it lost the GPU.
//! - A pause is acknowledged only after `on_pause` returned, and never for a lease that was revoked
//!   or released meanwhile.

#[cfg(feature = "server")]
mod answers;
mod client;
mod connect;
mod error;
mod http;
mod lease;
mod options;
mod router;
mod sse;
mod worker;

pub use client::Client;
pub use connect::{
    connect_options, inbox_prefix, redact, server_addrs, without_credentials, NatsAuth,
};
pub use error::ClientError;
pub use gpu_coordinator_wire::codec::Encoding;
pub use gpu_coordinator_wire::RejectCode;
pub use lease::{Lease, LeaseEvent, LeaseEvents, LeasePhase, LeaseWatch};
pub use options::{generate_request_id, RequestOptions};
pub use worker::{PauseOrder, ResumeOrder, Worker};

// The coordinator's own server side reads every service's answers through these (its HTTP API waits
// on an `AnswerReader`, the embedded mode feeds one, its reader service makes consumers with
// `reader_config`); no service needs them: they are there only with the `server` feature, which the
// coordinator's crate turns on.
#[cfg(feature = "server")]
pub use answers::{AnswerFeed, AnswerReader, ANSWERS_IDLE};
#[cfg(feature = "server")]
pub use router::{reader_config, Incoming, Route};
