//! The connection of one service to the coordinator: publishing inputs, and waiting for a grant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use gpu_coordinator_wire::codec::{self, Encoding};
use gpu_coordinator_wire::{valid_service_id, InputKind, ReleaseMsg, StatusDoc, Subjects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::http::Http;
use crate::lease::machine::Input;
use crate::options::{msg_id, nonce};
use crate::router::{Readiness, Router, Routes};
use crate::ClientError;

mod request;

/// How long an input is retried when nothing else bounds it.
pub(crate) const PUBLISH_RETRY: Duration = Duration::from_secs(30);
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A service's connection to the GPU Coordinator, over NATS JetStream ([`Client::connect`]) or over
/// its HTTP API ([`Client::connect_http`]); everything else works the same over either. Cheap to
/// clone; all clones share one connection and one reader of the coordinator's answers.
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
    transport: Transport,
    /// The names under the prefix; over HTTP those of the default prefix, which only the checks of
    /// a request before it is sent use.
    subjects: Subjects,
    service_id: String,
    routes: Arc<Routes>,
    /// One per reader: over NATS the replies' and the orders' consumers, over HTTP the control
    /// stream.
    ready: Vec<watch::Receiver<Readiness>>,
    /// Stops the router when the last clone of the client (and the last lease) is gone.
    shutdown: CancellationToken,
}

/// How the client reaches the coordinator.
// One per client, inside its `Arc`: the size of the NATS variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Transport {
    /// Inputs are JetStream publishes, answers come from consumers on the output stream.
    Nats {
        nats: async_nats::Client,
        js: jetstream::Context,
    },
    /// Inputs are POSTs answered with their replies, orders come from the control stream (SSE).
    Http(Http),
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut f = f.debug_struct("Client");
        match &self.inner.transport {
            Transport::Nats { .. } => f.field("prefix", &self.inner.subjects.prefix()),
            Transport::Http(http) => f.field("http", &http.base()),
        };
        f.field("service_id", &self.inner.service_id)
            .field("encoding", &self.encoding)
            .finish()
    }
}

impl Client {
    /// Connects to NATS at `nats_url` as the service `service_id` of the coordinator that runs under
    /// the subject prefix `prefix` (`gpu` by default there).
    ///
    /// `nats_url` may list several servers of a NATS cluster, separated by commas
    /// (`nats://n1:4222,nats://n2:4222`, as the `nats` CLI's `--server`): the client connects to one
    /// of them and, when it goes away, to another.
    ///
    /// The connection reconnects by itself, for as long as the client lives; the reader of the
    /// coordinator's answers follows it (see the crate docs). Fails if the prefix or the service id is
    /// not valid, if an entry of the URL is not a NATS URL, or if no server answers the first time.
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
        Client::connect_nats(nats_url, prefix, service_id, None).await
    }

    /// [`Client::connect`], with a NATS token when `token` is given (a URL with credentials takes
    /// none).
    async fn connect_nats(
        nats_url: &str,
        prefix: &str,
        service_id: &str,
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        let subjects = checked(prefix, service_id)?;
        let servers = crate::connect::server_addrs(nats_url).map_err(ClientError::InvalidConfig)?;
        let (reconnects_tx, reconnects_rx) = watch::channel(0u64);
        let reconnects_tx = Arc::new(reconnects_tx);
        let mut options =
            crate::connect::connect_options(nats_url).map_err(ClientError::InvalidConfig)?;
        if let Some(token) = token {
            let auth =
                crate::connect::NatsAuth::from_url(nats_url).map_err(ClientError::InvalidConfig)?;
            if auth.user.is_some() {
                return Err(ClientError::InvalidConfig(format!(
                    "`{}` carries credentials of its own: give either those or a token",
                    crate::connect::redact(nats_url)
                )));
            }
            options = options.token(token.to_owned());
        }
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
            .connect(servers)
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

    /// Connects to the coordinator's HTTP API at `base_url` (`http://host:8080`, the address of its
    /// `http.listen`) as the service `service_id`, with the bearer `token` when the coordinator has
    /// `[http.tokens]`.
    ///
    /// Inputs are POSTs to `/gpu/request`, `/gpu/renew`, ... (a request is a long poll answered with
    /// the grant), always JSON whatever [`Client::with_encoding`] says; control orders come from the
    /// Server-Sent Events stream `GET /gpu/control/<service_id>`, which reconnects by itself and
    /// resumes after the last order seen. Returns once that stream is open; fails if the service id
    /// or the URL is not valid, if the coordinator refuses the stream (a bad token: the error has its
    /// sentence), or if it does not answer within 10 s (the error names the URL).
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), gpu_coordinator_client::ClientError> {
    /// let client = gpu_coordinator_client::Client::connect_http(
    ///     "http://127.0.0.1:8080",
    ///     "chat",
    ///     Some("chat-token"),
    /// )
    /// .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_http(
        base_url: &str,
        service_id: &str,
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        let subjects = checked(gpu_coordinator_wire::subjects::DEFAULT_PREFIX, service_id)?;
        let http = Http::new(base_url, service_id, token)?;
        let first = http.open_first().await?;
        let routes = Arc::new(Routes::default());
        let shutdown = CancellationToken::new();
        let ready = http.spawn_control(first, Arc::clone(&routes), shutdown.clone());
        Ok(Client {
            inner: Arc::new(Inner {
                transport: Transport::Http(http),
                subjects,
                service_id: service_id.to_owned(),
                routes,
                ready: vec![ready],
                shutdown,
            }),
            encoding: Encoding::Json,
        })
    }

    /// Connects over whichever transport `url` names: the HTTP API for `http://` and `https://`
    /// ([`Client::connect_http`], `prefix` unused), NATS for `nats://`, `tls://`, `ws://` or a bare
    /// `host:port` ([`Client::connect`], `token` as the NATS token). For a service configured with
    /// one URL.
    ///
    /// ```no_run
    /// # async fn example(url: &str) -> Result<(), gpu_coordinator_client::ClientError> {
    /// // `nats://127.0.0.1:4222` or `http://127.0.0.1:8080`, from the service's configuration.
    /// let client = gpu_coordinator_client::Client::connect_url(url, "gpu", "chat", None).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_url(
        url: &str,
        prefix: &str,
        service_id: &str,
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        match url_scheme(url).as_deref() {
            Some("http" | "https") => Client::connect_http(url, service_id, token).await,
            None | Some("nats" | "tls" | "ws" | "wss") => {
                Client::connect_nats(url, prefix, service_id, token).await
            }
            Some(other) => Err(ClientError::InvalidConfig(format!(
                "`{}`: unknown scheme `{other}://`; expected http:// or https:// (the HTTP API) or \
                 nats://, tls://, ws:// (NATS)",
                crate::connect::redact(url)
            ))),
        }
    }

    fn start(
        nats: async_nats::Client,
        subjects: Subjects,
        service_id: &str,
        reconnects: Option<watch::Receiver<u64>>,
    ) -> Client {
        let routes = Arc::new(Routes::default());
        let shutdown = CancellationToken::new();
        let ready = [subjects.reply(service_id), subjects.control(service_id)]
            .map(|filter| {
                Router {
                    nats: nats.clone(),
                    subjects: subjects.clone(),
                    filter,
                    routes: Arc::clone(&routes),
                    reconnects: reconnects.clone(),
                    shutdown: shutdown.clone(),
                }
                .spawn()
            })
            .into();
        Client {
            inner: Arc::new(Inner {
                transport: Transport::Nats {
                    js: jetstream::new(nats.clone()),
                    nats,
                },
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

    /// The subject and stream names under the client's prefix (over HTTP, which has no prefix,
    /// those of the default one, `gpu`).
    pub fn subjects(&self) -> &Subjects {
        &self.inner.subjects
    }

    /// The NATS connection; `None` over HTTP.
    pub fn nats(&self) -> Option<&async_nats::Client> {
        match &self.inner.transport {
            Transport::Nats { nats, .. } => Some(nats),
            Transport::Http(_) => None,
        }
    }

    /// The encoding inputs are sent in: the client's over NATS, always JSON over HTTP.
    fn input_encoding(&self) -> Encoding {
        match self.inner.transport {
            Transport::Nats { .. } => self.encoding,
            Transport::Http(_) => Encoding::Json,
        }
    }

    /// Releases everything this service holds, queued or paused (`release` without a request id):
    /// for a service that restarts and wants no lease of its previous life. Returns once the input
    /// is stored; the `released` replies are not awaited. Over HTTP they do not come back at all
    /// (the API answers `202` once the input is stored): a lease of this client that it released
    /// finds out at its next renewal, which is rejected, and gives itself up when its renewals stay
    /// unconfirmed.
    ///
    /// ```no_run
    /// # async fn example(client: gpu_coordinator_client::Client) -> Result<(), gpu_coordinator_client::ClientError> {
    /// client.release_all().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn release_all(&self) -> Result<(), ClientError> {
        let svc = self.inner.service_id.as_str();
        let payload = codec::encode(self.input_encoding(), &ReleaseMsg::default());
        self.send_input(
            InputKind::Release,
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
        let nats = match &self.inner.transport {
            Transport::Nats { nats, .. } => nats,
            Transport::Http(http) => return http.status().await,
        };
        let subject = self.inner.subjects.status();
        let answer = match self.encoding.content_type() {
            Some(content_type) => {
                let mut headers = HeaderMap::new();
                headers.insert("Content-Type", content_type);
                nats.request_with_headers(subject, headers, Bytes::new())
                    .await
            }
            None => nats.request(subject, Bytes::new()).await,
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

    /// Sends an input of `kind` (`payload`, encoded in [`Client::input_encoding`]) until it is
    /// stored or `deadline` passes: a publish into the input stream over NATS, a POST over HTTP
    /// (whose reply is handed to the routes).
    pub(crate) async fn send_input(
        &self,
        kind: InputKind,
        msg_id: String,
        payload: Bytes,
        deadline: Instant,
    ) -> Result<(), ClientError> {
        match &self.inner.transport {
            Transport::Nats { js, .. } => {
                let subject = self.inner.subjects.input(kind, &self.inner.service_id);
                self.publish_input(js, subject, msg_id, payload, deadline)
                    .await
            }
            Transport::Http(http) => {
                http.post(kind, &payload, deadline, &self.inner.routes)
                    .await
            }
        }
    }

    /// Publishes an input into the input stream and waits for its PubAck, retrying with the same
    /// `Nats-Msg-Id` (so that the stream keeps one copy) until `deadline`.
    async fn publish_input(
        &self,
        js: &jetstream::Context,
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
                let ack = js
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
        let encoding = self.input_encoding();
        let (kind, request_id, fence, payload) = match &input {
            Input::Renew(m) => (
                InputKind::Renew,
                m.request_id.clone(),
                m.fence,
                codec::encode(encoding, m),
            ),
            Input::Ack(m) => (
                InputKind::Ack,
                m.request_id.clone(),
                m.fence,
                codec::encode(encoding, m),
            ),
            Input::Release(m) => (
                InputKind::Release,
                m.request_id.clone().unwrap_or_else(|| svc.to_owned()),
                m.fence,
                codec::encode(encoding, m),
            ),
        };
        let id = msg_id(&request_id, input.kind(), fence, &nonce());
        let client = self.clone();
        let deadline = Instant::now() + retry_for;
        tokio::spawn(async move {
            if let Err(error) = client.send_input(kind, id, payload.into(), deadline).await {
                tracing::warn!(request_id, "{error}");
            }
        });
    }
}

/// The scheme of `url` in lower case (`http`, `nats`, ...); `None` for a bare `host:port`.
fn url_scheme(url: &str) -> Option<String> {
    let (scheme, _) = url.trim().split_once("://")?;
    Some(scheme.to_ascii_lowercase())
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
    fn url_schemes_pick_the_transport() {
        assert_eq!(url_scheme("http://127.0.0.1:8080").as_deref(), Some("http"));
        assert_eq!(url_scheme("HTTPS://host").as_deref(), Some("https"));
        assert_eq!(url_scheme("nats://a:b@host:4222").as_deref(), Some("nats"));
        assert_eq!(url_scheme("tls://host:4222").as_deref(), Some("tls"));
        assert_eq!(url_scheme("127.0.0.1:4222"), None);
    }

    #[tokio::test]
    async fn connect_url_refuses_unknown_schemes_and_bad_ids_before_connecting() {
        let error = Client::connect_url("ftp://host", "gpu", "chat", None)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ClientError::InvalidConfig(e) if e.contains("ftp://")),
            "{error}"
        );
        for url in ["http://127.0.0.1:1", "nats://127.0.0.1:1"] {
            let error = Client::connect_url(url, "gpu", "a.b", None)
                .await
                .unwrap_err();
            assert!(
                matches!(&error, ClientError::InvalidConfig(e) if e.contains("service id")),
                "{url}: {error}"
            );
        }
        let error = Client::connect_url("nats://u:p@127.0.0.1:1", "gpu", "chat", Some("t"))
            .await
            .unwrap_err();
        assert!(matches!(error, ClientError::InvalidConfig(_)), "{error}");
    }

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
