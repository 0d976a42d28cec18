//! The input log: the inputs in stream order as the driver reads them, acknowledged once their effects
//! are committed, and the stream kept (made, numbered, trimmed). The real adapter is JetStream
//! ([`NatsBus`](crate::adapters::nats::NatsBus)); the embedded one
//! [`SqliteBus`](crate::adapters::sqlite::SqliteBus); the in-memory one
//! [`MemBus`](crate::adapters::memory::MemBus). The same object is, most often, the
//! [`OutputLog`](super::OutputLog) too.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use gpu_coordinator_core::Millis;
use tokio::sync::watch;

use super::PortError;

/// Settles one delivered input with the bus, once its effects are durable.
pub type Settle = Pin<Box<dyn Future<Output = Result<(), PortError>> + Send>>;

/// Settles one delivered input: acknowledges it (`false`), or ends its redelivery (`true`).
pub type Ack = Box<dyn FnOnce(bool) -> Settle + Send + Sync>;

/// One input as the bus delivered it.
pub struct Delivery {
    /// Its position in the input stream (0: unknown, never skipped as handled).
    pub seq: u64,
    /// When the bus stored it (milliseconds since the Unix epoch), if it says: the driver handles an
    /// input at that time, so that one stored in time (a renewal) counts in time, however late the
    /// coordinator gets to it.
    pub stored_at: Option<Millis>,
    pub subject: String,
    pub content_type: Option<String>,
    pub payload: Bytes,
    /// Acknowledges it (`false`), or ends its redelivery for good (`true`: it was invalid).
    pub ack: Ack,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("seq", &self.seq)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// The inputs in stream order. It ends (or fails) when the bus lost the consumer; the driver reopens it.
pub type Inputs = BoxStream<'static, Result<Delivery, PortError>>;

/// The input stream: inputs delivered in order, acknowledged once handled.
#[async_trait]
pub trait InputLog: Send + Sync + 'static {
    /// Creates or updates the output stream, and the input stream. A missing input stream is made
    /// only when `inputs_after` (the last input the journal handled) is given, and numbers its inputs
    /// after it, so that a default request id never names an older request.
    async fn ensure_streams(&self, inputs_after: Option<u64>) -> Result<(), PortError>;
    /// Where reading the inputs goes on from, given `handled`, the last input whose effects are committed
    /// (0: none known). The driver persists a changed answer before it opens the inputs.
    async fn input_position(&self, handled: u64) -> Result<u64, PortError>;
    /// The sequence of the last input stored (0: none, or a bus that cannot tell). Timers wait until
    /// the inputs stored before they fell due are handled.
    async fn input_end(&self) -> Result<u64, PortError>;
    /// Makes room in a nearly full input stream by removing the inputs up to `handled` (their effects
    /// are committed, so no restart needs them); returns how many went. A bus without limits keeps all
    /// (answers 0).
    async fn trim_inputs(&self, handled: u64) -> Result<u64, PortError>;
    /// Delivers the inputs after `after`, in order. Opening again drops what the previous stream had
    /// delivered and not settled; it comes again.
    async fn open_inputs(&self, after: u64) -> Result<Inputs, PortError>;
    /// Changes on every reconnect: the driver then reopens the inputs at once.
    fn reconnects(&self) -> watch::Receiver<u64>;
    /// Whether acknowledging an input also acknowledges every input delivered before it (JetStream's
    /// `AckPolicy::All`): the driver then acknowledges a batch by its last input alone.
    fn acks_cover_earlier(&self) -> bool;
}
