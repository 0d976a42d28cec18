//! What `GET /gpu/control/{service_id}` and `GET /gpu/events` share: Server-Sent Events read from the
//! output stream with an ordered consumer, each message decoded, named, and given its stream sequence as
//! id, so that a client that comes back with `Last-Event-ID` gets exactly what it missed.

use std::convert::Infallible;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{stream, StreamExt};
use gpu_coordinator_wire::{codec, Encoding};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::control::StreamSlot;
use super::{ApiError, HttpState};
use crate::adapters::nats::content_type;

/// The stream sequence a reconnecting client sends in `Last-Event-ID`.
pub(super) fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Where a stream starts for a client that saw up to stream sequence `seq`: right after it.
pub(super) fn after(seq: u64) -> DeliverPolicy {
    DeliverPolicy::ByStartSequence {
        start_sequence: seq.saturating_add(1),
    }
}

/// An SSE response of the output stream's messages on `subject` from `deliver_policy`, each decoded as
/// `T` and named by `name`, opened by the comment `hello`. The consumer exists before the response
/// starts, so nothing published after the answer is missed; the response holds `slot` while it lasts and
/// ends when the coordinator stops. `reading` says what is read, for the 503 when NATS fails.
pub(super) async fn output_events<T>(
    state: &HttpState,
    subject: String,
    deliver_policy: DeliverPolicy,
    reading: &str,
    hello: String,
    slot: StreamSlot,
    name: fn(&T) -> String,
) -> Result<Response, ApiError>
where
    T: DeserializeOwned + Serialize + Send + 'static,
{
    let js = &state.connected()?.js;
    let unavailable = |what: &str, e: String| {
        ApiError::Unavailable(format!("cannot read {reading} ({what} on {subject}): {e}"))
    };
    let output = js
        .get_stream(state.subjects().output_stream())
        .await
        .map_err(|e| unavailable("the output stream", e.to_string()))?;
    let consumer = output
        .create_consumer(OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable("a consumer", e.to_string()))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| unavailable("the messages", e.to_string()))?;
    let hello = Event::default().comment(hello);
    let events = messages.filter_map(move |item| async move {
        let msg = match item {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!("HTTP event stream: {e}");
                return None;
            }
        };
        let encoding = Encoding::from_content_type(content_type(msg.headers.as_ref()));
        let doc: T = match codec::decode(encoding, &msg.payload) {
            Ok(doc) => doc,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, "an undecodable message: {e}");
                return None;
            }
        };
        let mut event = Event::default().event(name(&doc));
        if let Ok(info) = msg.info() {
            event = event.id(info.stream_sequence.to_string());
        }
        match event.json_data(&doc) {
            Ok(event) => Some(event),
            Err(e) => {
                tracing::warn!("encoding an SSE event: {e}");
                None
            }
        }
    });
    let events = stream::once(async { hello })
        .chain(events)
        .map(move |event| {
            let _held = &slot;
            Ok::<_, Infallible>(event)
        })
        .take_until(state.stop().clone().cancelled_owned());
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
