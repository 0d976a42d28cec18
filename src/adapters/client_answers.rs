//! The [`Answers`] port over the client library's [`AnswerReader`]: both gateways (NATS and the
//! embedded bus) read the coordinator's answers with it.

use std::time::Duration;

use async_trait::async_trait;
use gpu_coordinator_client::{AnswerReader, Incoming, Route};

use crate::ports::{Answer, AnswerRoute, Answers, PortError};

#[async_trait]
impl Answers for AnswerReader {
    fn listen(&self, service: &str, request_id: &str) -> Box<dyn AnswerRoute> {
        Box::new(AnswerReader::listen(self, service, request_id))
    }

    async fn ready(&self, wait: Duration) -> Result<(), PortError> {
        AnswerReader::ready(self, wait)
            .await
            .map_err(PortError::new)
    }
}

#[async_trait]
impl AnswerRoute for Route {
    async fn recv(&mut self) -> Option<Answer> {
        Route::recv(self).await.map(Answer::from)
    }
}

impl From<Incoming> for Answer {
    fn from(incoming: Incoming) -> Answer {
        match incoming {
            Incoming::Reply(reply) => Answer::Reply(reply),
            Incoming::Control(control) => Answer::Control(control),
            Incoming::Event(event) => Answer::Event(event),
        }
    }
}
