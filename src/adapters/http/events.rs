//! `GET /gpu/events`: every change of state, as Server-Sent Events, for the web page and for operators.
//!
//! The events are read from the output stream with an ordered consumer filtered on `<prefix>.event.>`.
//! Each SSE event is named after the event's kind, carries the event document (JSON) as data and its
//! stream sequence as id: a client that reconnects with `Last-Event-ID` gets exactly the events after
//! the last it saw. Without it, `?since=` (a span back from now such as `5m`, or an RFC 3339 instant)
//! starts with the history kept since then; with neither, the events from now on.

use async_nats::jetstream::consumer::DeliverPolicy;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use gpu_coordinator_wire::Event;

use super::sse::{after, last_event_id, output_events};
use super::{ApiError, ErrorBody, HttpState};
use crate::audit::Since;

/// Where the event streams are counted, beside the services' control streams.
const EVENT_STREAMS: &str = "(events)";

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub(super) struct EventsQuery {
    /// Start with the events since then: a span back from now (`90s`, `5m`, `2h`) or an RFC 3339
    /// instant. Ignored when `Last-Event-ID` is sent.
    since: Option<String>,
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
            kind, with the event document as data and its stream sequence as id", content_type = "text/event-stream",
            body = String),
        (status = 400, description = "`since` is not a span or an instant", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 429, description = "Too many event streams open (`http.max_streams_per_service`)", body = ErrorBody),
        (status = 503, description = "NATS unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn events(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    state.caller(&headers)?;
    let deliver_policy = match (last_event_id(&headers), query.since.as_deref()) {
        (Some(seq), _) => after(seq),
        (None, Some(since)) => match Since::parse(since, crate::clock::now_ms())
            .map_err(|e| ApiError::BadRequest(e.replace("--since", "since")))?
        {
            Since::Start => DeliverPolicy::All,
            Since::At(ms) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(ms) * 1_000_000,
                )
                .map_err(|e| ApiError::BadRequest(format!("since: {e}")))?,
            },
        },
        (None, None) => DeliverPolicy::New,
    };
    let slot = state.inner.streams.open(EVENT_STREAMS)?;
    let subject = format!("{}.event.>", state.subjects().prefix());
    output_events(
        &state,
        subject,
        deliver_policy,
        "the events",
        "events".into(),
        slot,
        |event: &Event| event.kind.as_str().to_owned(),
    )
    .await
}
