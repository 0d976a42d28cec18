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
use bytes::Bytes;
use futures::future::join_all;
use gpu_coordinator_wire::codec::MSGPACK_CONTENT_TYPE;
use gpu_coordinator_wire::{Encoding, Subjects};

/// The durable pull consumer the coordinator reads its inputs with.
pub const CONSUMER: &str = "coordinator";

/// How long JetStream waits for an input's ACK before it redelivers it.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// What can go wrong talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The first connection could not be made.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A stream could not be created or updated.
    #[error("cannot create or update stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// The durable consumer could not be created or read.
    #[error("cannot open consumer {CONSUMER} on stream {stream}: {detail}")]
    Consumer { stream: String, detail: String },
    /// A publish did not get its PubAck.
    #[error("publish to {subject} was not stored: {detail}")]
    Publish { subject: String, detail: String },
    /// A core NATS operation failed.
    #[error("NATS {what} failed: {detail}")]
    Other { what: &'static str, detail: String },
}

/// A publish that failed part of the way.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct PublishFailure {
    /// How many of the first messages are surely stored.
    pub stored: usize,
    #[source]
    pub error: NatsError,
}

/// One message to publish on a stored output subject.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub subject: String,
    pub encoding: Encoding,
    pub payload: Bytes,
    /// `Nats-Msg-Id`: the same on every publish of this message, so JetStream stores it once.
    pub msg_id: String,
}

/// The connection to NATS and JetStream.
#[derive(Clone)]
pub struct Bus {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    /// Counts the connections made: it changes on every reconnect.
    connected: tokio::sync::watch::Receiver<u64>,
}

impl Bus {
    /// Connects (the client reconnects by itself afterwards, logging each disconnect and reconnect).
    pub async fn connect(url: &str, subjects: Subjects, name: &str) -> Result<Bus, NatsError> {
        let (connections, connected) = tokio::sync::watch::channel(0u64);
        let client = async_nats::ConnectOptions::new()
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
            .connect(url)
            .await
            .map_err(|source| NatsError::Connect {
                url: url.to_string(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        Ok(Bus {
            client,
            js,
            subjects,
            connected,
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

    /// Creates or updates `<PREFIX>_INPUT` and `<PREFIX>_OUTPUT` (limits retention, file storage).
    pub async fn ensure_streams(&self, max_age: Duration) -> Result<(), NatsError> {
        for (name, subjects) in [
            (self.subjects.input_stream(), self.subjects.input_subjects()),
            (
                self.subjects.output_stream(),
                self.subjects.output_subjects(),
            ),
        ] {
            let config = stream::Config {
                name: name.clone(),
                subjects,
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            };
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|source| NatsError::Stream {
                    stream: name,
                    source,
                })?;
        }
        Ok(())
    }

    /// The input stream, and how to word a failure about its consumer.
    async fn input_stream(
        &self,
    ) -> Result<(stream::Stream, impl Fn(String) -> NatsError), NatsError> {
        let name = self.subjects.input_stream();
        let fail = move |detail: String| NatsError::Consumer {
            stream: name.clone(),
            detail,
        };
        let stream = self
            .js
            .get_stream(self.subjects.input_stream())
            .await
            .map_err(|e| fail(e.to_string()))?;
        Ok((stream, fail))
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
            Err(e) => return Err(fail(e.to_string())),
        };
        let state = stream
            .info()
            .await
            .map_err(|e| fail(e.to_string()))?
            .state
            .clone();
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
                    .map_err(|e| fail(e.to_string()))?;
            }
            Err(e) if consumer_missing(&e.kind()) => {}
            Err(e) => return Err(fail(e.to_string())),
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
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                deliver_policy,
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .map_err(|e| fail(e.to_string()))?;
        consumer
            .stream()
            .max_messages_per_batch(500)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| fail(e.to_string()))
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
            let failed = |e: String| PublishFailure {
                stored: i,
                error: NatsError::Publish {
                    subject: out.subject.clone(),
                    detail: e,
                },
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
                .map_err(|e| failed(e.to_string()))?;
            if pipelined {
                pending.push(ack.into_future());
            } else {
                ack.await.map_err(|e| failed(e.to_string()))?;
            }
        }
        for (i, result) in join_all(pending).await.into_iter().enumerate() {
            if let Err(e) = result {
                return Err(PublishFailure {
                    stored: i,
                    error: NatsError::Publish {
                        subject: outputs[i].subject.clone(),
                        detail: e.to_string(),
                    },
                });
            }
        }
        Ok(())
    }

    /// Subscribes to `<prefix>.status` (request-reply, not stored).
    pub async fn status_requests(&self) -> Result<async_nats::Subscriber, NatsError> {
        self.client
            .subscribe(self.subjects.status())
            .await
            .map_err(|e| NatsError::Other {
                what: "subscribe to status",
                detail: e.to_string(),
            })
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
            detail: e.to_string(),
        })
    }

    /// Sends everything buffered to the server.
    pub async fn flush(&self) -> Result<(), NatsError> {
        self.client.flush().await.map_err(|e| NatsError::Other {
            what: "flush",
            detail: e.to_string(),
        })
    }
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
