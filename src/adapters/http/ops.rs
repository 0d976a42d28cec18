//! What operators look at: the status document, health and readiness, metrics.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpu_coordinator_wire::StatusPage;

use super::schemas::{Checks, Health, StatusSchema};
use super::{ApiError, ErrorBody, HttpState};

/// How long `/readyz` waits for each server.
const PING_WAIT: Duration = Duration::from_secs(2);

/// Each GPU with its VRAM and holders, the paused requests, and the queue with positions and estimated
/// waits.
#[utoipa::path(
    get,
    path = "/gpu/status",
    tag = "operators",
    params(
        ("offset" = Option<u64>, Query, description = "Queue entries to skip (default 0)"),
        ("limit" = Option<u64>, Query, description = "Queue entries to list (default `queue.status_limit`, at most 1000)"),
    ),
    responses(
        (status = 200, description = "The status document", body = StatusSchema),
        (status = 400, description = "`offset` or `limit` is not a whole number", body = ErrorBody),
        (status = 401, description = "Tokens are configured and none valid was sent", body = ErrorBody),
        (status = 503, description = "The coordinator is starting or stopping", body = ErrorBody),
        (status = 504, description = "The driver did not answer in time", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn status(
    State(state): State<HttpState>,
    headers: HeaderMap,
    page: Result<Query<StatusPage>, QueryRejection>,
) -> Result<Response, ApiError> {
    // With tokens configured, any valid token may read the status.
    state.caller(&headers)?;
    let Query(page) = page.map_err(|e| {
        ApiError::BadRequest(format!(
            "the query string is not valid ({e}): expected `offset` and `limit`, whole numbers"
        ))
    })?;
    Ok(Json(state.status(page).await?).into_response())
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operators", responses((status = 200, body = Health)))]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        checks: None,
        error: None,
    })
}

/// The bus, the lease store and the journal are reachable (NATS, Redis and Postgres, or the embedded
/// ones); 503 names the one that is not.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operators",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready: `error` names the server", body = Health),
    ),
)]
pub(super) async fn readyz(State(state): State<HttpState>) -> Response {
    let connected = match state.connected() {
        Ok(c) => c,
        Err(e) => return not_ready(e.to_string(), None),
    };
    let b = &connected.backends;
    let nats = async {
        b.gateway
            .health()
            .map_err(|e| format!("not connected ({e})"))
    };
    let redis = async {
        match tokio::time::timeout(PING_WAIT, b.leases.ping()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer to PING within {PING_WAIT:?}")),
        }
    };
    let postgres = async {
        match tokio::time::timeout(PING_WAIT, b.journal.ping()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {PING_WAIT:?}")),
        }
    };
    let (nats, redis, postgres) = tokio::join!(nats, redis, postgres);
    // The fields keep the servers' names; in the embedded mode they are the embedded bus, the
    // in-process leases and SQLite, as `labels` says.
    let labels = &b.labels;
    let failures: Vec<String> = [
        (labels.bus, &nats),
        (labels.leases, &redis),
        (labels.journal, &postgres),
    ]
    .into_iter()
    .filter_map(|(name, r)| {
        r.as_ref()
            .err()
            .map(|e| format!("{name} is not reachable: {e}"))
    })
    .collect();
    let show = |r: &Result<(), String>| r.as_ref().err().cloned().unwrap_or_else(|| "ok".into());
    let checks = Checks {
        nats: show(&nats),
        redis: show(&redis),
        postgres: show(&postgres),
    };
    if failures.is_empty() {
        Json(Health {
            status: "ready".into(),
            checks: Some(checks),
            error: None,
        })
        .into_response()
    } else {
        not_ready(failures.join("; "), Some(checks))
    }
}

fn not_ready(error: String, checks: Option<Checks>) -> Response {
    tracing::warn!("not ready: {error}");
    let body = Health {
        status: "not ready".into(),
        checks,
        error: Some(error),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// Prometheus metrics (OpenMetrics text): queue length per priority, holders, counters of grants,
/// preemptions, revocations, timeouts and rejections, histograms of grant latency, queue wait and
/// pause-ACK time, VRAM per GPU.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operators",
    responses(
        (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "Tokens are configured and none valid was sent", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn metrics(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // With tokens configured, any valid token may read the metrics.
    state.caller(&headers)?;
    // Without the driver's status (starting, or busy) the counters are still worth serving.
    // The counts of the whole queue, without its entries: as cheap at 100,000 queued as at none.
    let doc = state
        .status(StatusPage {
            offset: None,
            limit: Some(0),
        })
        .await
        .ok();
    let text = state.inner.metrics.render(doc.as_ref());
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
