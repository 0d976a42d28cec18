//! The reverse proxy: any method and path pass to the engine, through the [`Gate`]. The response body
//! passes frame by frame as the engine writes it (an OpenAI `stream: true` answer, SSE, chunked), never
//! buffered; the request stays counted in flight until its body has ended, and a pause that outlasts
//! its drain cuts it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::gate::{Gate, Pass};

type Upstream = Client<HttpConnector, Body>;
/// Why a request got no answer from the engine.
type EngineError = hyper_util::client::legacy::Error;

/// What the proxy of one engine needs.
#[derive(Clone)]
pub struct Proxy {
    gate: Arc<Gate>,
    upstream: Upstream,
    /// The engine's scheme and authority, and the path it is mounted under (without a trailing `/`).
    base: Uri,
    base_path: String,
    max_wait: Duration,
    service: String,
}

impl Proxy {
    pub fn new(gate: Arc<Gate>, upstream: &str, max_wait: Duration, service: &str) -> Proxy {
        let base: Uri = upstream.parse().expect("checked with the configuration");
        let base_path = base.path().trim_end_matches('/').to_owned();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Proxy {
            gate,
            upstream: Client::builder(TokioExecutor::new()).build(connector),
            base,
            base_path,
            max_wait,
            service: service.to_owned(),
        }
    }

    /// The router that proxies every request.
    pub fn router(self) -> axum::Router {
        axum::Router::new().fallback(forward).with_state(self)
    }
}

/// Headers that belong to one connection, not to the request (RFC 9110, 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the `Connection` header names are the connection's too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Passes one request to the engine once the gate lets it through, and its answer back.
async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let deadline = Instant::now() + proxy.max_wait;
    let Some(pass) = proxy.gate.enter(deadline).await else {
        return unavailable(
            &proxy.service,
            proxy.max_wait,
            format!(
                "the engine of `{}` did not get the GPU within {} ms (max_wait_ms)",
                proxy.service,
                proxy.max_wait.as_millis()
            ),
        );
    };
    let request = match proxy.engine_request(request) {
        Ok(request) => request,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad path: {e}")).into_response(),
    };
    let upstream = proxy.upstream.request(request);
    let cut = pass.cut.clone();
    let response = tokio::select! {
        response = upstream => response,
        () = cut.cancelled() => {
            return unavailable(
                &proxy.service,
                proxy.max_wait,
                format!("the engine of `{}` is being paused for a more urgent service", proxy.service),
            );
        }
    };
    proxy.engine_answer(response, pass)
}

impl Proxy {
    /// The request as the engine gets it: its path under the engine's, without the connection's
    /// headers, with the engine's `Host`. An error for a path that makes no URI.
    fn engine_request(&self, request: Request) -> Result<Request, axum::http::Error> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        parts.uri = Uri::builder()
            .scheme(
                self.base
                    .scheme()
                    .cloned()
                    .unwrap_or(axum::http::uri::Scheme::HTTP),
            )
            .authority(
                self.base
                    .authority()
                    .cloned()
                    .expect("checked with the configuration"),
            )
            .path_and_query(format!("{}{path_and_query}", self.base_path))
            .build()?;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(authority) = self.base.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        Ok(Request::from_parts(parts, body))
    }

    /// The engine's answer as the caller gets it: its body streamed and holding `pass` until it
    /// ends, or a 502 when the engine did not answer.
    fn engine_answer(
        &self,
        response: Result<axum::http::Response<hyper::body::Incoming>, EngineError>,
        pass: Pass,
    ) -> Response {
        match response {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                let body = Tracked {
                    inner: body,
                    cut: Box::pin(pass.cut.clone().cancelled_owned()),
                    pass: Some(pass),
                };
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => {
                tracing::warn!(service = self.service, "the engine did not answer: {e}");
                (
                    StatusCode::BAD_GATEWAY,
                    axum::Json(error_doc(
                        &format!("the engine of `{}` did not answer: {e}", self.service),
                        "bad_gateway",
                    )),
                )
                    .into_response()
            }
        }
    }
}

/// 503 with `Retry-After`, in the shape OpenAI-style clients read (`{"error": {"message", "type"}}`).
fn unavailable(service: &str, retry_after: Duration, message: String) -> Response {
    tracing::debug!(service, "{message}");
    let secs = retry_after.as_secs().max(1);
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(error_doc(&message, "service_unavailable")),
    )
        .into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&secs.to_string()).expect("digits are a valid header value"),
    );
    response
}

fn error_doc(message: &str, kind: &str) -> serde_json::Value {
    serde_json::json!({"error": {"message": message, "type": kind, "code": kind}})
}

/// A response body that keeps its request counted in flight until it ends, and ends in an error (the
/// connection is cut) when the pass is cut.
struct Tracked {
    inner: hyper::body::Incoming,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    pass: Option<Pass>,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.pass.is_none() {
            return Poll::Ready(None);
        }
        if self.cut.as_mut().poll(cx).is_ready() {
            self.pass = None;
            return Poll::Ready(Some(Err(
                "cut: the engine is being paused for a more urgent service".into(),
            )));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.pass = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.pass = None;
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pass.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }
}
