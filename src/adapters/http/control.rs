//! `GET /gpu/control/{service_id}`: a service's control orders (`pause`, `resume`, `revoke`, `restart`) as
//! Server-Sent Events, for services without a NATS client.
//!
//! The orders are read from the output stream with an ordered consumer filtered on
//! `<prefix>.control.<svc>`. Each event's `id` is its stream sequence: a client that reconnects with
//! `Last-Event-ID` gets the orders it missed meanwhile; a new one gets the orders from now on (the
//! consumer exists before the response starts, so nothing sent after the answer is missed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use gpu_coordinator_wire::{valid_service_id, Control};

use super::sse::{last_event_id, output_events};
use super::{ApiError, ErrorBody, HttpState, TokenHolder};
use crate::ports::ReadFrom;

/// Streams the service's control orders: one event per order, named after its action, with the order
/// (JSON) as data and the stream sequence as id.
#[utoipa::path(
    get,
    path = "/gpu/control/{service_id}",
    tag = "inputs",
    params(
        ("service_id" = String, Path, description = "The service whose orders to stream"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event (a stream sequence)"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: events `pause`, `resume`, `revoke`, `restart`, each \
            with a `control` document as data; answer a `pause` with POST /gpu/ack", content_type = "text/event-stream",
            body = String),
        (status = 400, description = "Not a valid service id", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "The token belongs to another service", body = ErrorBody),
        (status = 429, description = "Too many streams open, for this service (or the operator) or for \
            all services (`http.max_streams_per_service`, `http.max_streams`)", body = ErrorBody),
        (status = 503, description = "The bus (NATS) unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = [])),
)]
pub(super) async fn control(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    if !valid_service_id(&service) {
        return Err(ApiError::BadRequest(format!(
            "the service id {service:?} in the path must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`"
        )));
    }
    state.authorize_read(&headers, &service)?;
    // The operator's streams take its own slots; without tokens anyone is the service it names.
    let holder = match state.caller(&headers)? {
        Some(TokenHolder::Operator) => Holder::Operator,
        Some(TokenHolder::Service(own)) => Holder::Service(own),
        None => Holder::Service(&service),
    };
    // Held by the stream: the count goes down when the client goes away or the coordinator stops.
    let slot = state.inner.streams.open(holder)?;
    let subject = state.subjects().control(&service);
    tracing::debug!(%service, "HTTP: control stream opened");
    output_events(
        &state,
        subject,
        last_event_id(&headers).map_or(ReadFrom::New, ReadFrom::After),
        "the control orders",
        format!("control orders of `{service}`"),
        slot,
        action_name,
    )
    .await
}

/// `pause`, `resume`, `revoke` or `restart`, as the wire writes the action.
fn action_name(control: &Control) -> String {
    serde_json::to_value(control.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "control".into())
}

/// Whose slots a long-lived stream takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Holder<'a> {
    /// A service's: counted against `http.max_streams_per_service` for it and `http.max_streams` for
    /// all services.
    Service(&'a str),
    /// The operator's (an operator token, or anyone when no tokens are configured): slots of its own,
    /// as many as a service has, outside `http.max_streams`, so that services that take all theirs do
    /// not lock the operator's page out.
    Operator,
}

/// Open long-lived streams (control streams, event streams) per service, in all, and the operator's,
/// with their limits.
pub(super) struct StreamCount {
    per_service: usize,
    total: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    services: HashMap<String, usize>,
    operator: usize,
}

/// One open stream, counted until dropped.
pub(super) struct StreamSlot {
    count: Arc<StreamCount>,
    /// `None`: the operator's.
    service: Option<String>,
}

impl StreamCount {
    pub(super) fn new(per_service: usize, total: usize) -> StreamCount {
        StreamCount {
            per_service,
            total,
            open: Mutex::new(Open::default()),
        }
    }

    /// Counts one more stream for `holder`, or says which limit is reached.
    pub(super) fn open(self: &Arc<Self>, holder: Holder<'_>) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let service = match holder {
            Holder::Operator => {
                if open.operator >= self.per_service {
                    return Err(ApiError::TooMany(format!(
                        "the operator already has {} streams open, the most that \
                         http.max_streams_per_service allows: close one first",
                        open.operator
                    )));
                }
                open.operator += 1;
                None
            }
            Holder::Service(service) => {
                let all: usize = open.services.values().sum();
                let mine = open.services.get(service).copied().unwrap_or(0);
                if mine >= self.per_service {
                    return Err(ApiError::TooMany(format!(
                        "service `{service}` already has {mine} streams open (control and event \
                         streams), the most that http.max_streams_per_service allows: close one first"
                    )));
                }
                if all >= self.total {
                    return Err(ApiError::TooMany(format!(
                        "the services have {all} streams open, the most that http.max_streams \
                         allows: try again later"
                    )));
                }
                *open.services.entry(service.to_owned()).or_default() += 1;
                Some(service.to_owned())
            }
        };
        Ok(StreamSlot {
            count: Arc::clone(self),
            service,
        })
    }

    #[cfg(test)]
    fn open_now(&self, holder: Holder<'_>) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        match holder {
            Holder::Operator => open.operator,
            Holder::Service(service) => open.services.get(service).copied().unwrap_or(0),
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.count.open.lock().unwrap_or_else(|e| e.into_inner());
        match &self.service {
            None => open.operator = open.operator.saturating_sub(1),
            Some(service) => {
                if let Some(n) = open.services.get_mut(service) {
                    *n -= 1;
                    if *n == 0 {
                        open.services.remove(service);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod stream_count_tests {
    use super::*;

    #[test]
    fn streams_are_counted_per_service_and_in_all_until_dropped() {
        let count = Arc::new(StreamCount::new(2, 3));
        let a1 = count.open(Holder::Service("a")).expect("first of a");
        let _a2 = count.open(Holder::Service("a")).expect("second of a");
        let e = count
            .open(Holder::Service("a"))
            .err()
            .expect("a third of a is refused");
        assert!(e.to_string().contains("max_streams_per_service"), "{e}");
        let _b1 = count.open(Holder::Service("b")).expect("first of b");
        let e = count
            .open(Holder::Service("c"))
            .err()
            .expect("a fourth in all is refused");
        assert!(e.to_string().contains("http.max_streams "), "{e}");
        drop(a1);
        assert_eq!(count.open_now(Holder::Service("a")), 1);
        let _c1 = count.open(Holder::Service("c")).expect("room again");
    }

    #[test]
    fn the_operator_has_slots_of_its_own() {
        let count = Arc::new(StreamCount::new(2, 1));
        let _a = count.open(Holder::Service("a")).expect("the services' one");
        let op1 = count
            .open(Holder::Operator)
            .expect("not counted in the services' total");
        let _op2 = count.open(Holder::Operator).expect("a second");
        let e = count
            .open(Holder::Operator)
            .err()
            .expect("a third is refused");
        assert!(e.to_string().contains("operator"), "{e}");
        drop(op1);
        assert_eq!(count.open_now(Holder::Operator), 1);
        assert_eq!(count.open_now(Holder::Service("a")), 1);
    }
}
