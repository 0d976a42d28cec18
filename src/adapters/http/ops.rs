//! What operators look at: the status document, health and readiness, metrics.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gpu_coordinator_wire::{StatusDoc, StatusPage};

use super::schemas::{Checks, Health, StatusSchema};
use super::{ApiError, ErrorBody, HttpState, Viewer};

/// How long `/readyz` waits for each server.
const PING_WAIT: Duration = Duration::from_secs(2);

/// Each GPU with its VRAM and holders, the paused requests, and the queue with positions and estimated
/// waits. A service's token gets its own service's holders, paused and queued requests only (of the
/// page of the queue asked for); the GPUs' figures and the queue's counts stay, as they name nobody.
#[utoipa::path(
    get,
    path = "/gpu/status",
    tag = "operators",
    params(
        ("offset" = Option<u64>, Query, description = "Queue entries to skip (default 0)"),
        ("limit" = Option<u64>, Query, description = "Queue entries to list (default `queue.status_limit`, at most 1000)"),
    ),
    responses(
        (status = 200, description = "The status document; for a service's token, only that service's \
            holders, paused and queued requests", body = StatusSchema),
        (status = 400, description = "`offset` or `limit` is not a whole number", body = ErrorBody),
        (status = 401, description = "Tokens are configured and none valid was sent", body = ErrorBody),
        (status = 503, description = "The coordinator is starting or stopping", body = ErrorBody),
        (status = 504, description = "The driver did not answer in time", body = ErrorBody),
        (status = 507, description = "A store is full (out of disk space) and the driver is retrying \
            a write it refused; `error` names the store", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn status(
    State(state): State<HttpState>,
    headers: HeaderMap,
    page: Result<Query<StatusPage>, QueryRejection>,
) -> Result<Response, ApiError> {
    let viewer = state.viewer(&headers)?;
    let Query(page) = page.map_err(|e| {
        ApiError::BadRequest(format!(
            "the query string is not valid ({e}): expected `offset` and `limit`, whole numbers"
        ))
    })?;
    let mut doc = state.status(page).await?;
    if let Viewer::Service(own) = viewer {
        only_own(&mut doc, own);
    }
    Ok(Json(doc).into_response())
}

/// Keeps `own`'s entries of the document: another service's request ids and fences are not a
/// service's business (the lease's fence is what a holder proves itself with).
fn only_own(doc: &mut StatusDoc, own: &str) {
    for gpu in &mut doc.gpus {
        gpu.holders.retain(|h| h.service_id == own);
    }
    doc.paused.retain(|p| p.service_id == own);
    doc.queue.retain(|q| q.service_id == own);
    doc.services.retain(|s| s.service_id == own);
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
        (status = 503, description = "Not ready: `error` names the server, or the store that is \
            full (out of disk space)", body = Health),
    ),
)]
pub(super) async fn readyz(State(state): State<HttpState>) -> Response {
    let connected = match state.connected() {
        Ok(c) => c,
        Err(e) => return not_ready(e.to_string(), None),
    };
    let b = &connected.backends;
    let nats = async {
        match tokio::time::timeout(PING_WAIT, b.gateway.health()).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "JetStream did not answer its API within {PING_WAIT:?}; its store may be full"
            )),
        }
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
    let mut failures = failures;
    // A store that refuses writes for lack of space: reachable, yet not ready to take inputs.
    let full = b.journal.full();
    if let Some(full) = &full {
        failures.push(full.clone());
    }
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
        (status = 403, description = "A service's token: the metrics are every service's, for an \
            operator's token", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn metrics(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // They count every service's requests: with tokens configured, an operator's token only.
    if let Viewer::Service(own) = state.viewer(&headers)? {
        return Err(ApiError::Forbidden(format!(
            "the metrics count every service's requests: they are for an operator's token (`\"*\"` \
             in [http.tokens]), not service `{own}`'s"
        )));
    }
    if let Ok(connected) = state.connected() {
        let full = connected.backends.journal.full().is_some();
        state.inner.metrics.set_storage_full(full);
    }
    // Without the driver's status (starting, or busy) the counters are still worth serving.
    // The counts of the whole queue, without its entries: as cheap at 100,000 queued as at none.
    let doc = state
        .status(StatusPage {
            offset: None,
            limit: Some(0),
        })
        .await
        .ok();
    let mut text = state.inner.metrics.render(doc.as_ref());
    let engines = state.inner.engines.render_metrics();
    if !engines.is_empty() {
        // Before the coordinator's `# EOF`, which ends the exposition.
        let end = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(end, &engines);
    }
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// The engine sidecars this process runs: each engine's state, the requests waiting in its sidecar
/// and in flight, and its last sleep and wake times.
#[utoipa::path(
    get,
    path = "/gpu/engines",
    tag = "operators",
    responses(
        (status = 200, description = "One entry per `[[engines]]` sidecar of this process (empty \
            without any)", body = Vec<crate::engines::EngineView>),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn engines(
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let views = state.inner.engines.views();
    // A service's token sees its own engine only, as it sees its own requests in the status.
    let views: Vec<_> = match state.viewer(&headers)? {
        Viewer::Service(own) => views.into_iter().filter(|v| v.service == own).collect(),
        _ => views,
    };
    Ok(axum::Json(views).into_response())
}

#[cfg(test)]
mod tests {
    use gpu_coordinator_wire::{
        GpuStatus, HolderState, HolderStatus, PausedStatus, QueueEntry, VramSource,
    };

    use super::*;

    fn holder(service: &str, fence: u64) -> HolderStatus {
        HolderStatus {
            request_id: format!("{service}-{fence}"),
            service_id: service.into(),
            priority: 1,
            fence,
            vram_mb: 1,
            granted_at: String::new(),
            expires_at: String::new(),
            state: HolderState::Active,
            preemptible: true,
            pause_ms: None,
        }
    }

    fn queued(service: &str, position: u64) -> QueueEntry {
        QueueEntry {
            position,
            request_id: format!("{service}-q{position}"),
            service_id: service.into(),
            priority: 1,
            vram_mb: None,
            gpu: None,
            requested_at: String::new(),
            paused: false,
            timeout_at: None,
            estimated_wait_ms: None,
        }
    }

    #[test]
    fn a_service_keeps_only_its_own_entries() {
        let mut doc = StatusDoc {
            hosts: Vec::new(),
            at: String::new(),
            vram_source: VramSource::Config,
            gpus: vec![GpuStatus {
                host: None,
                reachable: None,
                uuid: None,
                id: "0".into(),
                total_mb: 10,
                used_mb: 2,
                free_mb: 8,
                external_mb: 0,
                vram_source: VramSource::Config,
                holders: vec![holder("chat", 1), holder("asr", 2)],
            }],
            paused: vec![PausedStatus {
                request_id: "p".into(),
                service_id: "chat".into(),
                priority: 2,
                gpu: "0".into(),
                vram_mb: 1,
                paused_at: String::new(),
            }],
            queue: vec![queued("chat", 1), queued("asr", 2), queued("chat", 3)],
            queue_total: 3,
            queue_offset: 0,
            queue_counts: Vec::new(),
            services: ["chat", "asr"]
                .into_iter()
                .map(|id| gpu_coordinator_wire::ServiceStatus {
                    service_id: id.into(),
                    used_mb: 1,
                    borrowed_mb: 1,
                    guaranteed_vram_mb: None,
                    max_vram_mb: None,
                })
                .collect(),
            leader: None,
            storage_full: None,
        };
        only_own(&mut doc, "asr");
        assert_eq!(doc.services.len(), 1);
        assert_eq!(doc.services[0].service_id, "asr");
        assert_eq!(doc.gpus[0].holders, vec![holder("asr", 2)]);
        assert!(doc.paused.is_empty());
        assert_eq!(doc.queue, vec![queued("asr", 2)]);
        assert_eq!(
            (doc.gpus[0].used_mb, doc.queue_total),
            (2, 3),
            "the figures name nobody"
        );
    }
}
