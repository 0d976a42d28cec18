//! NATS JetStream: the streams, the durable input consumer, and publishing with PubAcks.
//!
//! Owns the connection and the stream and consumer definitions. Decides nothing: decoding is the wire
//! crate's, scheduling the core's.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use gpu_coordinator_wire::Subjects;

pub use crate::ports::{Outbound, PublishFailure};

mod bus;
mod inputs;
mod publish;
mod streams;

pub use streams::await_placed;

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

/// What the NATS adapter is given (by the composition root, from `[nats]`): where the servers are, the
/// credentials to connect with, and the bounds of the streams it makes.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// The servers: one NATS URL, or several of a cluster separated by commas, with the user and
    /// password (or token) to connect with in them.
    pub url: String,
    /// A NATS credentials file (`.creds`) to connect with, in place of the credentials in the URL.
    pub creds_file: Option<String>,
    /// The bounds and the replicas of both streams.
    pub streams: StreamLimits,
}

/// The URL's credentials are secrets: `Debug` shows the URL redacted.
impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &gpu_coordinator_client::redact(&self.url))
            .field("creds_file", &self.creds_file)
            .field("streams", &self.streams)
            .finish()
    }
}

/// The bounds and the replicas of both streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// How long the streams keep messages.
    pub max_age: Duration,
    /// The most bytes each stream keeps; -1: no limit of its own.
    pub max_bytes: i64,
    /// The most messages each stream keeps; -1: no limit of its own.
    pub max_messages: i64,
    /// The largest message the streams accept, in bytes.
    pub max_message_size: i32,
    /// The replicas of every stream, on a cluster.
    pub replicas: usize,
}

/// The servers `settings.url` lists (one, or several separated by commas), without their credentials
/// (those are in [`options`]).
pub fn servers(settings: &NatsSettings) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    gpu_coordinator_client::server_addrs(&settings.url).map_err(NatsError::Url)
}

/// Connection options for `settings`: the credentials in its URL (or its creds file), and the inbox
/// prefix of that user (see `gpu_coordinator_client::NatsAuth`).
pub async fn options(settings: &NatsSettings) -> Result<async_nats::ConnectOptions, NatsError> {
    let mut options =
        gpu_coordinator_client::connect_options(&settings.url).map_err(|e| NatsError::Other {
            what: "read nats.url",
            source: e.into(),
        })?;
    if let Some(path) = &settings.creds_file {
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
    /// Connects to one of the servers `settings.url` lists (the client reconnects by itself
    /// afterwards, to any server of the cluster, logging each disconnect and reconnect).
    pub async fn connect(
        settings: &NatsSettings,
        subjects: Subjects,
        name: &str,
    ) -> Result<NatsBus, NatsError> {
        let servers = servers(settings)?;
        let (connections, connected) = tokio::sync::watch::channel(0u64);
        let client = options(settings)
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
                url: gpu_coordinator_client::redact(&settings.url),
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
            limits: settings.streams,
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
}

/// The `Content-Type` header of a message, if any.
pub fn content_type(headers: Option<&HeaderMap>) -> Option<&str> {
    headers
        .and_then(|h| h.get("Content-Type"))
        .map(|v| v.as_str())
}
