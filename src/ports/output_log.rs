//! The output log: the driver's outputs published in order and stored once, and the status questions
//! it answers. The real adapter is JetStream ([`NatsBus`](crate::adapters::nats::NatsBus)); the
//! embedded one [`SqliteBus`](crate::adapters::sqlite::SqliteBus); the in-memory one
//! [`MemBus`](crate::adapters::memory::MemBus). The same object is, most often, the
//! [`InputLog`](super::InputLog) too.

use std::collections::HashSet;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use gpu_coordinator_wire::Encoding;

use super::{PortError, Settle};

/// One message to publish on a stored output subject.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub subject: String,
    pub encoding: Encoding,
    pub payload: Bytes,
    /// The same on every publish of this message, so the bus stores it once.
    pub msg_id: String,
}

/// A publish that failed part of the way.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct PublishFailure {
    /// How many of the first messages are surely stored.
    pub stored: usize,
    #[source]
    pub error: PortError,
}

/// A `<prefix>.status` question: answer it with the status document in `encoding`.
pub struct StatusQuery {
    pub encoding: Encoding,
    /// The page of the queue asked for (the question's body; empty: the default page).
    pub page: gpu_coordinator_wire::StatusPage,
    pub respond: Box<dyn FnOnce(Vec<u8>) -> Settle + Send + Sync>,
}

/// The status questions, for as long as the bus is up.
pub type StatusQueries = BoxStream<'static, StatusQuery>;

/// The output stream: outputs published in order, and the status questions answered.
#[async_trait]
pub trait OutputLog: Send + Sync + 'static {
    /// Publishes the messages in order and waits until the bus stored them: all at once (`pipelined`) or
    /// each after the previous one is stored. A message published again under its `msg_id` is stored once.
    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        pipelined: bool,
    ) -> Result<(), PublishFailure>;
    /// Which of `msg_ids` (the ids of the last messages published, in order) the output stream already
    /// holds: those need not be published again after a restart, however long after (a bus's duplicate
    /// detection forgets ids after a while). A bus that detects duplicates forever answers none.
    async fn already_stored(&self, msg_ids: &[String]) -> Result<HashSet<String>, PortError>;
    /// Whether the bus is connected now: a leader cut off from it longer than its trust window gives
    /// the leadership up, so that a coordinator that can reach the bus takes over.
    fn connected(&self) -> bool;
    /// The status questions asked of this coordinator.
    async fn status_queries(&self) -> Result<StatusQueries, PortError>;
    /// Sends whatever is buffered, at shutdown.
    async fn flush(&self) -> Result<(), PortError>;
}
