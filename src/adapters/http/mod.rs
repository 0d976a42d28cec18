//! The HTTP API (axum), the same contract as NATS (`docs/protocol.md`, "HTTP") for services without a
//! NATS client, and what operators look at.
//!
//! A handler never touches the scheduler: an input is checked with the wire crate's validation, then
//! submitted to the bus through the [`Gateway`] port, into the same input stream as NATS inputs (so the
//! audit trail and the order are one), and the handler waits for the coordinator's answer through the
//! gateway's answer reader, listened to before submitting. On NATS that is JetStream consumers on the
//! output stream, recreated after a reconnect, so an answer published while NATS restarts still
//! arrives; in the embedded mode it is the SQLite bus's own. The status comes from the driver through a
//! command (the [`DriverStatus`] port); control orders and events are read from the output stream.
//! Routes:
//!
//! - `POST /gpu/request` (long poll), `/gpu/release`, `/gpu/renew`, `/gpu/ack`, `/gpu/cancel`
//! - `GET /gpu/status`, `GET /gpu/control/{service_id}` (Server-Sent Events)
//! - `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /openapi.json`
//!
//! With tokens given ([`HttpSettings::tokens`], from `[http.tokens]`), every `/gpu/` route and
//! `/metrics` want `Authorization: Bearer <token>`; a service's token acts only for its own service and
//! reads only its own service's entries of the status and the events, an operator's reads everything
//! and acts for none.

mod control;
mod error;
mod events;
mod inputs;
mod openapi;
mod ops;
mod schemas;
pub(crate) mod server;
mod sse;
mod ui;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{header, HeaderMap, Method, Uri};
use axum::routing::{get, post};
use axum::Router;
use gpu_coordinator_wire::{StatusDoc, Subjects};
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, ErrorBody};
pub use openapi::openapi;
pub use server::Limits;

use crate::metrics::Metrics;
use crate::ports::{DriverStatus, Gateway, Journal, Leadership, Leases};

/// How long a handler waits for the driver's status document.
const STATUS_WAIT: Duration = Duration::from_secs(5);

/// How long `GET /gpu/status` waits for the driver while a store is full: it answers at once when it
/// can, and it cannot while it retries a write the store refused.
const STATUS_WAIT_FULL: Duration = Duration::from_millis(500);

/// What the handlers need once the coordinator is connected: the bus inputs are submitted to and
/// answers read from (NATS, or the embedded bus), the ports readiness pings, and the driver.
#[derive(Clone)]
pub struct Backends {
    pub gateway: Arc<dyn Gateway>,
    pub journal: Arc<dyn Journal>,
    pub leases: Arc<dyn Leases>,
    /// Who leads, for a standby to say so.
    pub leadership: Arc<dyn Leadership>,
    /// The status document of the driver this process runs.
    pub driver: Arc<dyn DriverStatus>,
    /// What each backend is, for messages.
    pub labels: Labels,
}

/// The names of the backends in use (`NATS`, `Redis`, `Postgres`; `SQLite`, ...), for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labels {
    pub bus: &'static str,
    pub leases: &'static str,
    pub journal: &'static str,
}

/// What the HTTP API is given (by the composition root, from `[http]`, `request.default_timeout_ms` and
/// `[services]`).
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Bearer token -> whom it acts for. Empty: no authentication.
    pub tokens: BTreeMap<String, TokenHolder>,
    /// The timeout of a request that gives none, in ms.
    pub default_timeout_ms: u64,
    /// What each service may ask for: here, the `default_priority` of a request body that gives none.
    pub services: gpu_coordinator_core::ServicePolicies,
    /// The longest a `POST /gpu/request` long poll waits; a request still queued then is answered 202
    /// `queued`.
    pub max_wait: Duration,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
    /// The long-lived streams (control and event streams) each service may hold open; the operator
    /// has as many of its own.
    pub max_streams_per_service: usize,
    /// The services' long-lived streams in all (the operator's are apart).
    pub max_streams: usize,
    /// What bounds the connections.
    pub limits: Limits,
}

/// The tokens are secrets: `Debug` shows each as `***`.
impl std::fmt::Debug for HttpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSettings")
            .field("tokens", &crate::telemetry::SecretKeys(&self.tokens))
            .field("default_timeout_ms", &self.default_timeout_ms)
            .field("services", &self.services)
            .field("max_wait", &self.max_wait)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_streams_per_service", &self.max_streams_per_service)
            .field("max_streams", &self.max_streams)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Whom a bearer token acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenHolder {
    /// A service: the token acts for it alone, and reads only its own entries of the status and the
    /// events, and not the metrics.
    Service(String),
    /// An operator: the token reads everything (status, events, metrics, any service's control
    /// stream) but acts for no service.
    Operator,
}

/// [`Backends`], once set.
struct Connected {
    backends: Backends,
}

/// The state every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct HttpState {
    inner: Arc<Inner>,
}

struct Inner {
    subjects: Subjects,
    /// `(token, whom it acts for)`.
    tokens: Vec<(String, TokenHolder)>,
    default_timeout_ms: u64,
    /// The `default_priority` of a request body that gives none.
    services: gpu_coordinator_core::ServicePolicies,
    max_wait: Duration,
    max_body_bytes: usize,
    limits: Limits,
    /// Open control streams, counted against `http.max_streams_per_service` and `http.max_streams`.
    streams: Arc<control::StreamCount>,
    metrics: Arc<Metrics>,
    /// Cancelled when the coordinator stops: long polls and event streams end.
    stop: CancellationToken,
    /// Set once the coordinator has connected; until then the API answers 503 (except `/healthz`).
    connected: OnceLock<Connected>,
    /// The engine sidecars of this process.
    engines: crate::engines::Board,
}

impl HttpState {
    /// The engine sidecars this process runs, shown by `/gpu/engines`, `/metrics` and the page.
    pub fn engines(&self) -> crate::engines::Board {
        self.inner.engines.clone()
    }

    pub fn new(
        settings: HttpSettings,
        subjects: Subjects,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> HttpState {
        HttpState {
            inner: Arc::new(Inner {
                engines: crate::engines::Board::default(),
                subjects,
                tokens: settings.tokens.into_iter().collect(),
                default_timeout_ms: settings.default_timeout_ms,
                services: settings.services,
                max_wait: settings.max_wait,
                max_body_bytes: settings.max_body_bytes,
                limits: settings.limits,
                streams: Arc::new(control::StreamCount::new(
                    settings.max_streams_per_service,
                    settings.max_streams,
                )),
                metrics,
                stop,
                connected: OnceLock::new(),
            }),
        }
    }

    /// Hands the handlers the servers and the driver, once they are there.
    pub fn set_backends(&self, backends: Backends) {
        let _ = self.inner.connected.set(Connected { backends });
    }

    fn connected(&self) -> Result<&Connected, ApiError> {
        self.inner.connected.get().ok_or_else(|| {
            ApiError::Unavailable(
                "the coordinator is starting: it is still connecting to its stores and its bus"
                    .into(),
            )
        })
    }

    fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }

    fn stop(&self) -> &CancellationToken {
        &self.inner.stop
    }

    /// Whom the caller's token acts for; `Ok(None)` when authentication is off.
    fn caller(&self, headers: &HeaderMap) -> Result<Option<&TokenHolder>, ApiError> {
        if self.inner.tokens.is_empty() {
            return Ok(None);
        }
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::Unauthorized(
                "this coordinator wants a bearer token: send `Authorization: Bearer <token>`"
                    .into(),
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        // Every configured token is compared in full, so the time taken does not tell which was close.
        let mut found = None;
        for (token, holder) in &self.inner.tokens {
            if constant_time_eq(token.as_bytes(), presented.as_bytes()) {
                found = Some(holder);
            }
        }
        found
            .map(Some)
            .ok_or_else(|| ApiError::Unauthorized("the bearer token is not valid".into()))
    }

    /// Checks that the caller may act for `service`: 401 without a valid token, 403 for another service.
    fn authorize(&self, headers: &HeaderMap, service: &str) -> Result<(), ApiError> {
        match self.caller(headers)? {
            Some(TokenHolder::Operator) => Err(operator_acts_for_none()),
            Some(TokenHolder::Service(own)) if own != service => Err(ApiError::Forbidden(format!(
                "the bearer token acts for service `{own}`, not for `{service}`"
            ))),
            _ => Ok(()),
        }
    }

    /// Checks that the caller may read what concerns `service`: its own token, or an operator's.
    fn authorize_read(&self, headers: &HeaderMap, service: &str) -> Result<(), ApiError> {
        match self.caller(headers)? {
            Some(TokenHolder::Operator) => Ok(()),
            _ => self.authorize(headers, service),
        }
    }

    /// What the caller may read: everything (an operator's token, or anyone when no tokens are
    /// configured), or only what concerns its own service (a service's token).
    fn viewer(&self, headers: &HeaderMap) -> Result<Viewer<'_>, ApiError> {
        Ok(match self.caller(headers)? {
            None | Some(TokenHolder::Operator) => Viewer::Everything,
            Some(TokenHolder::Service(own)) => Viewer::Service(own),
        })
    }

    /// The status document from the driver.
    async fn status(&self, page: gpu_coordinator_wire::StatusPage) -> Result<StatusDoc, ApiError> {
        let backends = &self.connected()?.backends;
        let wait = match backends.journal.full() {
            Some(_) => STATUS_WAIT_FULL,
            None => STATUS_WAIT,
        };
        match tokio::time::timeout(wait, backends.driver.status(page)).await {
            Ok(Some(doc)) => Ok(doc),
            Ok(None) => {
                let mut leader = match backends.leadership.leader().await {
                    Some((term, holder)) => format!("the leader is `{holder}` (term {})", term.0),
                    None => "no coordinator leads right now".to_owned(),
                };
                if let Some(refusal) = backends.leadership.refusal() {
                    leader = format!("{refusal}; {leader}");
                }
                Err(ApiError::Unavailable(format!(
                    "this coordinator is not leading (a standby, or starting or stopping); {leader}: \
                     ask it, or again in a moment"
                )))
            }
            // The driver is retrying a write that a full store refused: say which, rather than
            // only that it did not answer.
            Err(_) => Err(match backends.journal.full() {
                Some(full) => ApiError::InsufficientStorage(format!(
                    "the coordinator's writes wait for space, so it cannot produce its status: \
                     {full}; nothing it acknowledged is lost, and it goes on by itself once space \
                     is freed"
                )),
                None => ApiError::GatewayTimeout(format!(
                    "the coordinator did not produce its status within {wait:?} (it may be \
                     waiting for Postgres or Redis; see /readyz)"
                )),
            }),
        }
    }
}

/// What a caller may read, from its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Viewer<'a> {
    /// Every service's status, events and metrics.
    Everything,
    /// Its own service's entries only: another's request ids and fences are not its business.
    Service(&'a str),
}

impl<'a> Viewer<'a> {
    /// Whose stream slots the caller's event streams take: a service's own, or the operator's.
    fn holder(self) -> control::Holder<'a> {
        match self {
            Viewer::Everything => control::Holder::Operator,
            Viewer::Service(own) => control::Holder::Service(own),
        }
    }
}

/// What an operator's token is told when it would act for a service.
fn operator_acts_for_none() -> ApiError {
    ApiError::Forbidden(
        "an operator token reads everything but acts for no service: use the service's own token"
            .into(),
    )
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// Every route.
pub fn router(state: HttpState) -> Router {
    let max_body = state.inner.max_body_bytes;
    Router::new()
        .route("/gpu/request", post(inputs::request))
        .route("/gpu/release", post(inputs::release))
        .route("/gpu/renew", post(inputs::renew))
        .route("/gpu/ack", post(inputs::ack))
        .route("/gpu/cancel", post(inputs::cancel))
        .route("/gpu/status", get(ops::status))
        .route("/gpu/control/{service_id}", get(control::control))
        .route("/gpu/events", get(events::events))
        .route("/gpu/engines", get(ops::engines))
        .route("/", get(ui::index))
        .route("/ui", get(ui::index))
        .route("/ui/app.js", get(ui::app))
        .route("/ui/style.css", get(ui::style))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// What the page may load and who may frame it: its own script, style and calls (`/ui/app.js`,
/// `/ui/style.css`, `/gpu/...`), nothing inline, nothing from elsewhere, in no other site's frame. The
/// page has no inline script or style attribute (it sets sizes through the CSSOM, which the policy does
/// not cover), so it needs no `unsafe-inline` nor hash. On the API's answers it costs nothing and stops
/// a JSON answer opened in a tab from running anything.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Adds the security headers to every answer, the page's and the API's alike: the policy above,
/// `X-Frame-Options: DENY` for browsers that predate `frame-ancestors`, and `nosniff` so that a browser
/// never runs an answer as a script or page of another type than the one it is served as.
async fn security_headers(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    response
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {method} {}; see /openapi.json",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} does not take {method}; see /openapi.json",
        uri.path()
    ))
}

/// Serves the API on `listener` until `state`'s stop token is cancelled, then lets calls in flight end
/// (long polls and event streams end at the stop). A request's headers must come within
/// `http.header_read_timeout_ms`, and at most `http.max_connections` connections are served at once.
pub async fn serve(listener: tokio::net::TcpListener, state: HttpState) -> std::io::Result<()> {
    let stop = state.stop().clone();
    let limits = state.inner.limits;
    server::serve(listener, router(state), limits, stop).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings the configuration's defaults give, without tokens.
    pub(super) fn settings() -> HttpSettings {
        HttpSettings {
            tokens: BTreeMap::new(),
            default_timeout_ms: 60_000,
            services: gpu_coordinator_core::ServicePolicies::default(),
            max_wait: Duration::from_secs(300),
            max_body_bytes: 65_536,
            max_streams_per_service: 16,
            max_streams: 1024,
            limits: Limits {
                header_read_timeout: Duration::from_secs(10),
                max_connections: 1024,
            },
        }
    }

    fn state(tokens: &[(&str, TokenHolder)]) -> HttpState {
        let settings = HttpSettings {
            tokens: tokens
                .iter()
                .map(|(t, holder)| (t.to_string(), holder.clone()))
                .collect(),
            ..settings()
        };
        HttpState::new(
            settings,
            Subjects::default(),
            Metrics::new(),
            CancellationToken::new(),
        )
    }

    fn service(id: &str) -> TokenHolder {
        TokenHolder::Service(id.to_owned())
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("a header value"),
        );
        headers
    }

    #[test]
    fn without_tokens_anyone_acts_for_any_service() {
        let s = state(&[]);
        assert!(s.authorize(&HeaderMap::new(), "chat").is_ok());
        assert!(s.authorize(&bearer("whatever"), "chat").is_ok());
    }

    #[test]
    fn a_token_acts_only_for_its_service() {
        let s = state(&[
            ("secret-chat", service("chat")),
            ("secret-asr", service("asr")),
        ]);
        assert!(s.authorize(&bearer("secret-chat"), "chat").is_ok());
        let forbidden = s.authorize(&bearer("secret-chat"), "asr").expect_err("403");
        assert!(matches!(forbidden, ApiError::Forbidden(_)), "{forbidden}");
        assert!(forbidden.to_string().contains("`chat`"));
        for headers in [
            HeaderMap::new(),
            bearer("secret-cha"),
            bearer("secret-chatx"),
            bearer(""),
        ] {
            let e = s.authorize(&headers, "chat").expect_err("401");
            assert!(matches!(e, ApiError::Unauthorized(_)), "{e}");
        }
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert!(matches!(
            s.authorize(&basic, "chat"),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn an_operator_token_reads_everything_and_acts_for_none() {
        let s = state(&[
            ("secret-op", TokenHolder::Operator),
            ("secret-chat", service("chat")),
        ]);
        let operator = bearer("secret-op");
        assert!(s.authorize_read(&operator, "chat").is_ok());
        assert_eq!(s.viewer(&operator).expect("valid"), Viewer::Everything);
        let e = s.authorize(&operator, "chat").expect_err("403");
        assert!(matches!(e, ApiError::Forbidden(_)), "{e}");
        assert!(e.to_string().contains("acts for no service"), "{e}");
        let chat = bearer("secret-chat");
        assert_eq!(s.viewer(&chat).expect("valid"), Viewer::Service("chat"));
        let e = s.authorize_read(&chat, "asr").expect_err("403");
        assert!(matches!(e, ApiError::Forbidden(_)), "{e}");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
