//! Publishing with PubAcks, and the `<prefix>.status` request-reply.

use std::future::IntoFuture;

use async_nats::HeaderMap;
use futures::future::join_all;
use gpu_coordinator_wire::codec::MSGPACK_CONTENT_TYPE;
use gpu_coordinator_wire::Encoding;

use super::{Cause, NatsBus, NatsError};
use crate::ports::{Outbound, PortError, PublishFailure};

impl NatsBus {
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
