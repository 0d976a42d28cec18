//! NATS JetStream: the streams, the durable input consumer, and publishing with PubAcks.
//!
//! Owns the connection and the stream and consumer definitions. Decides nothing: decoding is the wire
//! crate's, scheduling the core's.

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use futures::future::join_all;
use futures::StreamExt;
use gpu_coordinator_wire::codec::MSGPACK_CONTENT_TYPE;
use gpu_coordinator_wire::{Encoding, Subjects};

use crate::ports::{self, Delivery, Inputs, PortError, Settle, StatusQueries, StatusQuery};
pub use crate::ports::{Outbound, PublishFailure};

/// The durable pull consumer the coordinator reads its inputs with.
pub const CONSUMER: &str = "coordinator";

/// How long JetStream waits for an input's ACK before it redelivers it.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// The idle heartbeat of the pulls on the input consumer: two missed and the consumer is opened
/// anew. On a cluster, the consumer's leader may go with its server while this connection stays up;
/// the pulls it held are then answered by nobody, and only the missing heartbeats tell.
const INPUT_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a call that looks a stream or a consumer up, or makes a consumer, waits for its answer.
/// JetStream does not answer calls about a stream while the stream elects a leader (after the server
/// that led it went away, a few seconds): such a call waits for its whole timeout, and the
/// connection's (10 s) would hold the inputs back that much longer than the election.
const API_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a start waits for a stream whose replicas changed to have them placed and current.
const PLACEMENT_WAIT: Duration = Duration::from_secs(30);

/// The cause of a NATS failure, whatever the library's error type was.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong talking to NATS. Each variant keeps the library's error as its `source`.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The first connection could not be made.
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A stream could not be created or updated.
    #[error("cannot create or update stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: Cause,
    },
    /// The durable consumer could not be created or read.
    #[error("cannot open consumer {CONSUMER} on stream {stream}")]
    Consumer {
        stream: String,
        #[source]
        source: Cause,
    },
    /// A publish did not get its PubAck.
    #[error("publish to {subject} was not stored")]
    Publish {
        subject: String,
        #[source]
        source: Cause,
    },
    /// `nats.url` lists something that is not a NATS URL.
    #[error("nats.url: {0}")]
    Url(String),
    /// `nats.replicas` asks for more replicas than the NATS servers can keep: not retried.
    #[error("{0}")]
    Replicas(String),
    /// A core NATS operation failed.
    #[error("NATS {what} failed")]
    Other {
        what: &'static str,
        #[source]
        source: Cause,
    },
}

/// The connection to NATS and JetStream.
#[derive(Clone)]
pub struct NatsBus {
    client: Client,
    js: jetstream::Context,
    /// The same, for the calls that look streams and consumers up or make consumers: bounded by
    /// [`API_TIMEOUT`], so that a call made while a stream elects its leader is tried again soon.
    api: jetstream::Context,
    subjects: Subjects,
    /// Counts the connections made: it changes on every reconnect.
    connected: tokio::sync::watch::Receiver<u64>,
    /// How long the streams keep messages.
    limits: StreamLimits,
}

/// The bounds and the replicas of both streams (from `[nats]`).
#[derive(Debug, Clone, Copy)]
struct StreamLimits {
    max_age: Duration,
    max_bytes: i64,
    max_messages: i64,
    max_message_size: i32,
    replicas: usize,
}

impl From<&crate::config::NatsConfig> for StreamLimits {
    fn from(config: &crate::config::NatsConfig) -> Self {
        StreamLimits {
            max_age: Duration::from_millis(config.max_age_ms),
            max_bytes: config.max_bytes,
            max_messages: config.max_msgs,
            max_message_size: config.max_msg_size,
            replicas: config.replicas,
        }
    }
}

/// The servers `nats.url` lists (one, or several separated by commas), without their credentials
/// (those are in [`options`]).
pub fn servers(
    config: &crate::config::NatsConfig,
) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    gpu_coordinator_client::server_addrs(&config.url).map_err(NatsError::Url)
}

/// Connection options for `config`: the credentials in its URL (or its creds file), and the inbox
/// prefix of that user (see `gpu_coordinator_client::NatsAuth`).
pub async fn options(
    config: &crate::config::NatsConfig,
) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut options =
        gpu_coordinator_client::connect_options(&config.url).map_err(|e| NatsError::Other {
            what: "read nats.url",
            source: e.into(),
        })?;
    if let Some(path) = &config.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| NatsError::Other {
                what: "read nats.creds_file",
                source: e.into(),
            })?;
    }
    Ok(options)
}

/// A JetStream context for the calls that look streams and consumers up or make consumers, bounded by
/// [`API_TIMEOUT`].
pub fn api_context(client: &Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(API_TIMEOUT)
        .build(client.clone())
}

impl NatsBus {
    /// Connects to one of the servers `nats.url` lists (the client reconnects by itself afterwards,
    /// to any server of the cluster, logging each disconnect and reconnect).
    pub async fn connect(
        config: &crate::config::NatsConfig,
        subjects: Subjects,
        name: &str,
    ) -> Result<NatsBus, NatsError> {
        let servers = servers(config)?;
        let (connections, connected) = tokio::sync::watch::channel(0u64);
        let client = options(config)
            .await?
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let connections = connections.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS disconnected; reconnecting with backoff")
                        }
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connected");
                            connections.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                        other => tracing::warn!("NATS: {other}"),
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|source| NatsError::Connect {
                url: gpu_coordinator_client::redact(&config.url),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let api = api_context(&client);
        Ok(NatsBus {
            client,
            js,
            api,
            subjects,
            connected,
            limits: StreamLimits::from(config),
        })
    }

    /// Changes on every reconnect: the input consumer is then reopened at once, rather than after its
    /// missed heartbeats (while leases keep expiring on time).
    pub fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut rx = self.connected.clone();
        rx.mark_unchanged();
        rx
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Creates or updates `<PREFIX>_OUTPUT` and `<PREFIX>_INPUT` (limits retention, file storage).
    ///
    /// A missing input stream is made only when `inputs_after` is given (the last input the journal
    /// handled), and then numbers its inputs after it: a default request id `<svc>-<stream sequence>`
    /// never names an older request, and the journal's position stays meaningful. Without it (at start,
    /// before the journal is read) a missing input stream is left for the driver to make.
    pub async fn ensure_streams(&self, inputs_after: Option<u64>) -> Result<(), NatsError> {
        let output = self.stream_config(
            self.subjects.output_stream(),
            self.subjects.output_subjects(),
            // Full: the oldest history goes; the coordinator's publishes never block on it.
            stream::DiscardPolicy::Old,
        );
        self.create_or_update(output).await?;
        let input = self.stream_config(
            self.subjects.input_stream(),
            self.subjects.input_subjects(),
            // Full: a new input is refused at publish (its publisher gets the error), and none that
            // was accepted is dropped before it is handled.
            stream::DiscardPolicy::New,
        );
        let exists = match self.api.get_stream(&input.name).await {
            Ok(_) => true,
            Err(e) if stream_missing(&e.kind()) => false,
            Err(e) => return Err(self.stream_error(&input.name, e.into())),
        };
        match (exists, inputs_after) {
            (true, _) | (false, Some(0)) => self.create_or_update(input).await,
            (false, Some(after)) => self.create_numbered(input, after).await,
            (false, None) => Ok(()),
        }
    }

    fn stream_config(
        &self,
        name: String,
        subjects: Vec<String>,
        discard: stream::DiscardPolicy,
    ) -> stream::Config {
        let limits = self.limits;
        stream::Config {
            name,
            subjects,
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            max_messages: limits.max_messages,
            max_message_size: limits.max_message_size,
            discard,
            duplicate_window: Duration::from_secs(120),
            num_replicas: limits.replicas,
            ..Default::default()
        }
    }

    /// Makes the stream, or updates it to `config` unless it has those settings already: its replicas
    /// too, which JetStream changes in place (a stream going from 1 to 3 replicas is copied to two
    /// more servers). An update that changes nothing is not sent: while a stream's replicas catch up
    /// after such a change, JetStream leaves another update unanswered.
    async fn create_or_update(&self, config: stream::Config) -> Result<(), NatsError> {
        let name = config.name.clone();
        let had = match self.api.get_stream(&name).await {
            Ok(stream) => Some(stream.cached_info().config.clone()),
            Err(e) if stream_missing(&e.kind()) => None,
            // Not answered (the stream elects a leader), say: tried again, rather than sent an
            // update that waits as long.
            Err(e) => return Err(self.stream_error(&name, e.into())),
        };
        if had.as_ref().is_some_and(|had| same_settings(had, &config)) {
            return Ok(());
        }
        let replicas = config.num_replicas;
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|source| self.stream_error(&name, source.into()))?;
        if let Some(had) = had.map(|had| had.num_replicas.max(1)) {
            if had != replicas.max(1) {
                tracing::warn!(
                    "stream {name} had {had} replica(s): updated to {replicas} (nats.replicas); \
                     waiting until they are placed"
                );
                await_placed(&self.js, &name, replicas.max(1)).await;
            }
        }
        Ok(())
    }

    /// A stream that could not be made or updated; when JetStream could not place its replicas, the
    /// error says that `nats.replicas` asks for them.
    fn stream_error(&self, stream: &str, source: Cause) -> NatsError {
        let text = source.to_string();
        let placement = [
            "peers",
            "insufficient resources",
            "non-clustered",
            "replicas",
        ]
        .iter()
        .any(|what| text.contains(what));
        if placement && self.limits.replicas > 1 {
            return NatsError::Stream {
                stream: stream.to_owned(),
                source: format!(
                    "JetStream cannot place its {} replicas (nats.replicas): {text}",
                    self.limits.replicas
                )
                .into(),
            };
        }
        NatsError::Stream {
            stream: stream.to_owned(),
            source,
        }
    }

    /// Refuses `nats.replicas` above the number of servers the NATS cluster has, by the server's own
    /// word: a server that is not clustered keeps one copy of a stream; a clustered one announces its
    /// cluster's servers to clients (`connect_urls` of its INFO). A cluster whose servers are not
    /// announced (`no_advertise`) is left to JetStream, which refuses a stream it cannot place.
    ///
    /// A server of the cluster that is down is not announced: when the streams exist with these
    /// replicas already, that is a server away (the streams go on with a majority of theirs), not a
    /// mistake, and the start goes on with a warning.
    pub async fn check_replicas(&self) -> Result<(), NatsError> {
        let wanted = self.limits.replicas;
        if wanted <= 1 {
            return Ok(());
        }
        let info = self.client.server_info();
        let servers: std::collections::BTreeSet<&str> =
            info.connect_urls.iter().map(String::as_str).collect();
        let (cluster, count) = match &info.cluster {
            None => {
                return Err(NatsError::Replicas(format!(
                    "nats.replicas = {wanted}, but the NATS server {} ({}:{}) is not part of a \
                     cluster: it keeps one copy of a stream. Set nats.replicas = 1, or run \
                     nats-server clustered (--cluster, --routes) and list its servers in nats.url",
                    info.server_name, info.host, info.port
                )))
            }
            Some(_) if servers.is_empty() => return Ok(()),
            Some(cluster) => (cluster, servers.len()),
        };
        if wanted <= count {
            return Ok(());
        }
        let mut have = Vec::new();
        for name in [self.subjects.input_stream(), self.subjects.output_stream()] {
            if let Ok(stream) = self.api.get_stream(&name).await {
                have.push(stream.cached_info().config.num_replicas);
            }
        }
        let listed = servers.into_iter().collect::<Vec<_>>().join(", ");
        if have.len() == 2 && have.iter().all(|&n| n == wanted) {
            tracing::warn!(
                "the NATS cluster {cluster} announces {count} server(s) now ({listed}), fewer than \
                 the {wanted} replicas of the streams (nats.replicas): a server is away; the \
                 streams go on while a majority of their replicas is up"
            );
            return Ok(());
        }
        Err(NatsError::Replicas(format!(
            "nats.replicas = {wanted}, but the NATS cluster {cluster} has {count} server(s) \
             ({listed}): a stream cannot have more replicas than the cluster has servers. Set \
             nats.replicas to {count} or less, or start the servers that are missing"
        )))
    }

    /// Which of `msg_ids` the output stream holds among its last messages. They are the last messages a
    /// coordinator published (the outbox keeps a message only until the bus stored it, and a restart
    /// publishes what it kept before anything new), so if stored they are at the stream's end: the
    /// last `msg_ids.len()` messages, and a margin for a deposed leader's last publishes.
    pub async fn already_stored(
        &self,
        msg_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, NatsError> {
        const MARGIN: u64 = 256;
        let mut found = std::collections::HashSet::new();
        let (mut stream, fail) = self.stream_named(self.subjects.output_stream()).await?;
        let state = Self::state_of(&mut stream, &fail).await?;
        if msg_ids.is_empty() || state.messages == 0 {
            return Ok(found);
        }
        let from = state
            .last_sequence
            .saturating_sub(msg_ids.len() as u64 + MARGIN)
            .max(state.first_sequence)
            .max(1);
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| fail(e.into()))?;
        let mut messages = reader.messages().await.map_err(|e| fail(e.into()))?;
        let wanted: std::collections::HashSet<&str> = msg_ids.iter().map(String::as_str).collect();
        // Nothing within a few seconds (the last message removed meanwhile): what was read is the answer.
        while let Ok(Some(next)) =
            tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        {
            let msg = next.map_err(|e| fail(e.into()))?;
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str());
            if let Some(id) = id.filter(|id| wanted.contains(id)) {
                found.insert(id.to_owned());
            }
            if seq >= state.last_sequence {
                break;
            }
        }
        Ok(found)
    }

    /// Makes the input stream anew with its first input numbered `after + 1`: created on a subject
    /// nobody publishes to, emptied up to that sequence (which moves an empty stream's numbering), then
    /// given its subjects. Until then publishers find no stream and retry.
    async fn create_numbered(&self, config: stream::Config, after: u64) -> Result<(), NatsError> {
        let name = config.name.clone();
        let fail = |source: Cause| self.stream_error(&name, source);
        let aside = stream::Config {
            subjects: vec![format!("{}._numbering", self.subjects.prefix())],
            ..config.clone()
        };
        let created = self
            .js
            .create_stream(aside)
            .await
            .map_err(|e| fail(e.into()))?;
        created
            .purge()
            .sequence(after + 1)
            .await
            .map_err(|e| fail(e.into()))?;
        self.js
            .update_stream(config)
            .await
            .map_err(|e| fail(e.into()))?;
        tracing::warn!(
            "stream {name} was missing: made anew, numbering its inputs from #{} (after the last \
             input handled)",
            after + 1
        );
        Ok(())
    }

    /// The input stream, and how to word a failure about its consumer.
    async fn input_stream(
        &self,
    ) -> Result<(stream::Stream, impl Fn(Cause) -> NatsError), NatsError> {
        self.stream_named(self.subjects.input_stream()).await
    }

    /// One of the coordinator's streams, and how to word a failure about reading it.
    async fn stream_named(
        &self,
        name: String,
    ) -> Result<(stream::Stream, impl Fn(Cause) -> NatsError), NatsError> {
        let stream = self.api.get_stream(&name).await;
        let fail = move |source: Cause| NatsError::Consumer {
            stream: name.clone(),
            source,
        };
        let stream = stream.map_err(|e| fail(e.into()))?;
        Ok((stream, fail))
    }

    /// A stream's state now.
    async fn state_of(
        stream: &mut stream::Stream,
        fail: &impl Fn(Cause) -> NatsError,
    ) -> Result<stream::State, NatsError> {
        Ok(stream
            .info()
            .await
            .map_err(|e| fail(e.into()))?
            .state
            .clone())
    }

    /// Removes the inputs up to `handled` when the input stream is 80% full (messages or bytes), so that
    /// a full stream means a backlog the coordinator has not handled, not a long history. Returns how
    /// many were removed.
    pub async fn trim_inputs(&self, handled: u64) -> Result<u64, NatsError> {
        let (mut stream, fail) = self.input_stream().await?;
        let state = Self::state_of(&mut stream, &fail).await?;
        // How full the stream is, in percent of its tighter limit (a limit of -1 is none).
        let percent = |used: u64, max: i64| match u64::try_from(max) {
            Ok(max) if max > 0 => used.saturating_mul(100) / max,
            _ => 0,
        };
        let full = percent(state.messages, self.limits.max_messages)
            .max(percent(state.bytes, self.limits.max_bytes));
        // A `handled` beyond the stream's end belongs to an earlier stream of the same name.
        if full < 80 || handled < state.first_sequence || handled > state.last_sequence {
            return Ok(0);
        }
        // A purge may take a while on a long stream: the connection's timeout, not the lookups'.
        let stream = self
            .js
            .get_stream(self.subjects.input_stream())
            .await
            .map_err(|e| fail(e.into()))?;
        let purged = stream
            .purge()
            .sequence(handled + 1)
            .await
            .map_err(|e| fail(e.into()))?
            .purged;
        tracing::info!(
            "the input stream was {full}% full: removed {purged} handled input(s), up to #{handled}"
        );
        Ok(purged)
    }

    /// Where reading the inputs must go on from, given `handled`, the last input whose effects are
    /// committed (0: none known). When Postgres knows of none (a new database) the durable consumer's
    /// acknowledged floor counts; when the stream was made anew and is shorter than `handled`, its inputs
    /// are read from its first (the old position means nothing there). The driver persists a changed
    /// position before it opens the consumer.
    pub async fn input_position(&self, handled: u64) -> Result<u64, NatsError> {
        let (mut stream, fail) = self.input_stream().await?;
        let floor = match stream.consumer_info(CONSUMER).await {
            Ok(info) => info.ack_floor.stream_sequence,
            Err(e) if consumer_missing(&e.kind()) => 0,
            Err(e) => return Err(fail(e.into())),
        };
        let state = Self::state_of(&mut stream, &fail).await?;
        let after = handled.max(floor);
        if after > state.last_sequence {
            tracing::error!(
                "stream {} ends at input {} but input {after} was handled: the stream was made \
                 anew; reading its inputs from its first",
                self.subjects.input_stream(),
                state.last_sequence
            );
            return Ok(state.first_sequence.saturating_sub(1));
        }
        Ok(after)
    }

    /// Opens the durable pull consumer on the input stream, delivering in stream order from the input
    /// after `after` (see [`Bus::input_position`]), and starts its message stream.
    ///
    /// The consumer is made anew each time: an input that was delivered but not acknowledged before a
    /// crash would otherwise come back only after the ACK wait, behind newer ones. Drop the previous
    /// message stream first, so that no pull of its can reach the new consumer.
    pub async fn open_inputs(&self, after: u64) -> Result<consumer::pull::Stream, NatsError> {
        let (stream, fail) = self.input_stream().await?;
        match stream.consumer_info(CONSUMER).await {
            Ok(_) => {
                stream
                    .delete_consumer(CONSUMER)
                    .await
                    .map_err(|e| fail(e.into()))?;
            }
            Err(e) if consumer_missing(&e.kind()) => {}
            Err(e) => return Err(fail(e.into())),
        }
        let deliver_policy = if after == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            }
        };
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CONSUMER.to_string()),
                // One acknowledgement stands for every input before it: the driver handles and
                // acknowledges them in order, and a batch costs the server one acknowledgement.
                ack_policy: consumer::AckPolicy::All,
                ack_wait: ACK_WAIT,
                deliver_policy,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(e.into()))?;
        consumer
            .stream()
            .max_messages_per_batch(500)
            .heartbeat(INPUT_HEARTBEAT)
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| fail(e.into()))
    }

    /// Publishes the messages in order and waits for their PubAcks: all at once (`pipelined`), or each
    /// after the previous one's PubAck (in order even when some are lost, as after a failure). On a
    /// failure says how many of the first messages are surely stored, so that a retry goes on from there.
    pub async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        pipelined: bool,
    ) -> Result<(), PublishFailure> {
        let mut pending = Vec::with_capacity(outputs.len());
        for (i, out) in outputs.iter().enumerate() {
            let failed = |source: Cause| PublishFailure {
                stored: i,
                error: PortError::new(NatsError::Publish {
                    subject: out.subject.clone(),
                    source,
                }),
            };
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", out.msg_id.as_str());
            if let Some(ct) = out.encoding.content_type() {
                headers.insert("Content-Type", ct);
            }
            let ack = self
                .js
                .publish_with_headers(out.subject.clone(), headers, out.payload.clone())
                .await
                .map_err(|e| failed(e.into()))?;
            if pipelined {
                pending.push(ack.into_future());
            } else {
                ack.await.map_err(|e| failed(e.into()))?;
            }
        }
        for (i, result) in join_all(pending).await.into_iter().enumerate() {
            if let Err(e) = result {
                return Err(PublishFailure {
                    stored: i,
                    error: PortError::new(NatsError::Publish {
                        subject: outputs[i].subject.clone(),
                        source: e.into(),
                    }),
                });
            }
        }
        Ok(())
    }

    /// Subscribes to `<prefix>.status` (request-reply, not stored).
    ///
    /// The subscription is known to the server when this returns (flushed), so a status request sent
    /// afterwards finds a responder.
    pub async fn status_requests(&self) -> Result<async_nats::Subscriber, NatsError> {
        let subscriber = self
            .client
            .subscribe(self.subjects.status())
            .await
            .map_err(|e| NatsError::Other {
                what: "subscribe to status",
                source: e.into(),
            })?;
        self.client.flush().await.map_err(|e| NatsError::Other {
            what: "flush the status subscription",
            source: e.into(),
        })?;
        Ok(subscriber)
    }

    /// Answers a request-reply message, in MessagePack when the request asked for it.
    pub async fn respond(
        &self,
        reply_to: async_nats::Subject,
        encoding: Encoding,
        payload: Vec<u8>,
    ) -> Result<(), NatsError> {
        let result = if encoding == Encoding::MsgPack {
            let mut headers = HeaderMap::new();
            headers.insert("Content-Type", MSGPACK_CONTENT_TYPE);
            self.client
                .publish_with_headers(reply_to, headers, payload.into())
                .await
        } else {
            self.client.publish(reply_to, payload.into()).await
        };
        result.map_err(|e| NatsError::Other {
            what: "respond",
            source: e.into(),
        })
    }

    /// Sends everything buffered to the server.
    pub async fn flush(&self) -> Result<(), NatsError> {
        self.client.flush().await.map_err(|e| NatsError::Other {
            what: "flush",
            source: e.into(),
        })
    }
}

/// Waits, for at most [`PLACEMENT_WAIT`], until the stream `name` has a leader and `replicas - 1`
/// other replicas that are current. Right after its replicas changed, JetStream elects the stream's
/// leader anew, and a consumer made or removed meanwhile is not answered (the call waits for its
/// whole timeout).
pub async fn await_placed(js: &jetstream::Context, name: &str, replicas: usize) {
    let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
    loop {
        let placed = match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.cluster.as_ref().map_or(replicas == 1, |cluster| {
                    cluster.leader.is_some()
                        && cluster.replicas.len() + 1 == replicas
                        && cluster.replicas.iter().all(|peer| peer.current)
                }),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if placed {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "stream {name}: its {replicas} replica(s) are not all placed and current after \
                 {PLACEMENT_WAIT:?}; going on"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a stream configured as `had` has every setting the coordinator gives it in `wanted`.
fn same_settings(had: &stream::Config, wanted: &stream::Config) -> bool {
    had.subjects == wanted.subjects
        && had.retention == wanted.retention
        && had.storage == wanted.storage
        && had.max_age == wanted.max_age
        && had.max_bytes == wanted.max_bytes
        && had.max_messages == wanted.max_messages
        && had.max_message_size == wanted.max_message_size
        && had.discard == wanted.discard
        && had.duplicate_window == wanted.duplicate_window
        && had.num_replicas.max(1) == wanted.num_replicas.max(1)
}

/// Whether a stream lookup's error says the stream does not exist.
fn stream_missing(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Whether a consumer-info error says the consumer does not exist (any other error is a real one: the
/// consumer may exist, with a position that must not be lost).
fn consumer_missing(kind: &ConsumerInfoErrorKind) -> bool {
    match kind {
        ConsumerInfoErrorKind::NotFound => true,
        ConsumerInfoErrorKind::JetStream(e) => e.error_code() == ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// The `Content-Type` header of a message, if any.
pub fn content_type(headers: Option<&HeaderMap>) -> Option<&str> {
    headers
        .and_then(|h| h.get("Content-Type"))
        .map(|v| v.as_str())
}

/// One input of the pull consumer as the driver sees it.
fn delivery(msg: jetstream::Message) -> Delivery {
    let info = msg.info().ok();
    Delivery {
        seq: info.as_ref().map(|i| i.stream_sequence).unwrap_or(0),
        stored_at: info
            .as_ref()
            .and_then(|i| u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).ok()),
        subject: msg.subject.to_string(),
        content_type: content_type(msg.headers.as_ref()).map(str::to_owned),
        payload: msg.payload.clone(),
        ack: Box::new(move |terminate| -> Settle {
            Box::pin(async move {
                let kind = if terminate {
                    jetstream::AckKind::Term
                } else {
                    jetstream::AckKind::Ack
                };
                msg.ack_with(kind).await.map_err(PortError::from)
            })
        }),
    }
}

#[async_trait::async_trait]
impl ports::Bus for NatsBus {
    async fn ensure_streams(&self, inputs_after: Option<u64>) -> Result<(), PortError> {
        NatsBus::ensure_streams(self, inputs_after)
            .await
            .map_err(PortError::new)
    }

    async fn already_stored(
        &self,
        msg_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, PortError> {
        NatsBus::already_stored(self, msg_ids)
            .await
            .map_err(PortError::new)
    }

    async fn input_end(&self) -> Result<u64, PortError> {
        let (mut stream, fail) = self.input_stream().await.map_err(PortError::new)?;
        let state = Self::state_of(&mut stream, &fail)
            .await
            .map_err(PortError::new)?;
        Ok(state.last_sequence)
    }

    async fn input_position(&self, handled: u64) -> Result<u64, PortError> {
        NatsBus::input_position(self, handled)
            .await
            .map_err(PortError::new)
    }

    async fn trim_inputs(&self, handled: u64) -> Result<u64, PortError> {
        NatsBus::trim_inputs(self, handled)
            .await
            .map_err(PortError::new)
    }

    async fn open_inputs(&self, after: u64) -> Result<Inputs, PortError> {
        let messages = NatsBus::open_inputs(self, after)
            .await
            .map_err(PortError::new)?;
        Ok(messages
            .map(|next| next.map(delivery).map_err(PortError::new))
            .boxed())
    }

    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        pipelined: bool,
    ) -> Result<(), PublishFailure> {
        NatsBus::publish_in_order(self, outputs, pipelined).await
    }

    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        NatsBus::reconnects(self)
    }

    fn acks_cover_earlier(&self) -> bool {
        true
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn status_queries(&self) -> Result<StatusQueries, PortError> {
        let questions = self.status_requests().await.map_err(PortError::new)?;
        let bus = self.clone();
        Ok(questions
            .filter_map(move |msg| {
                let bus = bus.clone();
                async move {
                    let reply_to = msg.reply.clone()?;
                    // Answered on an inbox only: published with this coordinator's rights on
                    // `<p>.release.<svc>` it would be stored as that service's release, on a
                    // `$JS.API` subject it would be an API call.
                    if !bus.subjects.is_inbox(&reply_to) {
                        tracing::warn!(
                            "a status question asks for its answer on {reply_to:?}, which is not an \
                             inbox (_INBOX.… or _INBOX_<user>.…): not answered"
                        );
                        return None;
                    }
                    let encoding = Encoding::from_content_type(content_type(msg.headers.as_ref()));
                    // An empty or unreadable body asks for the default page.
                    let page = if msg.payload.is_empty() {
                        Default::default()
                    } else {
                        gpu_coordinator_wire::codec::decode(encoding, &msg.payload)
                            .unwrap_or_default()
                    };
                    Some(StatusQuery {
                        encoding,
                        page,
                        respond: Box::new(move |payload| -> Settle {
                            Box::pin(async move {
                                bus.respond(reply_to, encoding, payload)
                                    .await
                                    .map_err(PortError::new)
                            })
                        }),
                    })
                }
            })
            .boxed())
    }

    async fn flush(&self) -> Result<(), PortError> {
        NatsBus::flush(self).await.map_err(PortError::new)
    }
}
