//! `POST /gpu/request`, `/gpu/release`, `/gpu/renew`, `/gpu/ack`, `/gpu/cancel`: the body is checked as a
//! NATS input would be (the wire crate's validation), stored in the input stream (a PubAck on NATS, a
//! commit in the embedded mode), and answered with the coordinator's reply.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpu_coordinator_wire::{Inbound, InputKind, Outcome};
use tokio::time::Instant;

use super::schemas::{
    Accepted, AckSchema, CancelSchema, ReleaseSchema, RenewSchema, ReplySchema, RequestSchema,
};
use super::{ApiError, ErrorBody, HttpState};

mod answers;
mod prepare;
mod release_on_drop;

use answers::{listen, publish, wait_reply};
use prepare::{prepare, Prepared};
use release_on_drop::{wait_request, ReleaseOnDrop};

/// How much longer than `timeout_ms` a request's long poll waits for the coordinator's `timed_out`.
const REQUEST_MARGIN: Duration = Duration::from_secs(5);

/// How long a release, renew or cancel waits for its reply.
const REPLY_WAIT: Duration = Duration::from_secs(30);
/// Asks for a GPU and waits until the request is granted or ends waiting (at most `timeout_ms`).
///
/// When the client goes away before the answer, the request is released if this call created it (a
/// repeated `request_id` is answered with its state and left alone). When no answer comes in time (504)
/// or the coordinator stops meanwhile (503), the request stays queued: ask again with the same
/// `request_id` for its answer.
#[utoipa::path(
    post,
    path = "/gpu/request",
    tag = "inputs",
    request_body(content = RequestSchema, description = "The request fields of `<prefix>.request.<svc>` plus \
        `service_id` (required, unless the bearer token names the service). Without `request_id`, one is made up \
        and returned in the reply."),
    responses(
        (status = 200, description = "Granted", body = ReplySchema),
        (status = 202, description = "A repeated `request_id` of a paused request: it waits for `resume` (see \
            GET /gpu/control/{service_id}); or still queued after `http.max_wait_ms` (then the body is \
            `{request_id, detail}`): ask again with the `request_id`", body = ReplySchema),
        (status = 413, description = "The body is larger than `http.max_body_bytes`", body = String),
        (status = 400, description = "Invalid input, or rejected by the coordinator", body = ReplySchema),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token belongs to another service", body = ErrorBody),
        (status = 408, description = "Timed out waiting for a grant", body = ReplySchema),
        (status = 409, description = "A repeated `request_id` of a request that already ended (released, \
            cancelled, revoked)", body = ReplySchema),
        (status = 503, description = "NATS unavailable, or the coordinator is starting or stopping", body = ErrorBody),
        (status = 504, description = "The coordinator did not answer in time", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn request(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, &headers, &body, InputKind::Request)?;
    let Inbound::Request(msg) = &prepared.input else {
        unreachable!("a request subject decodes to a request")
    };
    let request_id = msg
        .request_id
        .clone()
        .expect("a validated request always has a request_id");
    let timeout = Duration::from_millis(msg.timeout_ms.unwrap_or(state.inner.default_timeout_ms));
    let js = state.connected()?.backends.gateway.clone();
    let route = listen(&state, &prepared.service, &request_id).await?;
    let subject = state.subjects().input(prepared.kind, &prepared.service);
    publish(&js, subject, prepared.payload).await?;
    let mut guard = ReleaseOnDrop::new(
        &js,
        &state,
        &prepared.service,
        &request_id,
        route,
        prepared.generated_id,
    );
    // The wait is capped (`http.max_wait_ms`): past the cap the request stays queued and the call
    // says so, rather than holding a connection for as long as `timeout_ms` says.
    let wanted = timeout.saturating_add(REQUEST_MARGIN);
    let capped = wanted > state.inner.max_wait;
    let deadline = Instant::now() + wanted.min(state.inner.max_wait);
    // A repeated id of a queued request is answered `queued` first: the grant or the timeout follows.
    let reply = wait_request(&state, &request_id, deadline, &mut guard).await;
    // The handler ends on its own (answered, its deadline passed, the coordinator stops): the guard is
    // only for a client that goes away while it waits.
    guard.disarm();
    let reply = match reply {
        Err(ApiError::GatewayTimeout(_)) if capped => {
            let still = Accepted {
                request_id: Some(request_id.clone()),
                detail: format!(
                    "still queued after {} ms, the longest a call waits (http.max_wait_ms): the \
                     request stays queued; POST it again with this request_id to wait on",
                    state.inner.max_wait.as_millis()
                ),
            };
            return Ok((StatusCode::ACCEPTED, Json(still)).into_response());
        }
        other => other?,
    };
    let status = match reply.outcome {
        Outcome::Granted => StatusCode::OK,
        Outcome::TimedOut => StatusCode::REQUEST_TIMEOUT,
        Outcome::Rejected => StatusCode::BAD_REQUEST,
        Outcome::Paused | Outcome::Queued => StatusCode::ACCEPTED,
        Outcome::Released | Outcome::Cancelled | Outcome::Revoked | Outcome::Renewed => {
            StatusCode::CONFLICT
        }
    };
    Ok((status, Json(reply)).into_response())
}

/// Publishes an input about `request_id` and answers with its reply: 200 on `expected`, 400 on `rejected`.
async fn answered(
    state: &HttpState,
    prepared: Prepared,
    request_id: &str,
    expected: Outcome,
) -> Result<Response, ApiError> {
    let js = state.connected()?.backends.gateway.clone();
    let mut route = listen(state, &prepared.service, request_id).await?;
    let subject = state.subjects().input(prepared.kind, &prepared.service);
    publish(&js, subject, prepared.payload).await?;
    let deadline = Instant::now() + REPLY_WAIT;
    let reply = wait_reply(state, &mut route, request_id, deadline, |o| {
        o == expected || o == Outcome::Rejected
    })
    .await?;
    let status = if reply.outcome == expected {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, Json(reply)).into_response())
}

/// Publishes an input that gets no reply unless rejected, and answers 202 once it is stored.
async fn stored(
    state: &HttpState,
    prepared: Prepared,
    request_id: Option<String>,
    detail: String,
) -> Result<Response, ApiError> {
    let js = state.connected()?.backends.gateway.clone();
    let subject = state.subjects().input(prepared.kind, &prepared.service);
    publish(&js, subject, prepared.payload).await?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { request_id, detail })).into_response())
}

/// Ends a lease, or a queued or paused request. Without `request_id`: everything the service holds.
#[utoipa::path(
    post,
    path = "/gpu/release",
    tag = "inputs",
    request_body(content = ReleaseSchema, description = "The fields of `<prefix>.release.<svc>` plus `service_id`."),
    responses(
        (status = 200, description = "Released", body = ReplySchema),
        (status = 202, description = "Without `request_id`: stored; each request released gets its reply on \
            NATS", body = Accepted),
        (status = 400, description = "Invalid input, or rejected (unknown request, stale fence)", body = ReplySchema),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token belongs to another service", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
        (status = 504, description = "The coordinator did not answer in time", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn release(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, &headers, &body, InputKind::Release)?;
    let Inbound::Release(msg) = &prepared.input else {
        unreachable!("a release subject decodes to a release")
    };
    match msg.request_id.clone() {
        Some(id) => answered(&state, prepared, &id, Outcome::Released).await,
        None => {
            let detail = format!(
                "stored: everything service `{}` holds or waits for is released; each request gets its reply \
                 on {}",
                prepared.service,
                state.subjects().reply(&prepared.service)
            );
            stored(&state, prepared, None, detail).await
        }
    }
}

/// Extends a held lease from now.
#[utoipa::path(
    post,
    path = "/gpu/renew",
    tag = "inputs",
    request_body(content = RenewSchema, description = "The fields of `<prefix>.renew.<svc>` plus `service_id`."),
    responses(
        (status = 200, description = "Renewed", body = ReplySchema),
        (status = 400, description = "Invalid input, or rejected (not holding, stale fence)", body = ReplySchema),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token belongs to another service", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
        (status = 504, description = "The coordinator did not answer in time", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn renew(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, &headers, &body, InputKind::Renew)?;
    let id = request_id_of(&prepared);
    answered(&state, prepared, &id, Outcome::Renewed).await
}

/// Acknowledges a `pause` (the VRAM is freed) or a `resume`.
#[utoipa::path(
    post,
    path = "/gpu/ack",
    tag = "inputs",
    request_body(content = AckSchema, description = "The fields of `<prefix>.ack.<svc>` plus `service_id`."),
    responses(
        (status = 202, description = "Stored; an ACK gets a reply only when it is rejected", body = Accepted),
        (status = 400, description = "Invalid input", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token belongs to another service", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn ack(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, &headers, &body, InputKind::Ack)?;
    let id = request_id_of(&prepared);
    let detail = format!(
        "stored; a rejection would come on {}",
        state.subjects().reply(&prepared.service)
    );
    stored(&state, prepared, Some(id), detail).await
}

/// Withdraws a queued or paused request.
#[utoipa::path(
    post,
    path = "/gpu/cancel",
    tag = "inputs",
    request_body(content = CancelSchema, description = "The fields of `<prefix>.cancel.<svc>` plus `service_id`."),
    responses(
        (status = 200, description = "Cancelled", body = ReplySchema),
        (status = 400, description = "Invalid input, or rejected (holding: release it instead)", body = ReplySchema),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token belongs to another service", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
        (status = 504, description = "The coordinator did not answer in time", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn cancel(
    State(state): State<HttpState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let prepared = prepare(&state, &headers, &body, InputKind::Cancel)?;
    let id = request_id_of(&prepared);
    answered(&state, prepared, &id, Outcome::Cancelled).await
}

/// The request id of an input that always carries one (renew, ack, cancel).
fn request_id_of(prepared: &Prepared) -> String {
    prepared
        .input
        .request_id()
        .expect("renew, ack and cancel messages carry a request_id")
        .to_string()
}

#[cfg(test)]
mod tests;
