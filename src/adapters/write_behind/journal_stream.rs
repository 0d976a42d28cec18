//! The journal stream itself: made if missing, a batch appended (in parts when it is too big for one
//! message), everything it holds read back.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::{BehindError, Head, WriteBehind};
use crate::adapters::postgres::{Merged, Rows};
use crate::ports::{Deposed, PortError};

/// How long reading the stream back waits for the next message before it looks whether the rest was
/// purged.
const READ_WAIT: Duration = Duration::from_secs(1);

/// Room left in a message for its headers and framing, below the server's `max_payload`.
const HEADROOM: usize = 4096;

/// One message of the journal stream, as read: a batch's rows, or a part of them.
#[derive(Debug, Deserialize)]
struct Entry {
    /// The batch it belongs to (`<boot>-<number>`): the parts of one batch are consecutive.
    batch: String,
    /// The batch's last part: a batch is complete with it.
    last: bool,
    rows: Rows,
}

/// An [`Entry`] as written, its rows borrowed.
#[derive(Serialize)]
struct EntryRef<'a> {
    batch: &'a str,
    last: bool,
    rows: &'a Rows,
}

impl EntryRef<'_> {
    fn encode(&self) -> Result<Vec<u8>, PortError> {
        rmp_serde::to_vec_named(self).map_err(PortError::new)
    }
}

impl WriteBehind {
    /// Makes the stream if it is missing: file storage, nothing removed but by the writer's purges,
    /// and a full stream refuses a new batch rather than dropping an old one; with `nats.replicas`
    /// replicas, to which a stream that has others is updated (the rest of its settings kept).
    pub(super) async fn ensure_stream(&self) -> Result<stream::Stream, BehindError> {
        let config = stream::Config {
            name: self.stream.clone(),
            subjects: vec![self.subject.clone()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.replicas,
            ..Default::default()
        };
        let stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.stream_error(e))?;
        let had = stream.cached_info().config.num_replicas.max(1);
        if had == self.replicas {
            return Ok(stream);
        }
        let config = stream::Config {
            num_replicas: self.replicas,
            ..stream.cached_info().config.clone()
        };
        self.js
            .update_stream(config)
            .await
            .map_err(|e| self.stream_error(e))?;
        tracing::warn!(
            "the journal stream {} had {had} replica(s): updated to {} (nats.replicas); waiting \
             until they are placed",
            self.stream,
            self.replicas
        );
        crate::adapters::nats::await_placed(&self.js, &self.stream, self.replicas).await;
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.stream_error(e))
    }

    fn stream_error(&self, e: impl std::error::Error + Send + Sync + 'static) -> BehindError {
        BehindError::Stream {
            stream: self.stream.clone(),
            source: Box::new(e),
        }
    }

    /// Appends one batch's rows, in as many messages as they need, each expecting the sequence before
    /// it. Answers the last sequence.
    pub(super) async fn append(&self, head: &mut Head, rows: &Rows) -> Result<u64, PortError> {
        let batch = format!("{}-{}", self.boot, head.next);
        let whole = EntryRef {
            batch: &batch,
            last: true,
            rows,
        }
        .encode()?;
        let payloads = if whole.len() <= self.max_payload.saturating_sub(HEADROOM) {
            vec![whole]
        } else {
            let parts = self.parts(rows.clone())?;
            let count = parts.len();
            parts
                .iter()
                .enumerate()
                .map(|(i, rows)| {
                    EntryRef {
                        batch: &batch,
                        last: i + 1 == count,
                        rows,
                    }
                    .encode()
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        for (i, payload) in payloads.into_iter().enumerate() {
            let id = format!("{batch}-{i}");
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(id.clone())
                .expected_last_sequence(head.last_seq);
            let stored = match self.js.send_publish(self.subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(stored) => {
                    head.last_seq = stored.sequence;
                    head.last_id = id;
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Deleted, or a server that came back without it: made anew, numbered from its
                    // start, for the driver's next try. What it held and Postgres did not is in the
                    // writer task's hands.
                    if let Ok(mut stream) = self.ensure_stream().await {
                        if let Ok(info) = stream.info().await {
                            tracing::warn!(
                                "the journal stream {} was lost and is made anew",
                                self.stream
                            );
                            head.last_seq = info.state.last_sequence;
                            head.last_id.clear();
                        }
                    }
                    return Err(self.publish_error(head, e));
                }
                Err(e) => return Err(self.publish_error(head, e)),
            }
        }
        head.next += 1;
        Ok(head.last_seq)
    }

    /// A refused publish: [`Deposed`] when another writer appended since (a newer leader's marker).
    fn publish_error(
        &self,
        head: &Head,
        e: async_nats::jetstream::context::PublishError,
    ) -> PortError {
        if e.kind() == PublishErrorKind::WrongLastSequence {
            return PortError::new(Deposed {
                term: head.term.map_or(0, |t| t.0),
                detail: format!(
                    "the journal stream {} was written by another coordinator after #{}",
                    self.stream, head.last_seq
                ),
            });
        }
        PortError::new(BehindError::Publish {
            stream: self.stream.clone(),
            source: e,
        })
    }

    /// `rows` cut into parts that each fit in a message (one part, nearly always).
    fn parts(&self, rows: Rows) -> Result<Vec<Rows>, PortError> {
        let limit = self.max_payload.saturating_sub(HEADROOM);
        let size = rmp_serde::to_vec_named(&rows)
            .map_err(PortError::new)?
            .len();
        if size <= limit {
            return Ok(vec![rows]);
        }
        let (n, m) = (rows.requests.len(), rows.outbox.len());
        if n + m <= 1 {
            return Err(PortError::new(BehindError::TooBig { bytes: size, limit }));
        }
        // The first half of the rows, then the rest with the batch's own numbers.
        let mut second = rows;
        let first = Rows {
            requests: second.requests.drain(..n / 2).collect(),
            outbox: second.outbox.drain(..m / 2).collect(),
            term: second.term,
            ..Rows::default()
        };
        let mut parts = self.parts(first)?;
        parts.extend(self.parts(second)?);
        Ok(parts)
    }

    /// Every complete batch the stream holds, merged in order, and the stream's last sequence.
    pub(super) async fn read_all(&self) -> Result<(Rows, u64), PortError> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?;
        let state = stream
            .info()
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok((Rows::default(), state.last_sequence));
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?;
        let mut all = Merged::default();
        // The parts of a batch whose last part has not come yet.
        let mut open: Option<(String, Rows)> = None;
        let mut seq = 0;
        while seq < state.last_sequence {
            let message = match tokio::time::timeout(READ_WAIT, messages.next()).await {
                Ok(next) => next
                    .ok_or_else(|| PortError::new(self.corrupt(seq + 1, "the stream ended early")))?
                    .map_err(|e| PortError::new(self.stream_error(e)))?,
                Err(_) => {
                    // Purged meanwhile (by an earlier leader's writer, once Postgres had it)?
                    let first = stream
                        .info()
                        .await
                        .map_err(|e| PortError::new(self.stream_error(e)))?
                        .state
                        .first_sequence;
                    if first > state.last_sequence {
                        break;
                    }
                    continue;
                }
            };
            seq = message
                .info()
                .map_err(|e| PortError::new(self.corrupt(seq + 1, &e.to_string())))?
                .stream_sequence;
            let entry: Entry = rmp_serde::from_slice(&message.payload)
                .map_err(|e| PortError::new(self.corrupt(seq, &e.to_string())))?;
            let rows = match open.take() {
                Some((batch, mut rows)) if batch == entry.batch => {
                    rows.then(entry.rows);
                    rows
                }
                Some((batch, _)) => {
                    skipped(&batch);
                    entry.rows
                }
                None => entry.rows,
            };
            if entry.last {
                all.push(rows);
            } else {
                open = Some((entry.batch, rows));
            }
        }
        if let Some((batch, _)) = open {
            skipped(&batch);
        }
        Ok((all.into_rows(), state.last_sequence))
    }

    fn corrupt(&self, seq: u64, detail: &str) -> BehindError {
        BehindError::Corrupt {
            stream: self.stream.clone(),
            seq,
            detail: detail.to_owned(),
        }
    }
}

/// Says that a batch whose last part never came is not written.
fn skipped(batch: &str) {
    tracing::warn!("journal batch {batch} never completed (a crash while it was written): skipped");
}
