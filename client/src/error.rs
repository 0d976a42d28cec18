//! The one error type of the client. A request that does not end in a grant (timed out, rejected,
//! cancelled) is an `Err` here: for a caller of [`crate::Client::request`] that is the natural shape,
//! even though the coordinator treats those outcomes as ordinary ends of a request.

use std::time::Duration;

use gpu_coordinator_wire::{Outcome, RejectCode};

/// What can go wrong when talking to the coordinator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The subject prefix or the service id is not valid (the text says which rule it breaks).
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),
    /// The first connection to NATS failed (later disconnects are retried by themselves).
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// The coordinator's HTTP API did not open the control stream when the client connected
    /// ([`crate::Client::connect_http`]): it does not answer at `url`, or it refused (a bad token).
    #[error("cannot connect to the coordinator's HTTP API at {url}: {detail}")]
    HttpConnect { url: String, detail: String },
    /// The request breaks a rule of the wire contract, so the coordinator would reject it; it was not
    /// sent. The text names the field. Over HTTP also a `400` of the API, with its sentence.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// This client is already waiting for, or holding, a request with this id.
    #[error("request `{0}` is already in use by this client: request ids must be unique")]
    DuplicateRequestId(String),
    /// The coordinator's output stream could not be read (it does not exist, or NATS is down), so no
    /// reply could be received; the request was not sent.
    #[error("the coordinator is not reachable: {0}")]
    Unavailable(String),
    /// No GPU was granted within `timeout_ms`.
    #[error("the request timed out before a GPU was granted")]
    TimedOut,
    /// The coordinator refused the input: `error` is its sentence saying what to fix, `code` the
    /// reason to decide on (see [`RejectCode`]; `None` for a refusal of the HTTP API itself, a 401
    /// or 403 for the bearer token, whose status code `error` gives).
    #[error("the coordinator rejected the input: {error}")]
    Rejected {
        code: Option<RejectCode>,
        error: String,
    },
    /// The request was withdrawn before it was granted.
    #[error("the request was cancelled")]
    Cancelled,
    /// The request id names a request that has already ended (its id was reused).
    #[error("the request had already ended ({0:?})")]
    Ended(Outcome),
    /// The lease was revoked: it expired, or a pause was not acknowledged in time. The GPU is no
    /// longer this service's.
    #[error("the lease was revoked")]
    Revoked,
    /// The coordinator did not answer in time.
    #[error("no `{expected}` reply came within {waited:?}")]
    NoReply {
        expected: &'static str,
        waited: Duration,
    },
    /// An input could not be stored in the input stream, even after retries (over HTTP, `subject`
    /// is the `POST` and its URL).
    #[error("publishing to {subject} failed: {detail}")]
    Publish { subject: String, detail: String },
    /// The status request failed or its answer could not be read.
    #[error("status request failed: {0}")]
    Status(String),
    /// The lease's background task is gone (the runtime is shutting down).
    #[error("the client was closed")]
    Closed,
}
