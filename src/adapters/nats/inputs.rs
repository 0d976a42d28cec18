//! The inputs: the durable pull consumer on the input stream, where it goes on from, trimming what
//! was handled, and each message as the driver's [`Delivery`].

use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, consumer, stream};

use super::{content_type, Cause, NatsBus, NatsError, ACK_WAIT, CONSUMER, INPUT_HEARTBEAT};
use crate::ports::{Delivery, PortError, Settle};

impl NatsBus {
    /// The input stream, and how to word a failure about its consumer.
    pub(super) async fn input_stream(
        &self,
    ) -> Result<(stream::Stream, impl Fn(Cause) -> NatsError), NatsError> {
        self.stream_named(self.subjects.input_stream()).await
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
    /// after `after` (see [`InputLog::input_position`](crate::ports::InputLog::input_position)), and
    /// starts its message stream.
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
/// One input of the pull consumer as the driver sees it.
pub(super) fn delivery(msg: jetstream::Message) -> Delivery {
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
