//! The gateway: the bus as the HTTP API and `audit` see it, inputs submitted and outputs read. The real
//! adapter is JetStream ([`NatsGateway`](crate::adapters::nats_gateway::NatsGateway)); the embedded one
//! [`SqliteBus`](crate::adapters::sqlite::SqliteBus).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use gpu_coordinator_core::Millis;
use gpu_coordinator_wire::{Control, Encoding, Event, Reply};

use super::PortError;

/// A message as one of the bus's streams stored it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its position in its stream.
    pub seq: u64,
    pub subject: String,
    /// `application/msgpack`, else JSON.
    pub content_type: Option<String>,
    pub payload: Bytes,
    /// When it was stored (milliseconds since the Unix epoch), if known.
    pub stored_at: Option<Millis>,
}

impl Stored {
    /// How its payload is encoded.
    pub fn encoding(&self) -> Encoding {
        Encoding::from_content_type(self.content_type.as_deref())
    }
}

/// Where reading a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// At the first message the stream keeps.
    Start,
    /// Right after this position.
    After(u64),
    /// At the first message stored at or after this instant (milliseconds since the Unix epoch).
    Since(Millis),
    /// At the next message stored.
    New,
}

/// The input or the output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Inputs,
    Outputs,
}

/// Stored messages, in stream order.
pub type StoredStream = BoxStream<'static, Result<Stored, PortError>>;

/// The bus as the HTTP API and `audit` use it, beside the driver: inputs submitted, the outputs read.
/// The real adapter is JetStream ([`NatsGateway`](crate::adapters::nats_gateway::NatsGateway)); the
/// embedded one is [`SqliteBus`](crate::adapters::sqlite::SqliteBus).
#[async_trait]
pub trait Gateway: Send + Sync + 'static {
    /// Stores one input on `subject` (JSON), and returns once it is durable.
    async fn submit(&self, subject: &str, payload: Vec<u8>) -> Result<(), PortError>;
    /// The output messages on `filter` (a subject, wildcards `*` and `>` allowed) from `from` on, as
    /// they are stored: endless. Nothing stored after the call returns is missed.
    async fn follow(&self, filter: &str, from: ReadFrom) -> Result<StoredStream, PortError>;
    /// The messages of `which` stream on `filter` from `from` up to the last one stored now: ends.
    async fn history(
        &self,
        which: Which,
        filter: &str,
        from: ReadFrom,
    ) -> Result<StoredStream, PortError>;
    /// The position of the last message of `which` stream now (0: none yet): where a reader that
    /// starts from [`ReadFrom::After`] it misses nothing stored later, and can say where it began.
    async fn last_seq(&self, which: Which) -> Result<u64, PortError>;
    /// The reader of the coordinator's replies and `requested` events, that HTTP calls wait on.
    fn answers(&self) -> &dyn Answers;
    /// Whether the bus can be used now (readiness): why not, if not. Bounded in time by the caller.
    async fn health(&self) -> Result<(), String>;
}

/// A message from the coordinator about one request: its reply, an order, or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Reply(Reply),
    Control(Control),
    Event(Event),
}

/// The reader of what the coordinator says about requests, read from the output stream: the HTTP calls
/// listen for the request they stored an input about, then wait on their [`AnswerRoute`].
#[async_trait]
pub trait Answers: Send + Sync {
    /// Starts routing what the coordinator says about `request_id` of `service` to the returned route
    /// (call it before publishing, so that nothing is missed). Opens the reader if it is closed.
    fn listen(&self, service: &str, request_id: &str) -> Box<dyn AnswerRoute>;
    /// Waits up to `wait` for the reader to be open: why not, if it is not.
    async fn ready(&self, wait: Duration) -> Result<(), PortError>;
}

/// What the coordinator says about one request, routed to one waiter; dropped, the routing ends.
#[async_trait]
pub trait AnswerRoute: Send {
    /// The next message about the request, in the order the coordinator stored them. `None` once the
    /// reader stopped.
    async fn recv(&mut self) -> Option<Answer>;
}

/// Whether `subject` is matched by `filter`, as NATS matches them: `*` is one token, a final `>` one
/// or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for want in filter.split('.') {
        match (want, subject.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (want, Some(token)) if want == token => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn subjects_match_as_nats_matches_them() {
        assert!(subject_matches("gpu.event.>", "gpu.event.granted.chat"));
        assert!(!subject_matches("gpu.event.>", "gpu.event"));
        assert!(subject_matches("gpu.reply.*", "gpu.reply.chat"));
        assert!(!subject_matches("gpu.reply.*", "gpu.reply.chat.x"));
        assert!(subject_matches("gpu.control.chat", "gpu.control.chat"));
        assert!(!subject_matches("gpu.control.chat", "gpu.control.chatty"));
        assert!(subject_matches(
            "gpu.event.requested.*",
            "gpu.event.requested.a"
        ));
        assert!(!subject_matches(
            "gpu.event.requested.*",
            "gpu.event.granted.a"
        ));
        assert!(subject_matches(">", "a.b"));
    }
}
