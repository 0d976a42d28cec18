//! Storing an input through the gateway, and waiting for what the coordinator says about it.

use std::sync::Arc;
use std::time::Duration;

use gpu_coordinator_wire::{Outcome, Reply};
use tokio::time::Instant;

use super::super::{ApiError, HttpState};
use crate::ports::{Answer, AnswerRoute, Gateway};

/// Stores the input in the input stream, and returns once it is durable. The same `request_id` sent
/// again is answered by the coordinator with its current state (as over NATS).
pub(super) async fn publish(
    gateway: &Arc<dyn Gateway>,
    subject: String,
    payload: Vec<u8>,
) -> Result<(), ApiError> {
    gateway.submit(&subject, payload).await.map_err(|e| {
        let why = crate::retry::causes(&e);
        if crate::storage::is_full(&e) {
            ApiError::InsufficientStorage(format!(
                "the input was not stored, the store is full (out of space): {why}; nothing of it \
                 was kept, send it again once space is freed"
            ))
        } else {
            ApiError::Unavailable(why)
        }
    })
}

/// How long a call waits for the reader of the coordinator's answers to be open.
const READER_WAIT: Duration = Duration::from_secs(5);

/// Starts routing what the coordinator says about `request_id` of `service` to the returned route (before
/// publishing, so that nothing is missed). The answers are read from the output stream, so a NATS
/// restart between the publish and the answer loses nothing.
pub(super) async fn listen(
    state: &HttpState,
    service: &str,
    request_id: &str,
) -> Result<Box<dyn AnswerRoute>, ApiError> {
    let reader = state.connected()?.backends.gateway.answers();
    // Listening first opens the reader if it is closed (nobody waited for a while).
    let route = reader.listen(service, request_id);
    reader.ready(READER_WAIT).await.map_err(|e| {
        ApiError::Unavailable(format!("the coordinator's answers cannot be read: {e}"))
    })?;
    Ok(route)
}

/// The error of a call whose answer did not come by its deadline.
fn no_answer(request_id: &str, waited: Instant) -> ApiError {
    ApiError::GatewayTimeout(format!(
        "the coordinator did not answer about request `{request_id}` within {} ms; the input is \
         stored and will be handled when it can",
        waited.elapsed().as_millis()
    ))
}

/// The error of a call cut short by the coordinator stopping.
fn stopping(request_id: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "the coordinator is stopping; the input about request `{request_id}` is stored and will be \
         handled after its restart: send it again with this request_id for the answer"
    ))
}

/// The next thing said about the route's request, until `deadline` or until the coordinator stops.
pub(super) async fn next_answer(
    state: &HttpState,
    route: &mut Box<dyn AnswerRoute>,
    request_id: &str,
    deadline: Instant,
    waited: Instant,
) -> Result<Answer, ApiError> {
    tokio::select! {
        incoming = route.recv() => incoming.ok_or_else(|| {
            ApiError::Unavailable("the reader of the coordinator's answers stopped".into())
        }),
        _ = tokio::time::sleep_until(deadline) => Err(no_answer(request_id, waited)),
        _ = state.stop().cancelled() => Err(stopping(request_id)),
    }
}

/// Waits for the reply about the route's request whose outcome `accept`s, until `deadline`.
pub(super) async fn wait_reply(
    state: &HttpState,
    route: &mut Box<dyn AnswerRoute>,
    request_id: &str,
    deadline: Instant,
    accept: impl Fn(Outcome) -> bool,
) -> Result<Reply, ApiError> {
    let waited = Instant::now();
    loop {
        if let Answer::Reply(reply) =
            next_answer(state, route, request_id, deadline, waited).await?
        {
            if accept(reply.outcome) {
                return Ok(reply);
            }
        }
    }
}
