//! The journal: the durable state of one deployment (requests, the highest fence, the input position,
//! the outbox). The real adapter is Postgres ([`PgJournal`](crate::adapters::postgres::PgJournal)); the
//! embedded one [`SqliteJournal`](crate::adapters::sqlite::SqliteJournal); the in-memory one
//! [`MemJournal`](crate::adapters::memory::MemJournal).

use async_trait::async_trait;
use gpu_coordinator_core::{Fence, RequestRecord};
use gpu_coordinator_wire::Encoding;

use super::{Outbound, PortError, Term};

/// One batch of durable effects, written atomically by [`Journal::write`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Batch<'a> {
    /// Requests to upsert.
    pub records: &'a [RequestRecord],
    /// The highest fence issued (only raised).
    pub max_fence: Option<Fence>,
    /// The stream sequence of the last input handled. The stored position only rises, but for
    /// `input_reset`.
    pub input_seq: Option<u64>,
    /// `input_seq` sets the position even lower than the stored one: the input stream was made anew
    /// (by someone else) and is numbered from its start again.
    pub input_reset: bool,
    /// Messages to publish, kept until the bus has stored them.
    pub outbox: &'a [OutboxRow],
    /// Outbox rows already stored by the bus: ids up to this one are deleted.
    pub published_upto: Option<u64>,
    /// The writer's leadership term: the journal refuses the batch ([`Deposed`](super::Deposed)) when the leader's term
    /// is another. `None`: unfenced (tools and tests that write directly).
    pub term: Option<Term>,
}

impl Batch<'_> {
    /// Whether writing it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.max_fence.is_none()
            && self.input_seq.is_none()
            && self.outbox.is_empty()
            && self.published_upto.is_none()
    }
}

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutboxRow {
    /// Order of the rows, increasing.
    pub id: u64,
    /// The `Nats-Msg-Id` it is published under, every time.
    pub msg_id: String,
    pub subject: String,
    /// `Content-Type: application/msgpack`, else JSON.
    pub msgpack: bool,
    /// Serialized as bytes (MessagePack's `bin`), not as a sequence of numbers.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl OutboxRow {
    /// The message this row is published as.
    pub fn outbound(&self) -> Outbound {
        Outbound {
            subject: self.subject.clone(),
            encoding: if self.msgpack {
                Encoding::MsgPack
            } else {
                Encoding::Json
            },
            payload: self.payload.clone().into(),
            msg_id: self.msg_id.clone(),
        }
    }
}

/// What [`Journal::load`] reads at start.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub records: Vec<RequestRecord>,
    pub max_fence: Fence,
    /// The highest arrival number ever persisted.
    pub max_arrival: u64,
    /// The stream sequence of the last input whose effects are committed.
    pub input_seq: u64,
    /// Messages committed but perhaps not stored by the bus, oldest first.
    pub outbox: Vec<OutboxRow>,
}

/// The most ended requests one call of [`Journal::trim_ended`] deletes: a short write beside the
/// grant path's.
pub const TRIM_ENDED_BATCH: u64 = 1000;

/// The durable state of one deployment.
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Brings the schema up to date (idempotent).
    async fn migrate(&self) -> Result<(), PortError>;
    /// Every live request and the `retain_ended` most recently ended ones, the highest fence and arrival
    /// number, the input position and the outbox.
    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError>;
    /// Called once leadership `term` is won, before [`Journal::load`]: a journal that writes behind
    /// brings its store up to date here, and fences off the writes of any earlier leader. Nothing to do
    /// for the others.
    async fn take_over(&self, term: Term) -> Result<(), PortError>;
    /// Called when a term ends (its driver stopped), before the leadership is released or handed on:
    /// a journal that writes behind stops its writer here, so that nothing of the ended term touches
    /// the store or the stream while the next leader reads them. `finish`: a graceful stop, which
    /// lets the writer first write what it holds (for a while); else it stops at once, and the next
    /// leader writes that. Nothing to do for the others.
    async fn stand_down(&self, finish: bool);
    /// Writes the whole batch or nothing. Writing the same batch twice leaves the same state (the driver
    /// retries a write whose answer was lost).
    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError>;
    /// Deletes some of the ended requests beyond the `retain_ended` most recently ended ones (those
    /// [`Journal::load`] reads), at most [`TRIM_ENDED_BATCH`] per call so that the writes of the grant path are not
    /// held up; returns how many went (fewer than a batch: none is left to delete). The request that
    /// arrived last is kept, whatever its phase: the arrival numbers go on from it. A journal that keeps
    /// nothing on disk deletes nothing (answers 0).
    async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PortError>;
    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), PortError>;
    /// Why a store is full (a write refused for lack of space), if one is: for `/readyz` and the
    /// status document (see [`crate::storage`]). `None` for a journal that cannot tell.
    fn full(&self) -> Option<String>;
    /// Closes the connections at shutdown.
    async fn close(&self);
}
