//! The connection of one service to the coordinator: publishing inputs, and waiting for a grant.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use gpu_coordinator_wire::codec::{self, Encoding};
use gpu_coordinator_wire::{
    decode_input, valid_service_id, ControlAction, Outcome, ReleaseMsg, StatusDoc, Subjects,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::lease::machine::{Grant, Input, Machine};
use crate::options::{generate_request_id, msg_id, nonce};
use crate::router::{Incoming, Readiness, Router, Routes};
use crate::worker::Handlers;
use crate::{ClientError, Lease, RequestOptions};

/// How long past `timeout_ms` the client still waits for the coordinator's `timed_out`, before it
/// gives up by itself.
const REPLY_GRACE: Duration = Duration::from_secs(5);
/// How long a request without `timeout_ms` waits for the output stream to be readable.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an input is retried when nothing else bounds it.
const PUBLISH_RETRY: Duration = Duration::from_secs(30);
/// The contract's default lease length, for a grant that names none.
const DEFAULT_LEASE_MS: u64 = 30_000;
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A service's connection to the GPU Coordinator. Cheap to clone; all clones share one NATS
/// connection and one reader of the coordinator's answers.
///
/// ```no_run
/// # async fn example() -> Result<(), gpu_coordinator_client::ClientError> {
/// use gpu_coordinator_client::{Client, RequestOptions};
///
/// let client = Client::connect("nats://127.0.0.1:4222", "gpu", "chat").await?;
/// let lease = client.request(RequestOptions::new(0).timeout_ms(10_000)).await?;
/// // ... use the GPU `lease.gpu()` ...
/// lease.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    encoding: Encoding,
}

struct Inner {
    nats: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    service_id: String,
    routes: Arc<Routes>,
    /// One per router: replies, orders.
    ready: [watch::Receiver<Readiness>; 2],
    /// Stops the router when the last clone of the client (and the last lease) is gone.
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("prefix", &self.inner.subjects.prefix())
            .field("service_id", &self.inner.service_id)
            .field("encoding", &self.encoding)
            .finish()
    }
}

impl Client {
    /// Connects to NATS at `nats_url` as the service `service_id` of the coordinator that runs under
    /// the subject prefix `prefix` (`gpu` by default there).
    ///
    /// The connection reconnects by itself, for as long as the client lives; the reader of the
    /// coordinator's answers follows it (see the crate docs). Fails if the prefix or the service id is
    /// not valid, or if NATS does not answer the first time.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), gpu_coordinator_client::ClientError> {
    /// let client =
    ///     gpu_coordinator_client::Client::connect("nats://127.0.0.1:4222", "gpu", "chat").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(
        nats_url: &str,
        prefix: &str,
        service_id: &str,
    ) -> Result<Client, ClientError> {
        let subjects = checked(prefix, service_id)?;
        let (reconnects_tx, reconnects_rx) = watch::channel(0u64);
        let reconnects_tx = Arc::new(reconnects_tx);
        let options =
            crate::connect::connect_options(nats_url).map_err(ClientError::InvalidConfig)?;
        let nats = options
            .name(format!("gpu-coordinator-client {service_id}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let reconnects = Arc::clone(&reconnects_tx);
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            reconnects.send_modify(|n| *n += 1);
                            tracing::info!("NATS connected");
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS disconnected; reconnecting")
                        }
                        // Each failed reconnect attempt reports an I/O error: not worth a warning.
                        async_nats::Event::ClientError(e) => tracing::debug!("NATS: {e}"),
                        // The connection closes when the last clone of the client is dropped.
                        async_nats::Event::Closed => tracing::debug!("NATS: closed"),
                        other => tracing::warn!("NATS: {other}"),
                    }
                }
            })
            .connect(crate::connect::without_credentials(nats_url))
            .await
            .map_err(|source| ClientError::Connect {
                url: crate::connect::redact(nats_url),
                source,
            })?;
        Ok(Client::start(
            nats,
            subjects,
            service_id,
            Some(reconnects_rx),
        ))
    }

    /// A client over a NATS connection made elsewhere (with its own options). It must be called
    /// within a Tokio runtime. Reconnects are then noticed by watching the connection state.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let nats = async_nats::ConnectOptions::new()
    ///     .user_and_password("chat".into(), "secret".into())
    ///     .connect("nats://127.0.0.1:4222")
    ///     .await?;
    /// let client = gpu_coordinator_client::Client::with_nats(nats, "gpu", "chat")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_nats(
        nats: async_nats::Client,
        prefix: &str,
        service_id: &str,
    ) -> Result<Client, ClientError> {
        let subjects = checked(prefix, service_id)?;
        Ok(Client::start(nats, subjects, service_id, None))
    }

    fn start(
        nats: async_nats::Client,
        subjects: Subjects,
        service_id: &str,
        reconnects: Option<watch::Receiver<u64>>,
    ) -> Client {
        let routes = Arc::new(Routes::default());
        let shutdown = CancellationToken::new();
        let ready = [subjects.reply(service_id), subjects.control(service_id)].map(|filter| {
            Router {
                nats: nats.clone(),
                subjects: subjects.clone(),
                filter,
                routes: Arc::clone(&routes),
                reconnects: reconnects.clone(),
                shutdown: shutdown.clone(),
            }
            .spawn()
        });
        Client {
            inner: Arc::new(Inner {
                js: jetstream::new(nats.clone()),
                nats,
                subjects,
                service_id: service_id.to_owned(),
                routes,
                ready,
                shutdown,
            }),
            encoding: Encoding::Json,
        }
    }

    /// The same client, sending its inputs in `encoding` (JSON by default). The coordinator answers
    /// each request in the encoding it came in; the client reads either.
    pub fn with_encoding(mut self, encoding: Encoding) -> Client {
        self.encoding = encoding;
        self
    }

    /// The service id every input of this client is sent as.
    pub fn service_id(&self) -> &str {
        &self.inner.service_id
    }

    /// The subject and stream names under the client's prefix.
    pub fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.inner.nats
    }

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
    ///     Err(ClientError::Rejected(why)) => eprintln!("refused: {why}"),
    ///     Err(e) => eprintln!("{e}"),
    /// }
    /// # }
    /// ```
    pub async fn request(&self, options: RequestOptions) -> Result<Lease, ClientError> {
        self.request_with(options, Handlers::default()).await
    }

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
        let subject = self.inner.subjects.request(svc);
        let payload = codec::encode(self.encoding, &options.to_message(svc, &request_id));
        // The coordinator's own rules, so that a mistake is an error here rather than a rejection.
        decode_input(
            &self.inner.subjects,
            &subject,
            self.encoding.content_type(),
            &payload,
            0,
        )
        .map_err(|rejection| ClientError::InvalidRequest(rejection.error))?;
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
        // timeout and a (deduplicated) retry, and the grant may well be there before that.
        let publish = self.publish_input(
            subject,
            msg_id(&request_id, "request", None, &nonce()),
            payload.into(),
            deadline.unwrap_or_else(|| Instant::now() + PUBLISH_RETRY),
        );
        tokio::pin!(publish);
        let mut published = false;
        let (has_pause, has_resume) = (handlers.on_pause.is_some(), handlers.on_resume.is_some());
        let mut early = Vec::new();
        loop {
            let next = async {
                match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline.into(), route.recv())
                        .await
                        .map_err(|_| ClientError::TimedOut),
                    None => Ok(route.recv().await),
                }
            };
            let message = tokio::select! {
                stored = &mut publish, if !published => {
                    stored?;
                    published = true;
                    continue;
                }
                message = next => message?,
            };
            let message = message.ok_or(ClientError::Closed)?;
            let (now, wall) = (Instant::now(), SystemTime::now());
            let reply = match message {
                Incoming::Reply(reply) => reply,
                Incoming::Control(control) if control.action == ControlAction::Resume => {
                    // A reused request id that was paused holds the GPU again.
                    abandon.armed = false;
                    let machine = Machine::paused(request_id.clone(), has_pause, has_resume, wall);
                    early.push((Incoming::Control(control), now, wall));
                    return Ok(Lease::start(
                        self.clone(),
                        request_id,
                        None,
                        machine,
                        early,
                        handlers,
                        route,
                    ));
                }
                // An order that overtook the grant (replies and orders come through two
                // consumers): the lease handles it once it exists.
                control @ Incoming::Control(_) => {
                    early.push((control, now, wall));
                    continue;
                }
                // This client reads no events.
                Incoming::Event(_) => continue,
            };
            let error = match reply.outcome {
                Outcome::Granted => {
                    abandon.armed = false;
                    let grant =
                        Grant::from_reply(&reply, options.lease_ms.unwrap_or(DEFAULT_LEASE_MS));
                    let machine = Machine::granted(
                        request_id.clone(),
                        grant,
                        has_pause,
                        has_resume,
                        now,
                        wall,
                    );
                    return Ok(Lease::start(
                        self.clone(),
                        request_id,
                        reply.waited_ms,
                        machine,
                        early,
                        handlers,
                        route,
                    ));
                }
                Outcome::TimedOut => ClientError::TimedOut,
                Outcome::Rejected => ClientError::Rejected(
                    reply
                        .error
                        .unwrap_or_else(|| "the coordinator gave no reason".to_owned()),
                ),
                Outcome::Cancelled => ClientError::Cancelled,
                Outcome::Released | Outcome::Revoked => ClientError::Ended(reply.outcome),
                Outcome::Queued | Outcome::Paused | Outcome::Renewed => continue,
            };
            abandon.armed = false;
            return Err(error);
        }
    }

    /// Releases everything this service holds, queued or paused (`release` without a request id):
    /// for a service that restarts and wants no lease of its previous life. Returns once the input
    /// is stored; the `released` replies are not awaited.
    ///
    /// ```no_run
    /// # async fn example(client: gpu_coordinator_client::Client) -> Result<(), gpu_coordinator_client::ClientError> {
    /// client.release_all().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn release_all(&self) -> Result<(), ClientError> {
        let svc = self.inner.service_id.as_str();
        let payload = codec::encode(self.encoding, &ReleaseMsg::default());
        self.publish_input(
            self.inner.subjects.release(svc),
            msg_id(svc, "release-all", None, &nonce()),
            payload.into(),
            Instant::now() + PUBLISH_RETRY,
        )
        .await
    }

    /// The coordinator's status document: each GPU with its VRAM and holders, the paused requests and
    /// the queue.
    ///
    /// ```no_run
    /// # async fn example(client: gpu_coordinator_client::Client) -> Result<(), gpu_coordinator_client::ClientError> {
    /// let status = client.status().await?;
    /// for gpu in &status.gpus {
    ///     println!("{}: {} MB free, {} holders", gpu.id, gpu.free_mb, gpu.holders.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn status(&self) -> Result<StatusDoc, ClientError> {
        let subject = self.inner.subjects.status();
        let answer = match self.encoding.content_type() {
            Some(content_type) => {
                let mut headers = HeaderMap::new();
                headers.insert("Content-Type", content_type);
                self.inner
                    .nats
                    .request_with_headers(subject, headers, Bytes::new())
                    .await
            }
            None => self.inner.nats.request(subject, Bytes::new()).await,
        }
        .map_err(|e| ClientError::Status(e.to_string()))?;
        let content_type = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .map(|v| v.as_str());
        codec::decode(Encoding::from_content_type(content_type), &answer.payload)
            .map_err(|e| ClientError::Status(e.0))
    }

    /// Waits until the coordinator's answers can be read, or says why they cannot by `deadline`.
    async fn wait_ready(&self, deadline: Instant) -> Result<(), ClientError> {
        crate::router::wait_ready(&self.inner.ready, deadline.into()).await
    }

    /// Publishes an input into the input stream and waits for its PubAck, retrying with the same
    /// `Nats-Msg-Id` (so that the stream keeps one copy) until `deadline`.
    pub(crate) async fn publish_input(
        &self,
        subject: String,
        msg_id: String,
        payload: Bytes,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        if let Some(content_type) = self.encoding.content_type() {
            headers.insert("Content-Type", content_type);
        }
        let mut delay = RETRY_MIN;
        loop {
            let attempt = async {
                let ack = self
                    .inner
                    .js
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            };
            let error = match tokio::time::timeout_at(deadline.into(), attempt).await {
                Ok(Ok(ack)) => {
                    if ack.duplicate {
                        tracing::debug!(msg_id, "the input stream already had this input");
                    }
                    return Ok(());
                }
                Ok(Err(error)) => error,
                Err(_) => "no PubAck before the deadline".to_owned(),
            };
            if Instant::now() + delay >= deadline {
                return Err(ClientError::Publish {
                    subject,
                    detail: error,
                });
            }
            tracing::debug!(subject, "publishing failed, retrying: {error}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Publishes an input of a lease in the background, retrying for `retry_for`.
    pub(crate) fn spawn_publish_input(&self, input: Input, retry_for: Duration) {
        let svc = self.inner.service_id.as_str();
        let subjects = &self.inner.subjects;
        let (subject, request_id, fence, payload) = match &input {
            Input::Renew(m) => (
                subjects.renew(svc),
                m.request_id.clone(),
                m.fence,
                codec::encode(self.encoding, m),
            ),
            Input::Ack(m) => (
                subjects.ack(svc),
                m.request_id.clone(),
                m.fence,
                codec::encode(self.encoding, m),
            ),
            Input::Release(m) => (
                subjects.release(svc),
                m.request_id.clone().unwrap_or_else(|| svc.to_owned()),
                m.fence,
                codec::encode(self.encoding, m),
            ),
        };
        let id = msg_id(&request_id, input.kind(), fence, &nonce());
        let client = self.clone();
        let deadline = Instant::now() + retry_for;
        tokio::spawn(async move {
            if let Err(error) = client
                .publish_input(subject, id, payload.into(), deadline)
                .await
            {
                tracing::warn!(request_id, "{error}");
            }
        });
    }
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

/// The names under `prefix`, after checking the prefix and the service id.
fn checked(prefix: &str, service_id: &str) -> Result<Subjects, ClientError> {
    let subjects = Subjects::new(prefix).map_err(ClientError::InvalidConfig)?;
    if !valid_service_id(service_id) {
        return Err(ClientError::InvalidConfig(format!(
            "the service id {service_id:?} is not valid: expected 1 to 64 characters of A-Z, a-z, \
             0-9, `_` and `-`"
        )));
    }
    Ok(subjects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_prefix_and_service_id() {
        assert!(checked("gpu", "chat").is_ok());
        assert!(checked("team.gpu", "voice_cmd-2").is_ok());
        assert!(matches!(
            checked("", "chat"),
            Err(ClientError::InvalidConfig(_))
        ));
        assert!(matches!(
            checked("gpu", "a.b"),
            Err(ClientError::InvalidConfig(_))
        ));
        assert!(matches!(
            checked("gpu", ""),
            Err(ClientError::InvalidConfig(_))
        ));
        assert!(matches!(
            checked("gpu", &"x".repeat(65)),
            Err(ClientError::InvalidConfig(_))
        ));
    }
}
