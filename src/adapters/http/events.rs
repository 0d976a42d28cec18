//! `GET /gpu/events`: every change of state, as Server-Sent Events, for the web page and for operators.
//!
//! The events are read from the output stream (JetStream, or the embedded bus) filtered on
//! `<prefix>.event.>`.
//! Each SSE event is named after the event's kind, carries the event document (JSON) as data and its
//! stream sequence as id: a client that reconnects with `Last-Event-ID` gets exactly the events after
//! the last it saw. Without it, `?since=` (a span back from now such as `5m`, or an RFC 3339 instant)
//! starts with the history kept since then; with neither, the events from now on. `?format=jsonl`
//! answers the history up to now as JSON lines instead, and ends.
//!
//! A service's token reads its own service's events only (the subject filter names the service), an
//! operator's token (or anyone, without tokens) every service's. Either format holds a stream slot
//! while it is sent (a JSON-lines history read slowly lasts as long as an SSE stream): a service's
//! token takes its own service's slots, the operator its own.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use gpu_coordinator_wire::Event;

use super::control::StreamSlot;
use super::sse::{decode, last_event_id, output_events};
use super::{ApiError, ErrorBody, HttpState, Viewer};
use crate::ports::{ReadFrom, Which};
use gpu_coordinator_wire::time::Since;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub(super) struct EventsQuery {
    /// Start with the events since then: a span back from now (`90s`, `5m`, `2h`) or an RFC 3339
    /// instant. Ignored when `Last-Event-ID` is sent.
    since: Option<String>,
    /// `sse` (the default): the events from the start chosen on, as they happen. `jsonl`: the events
    /// kept from the start chosen up to now, one JSON document per line, then the response ends (for
    /// scripts: `curl -s 'localhost:8080/gpu/events?since=1h&format=jsonl' | jq`).
    format: Option<String>,
}

/// Streams the events: one SSE event per event of the output stream.
#[utoipa::path(
    get,
    path = "/gpu/events",
    tag = "ops",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event (a stream sequence)"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one event per change of state, named after its \
            kind, with the event document as data and its stream sequence as id; with `format=jsonl`,             `application/x-ndjson`: the events kept up to now, one per line", content_type = "text/event-stream",
            body = String),
        (status = 400, description = "`since` is not a span or an instant, or `format` is unknown", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 429, description = "Too many streams open, for the token's service or for the operator \
            (`http.max_streams_per_service`), or for all services (`http.max_streams`)", body = ErrorBody),
        (status = 503, description = "The bus (NATS) unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn events(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let viewer = state.viewer(&headers)?;
    let from = match (last_event_id(&headers), query.since.as_deref()) {
        (Some(seq), _) => ReadFrom::After(seq),
        (None, Some(since)) => match Since::parse(since, crate::clock::now_ms())
            .map_err(|e| ApiError::BadRequest(e.replace("--since", "since")))?
        {
            Since::Start => ReadFrom::Start,
            Since::At(ms) => ReadFrom::Since(ms),
        },
        (None, None) => ReadFrom::New,
    };
    // `<prefix>.event.<kind>.<svc>`: a service's own are those whose last token is its id.
    let prefix = state.subjects().prefix();
    let subject = match viewer {
        Viewer::Everything => format!("{prefix}.event.>"),
        Viewer::Service(own) => format!("{prefix}.event.*.{own}"),
    };
    let jsonl = match query.format.as_deref() {
        None | Some("sse") => false,
        Some("jsonl") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "format must be `sse` or `jsonl`, got {other:?}"
            )))
        }
    };
    let slot = state.inner.streams.open(viewer.holder())?;
    if jsonl {
        return json_lines(&state, &subject, from, slot).await;
    }
    output_events(
        &state,
        subject,
        from,
        "the events",
        "events".into(),
        slot,
        |event: &Event| event.kind.as_str().to_owned(),
    )
    .await
}

/// The events kept from `from` up to now, one JSON document per line (`application/x-ndjson`); the
/// body holds `slot` until it is sent or the client goes away.
async fn json_lines(
    state: &HttpState,
    subject: &str,
    from: ReadFrom,
    slot: StreamSlot,
) -> Result<Response, ApiError> {
    let gateway = &state.connected()?.backends.gateway;
    let history = gateway
        .history(Which::Outputs, subject, from)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read the events: {e}")))?;
    let lines = history.filter_map(|item| async move {
        match item {
            Ok(msg) => {
                let event: Event = decode(&msg)?;
                let mut line = serde_json::to_vec(&event).ok()?;
                line.push(b'\n');
                Some(Ok::<_, std::io::Error>(line))
            }
            Err(e) => Some(Err(std::io::Error::other(e.to_string()))),
        }
    });
    let lines = lines.map(move |line| {
        let _held = &slot;
        line
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}
