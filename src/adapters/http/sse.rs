//! What `GET /gpu/control/{service_id}` and `GET /gpu/events` share: Server-Sent Events read from the
//! output stream through the [`Gateway`](crate::ports::Gateway), each message decoded, named, and given
//! its stream sequence as id, so that a client that comes back with `Last-Event-ID` gets exactly what
//! it missed.

use std::convert::Infallible;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{stream, StreamExt};
use gpu_coordinator_wire::codec;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::control::StreamSlot;
use super::{ApiError, HttpState};
use crate::ports::{PortError, ReadFrom, Stored, Which};

/// The stream sequence a reconnecting client sends in `Last-Event-ID`.
pub(super) fn last_event_id(headers: &HeaderMap) -> Option<u64> {
    headers
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// One stored output decoded as `T`; `None` (with a warning) for one that is not.
pub(super) fn decode<T: DeserializeOwned>(msg: &Stored) -> Option<T> {
    match codec::decode(msg.encoding(), &msg.payload) {
        Ok(doc) => Some(doc),
        Err(e) => {
            tracing::warn!(subject = %msg.subject, "an undecodable message: {e}");
            None
        }
    }
}

/// An SSE response of the output stream's messages on `subject` from `from`, each decoded as `T` and
/// named by `name`, opened by the comment `hello` (with, for a new reader, the position it starts
/// after as its id). The reader exists before the response starts, so
/// nothing stored after the answer is missed; the response holds `slot` while it lasts and ends when
/// the coordinator stops. `reading` says what is read, for the 503 when the bus fails.
pub(super) async fn output_events<T>(
    state: &HttpState,
    subject: String,
    from: ReadFrom,
    reading: &str,
    hello: String,
    slot: StreamSlot,
    name: fn(&T) -> String,
) -> Result<Response, ApiError>
where
    T: DeserializeOwned + Serialize + Send + 'static,
{
    let gateway = &state.connected()?.backends.gateway;
    let unavailable =
        |e: PortError| ApiError::Unavailable(format!("cannot read {reading} (on {subject}): {e}"));
    // A new reader starts after the last message stored now, and its first event carries that
    // position as its id: a client cut off before any message came resumes from there with
    // `Last-Event-ID`, and misses nothing stored meanwhile.
    let (from, start) = match from {
        ReadFrom::New => {
            let last = gateway
                .last_seq(Which::Outputs)
                .await
                .map_err(unavailable)?;
            (ReadFrom::After(last), Some(last))
        }
        other => (other, None),
    };
    let messages = gateway.follow(&subject, from).await.map_err(unavailable)?;
    let hello = match start {
        Some(last) => Event::default().comment(hello).id(last.to_string()),
        None => Event::default().comment(hello),
    };
    let events = messages.filter_map(move |item| async move {
        let msg = match item {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!("HTTP event stream: {e}");
                return None;
            }
        };
        let doc: T = decode(&msg)?;
        let event = Event::default().event(name(&doc)).id(msg.seq.to_string());
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
