//! The long poll of `POST /gpu/request`, and the guard that releases the request it created when
//! its client goes away.

use std::sync::Arc;
use std::time::Duration;

use gpu_coordinator_wire::{EventKind, Outcome, Reply};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::{ApiError, HttpState};
use super::answers::{next_answer, publish};
use crate::ports::{Answer, AnswerRoute, Gateway};

/// What the coordinator's answers say of who created a request.
enum Origin {
    /// Its `requested` event: the coordinator created it for this call's input.
    Created,
    /// A `queued` or `paused` reply: the answer to a repeated id, the request is someone else's.
    Repeated,
    /// Neither yet.
    Unknown,
}

fn origin(incoming: &Answer) -> Origin {
    match incoming {
        Answer::Event(e) if e.kind == EventKind::Requested => Origin::Created,
        Answer::Reply(r) if matches!(r.outcome, Outcome::Queued | Outcome::Paused) => {
            Origin::Repeated
        }
        _ => Origin::Unknown,
    }
}

/// Releases a request that this call created when its long poll is abandoned: the client went away (the
/// handler's future is dropped), so nobody would learn of its grant, and it must not hold a GPU until its
/// lease expires. Armed once the coordinator says the request is this call's (its `requested` event, or
/// from the start for an id made up here); a repeated `request_id` names a request that someone else (a
/// NATS service, an earlier call) owns. It never fires when the handler itself ends, its own deadline
/// included (the coordinator ends a request that waited `timeout_ms` with `timed_out`), nor when the
/// coordinator stops: the request stays queued, and the client asks again with its `request_id`.
pub(super) struct ReleaseOnDrop {
    release: Option<(Arc<dyn Gateway>, String, Vec<u8>)>,
    armed: bool,
    /// The answers about the request; while undecided, a client that goes away leaves the wait for the
    /// `requested` event to a task.
    route: Option<Box<dyn AnswerRoute>>,
    stop: CancellationToken,
}

impl ReleaseOnDrop {
    /// A guard armed at once for an id made up here (`generated`), else undecided until the answers on
    /// `route` say.
    pub(super) fn new(
        js: &Arc<dyn Gateway>,
        state: &HttpState,
        service: &str,
        request_id: &str,
        route: Box<dyn AnswerRoute>,
        generated: bool,
    ) -> Self {
        let body = serde_json::json!({ "request_id": request_id });
        ReleaseOnDrop {
            release: Some((
                js.clone(),
                state.subjects().release(service),
                serde_json::to_vec(&body).expect("a JSON value always serializes"),
            )),
            armed: generated,
            route: Some(route),
            stop: state.stop().clone(),
        }
    }

    /// Takes what the coordinator said into account.
    fn learn(&mut self, incoming: &Answer) {
        match origin(incoming) {
            Origin::Created => self.armed = self.release.is_some(),
            // For good: a disarmed guard cannot be armed again.
            Origin::Repeated => self.disarm(),
            Origin::Unknown => {}
        }
    }

    pub(super) fn disarm(&mut self) {
        self.armed = false;
        self.release = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if self.stop.is_cancelled() {
            return;
        }
        let Some((js, subject, payload)) = self.release.take() else {
            return;
        };
        let undecided = if self.armed { None } else { self.route.take() };
        if !self.armed && undecided.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Some(route) = undecided {
                // The client left before this call learnt whether it created the request: the
                // coordinator's answers about the id, if they come, say so.
                if !created_here(route).await {
                    return;
                }
            }
            tracing::info!(%subject, "HTTP: a long poll was abandoned; releasing its request");
            if let Err(e) = publish(&js, subject, payload).await {
                tracing::warn!("releasing an abandoned request: {e}");
            }
        });
    }
}

/// How long an abandoned call's request may take to show whether this call created it.
const DECIDE_WAIT: Duration = Duration::from_secs(60);

/// Whether the answers say the request was created for this call (within [`DECIDE_WAIT`]).
async fn created_here(mut route: Box<dyn AnswerRoute>) -> bool {
    let wait = async {
        while let Some(incoming) = route.recv().await {
            match origin(&incoming) {
                Origin::Created => return true,
                Origin::Repeated => return false,
                Origin::Unknown => {}
            }
        }
        false
    };
    tokio::time::timeout(DECIDE_WAIT, wait)
        .await
        .unwrap_or(false)
}

/// Waits for the answer to a request (the first reply about it that is not `queued`), until `deadline`,
/// while `guard` learns from the answers whether the request is this call's. A `queued` or `paused`
/// reply is the answer to a repeated id: the request is, or may be, someone else's (when another input
/// repeated the id of a request this call created, the coordinator's own `timed_out` still ends it).
pub(super) async fn wait_request(
    state: &HttpState,
    request_id: &str,
    deadline: Instant,
    guard: &mut ReleaseOnDrop,
) -> Result<Reply, ApiError> {
    let waited = Instant::now();
    loop {
        let route = guard
            .route
            .as_mut()
            .expect("the guard keeps its route while the call waits");
        let incoming = next_answer(state, route, request_id, deadline, waited).await?;
        guard.learn(&incoming);
        if let Answer::Reply(reply) = incoming {
            if reply.outcome != Outcome::Queued {
                return Ok(reply);
            }
        }
    }
}
