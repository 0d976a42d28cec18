//! [`NatsBus`] as the driver's [`ports::InputLog`] and [`ports::OutputLog`].

use futures::StreamExt;
use gpu_coordinator_wire::Encoding;

use super::inputs::delivery;
use super::{content_type, NatsBus};
use crate::ports::{
    self, Inputs, Outbound, PortError, PublishFailure, Settle, StatusQueries, StatusQuery,
};

#[async_trait::async_trait]
impl ports::InputLog for NatsBus {
    async fn ensure_streams(&self, inputs_after: Option<u64>) -> Result<(), PortError> {
        NatsBus::ensure_streams(self, inputs_after)
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

    fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        NatsBus::reconnects(self)
    }

    fn acks_cover_earlier(&self) -> bool {
        true
    }
}

#[async_trait::async_trait]
impl ports::OutputLog for NatsBus {
    async fn already_stored(
        &self,
        msg_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, PortError> {
        NatsBus::already_stored(self, msg_ids)
            .await
            .map_err(PortError::new)
    }

    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        pipelined: bool,
    ) -> Result<(), PublishFailure> {
        NatsBus::publish_in_order(self, outputs, pipelined).await
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
