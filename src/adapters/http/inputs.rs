//! `POST /gpu/request`, `/gpu/release`, `/gpu/renew`, `/gpu/ack`, `/gpu/cancel`: the body is checked as a
//! NATS input would be (the wire crate's validation), stored in the input stream (a PubAck on NATS, a
//! commit in the embedded mode), and answered with the coordinator's reply.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpu_coordinator_client::{Incoming, Route};
use gpu_coordinator_wire::{
    decode_input, valid_service_id, EventKind, Inbound, InputKind, Outcome, Reply,
};
use serde_json::Value;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::schemas::{
    Accepted, AckSchema, CancelSchema, ReleaseSchema, RenewSchema, ReplySchema, RequestSchema,
};
use super::{ApiError, ErrorBody, HttpState};
use crate::ports::Gateway;

/// How much longer than `timeout_ms` a request's long poll waits for the coordinator's `timed_out`.
const REQUEST_MARGIN: Duration = Duration::from_secs(5);

/// How long a release, renew or cancel waits for its reply.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// A body checked like a NATS input, ready to publish.
struct Prepared {
    service: String,
    kind: InputKind,
    payload: Vec<u8>,
    input: Inbound,
    /// A request whose `request_id` was made up here: nobody else can know it, so this call creates it.
    generated_id: bool,
}

/// Reads the body, finds its service (`service_id`, else the token's), checks the caller may act for
/// it, fills in a `request_id` for a request without one, and validates it as the coordinator will.
fn prepare(
    state: &HttpState,
    headers: &HeaderMap,
    body: &[u8],
    kind: InputKind,
) -> Result<Prepared, ApiError> {
    let caller = state.caller(headers)?.map(str::to_owned);
    let mut value = parse_body(body, kind)?;
    let fields = value
        .as_object_mut()
        .expect("parse_body returns only JSON objects");
    let service = match fields.get("service_id") {
        Some(Value::String(s)) if valid_service_id(s) => s.clone(),
        Some(Value::String(s)) => {
            return Err(ApiError::BadRequest(format!(
                "field `service_id` must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`, got {s:?}"
            )))
        }
        None | Some(Value::Null) => caller.clone().ok_or_else(|| {
            ApiError::BadRequest(
                "field `service_id` is required: the id of the service this input is for (1 to 64 \
                 characters of A-Z, a-z, 0-9, `_` and `-`)"
                    .into(),
            )
        })?,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "field `service_id`: expected a string, got {}",
                describe(other)
            )))
        }
    };
    state.authorize(headers, &service)?;
    // The wire contract requires `priority`; an HTTP body may leave it out for its service's
    // `default_priority`, filled in here so that the stored input carries the priority it is
    // scheduled at (the core checks it against the service's `max_priority` like any other).
    if kind == InputKind::Request && matches!(fields.get("priority"), None | Some(Value::Null)) {
        if let Some(priority) = state
            .inner
            .services
            .get(&service)
            .and_then(|policy| policy.default_priority)
        {
            fields.insert("priority".into(), Value::from(priority));
        }
    }
    let generated_id =
        kind == InputKind::Request && matches!(fields.get("request_id"), None | Some(Value::Null));
    if generated_id {
        fields.insert("request_id".into(), Value::String(new_request_id(&service)));
    }
    let payload = serde_json::to_vec(&value).expect("a JSON value always serializes");
    let subject = state.subjects().input(kind, &service);
    match decode_input(state.subjects(), &subject, None, &payload, 0) {
        Ok(decoded) => Ok(Prepared {
            service,
            kind,
            // What is stored is the typed message encoded again: fields the coordinator does not know
            // are dropped here, so that a caller cannot store arbitrary bytes in the input stream.
            payload: reencode(&decoded.input),
            input: decoded.input,
            generated_id,
        }),
        Err(rejection) => Err(ApiError::BadRequest(rejection.error)),
    }
}

/// The input as the coordinator reads it, in JSON: only its known fields.
fn reencode(input: &Inbound) -> Vec<u8> {
    let encoded = match input {
        Inbound::Request(m) => serde_json::to_vec(m),
        Inbound::Release(m) => serde_json::to_vec(m),
        Inbound::Renew(m) => serde_json::to_vec(m),
        Inbound::Ack(m) => serde_json::to_vec(m),
        Inbound::Cancel(m) => serde_json::to_vec(m),
    };
    encoded.expect("a typed message always serializes")
}

fn parse_body(body: &[u8], kind: InputKind) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(format!(
            "the body is empty: expected a JSON object with the fields of a `{}` input and `service_id`",
            kind.as_str()
        )));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(other) => Err(ApiError::BadRequest(format!(
            "the body must be a JSON object of field names to values, got {}",
            describe(&other)
        ))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// `<svc>-http-<random>`: the handler must know the id to find the reply.
fn new_request_id(service: &str) -> String {
    format!("{service}-http-{:016x}", rand::random::<u64>())
}

/// Stores the input in the input stream, and returns once it is durable. The same `request_id` sent
/// again is answered by the coordinator with its current state (as over NATS).
async fn publish(
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
async fn listen(state: &HttpState, service: &str, request_id: &str) -> Result<Route, ApiError> {
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
async fn next_answer(
    state: &HttpState,
    route: &mut Route,
    request_id: &str,
    deadline: Instant,
    waited: Instant,
) -> Result<Incoming, ApiError> {
    tokio::select! {
        incoming = route.recv() => incoming.ok_or_else(|| {
            ApiError::Unavailable("the reader of the coordinator's answers stopped".into())
        }),
        _ = tokio::time::sleep_until(deadline) => Err(no_answer(request_id, waited)),
        _ = state.stop().cancelled() => Err(stopping(request_id)),
    }
}

/// Waits for the reply about the route's request whose outcome `accept`s, until `deadline`.
async fn wait_reply(
    state: &HttpState,
    route: &mut Route,
    request_id: &str,
    deadline: Instant,
    accept: impl Fn(Outcome) -> bool,
) -> Result<Reply, ApiError> {
    let waited = Instant::now();
    loop {
        if let Incoming::Reply(reply) =
            next_answer(state, route, request_id, deadline, waited).await?
        {
            if accept(reply.outcome) {
                return Ok(reply);
            }
        }
    }
}

/// What the coordinator's answers say of who created a request.
enum Origin {
    /// Its `requested` event: the coordinator created it for this call's input.
    Created,
    /// A `queued` or `paused` reply: the answer to a repeated id, the request is someone else's.
    Repeated,
    /// Neither yet.
    Unknown,
}

fn origin(incoming: &Incoming) -> Origin {
    match incoming {
        Incoming::Event(e) if e.kind == EventKind::Requested => Origin::Created,
        Incoming::Reply(r) if matches!(r.outcome, Outcome::Queued | Outcome::Paused) => {
            Origin::Repeated
        }
        _ => Origin::Unknown,
    }
}

/// Releases a request that this call created when its long poll is abandoned: the client went away (the
/// handler's future is dropped), so nobody would learn of its grant, and it must not hold a GPU until its
/// lease expires. Armed once the coordinator says the request is this call's (its `requested` event, or
/// from the start for an id made up here); a repeated `request_id` names a request that someone else (a
/// NATS service, an earlier call) owns. It never fires when the handler itself ends, its own deadline
/// included (the coordinator ends a request that waited `timeout_ms` with `timed_out`), nor when the
/// coordinator stops: the request stays queued, and the client asks again with its `request_id`.
struct ReleaseOnDrop {
    release: Option<(Arc<dyn Gateway>, String, Vec<u8>)>,
    armed: bool,
    /// The answers about the request; while undecided, a client that goes away leaves the wait for the
    /// `requested` event to a task.
    route: Option<Route>,
    stop: CancellationToken,
}

impl ReleaseOnDrop {
    /// A guard armed at once for an id made up here (`generated`), else undecided until the answers on
    /// `route` say.
    fn new(
        js: &Arc<dyn Gateway>,
        state: &HttpState,
        service: &str,
        request_id: &str,
        route: Route,
        generated: bool,
    ) -> Self {
        let body = serde_json::json!({ "request_id": request_id });
        ReleaseOnDrop {
            release: Some((
                js.clone(),
                state.subjects().release(service),
                serde_json::to_vec(&body).expect("a JSON value always serializes"),
            )),
            armed: generated,
            route: Some(route),
            stop: state.stop().clone(),
        }
    }

    /// Takes what the coordinator said into account.
    fn learn(&mut self, incoming: &Incoming) {
        match origin(incoming) {
            Origin::Created => self.armed = self.release.is_some(),
            // For good: a disarmed guard cannot be armed again.
            Origin::Repeated => self.disarm(),
            Origin::Unknown => {}
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
        self.release = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if self.stop.is_cancelled() {
            return;
        }
        let Some((js, subject, payload)) = self.release.take() else {
            return;
        };
        let undecided = if self.armed { None } else { self.route.take() };
        if !self.armed && undecided.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Some(route) = undecided {
                // The client left before this call learnt whether it created the request: the
                // coordinator's answers about the id, if they come, say so.
                if !created_here(route).await {
                    return;
                }
            }
            tracing::info!(%subject, "HTTP: a long poll was abandoned; releasing its request");
            if let Err(e) = publish(&js, subject, payload).await {
                tracing::warn!("releasing an abandoned request: {e}");
            }
        });
    }
}

/// How long an abandoned call's request may take to show whether this call created it.
const DECIDE_WAIT: Duration = Duration::from_secs(60);

/// Whether the answers say the request was created for this call (within [`DECIDE_WAIT`]).
async fn created_here(mut route: Route) -> bool {
    let wait = async {
        while let Some(incoming) = route.recv().await {
            match origin(&incoming) {
                Origin::Created => return true,
                Origin::Repeated => return false,
                Origin::Unknown => {}
            }
        }
        false
    };
    tokio::time::timeout(DECIDE_WAIT, wait)
        .await
        .unwrap_or(false)
}

/// Waits for the answer to a request (the first reply about it that is not `queued`), until `deadline`,
/// while `guard` learns from the answers whether the request is this call's. A `queued` or `paused`
/// reply is the answer to a repeated id: the request is, or may be, someone else's (when another input
/// repeated the id of a request this call created, the coordinator's own `timed_out` still ends it).
async fn wait_request(
    state: &HttpState,
    request_id: &str,
    deadline: Instant,
    guard: &mut ReleaseOnDrop,
) -> Result<Reply, ApiError> {
    let waited = Instant::now();
    loop {
        let route = guard
            .route
            .as_mut()
            .expect("the guard keeps its route while the call waits");
        let incoming = next_answer(state, route, request_id, deadline, waited).await?;
        guard.learn(&incoming);
        if let Incoming::Reply(reply) = incoming {
            if reply.outcome != Outcome::Queued {
                return Ok(reply);
            }
        }
    }
}

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
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use gpu_coordinator_wire::Subjects;
    use tokio_util::sync::CancellationToken;

    fn state() -> HttpState {
        HttpState::new(
            &Config::default(),
            Subjects::default(),
            Metrics::new(),
            CancellationToken::new(),
        )
    }

    fn bad(body: &str, kind: InputKind) -> String {
        match prepare(&state(), &HeaderMap::new(), body.as_bytes(), kind) {
            Err(ApiError::BadRequest(e)) => e,
            Err(other) => panic!("expected 400, got {other:?}"),
            Ok(_) => panic!("expected 400 for {body}"),
        }
    }

    #[test]
    fn a_request_without_id_gets_one_and_keeps_its_fields() {
        let p = prepare(
            &state(),
            &HeaderMap::new(),
            br#"{"service_id":"chat","priority":0,"vram_mb":8000,"extra":1}"#,
            InputKind::Request,
        )
        .expect("valid");
        let Inbound::Request(msg) = p.input else {
            panic!("a request")
        };
        let id = msg.request_id.expect("an id");
        assert!(id.starts_with("chat-http-"), "{id}");
        assert_eq!(msg.vram_mb, Some(8000));
        let published: Value = serde_json::from_slice(&p.payload).expect("json");
        assert_eq!(published["request_id"], id.as_str());
        assert_eq!(
            published.get("extra"),
            None,
            "an unknown field is not stored"
        );
        assert_eq!(p.service, "chat");
        assert!(p.generated_id);

        // A given id may be a repeated one: this call does not know that it creates the request.
        let p = prepare(
            &state(),
            &HeaderMap::new(),
            br#"{"service_id":"chat","request_id":"job-1","priority":0}"#,
            InputKind::Request,
        )
        .expect("valid");
        assert!(!p.generated_id);
    }

    #[test]
    fn a_body_without_priority_gets_its_services_default_priority() {
        let mut config = Config::default();
        config.services.named.insert(
            "asr".into(),
            crate::config::ServiceConfig {
                default_priority: Some(2),
                ..Default::default()
            },
        );
        let state = HttpState::new(
            &config,
            Subjects::default(),
            Metrics::new(),
            CancellationToken::new(),
        );
        let priority = |body: &str| {
            let p = prepare(
                &state,
                &HeaderMap::new(),
                body.as_bytes(),
                InputKind::Request,
            )
            .map_err(|e| format!("{e:?}"))?;
            let stored: Value = serde_json::from_slice(&p.payload).expect("json");
            Ok::<_, String>(stored["priority"].clone())
        };
        // Left out (or null): the default, stored with the input.
        assert_eq!(priority(r#"{"service_id":"asr"}"#), Ok(Value::from(2)));
        assert_eq!(
            priority(r#"{"service_id":"asr","priority":null}"#),
            Ok(Value::from(2))
        );
        // Given: what was given (the core checks it against max_priority).
        assert_eq!(
            priority(r#"{"service_id":"asr","priority":0}"#),
            Ok(Value::from(0))
        );
        // A service without a default must give one, as over NATS.
        let e = priority(r#"{"service_id":"chat"}"#).expect_err("no default");
        assert!(e.contains("`priority`"), "{e}");
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        assert!(bad("", InputKind::Request).contains("the body is empty"));
        assert!(bad("{\"priority\": 1", InputKind::Request).contains("not valid JSON"));
        assert!(bad("[1]", InputKind::Request).contains("got an array"));
        assert!(bad(r#"{"priority": 1}"#, InputKind::Request)
            .contains("field `service_id` is required"));
        assert!(
            bad(r#"{"service_id": 7, "priority": 1}"#, InputKind::Request)
                .contains("field `service_id`: expected a string, got 7")
        );
        assert!(bad(
            r#"{"service_id": "a b", "priority": 1}"#,
            InputKind::Request
        )
        .contains("field `service_id`"));
        let e = bad(
            r#"{"service_id": "chat", "priority": "high"}"#,
            InputKind::Request,
        );
        assert!(e.contains("`priority`"), "{e}");
        let e = bad(
            r#"{"service_id": "chat", "priority": 300}"#,
            InputKind::Request,
        );
        assert!(e.contains("`priority`"), "{e}");
        let e = bad(r#"{"service_id": "chat"}"#, InputKind::Renew);
        assert!(e.contains("`request_id`"), "{e}");
        let e = bad(
            r#"{"service_id": "chat", "request_id": "r", "action": "slept"}"#,
            InputKind::Ack,
        );
        assert!(e.contains("`action`"), "{e}");
    }
}
