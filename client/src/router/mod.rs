//! The readers of the coordinator's answers: JetStream consumers on the output stream, one for this
//! service's replies and one for its orders, whose messages they hand to the request or lease they
//! name.
//!
//! # Why JetStream consumers and not core subscriptions
//!
//! A core subscription to `<prefix>.reply.<svc>` only sees what is published while it is connected:
//! a grant, a `pause` or a `revoke` published while NATS restarts, or while this client reconnects,
//! would be lost, and with it the GPU (an unacknowledged pause ends in a revoke). The coordinator
//! stores all of them in `<PREFIX>_OUTPUT`, so the client reads them from there:
//!
//! - Two ephemeral pull consumers, filtered to `<prefix>.reply.<svc>` and `<prefix>.control.<svc>`,
//!   made by a coordinator on `<prefix>.reader.<svc>` (with per-service NATS permissions a service may
//!   make no consumer: its deliver subject could push the stream anywhere), or by the client itself
//!   when no coordinator answers that subject.
//!   nats-server 2.9 allows one filter subject per consumer, and it must lie within one subject of
//!   the stream, so a single `<prefix>.*.<svc>` is refused. Each consumer keeps the coordinator's
//!   order of its subject; between the two the order may differ, which the lease allows for (an
//!   order that overtakes its grant waits for it, a `renewed` for an older fence is ignored).
//! - Each starts at the stream's next sequence when the client starts, and the client sends no
//!   request before both exist: every answer to a request of this client is after their start.
//! - Each remembers the stream sequence of the last message it handed on. Whenever its consumer
//!   fails (missed heartbeats, consumer gone after a server restart, a gap in the consumer sequence,
//!   which means a delivery was lost) and after every reconnect to NATS, it deletes the consumer and
//!   creates a new one that starts right after that sequence. So nothing is lost and nothing is
//!   handed on twice. This is what the library's ordered consumer does, except that it replays the
//!   whole stream when it must recreate itself before its first message.
//!
//! The routers own no request state: they look the service and `request_id` up in [`Routes`], and drop
//! what no one here waits for (another instance of the same service, or a request that has ended).
//!
//! The same readers serve the coordinator's HTTP API ([`crate::AnswerReader`]): one consumer on all services'
//! replies (`<prefix>.reply.*`) and one on their `requested` events, correlated the same way, so that
//! a long poll, too, gets its grant across a NATS restart. Those two are open only while HTTP calls
//! come (see [`crate::ANSWERS_IDLE`]).
//!
//! This module holds what the routers hand on and to whom ([`Incoming`], [`Routes`], [`Route`]);
//! `reading` holds the router task itself, and how it opens its consumers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use gpu_coordinator_wire::codec::{self, Encoding};
use gpu_coordinator_wire::{Control, Event, Reply};
use tokio::sync::{mpsc, watch};

use crate::ClientError;

mod reading;

#[cfg(feature = "server")]
pub use reading::reader_config;
pub(crate) use reading::Router;

/// A message from the coordinator about one request: its reply, an order, or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Reply(Reply),
    Control(Control),
    Event(Event),
}

impl Incoming {
    /// The request it is about (an event about no request names none: `""`).
    pub fn request_id(&self) -> &str {
        match self {
            Incoming::Reply(r) => &r.request_id,
            Incoming::Control(c) => &c.request_id,
            Incoming::Event(e) => e.request_id.as_deref().unwrap_or_default(),
        }
    }
}

/// One waiter's channel, with the number that tells it from the others of the same request.
type Waiter = (u64, mpsc::UnboundedSender<Incoming>);

/// Who waits for which request of which service.
#[derive(Default)]
pub(crate) struct Routes {
    map: Mutex<RouteTable>,
}

#[derive(Default)]
struct RouteTable {
    waiters: HashMap<(String, String), Vec<Waiter>>,
    next: u64,
}

impl Routes {
    /// Starts routing the messages about `request_id` of `service` to the returned receiver, until
    /// the [`Route`] is dropped. A client's requests are its own: a second one with the same id is
    /// refused.
    pub(crate) fn register(
        self: &Arc<Self>,
        service: &str,
        request_id: &str,
    ) -> Result<Route, ClientError> {
        self.add(service, request_id, true)
    }

    /// As [`Routes::register`], beside any other waiter for the same request (each gets every message).
    #[cfg(any(test, feature = "server"))]
    pub(crate) fn listen(self: &Arc<Self>, service: &str, request_id: &str) -> Route {
        self.add(service, request_id, false)
            .expect("a shared route is never refused")
    }

    fn add(
        self: &Arc<Self>,
        service: &str,
        request_id: &str,
        exclusive: bool,
    ) -> Result<Route, ClientError> {
        let mut table = self
            .map
            .lock()
            .expect("the route table lock is never poisoned");
        let key = (service.to_owned(), request_id.to_owned());
        if exclusive && table.waiters.get(&key).is_some_and(|w| !w.is_empty()) {
            return Err(ClientError::DuplicateRequestId(request_id.to_owned()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        table.next += 1;
        let id = table.next;
        table.waiters.entry(key.clone()).or_default().push((id, tx));
        Ok(Route {
            routes: Arc::clone(self),
            key,
            id,
            rx,
        })
    }

    /// Whether nobody waits for anything.
    #[cfg(feature = "server")]
    pub(crate) fn is_empty(&self) -> bool {
        self.map
            .lock()
            .expect("the route table lock is never poisoned")
            .waiters
            .is_empty()
    }

    pub(crate) fn dispatch(&self, service: &str, incoming: Incoming) {
        let table = self
            .map
            .lock()
            .expect("the route table lock is never poisoned");
        let key = (service.to_owned(), incoming.request_id().to_owned());
        match table.waiters.get(&key) {
            Some(waiters) => {
                for (_, tx) in waiters {
                    // A closed receiver means its owner is ending; the Route removes the entry.
                    let _ = tx.send(incoming.clone());
                }
            }
            None => tracing::trace!(
                service,
                request_id = incoming.request_id(),
                "nobody here waits for this message"
            ),
        }
    }
}

/// The messages about one request, until dropped.
pub struct Route {
    routes: Arc<Routes>,
    key: (String, String),
    id: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
}

impl Route {
    /// The next message about this request, in the order the coordinator stored them (per subject:
    /// replies, orders and events come through separate consumers). `None` once the reader stopped.
    pub async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        if let Ok(mut table) = self.routes.map.lock() {
            if let Some(waiters) = table.waiters.get_mut(&self.key) {
                waiters.retain(|(id, _)| *id != self.id);
                if waiters.is_empty() {
                    table.waiters.remove(&self.key);
                }
            }
        }
    }
}

/// Whether the consumer is there to receive answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Not yet opened; the text says why, when an attempt failed.
    Starting(Option<String>),
    /// Opened at least once: from now on nothing stored for this service is missed, even while the
    /// consumer is being recreated.
    Ready,
}

/// Decodes a message of the output stream into the service it is for and what it says, or says why
/// it cannot. `None`: a subject that is not a reply, order or event of `prefix`.
pub(crate) fn decode_incoming(
    prefix: &str,
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Option<(String, Result<Incoming, String>)> {
    let content_type = headers
        .and_then(|h| h.get("Content-Type"))
        .map(|v| v.as_str());
    decode_encoded(
        prefix,
        subject,
        Encoding::from_content_type(content_type),
        payload,
    )
}

/// [`decode_incoming`] with the encoding already known.
pub(crate) fn decode_encoded(
    prefix: &str,
    subject: &str,
    encoding: Encoding,
    payload: &[u8],
) -> Option<(String, Result<Incoming, String>)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let tokens: Vec<&str> = rest.split('.').collect();
    let decoded = match tokens.as_slice() {
        ["reply", svc] => (
            *svc,
            codec::decode::<Reply>(encoding, payload).map(Incoming::Reply),
        ),
        ["control", svc] => (
            *svc,
            codec::decode::<Control>(encoding, payload).map(Incoming::Control),
        ),
        ["event", _, svc] => (
            *svc,
            codec::decode::<Event>(encoding, payload).map(Incoming::Event),
        ),
        _ => return None,
    };
    Some((decoded.0.to_owned(), decoded.1.map_err(|e| e.0)))
}

/// Waits until every reader is open, at most until `deadline`; says why not.
pub(crate) async fn wait_ready(
    ready: &[watch::Receiver<Readiness>],
    deadline: tokio::time::Instant,
) -> Result<(), ClientError> {
    for ready in ready {
        let mut ready = ready.clone();
        let waited = tokio::time::timeout_at(deadline, async {
            ready.wait_for(|r| *r == Readiness::Ready).await.is_ok()
        })
        .await;
        match waited {
            Ok(true) => {}
            Ok(false) => return Err(ClientError::Closed),
            Err(_) => {
                return Err(ClientError::Unavailable(match &*ready.borrow() {
                    Readiness::Starting(Some(error)) => error.clone(),
                    _ => "the consumers on the output stream are not open yet".to_owned(),
                }))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator_wire::{ControlAction, Outcome};

    const REPLY: &str = "gpu.reply.chat";
    const CONTROL: &str = "gpu.control.chat";

    #[test]
    fn decodes_replies_orders_and_events_in_either_encoding_with_their_service() {
        let reply = Reply::new("chat-1", Outcome::Granted);
        let json = codec::encode(Encoding::Json, &reply);
        assert_eq!(
            decode_incoming("gpu", REPLY, None, &json),
            Some(("chat".to_owned(), Ok(Incoming::Reply(reply.clone()))))
        );
        let control = Control {
            action: ControlAction::Pause,
            request_id: "chat-1".into(),
            fence: 7,
            deadline_ms: Some(5_000),
            reason: "a chat needs the GPU".into(),
            lease_ms: None,
            expires_at: None,
            gpu: None,
        };
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", codec::MSGPACK_CONTENT_TYPE);
        let msgpack = codec::encode(Encoding::MsgPack, &control);
        assert_eq!(
            decode_incoming("gpu", CONTROL, Some(&headers), &msgpack),
            Some(("chat".to_owned(), Ok(Incoming::Control(control))))
        );
        let event = Event {
            capacity_mb: None,
            at: "2026-11-28T18:00:00Z".into(),
            kind: gpu_coordinator_wire::EventKind::Requested,
            request_id: Some("asr-1".into()),
            service_id: "asr".into(),
            priority: Some(2),
            gpu: None,
            fence: None,
            detail: None,
            reclaim_for: None,
            code: None,
        };
        let json = codec::encode(Encoding::Json, &event);
        assert_eq!(
            decode_incoming("gpu", "gpu.event.requested.asr", None, &json),
            Some(("asr".to_owned(), Ok(Incoming::Event(event))))
        );
    }

    #[test]
    fn ignores_other_subjects_and_reports_bad_payloads() {
        assert_eq!(
            decode_incoming("gpu", "gpu.request.chat", None, b"{}"),
            None
        );
        assert_eq!(
            decode_incoming("gpu", "other.reply.chat", None, b"{}"),
            None
        );
        let bad = decode_incoming("gpu", REPLY, None, b"{\"request_id\":1}");
        assert!(matches!(bad, Some((svc, Err(e))) if svc == "chat" && e.contains("request_id")));
    }

    #[test]
    fn routes_by_service_and_request_id_until_the_route_is_dropped() {
        let routes = Arc::new(Routes::default());
        let mut route = routes.register("svc", "a").unwrap();
        assert!(matches!(
            routes.register("svc", "a"),
            Err(ClientError::DuplicateRequestId(id)) if id == "a"
        ));
        routes.dispatch("svc", Incoming::Reply(Reply::new("b", Outcome::Granted)));
        // The same id from another service is not this request's.
        routes.dispatch("other", Incoming::Reply(Reply::new("a", Outcome::Rejected)));
        routes.dispatch("svc", Incoming::Reply(Reply::new("a", Outcome::Queued)));
        assert_eq!(
            route.rx.try_recv().unwrap(),
            Incoming::Reply(Reply::new("a", Outcome::Queued))
        );
        assert!(route.rx.try_recv().is_err());
        // A shared listener beside it gets the same messages.
        let mut beside = routes.listen("svc", "a");
        routes.dispatch("svc", Incoming::Reply(Reply::new("a", Outcome::Granted)));
        assert!(route.rx.try_recv().is_ok());
        assert!(beside.rx.try_recv().is_ok());
        drop(route);
        drop(beside);
        assert!(routes.register("svc", "a").is_ok());
    }
}
