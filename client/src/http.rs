//! The HTTP transport: inputs are POSTed to the coordinator's HTTP API, and control orders are read
//! from its Server-Sent Events stream `GET /gpu/control/{service_id}`. The same behaviour as the
//! Python client's (`clients/python/src/gpu_coordinator/_http.py`).
//!
//! - Every POST answers with the coordinator's reply when there is one (`granted`, `renewed`,
//!   `released`, `rejected`, ...). It is handed to [`Routes`] exactly as a reply read from the output
//!   stream over NATS would be, so the request and the lease machine see the same messages whichever
//!   transport carries them.
//! - `POST /gpu/request` is a long poll. `202` without a reply means that it waited as long as a call
//!   may (`http.max_wait_ms`): the same `request_id` is POSTed again to wait on; a `queued` reply
//!   too. A `paused` reply (a reused id of a paused request) ends the POST: the `resume` comes on the
//!   control stream.
//! - A POST that cannot connect, or answers 5xx (503: the coordinator is starting, stopping or cut
//!   off from its bus; 504: no answer in time, the input is stored; 507: the store is full), is sent
//!   again with backoff until its deadline, as a NATS publish is. 400 is
//!   [`ClientError::InvalidRequest`], any other 4xx (401, 403: the token) [`ClientError::Rejected`],
//!   each with the server's `error` sentence.
//! - The control stream reconnects with backoff, sending `Last-Event-ID` (the stream sequence of the
//!   last order seen), so the orders stored meanwhile are delivered after a cut. While it is down the
//!   client is not ready: a new request waits for it, as it waits for the NATS consumers. Before
//!   the first order there is no id to resume from: a stream cut then resumes from the orders stored
//!   after the reconnect (the coordinator gives no position before its first event).

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use gpu_coordinator_wire::{Control, InputKind, Outcome, Reply, StatusDoc};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::router::{Incoming, Readiness, Routes};
use crate::sse::SseParser;
use crate::ClientError;

/// How long [`crate::Client::connect_http`] tries to open the control stream.
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long one TCP connect may take.
const TCP_CONNECT: Duration = Duration::from_secs(5);
/// Nothing at all on the control stream for this long (the coordinator sends a keep-alive comment
/// every 15 s): the connection is taken for dead and opened again.
const IDLE: Duration = Duration::from_secs(45);
/// Backoff between the attempts of a POST.
const POST_RETRY_MIN: Duration = Duration::from_millis(50);
const POST_RETRY_MAX: Duration = Duration::from_secs(2);
/// Backoff between attempts to open the control stream.
const STREAM_RETRY_MIN: Duration = Duration::from_millis(100);
const STREAM_RETRY_MAX: Duration = Duration::from_secs(5);
/// A control stream that stayed open this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// How much of a body that is not JSON an error quotes.
const QUOTE: usize = 200;

/// The coordinator's HTTP API for one service.
pub(crate) struct Http {
    /// The base URL, without a trailing `/`.
    base: String,
    http: reqwest::Client,
    service_id: String,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Http").field("base", &self.base).finish()
    }
}

/// Why a call did not get an answer it can use.
enum Failure {
    /// Worth trying again (no connection, 5xx); the text says what happened.
    Retry(String),
    /// Trying again would not help.
    Fatal(ClientError),
}

/// What a POST was answered.
enum Answered {
    /// The coordinator's reply about the input.
    Reply(Reply),
    /// Stored (`202` of an ACK or of a release without request id): no reply comes.
    Stored,
    /// A long poll that waited as long as a call may: POST it again.
    WaitOn,
}

fn backoff(min: Duration, max: Duration) -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Http {
    /// The API at `base_url` (`http://host:port`, maybe with a path before `/gpu/...`), acting as
    /// `service_id`, with the bearer `token` if any.
    pub(crate) fn new(
        base_url: &str,
        service_id: &str,
        token: Option<&str>,
    ) -> Result<Http, ClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| ClientError::InvalidConfig(format!("`{base}` is not an HTTP URL: {e}")))?;
        match url.scheme() {
            "http" => {}
            "https" => {
                return Err(ClientError::InvalidConfig(format!(
                "`{base}`: this build of the client speaks plain HTTP only (reqwest without a TLS \
                     feature); reach the coordinator over http://, or over NATS with TLS (tls://)"
            )))
            }
            other => {
                return Err(ClientError::InvalidConfig(format!(
                    "`{base}` is not an HTTP URL: the scheme is `{other}`, expected http://"
                )))
            }
        }
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ClientError::InvalidConfig(
                    "the bearer token must be visible ASCII, without line breaks".into(),
                )
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(TCP_CONNECT)
            .tcp_keepalive(Duration::from_secs(15))
            .build()
            .map_err(|e| ClientError::InvalidConfig(format!("an HTTP client for `{base}`: {e}")))?;
        Ok(Http {
            base,
            http,
            service_id: service_id.to_owned(),
        })
    }

    /// The base URL the client talks to.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn control_url(&self) -> String {
        format!("{}/gpu/control/{}", self.base, self.service_id)
    }

    /// Opens the control stream for the first time: retried while the coordinator does not answer,
    /// until [`CONNECT_WAIT`]; an answer that says no (a bad token: 401, 403) is an error at once.
    pub(crate) async fn open_first(&self) -> Result<reqwest::Response, ClientError> {
        let url = self.control_url();
        let give_up = Instant::now() + CONNECT_WAIT;
        let mut delays = backoff(STREAM_RETRY_MIN, STREAM_RETRY_MAX);
        loop {
            let why =
                match tokio::time::timeout_at(give_up.into(), open_control(&self.http, &url, None))
                    .await
                {
                    Ok(Ok(response)) => return Ok(response),
                    Ok(Err(Failure::Fatal(error))) => {
                        return Err(ClientError::HttpConnect {
                            url: url.clone(),
                            detail: error.to_string(),
                        })
                    }
                    Ok(Err(Failure::Retry(why))) => why,
                    Err(_) => "no answer".to_owned(),
                };
            let delay = delays.next().unwrap_or(STREAM_RETRY_MAX);
            if Instant::now() + delay >= give_up {
                return Err(ClientError::HttpConnect {
                    url,
                    detail: format!(
                        "the coordinator did not open the control stream within {CONNECT_WAIT:?}: \
                         {why}"
                    ),
                });
            }
            tracing::debug!("opening {url}: {why}; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Reads the control stream in a task of its own, from the response `first` on and again after
    /// every cut, handing each order to `routes`, until `shutdown`. The receiver says whether the
    /// stream is open now.
    pub(crate) fn spawn_control(
        &self,
        first: reqwest::Response,
        routes: Arc<Routes>,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Readiness> {
        let (ready_tx, ready_rx) = watch::channel(Readiness::Ready);
        let reader = ControlReader {
            http: self.http.clone(),
            url: self.control_url(),
            service_id: self.service_id.clone(),
            routes,
            ready: ready_tx,
            shutdown,
            parser: SseParser::default(),
        };
        tokio::spawn(reader.run(first));
        ready_rx
    }

    /// POSTs an input (`payload` is its JSON message) to `/gpu/<kind>`, with `service_id`, and hands
    /// the reply it is answered with to `routes`. Tried again (see the module docs) until
    /// `deadline`; a request's long poll itself is not cut short by it (its caller waits as long as
    /// the request may), only its attempts to connect.
    pub(crate) async fn post(
        &self,
        kind: InputKind,
        payload: &[u8],
        deadline: Instant,
        routes: &Routes,
    ) -> Result<(), ClientError> {
        let url = format!("{}/gpu/{}", self.base, kind.as_str());
        let body = with_service(payload, &self.service_id)?;
        let long_poll = kind == InputKind::Request;
        let mut retry_until = deadline;
        let mut delays = backoff(POST_RETRY_MIN, POST_RETRY_MAX);
        loop {
            let attempt = self.post_once(&url, kind, body.clone());
            let answered = if long_poll {
                attempt.await
            } else {
                tokio::time::timeout_at(deadline.into(), attempt)
                    .await
                    .unwrap_or_else(|_| Err(Failure::Retry("no answer before the deadline".into())))
            };
            let why = match answered {
                Ok(Answered::Reply(reply)) => {
                    let outcome = reply.outcome;
                    routes.dispatch(&self.service_id, Incoming::Reply(reply));
                    if long_poll && outcome == Outcome::Queued {
                        retry_until =
                            retry_until.max(Instant::now() + crate::client::PUBLISH_RETRY);
                        delays = backoff(POST_RETRY_MIN, POST_RETRY_MAX);
                        continue;
                    }
                    return Ok(());
                }
                Ok(Answered::Stored) => return Ok(()),
                Ok(Answered::WaitOn) => {
                    tracing::debug!(url, "the long poll waited its longest; waiting on");
                    retry_until = retry_until.max(Instant::now() + crate::client::PUBLISH_RETRY);
                    delays = backoff(POST_RETRY_MIN, POST_RETRY_MAX);
                    continue;
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry(why)) => why,
            };
            let delay = delays.next().unwrap_or(POST_RETRY_MAX);
            if Instant::now() + delay >= retry_until {
                return Err(ClientError::Publish {
                    subject: format!("POST {url}"),
                    detail: why,
                });
            }
            tracing::debug!(url, "POST failed, retrying: {why}");
            tokio::time::sleep(delay).await;
        }
    }

    async fn post_once(
        &self,
        url: &str,
        kind: InputKind,
        body: Vec<u8>,
    ) -> Result<Answered, Failure> {
        let response = self
            .http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::Retry(describe(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| Failure::Retry(format!("reading the answer: {}", describe(&e))))?;
        classify(kind, status, &body)
    }

    /// `GET /gpu/status`.
    pub(crate) async fn status(&self) -> Result<StatusDoc, ClientError> {
        let url = format!("{}/gpu/status", self.base);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ClientError::Status(format!("GET {url}: {}", describe(&e))))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ClientError::Status(format!("GET {url}: {}", describe(&e))))?;
        if !status.is_success() {
            return Err(ClientError::Status(format!(
                "GET {url}: {} (HTTP {})",
                error_text(&body),
                status.as_u16()
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Status(format!("GET {url}: not a status document: {e}")))
    }
}

/// What an answer to a POST means (see the module docs).
fn classify(kind: InputKind, status: StatusCode, body: &[u8]) -> Result<Answered, Failure> {
    if status.is_server_error() {
        return Err(Failure::Retry(format!(
            "{} (HTTP {})",
            error_text(body),
            status.as_u16()
        )));
    }
    let doc: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(doc) = doc.as_ref().filter(|d| d.get("outcome").is_some()) {
        return match serde_json::from_value::<Reply>(doc.clone()) {
            Ok(reply) => Ok(Answered::Reply(reply)),
            Err(e) => Err(Failure::Fatal(ClientError::Rejected {
                code: None,
                error: format!(
                    "the coordinator's answer (HTTP {}) is not a reply: {e}",
                    status.as_u16()
                ),
            })),
        };
    }
    if status == StatusCode::ACCEPTED && kind == InputKind::Request {
        return Ok(Answered::WaitOn);
    }
    if status.is_success() {
        return Ok(Answered::Stored);
    }
    let error = format!("{} (HTTP {})", error_text(body), status.as_u16());
    Err(Failure::Fatal(if status == StatusCode::BAD_REQUEST {
        ClientError::InvalidRequest(error)
    } else {
        ClientError::Rejected { code: None, error }
    }))
}

/// The `error` sentence of an error body, else (a proxy's page) the start of the body.
fn error_text(body: &[u8]) -> String {
    if let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::String(error)) = doc.get("error") {
            return error.clone();
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "no explanation given".to_owned();
    }
    match text.char_indices().nth(QUOTE) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// A reqwest error with its causes (reqwest's own text is often only "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The JSON message `payload` with `service_id` set (the HTTP API wants it in the body).
fn with_service(payload: &[u8], service_id: &str) -> Result<Vec<u8>, ClientError> {
    let mut doc: serde_json::Map<String, Value> = serde_json::from_slice(payload)
        .map_err(|e| ClientError::InvalidRequest(format!("an input that is not JSON: {e}")))?;
    doc.entry("service_id")
        .or_insert_with(|| Value::String(service_id.to_owned()));
    Ok(serde_json::to_vec(&doc).expect("a JSON object always serializes"))
}

/// Sends `GET` for the control stream (after `last_event_id`, if any); the response once it is a
/// `200`.
async fn open_control(
    http: &reqwest::Client,
    url: &str,
    last_event_id: Option<&str>,
) -> Result<reqwest::Response, Failure> {
    let mut request = http.get(url).header(ACCEPT, "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Failure::Retry(describe(&e)))?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response);
    }
    let body = response.bytes().await.unwrap_or_default();
    let error = format!("{} (HTTP {})", error_text(&body), status.as_u16());
    // Too many streams (429) may pass; 401, 403, 400, 404 will not.
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        Err(Failure::Retry(error))
    } else {
        Err(Failure::Fatal(ClientError::Rejected { code: None, error }))
    }
}

/// The task that reads the control stream.
struct ControlReader {
    http: reqwest::Client,
    url: String,
    service_id: String,
    routes: Arc<Routes>,
    ready: watch::Sender<Readiness>,
    shutdown: CancellationToken,
    /// Kept across reconnects for the last event id; each stream gets a fresh one otherwise.
    parser: SseParser,
}

impl ControlReader {
    async fn run(mut self, first: reqwest::Response) {
        let mut response = Some(first);
        let mut delays = backoff(STREAM_RETRY_MIN, STREAM_RETRY_MAX);
        loop {
            let opened = match response.take() {
                Some(response) => Ok(response),
                None => {
                    let last = self.parser.last_event_id().map(str::to_owned);
                    tokio::select! {
                        () = self.shutdown.cancelled() => return,
                        opened = open_control(&self.http, &self.url, last.as_deref()) => opened,
                    }
                }
            };
            let why = match opened {
                Ok(response) => {
                    tracing::debug!(url = self.url, resume_after = ?self.parser.last_event_id(), "control stream open");
                    self.ready.send_if_modified(|r| {
                        let changed = *r != Readiness::Ready;
                        *r = Readiness::Ready;
                        changed
                    });
                    let opened_at = Instant::now();
                    let Some(why) = self.read(response).await else {
                        return;
                    };
                    if opened_at.elapsed() >= STABLE {
                        delays = backoff(STREAM_RETRY_MIN, STREAM_RETRY_MAX);
                    }
                    why
                }
                Err(Failure::Retry(why)) => why,
                Err(Failure::Fatal(error)) => error.to_string(),
            };
            tracing::warn!(
                "the control stream {} is down: {why}; opening it again",
                self.url
            );
            self.ready.send_replace(Readiness::Starting(Some(format!(
                "the coordinator's control stream {} is not open: {why}",
                self.url
            ))));
            let delay = delays.next().unwrap_or(STREAM_RETRY_MAX);
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Reads one open stream until it ends (why) or the client shuts down (`None`).
    async fn read(&mut self, response: reqwest::Response) -> Option<String> {
        let mut body = response.bytes_stream();
        // A fresh stream: an event cut off with the previous one is not continued by this one.
        self.parser = SseParser::resuming(self.parser.last_event_id().map(str::to_owned));
        loop {
            let chunk = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                chunk = tokio::time::timeout(IDLE, body.next()) => chunk,
            };
            let bytes = match chunk {
                Err(_) => return Some(format!("nothing came for {IDLE:?}")),
                Ok(None) => return Some("the coordinator ended the stream".to_owned()),
                Ok(Some(Err(e))) => return Some(describe(&e)),
                Ok(Some(Ok(bytes))) => bytes,
            };
            for event in self.parser.push(&bytes) {
                match serde_json::from_str::<Control>(&event.data) {
                    Ok(control) => {
                        tracing::debug!(id = ?event.id, action = event.event, request_id = control.request_id, "control order");
                        self.routes
                            .dispatch(&self.service_id, Incoming::Control(control));
                    }
                    Err(e) => tracing::warn!(
                        id = ?event.id,
                        "an event of the control stream that is not a control order: {e}"
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
