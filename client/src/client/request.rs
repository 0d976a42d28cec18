//! Asking for a GPU: the request is checked and sent, and its answers are read until the grant (or
//! the end) comes.

use std::time::{Duration, Instant, SystemTime};

use gpu_coordinator_wire::codec;
use gpu_coordinator_wire::{decode_input, ControlAction, InputKind, Outcome, ReleaseMsg};

use super::{Client, PUBLISH_RETRY};
use crate::lease::machine::{Grant, Input, Machine};
use crate::options::{generate_request_id, msg_id, nonce};
use crate::router::{Incoming, Route};
use crate::worker::Handlers;
use crate::{ClientError, Lease, RequestOptions};

/// How long past `timeout_ms` the client still waits for the coordinator's `timed_out`, before it
/// gives up by itself.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// How long a request without `timeout_ms` waits for the output stream to be readable.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The contract's default lease length, for a grant that names none.
const DEFAULT_LEASE_MS: u64 = 30_000;

impl Client {
    /// Asks for a GPU and waits for the grant.
    ///
    /// The client reads the coordinator's answers before it publishes the request, so no answer is
    /// missed, even across a NATS restart. It waits until the coordinator answers: `granted` gives a
    /// [`Lease`]; `timed_out` ([`ClientError::TimedOut`], also when nothing at all came within
    /// `timeout_ms` and 5 s more), `rejected` ([`ClientError::Rejected`] with the coordinator's
    /// sentence) and `cancelled` are errors. A request that is already known (a reused
    /// `request_id`) is answered with its current state: a lease still held is returned again, an
    /// ended one is [`ClientError::Ended`].
    ///
    /// Dropping the future before it resolves withdraws the request (it publishes `release` for it),
    /// so `tokio::time::timeout(.., client.request(..))` is safe.
    ///
    /// A pause order for a lease from a plain `request` is not acknowledged (there is no handler to
    /// free the VRAM): use a [`crate::Worker`] for preemptible work, or `preemptible(false)`.
    ///
    /// ```no_run
    /// # async fn example(client: gpu_coordinator_client::Client) {
    /// use gpu_coordinator_client::{ClientError, RequestOptions};
    ///
    /// match client.request(RequestOptions::new(0).vram_mb(8_000).timeout_ms(5_000)).await {
    ///     Ok(lease) => {
    ///         // ... generate the answer on `lease.gpu()` ...
    ///         let _ = lease.release().await;
    ///     }
    ///     Err(ClientError::TimedOut) => eprintln!("no GPU within 5 s"),
    ///     Err(ClientError::Rejected { error, .. }) => eprintln!("refused: {error}"),
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    pub async fn request(&self, options: RequestOptions) -> Result<Lease, ClientError> {
        self.request_with(options, Handlers::default()).await
    }

    /// [`Client::request`], for a lease whose pause and resume run `handlers`.
    pub(crate) async fn request_with(
        &self,
        options: RequestOptions,
        handlers: Handlers,
    ) -> Result<Lease, ClientError> {
        let svc = self.inner.service_id.as_str();
        let request_id = options
            .request_id
            .clone()
            .unwrap_or_else(|| generate_request_id(svc));
        let payload = self.request_payload(&options, &request_id)?;
        let mut route = self.inner.routes.register(svc, &request_id)?;
        let started = Instant::now();
        let deadline = options
            .timeout_ms
            .map(|ms| started + Duration::from_millis(ms) + REPLY_GRACE);
        self.wait_ready(deadline.unwrap_or(started + READY_TIMEOUT))
            .await?;
        let mut abandon = Abandon {
            client: self.clone(),
            request_id: request_id.clone(),
            armed: true,
        };
        // Replies are read while the PubAck is awaited: a PubAck lost in a reconnect costs a
        // timeout and a (deduplicated) retry, and the grant may well be there before that. Over
        // HTTP this is the long poll, whose answer comes through the route too.
        let publish = self.send_input(
            InputKind::Request,
            msg_id(&request_id, "request", None, &nonce()),
            payload.into(),
            deadline.unwrap_or_else(|| Instant::now() + PUBLISH_RETRY),
        );
        tokio::pin!(publish);
        let mut published = false;
        let mut early = Vec::new();
        loop {
            let message = tokio::select! {
                stored = &mut publish, if !published => {
                    if let Err(error) = stored {
                        // Refused by the HTTP API (a bad field, a bad token): nothing was stored,
                        // there is nothing to withdraw.
                        if matches!(
                            error,
                            ClientError::InvalidRequest(_) | ClientError::Rejected { .. }
                        ) {
                            abandon.armed = false;
                        }
                        return Err(error);
                    }
                    published = true;
                    continue;
                }
                message = next_message(&mut route, deadline) => message?,
            };
            let message = message.ok_or(ClientError::Closed)?;
            let (machine, waited_ms) =
                match answer(message, &request_id, &options, &handlers, &mut early) {
                    Answer::Wait => continue,
                    Answer::Failed(error) => {
                        abandon.armed = false;
                        return Err(error);
                    }
                    Answer::Start { machine, waited_ms } => (machine, waited_ms),
                };
            abandon.armed = false;
            return Ok(Lease::start(
                self.clone(),
                request_id,
                waited_ms,
                *machine,
                early,
                handlers,
                route,
            ));
        }
    }

    /// The `request` input for `options`, encoded; an error where the coordinator's own rules
    /// would reject it, so that a mistake is an error here rather than a rejection.
    fn request_payload(
        &self,
        options: &RequestOptions,
        request_id: &str,
    ) -> Result<Vec<u8>, ClientError> {
        let svc = self.inner.service_id.as_str();
        let subject = self.inner.subjects.request(svc);
        let encoding = self.input_encoding();
        let payload = codec::encode(encoding, &options.to_message(svc, request_id));
        decode_input(
            &self.inner.subjects,
            &subject,
            encoding.content_type(),
            &payload,
            0,
        )
        .map_err(|rejection| ClientError::InvalidRequest(rejection.error))?;
        Ok(payload)
    }
}

/// The next message about a request (`None`: the client is closing); an error when `deadline`
/// passes first.
async fn next_message(
    route: &mut Route,
    deadline: Option<Instant>,
) -> Result<Option<Incoming>, ClientError> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), route.recv())
            .await
            .map_err(|_| ClientError::TimedOut),
        None => Ok(route.recv().await),
    }
}

/// What one message about a request means for it.
enum Answer {
    /// Not the end of the request: wait for the next.
    Wait,
    /// The lease starts, as this machine; `waited_ms`: how long the request queued, by a grant.
    Start {
        machine: Box<Machine>,
        waited_ms: Option<u64>,
    },
    /// The request ended without a lease.
    Failed(ClientError),
}

/// A message that came before a lease existed, to hand to it once it does, with when it came.
type Early = (Incoming, Instant, SystemTime);

/// Reads one message about the request `request_id`: a grant (or a resume of a reused request id
/// that was paused) starts the lease, an order that overtook the grant is kept in `early`, and an
/// end without a lease is its error.
fn answer(
    message: Incoming,
    request_id: &str,
    options: &RequestOptions,
    handlers: &Handlers,
    early: &mut Vec<Early>,
) -> Answer {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let (has_pause, has_resume) = (handlers.on_pause.is_some(), handlers.on_resume.is_some());
    let reply = match message {
        Incoming::Reply(reply) => reply,
        Incoming::Control(control) if control.action == ControlAction::Resume => {
            // A reused request id that was paused holds the GPU again.
            let machine = Machine::paused(request_id.to_owned(), has_pause, has_resume, wall);
            early.push((Incoming::Control(control), now, wall));
            return Answer::Start {
                machine: Box::new(machine),
                waited_ms: None,
            };
        }
        // An order that overtook the grant (replies and orders come through two
        // consumers): the lease handles it once it exists.
        control @ Incoming::Control(_) => {
            early.push((control, now, wall));
            return Answer::Wait;
        }
        // This client reads no events.
        Incoming::Event(_) => return Answer::Wait,
    };
    let error = match reply.outcome {
        Outcome::Granted => {
            let grant = Grant::from_reply(&reply, options.lease_ms.unwrap_or(DEFAULT_LEASE_MS));
            let machine = Machine::granted(
                request_id.to_owned(),
                grant,
                has_pause,
                has_resume,
                now,
                wall,
            );
            return Answer::Start {
                machine: Box::new(machine),
                waited_ms: reply.waited_ms,
            };
        }
        Outcome::TimedOut => ClientError::TimedOut,
        Outcome::Rejected => ClientError::Rejected {
            code: reply.code,
            error: reply
                .error
                .unwrap_or_else(|| "the coordinator gave no reason".to_owned()),
        },
        Outcome::Cancelled => ClientError::Cancelled,
        Outcome::Released | Outcome::Revoked => ClientError::Ended(reply.outcome),
        Outcome::Queued | Outcome::Paused | Outcome::Renewed => return Answer::Wait,
    };
    Answer::Failed(error)
}

/// Withdraws a request whose `request` future was dropped (or failed) before the coordinator ended
/// it: `release` without a fence ends it whether it is still queued or was just granted.
struct Abandon {
    client: Client,
    request_id: String,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.armed || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tracing::debug!(
            request_id = self.request_id,
            "withdrawing a request nobody waits for"
        );
        self.client.spawn_publish_input(
            Input::Release(ReleaseMsg {
                request_id: Some(self.request_id.clone()),
                fence: None,
            }),
            PUBLISH_RETRY,
        );
    }
}
