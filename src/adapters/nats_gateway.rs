//! The [`Gateway`] over NATS JetStream: an input is published to the input stream and its PubAck
//! awaited; the outputs are read from the output stream with ordered consumers; the answers the HTTP
//! calls wait on come through the client library's [`AnswerReader`].

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use futures::StreamExt;
use gpu_coordinator_client::AnswerReader;
use gpu_coordinator_wire::{EventKind, Subjects};

use super::nats::content_type;
use crate::ports::{Answers, Gateway, PortError, ReadFrom, Stored, StoredStream, Which};

/// The gateway of a coordinator on NATS.
pub struct NatsGateway {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    answers: AnswerReader,
    /// Reads the history message by message (`STREAM.MSG.GET`) rather than through a consumer: what the
    /// auditor does, which may make no consumer (see `nats_auth`).
    by_message: bool,
}

impl NatsGateway {
    /// A gateway on `client`, reading the replies and `requested` events of every service while HTTP
    /// calls wait for them.
    pub fn new(client: async_nats::Client, subjects: &Subjects) -> NatsGateway {
        let filters = [
            subjects.reply("*"),
            subjects.event(EventKind::Requested, "*"),
        ];
        NatsGateway {
            answers: AnswerReader::start(client.clone(), subjects, &filters),
            js: jetstream::new(client.clone()),
            client,
            subjects: subjects.clone(),
            by_message: false,
        }
    }

    /// A gateway that only reads the streams' history (`audit`): it starts no reader of answers and
    /// makes no consumer, so the auditor's user needs no right to make, pull from or delete one.
    pub fn reader(client: async_nats::Client, subjects: &Subjects) -> NatsGateway {
        NatsGateway {
            answers: AnswerReader::fed(subjects).0,
            js: jetstream::new(client.clone()),
            client,
            subjects: subjects.clone(),
            by_message: true,
        }
    }

    /// The history of `which` matching `filter` from `from`, up to the last message stored when the
    /// call began, read by sequence with many gets in flight (a consumer would be one round trip for
    /// many messages, but the auditor may make none).
    async fn history_by_message(
        &self,
        which: Which,
        filter: &str,
        from: ReadFrom,
    ) -> Result<StoredStream, PortError> {
        /// Gets in flight at once.
        const IN_FLIGHT: usize = 64;
        let name = self.stream(which);
        let fail = |e: String| PortError::msg(format!("cannot read stream {name}: {e}"));
        let mut stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let state = stream
            .info()
            .await
            .map_err(|e| fail(e.to_string()))?
            .state
            .clone();
        let (first, last) = (state.first_sequence.max(1), state.last_sequence);
        if state.messages == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        let start = match from {
            ReadFrom::Start => first,
            ReadFrom::New => return Ok(futures::stream::empty().boxed()),
            ReadFrom::After(seq) => seq.saturating_add(1).max(first),
            ReadFrom::Since(ms) => {
                // The first message stored at or after `ms`: stored times rise with the sequence.
                let (mut lo, mut hi) = (first, last + 1);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    match stream.get_first_raw_message_by_subject(filter, mid).await {
                        Ok(msg) if stored_ms(&msg.time) < ms => lo = msg.sequence + 1,
                        Ok(_) => hi = mid,
                        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => hi = mid,
                        Err(e) => return Err(fail(e.to_string())),
                    }
                }
                lo
            }
        };
        let filter = filter.to_owned();
        let messages = futures::stream::iter(start..=last)
            .map(move |seq| {
                let stream = stream.clone();
                async move { (seq, stream.get_raw_message(seq).await) }
            })
            .buffered(IN_FLIGHT)
            .filter_map(move |(seq, got)| {
                let item = match got {
                    Ok(msg) if crate::ports::subject_matches(&filter, &msg.subject) => {
                        Some(Ok(Stored {
                            seq: msg.sequence,
                            subject: msg.subject.to_string(),
                            content_type: content_type(Some(&msg.headers)).map(str::to_owned),
                            stored_at: Some(stored_ms(&msg.time)),
                            payload: msg.payload,
                        }))
                    }
                    Ok(_) => None,
                    // Removed (handled inputs are purged, old outputs dropped): nothing to read.
                    Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => None,
                    Err(e) => Some(Err(PortError::msg(format!(
                        "reading message {seq} of a stream: {e}"
                    )))),
                };
                futures::future::ready(item)
            });
        Ok(messages.boxed())
    }

    fn stream(&self, which: Which) -> String {
        match which {
            Which::Inputs => self.subjects.input_stream(),
            Which::Outputs => self.subjects.output_stream(),
        }
    }

    async fn consumer(
        &self,
        which: Which,
        filter: &str,
        from: ReadFrom,
    ) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, PortError> {
        let name = self.stream(which);
        let fail = |what: &str, e: String| {
            PortError::msg(format!(
                "cannot read stream {name} ({what} on {filter}): {e}"
            ))
        };
        let deliver_policy = match from {
            ReadFrom::Start => consumer::DeliverPolicy::All,
            ReadFrom::New => consumer::DeliverPolicy::New,
            ReadFrom::After(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq.saturating_add(1),
            },
            ReadFrom::Since(ms) => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(ms) * 1_000_000,
                )
                .map_err(|e| fail("the start time", e.to_string()))?,
            },
        };
        let stream = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| fail("the stream", e.to_string()))?;
        stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| fail("a consumer", e.to_string()))
    }
}

/// A stored time in milliseconds since the Unix epoch (0 before it).
fn stored_ms(time: &time::OffsetDateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// A JetStream message as stored.
fn stored(msg: &jetstream::Message) -> Stored {
    let info = msg.info().ok();
    Stored {
        seq: info.as_ref().map_or(0, |i| i.stream_sequence),
        subject: msg.subject.to_string(),
        content_type: content_type(msg.headers.as_ref()).map(str::to_owned),
        payload: msg.payload.clone(),
        stored_at: info
            .as_ref()
            .and_then(|i| u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).ok()),
    }
}

#[async_trait]
impl Gateway for NatsGateway {
    /// `Nats-Msg-Id` is unique to this call: a retried publish is stored once, while the same
    /// `request_id` sent again is answered by the coordinator with its current state.
    async fn submit(&self, subject: &str, payload: Vec<u8>) -> Result<(), PortError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("http-{:032x}", rand::random::<u128>()).as_str(),
        );
        let fail = |e: String| {
            PortError::msg(format!(
                "the input could not be stored in JetStream (subject {subject}): {e}"
            ))
        };
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, payload.into())
            .await
            .map_err(|e| fail(e.to_string()))?;
        ack.await.map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    async fn last_seq(&self, which: Which) -> Result<u64, PortError> {
        let name = self.stream(which);
        let fail = |e: String| PortError::msg(format!("cannot read stream {name}: {e}"));
        Ok(self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| fail(e.to_string()))?
            .info()
            .await
            .map_err(|e| fail(e.to_string()))?
            .state
            .last_sequence)
    }

    async fn follow(&self, filter: &str, from: ReadFrom) -> Result<StoredStream, PortError> {
        let messages = self
            .consumer(Which::Outputs, filter, from)
            .await?
            .messages()
            .await
            .map_err(|e| PortError::msg(format!("cannot read the output stream: {e}")))?;
        Ok(messages
            .map(|item| {
                item.map(|msg| stored(&msg))
                    .map_err(|e| PortError::msg(format!("reading the output stream: {e}")))
            })
            .boxed())
    }

    async fn history(
        &self,
        which: Which,
        filter: &str,
        from: ReadFrom,
    ) -> Result<StoredStream, PortError> {
        if self.by_message {
            return self.history_by_message(which, filter, from).await;
        }
        let name = self.stream(which);
        let last = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| PortError::msg(format!("cannot read stream {name}: {e}")))?
            .info()
            .await
            .map_err(|e| PortError::msg(format!("cannot read stream {name}: {e}")))?
            .state
            .last_sequence;
        let mut consumer = self.consumer(which, filter, from).await?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| PortError::msg(format!("cannot read a consumer: {e}")))?
            .num_pending;
        if pending == 0 {
            return Ok(futures::stream::empty().boxed());
        }
        let messages = consumer.messages().await.map_err(|e| {
            PortError::msg(format!("cannot read stream {}: {e}", self.stream(which)))
        })?;
        // Up to the last message stored when the call began (each message also says how many of the
        // filter's follow it).
        let messages = futures::stream::unfold(Some(messages), move |messages| async move {
            // `None` once the last message is out: the stream ends without waiting for another.
            let mut messages = messages?;
            let item = messages.next().await?;
            let item = item
                .map_err(|e| PortError::msg(format!("reading a stream: {e}")))
                .map(|msg| {
                    let last_one = msg
                        .info()
                        .map_or(true, |i| i.pending == 0 || i.stream_sequence >= last);
                    (stored(&msg), last_one)
                });
            match item {
                Ok((stored, false)) => Some((Ok(stored), Some(messages))),
                Ok((stored, true)) => Some((Ok(stored), None)),
                Err(e) => Some((Err(e), None)),
            }
        });
        Ok(messages.boxed())
    }

    fn answers(&self) -> &dyn Answers {
        &self.answers
    }

    /// Connected, and JetStream answers its API (`$JS.API.INFO`): a nats-server whose JetStream is
    /// wedged (2.9 on a disk that filled under it) still takes connections, and answers no publish.
    async fn health(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => {}
            other => return Err(format!("not connected ({other:?})")),
        }
        // Read as any JSON: only whether (and what) JetStream answers matters here.
        let info: serde_json::Value = self
            .js
            .request("INFO", &serde_json::json!({}))
            .await
            .map_err(|e| {
                format!("JetStream does not answer its API ({e}); its store may be full")
            })?;
        match info.get("error") {
            Some(error) => Err(format!("JetStream refuses its API: {error}")),
            None => Ok(()),
        }
    }
}
