//! The ports: what the driver needs from the outside world, as traits it owns. The driver holds each as
//! an `Arc<dyn ...>` ([`Ports`]) and never names a server; which adapter fills which port is decided once,
//! at start, in [`crate::app`].
//!
//! | port | what it is for | real adapter | in-memory adapter |
//! |---|---|---|---|
//! | [`Journal`] | the durable state: requests, the highest fence, the input position, the outbox | [`PgStore`](crate::adapters::postgres::PgStore) (Postgres, sea-orm) | [`MemJournal`](crate::adapters::memory::MemJournal) |
//! | [`Leases`] | the lease store, source of truth for who holds a GPU | [`LeaseStore`](crate::adapters::redis::LeaseStore) (Redis, Lua scripts) | [`MemLeases`](crate::adapters::memory::MemLeases) |
//! | [`InputLog`] | the inputs in stream order, acknowledged once handled; the streams kept | [`NatsBus`](crate::adapters::nats::NatsBus) (NATS JetStream) | [`MemBus`](crate::adapters::memory::MemBus) |
//! | [`OutputLog`] | ordered publishing of outputs, status requests | [`NatsBus`](crate::adapters::nats::NatsBus) (NATS JetStream) | [`MemBus`](crate::adapters::memory::MemBus) |
//! | [`Leadership`] | whether this process may act, and under which term | [`PgLeadership`](crate::adapters::postgres::PgLeadership) (a lease row in Postgres) | [`AlwaysLeader`] |
//! | [`DriverStatus`] | the status document of the driver this process runs, for the HTTP API | [`DriverHandle`](crate::driver::DriverHandle) | - |
//! | [`Gateway`] | the bus as the HTTP API and `audit` see it: inputs submitted, outputs read | [`NatsGateway`](crate::adapters::nats_gateway::NatsGateway) | - |
//!
//! The embedded mode fills the same ports with no server: [`SqliteStore`](crate::adapters::sqlite::SqliteStore)
//! (the journal), [`MemLeases`](crate::adapters::memory::MemLeases) (the journal being the source of
//! truth, a restart writes the live leases back), [`SqliteBus`](crate::adapters::sqlite::SqliteBus) (input
//! log, output log and gateway) and [`DirLock`](crate::adapters::sqlite::DirLock) (leadership).
//!
//! # Adding an adapter
//!
//! Implement the port's trait in a module of `src/adapters/` (say `adapters/sqlite.rs` for a [`Journal`]):
//! translate, decide nothing. Its errors are a `thiserror` enum of its own, turned into a [`PortError`]
//! at the trait boundary, so that the driver's retry log shows every cause. Then pick it in
//! [`crate::app`], the one place where adapters are chosen. The in-memory adapters in
//! [`crate::adapters::memory`] are the smallest complete example of each contract, and the driver's own
//! tests run on them: a new adapter should behave as they do (the doc of each method says what the driver
//! relies on).
//!
//! The ports speak the core's types ([`RequestRecord`], [`Lease`], [`LeaseOp`], [`Fence`]) and already
//! rendered messages ([`Outbound`]); nothing here decides who gets a GPU.

pub mod driver_status;
pub mod gpu;
pub mod input_log;
pub mod nodes;
pub mod output_log;

pub use driver_status::DriverStatus;
pub use input_log::{Ack, Delivery, InputLog, Inputs, Settle};
pub use output_log::{Outbound, OutputLog, PublishFailure, StatusQueries, StatusQuery};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use gpu_coordinator_core::{Fence, GpuId, Lease, LeaseOp, Millis, RequestId, RequestRecord};
use gpu_coordinator_wire::Encoding;

/// A failure of an adapter, whatever its kind: the adapter's own error, with its causes as `source`s.
/// Every port method that talks to a server may fail this way; the driver retries with backoff.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PortError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl PortError {
    /// Wraps an adapter's error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> PortError {
        PortError(Box::new(error))
    }

    /// An error the library gave boxed.
    pub fn boxed(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> PortError {
        PortError(error)
    }

    /// An error from a sentence (in-memory adapters, injected faults).
    pub fn msg(text: impl Into<String>) -> PortError {
        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct Text(String);
        PortError::new(Text(text.into()))
    }
}

impl PortError {
    /// Whether the write was refused because a newer leadership term exists: retrying cannot help, the
    /// writer must stop acting.
    pub fn is_deposed(&self) -> bool {
        deposed_in(self).is_some()
    }
}

/// A write refused because another coordinator leads under a newer term. Not retried: the writer stops
/// acting and goes back to standby.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("deposed: the write of term {term} was refused ({detail})")]
pub struct Deposed {
    pub term: u64,
    pub detail: String,
}

/// The [`Deposed`] refusal in an error's chain of causes, if any.
pub fn deposed_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Deposed> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(deposed) = e.downcast_ref::<Deposed>() {
            return Some(deposed);
        }
        // A port error is transparent: its own source is its inner error's source, so the inner error
        // itself is looked at here.
        if let Some(inner) = e.downcast_ref::<PortError>() {
            if let Some(deposed) = inner.0.downcast_ref::<Deposed>() {
                return Some(deposed);
            }
        }
        current = e.source();
    }
    None
}

impl From<Box<dyn std::error::Error + Send + Sync + 'static>> for PortError {
    fn from(error: Box<dyn std::error::Error + Send + Sync + 'static>) -> PortError {
        PortError(error)
    }
}

// ----- the journal ---------------------------------------------------------------------------------

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
    /// The writer's leadership term: the journal refuses the batch ([`Deposed`]) when the leader's term
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

// ----- the lease store ------------------------------------------------------------------------------

/// Why the store would not write a lease. Not an error: the core hears of it and revokes its grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The live leases on the GPU and this one exceed the GPU's capacity.
    Capacity {
        gpu: GpuId,
        used_mb: u64,
        vram_mb: u64,
        capacity_mb: u64,
    },
    /// The fence is not above the highest one stored (for a rewrite: below it).
    StaleFence { fence: Fence, stored: Fence },
    /// A live lease for this request exists under another fence.
    Held { request_id: RequestId, fence: Fence },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Capacity {
                gpu,
                used_mb,
                vram_mb,
                capacity_mb,
            } => write!(
                f,
                "GPU {gpu} has {used_mb} MB of {capacity_mb} MB leased; {vram_mb} MB more do not fit"
            ),
            Refused::StaleFence { fence, stored } => write!(
                f,
                "fence {} is older than the highest fence in the lease store ({})",
                fence.0, stored.0
            ),
            Refused::Held { request_id, fence } => write!(
                f,
                "request {request_id} already holds a lease under fence {}",
                fence.0
            ),
        }
    }
}

/// What [`Leases::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// Written, extended or deleted.
    Done,
    /// An acquire or restore that the store refused.
    Refused(Refused),
    /// A renew or release that found no lease under that fence (expired, released, or another fence).
    NotHeld,
    /// The store lacks writes it acknowledged before (a failover to a replica that was behind its
    /// master, a restart from an old snapshot): it wrote nothing, and writes nothing until
    /// [`Leases::recover`]; the leases are to be written back before anything new.
    Behind,
}

impl From<Result<(), Refused>> for LeaseOutcome {
    fn from(written: Result<(), Refused>) -> Self {
        match written {
            Ok(()) => LeaseOutcome::Done,
            Err(refused) => LeaseOutcome::Refused(refused),
        }
    }
}

impl LeaseOutcome {
    /// Why the store refused a lease (`Acquire`, `Restore`), as a sentence; `None` for anything else.
    pub fn refusal(&self) -> Option<String> {
        match self {
            LeaseOutcome::Refused(refused) => Some(refused.to_string()),
            LeaseOutcome::Done | LeaseOutcome::NotHeld | LeaseOutcome::Behind => None,
        }
    }
}

/// The lease store: the source of truth for who holds a GPU. Every write is conditional (compare-and-set
/// on the fence, a capacity check), so a lease it refuses is a second holder prevented.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Carries out one of the core's lease operations, with the checks [`LeaseOp`] documents. Leases
    /// expire by themselves at `expires_at`.
    async fn apply(&self, op: &LeaseOp) -> Result<LeaseOutcome, PortError>;
    /// Carries out `ops` in order, as [`Leases::apply`] one after the other would; the outcomes in the
    /// same order. A store may send them together (one round trip). Every operation may be carried out
    /// again after an error: writing the same lease again changes nothing, and a release or renewal
    /// carried out twice only answers [`LeaseOutcome::NotHeld`] or `Done` the second time.
    async fn apply_all(&self, ops: &[LeaseOp]) -> Result<Vec<LeaseOutcome>, PortError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            outcomes.push(self.apply(op).await?);
        }
        Ok(outcomes)
    }
    /// Every live lease, read atomically, in no particular order.
    async fn leases(&self) -> Result<Vec<Lease>, PortError>;
    /// The highest fence ever written (0 when none).
    async fn max_fence(&self) -> Result<Fence, PortError>;
    /// Marks the store's epoch if unmarked. `true`: it was unmarked, so the store is new or lost its data,
    /// and the leases it held are gone; or it lacks writes it acknowledged before (see
    /// [`LeaseOutcome::Behind`]). Either way [`Leases::recover`], then the leases written back.
    async fn ensure_epoch(&self) -> Result<bool, PortError>;
    /// Makes a store that lost writes accept writes again: raises its leadership term to this writer's
    /// (refused, [`Deposed`], when a newer one is stored) and its highest fence to `fence` (the
    /// highest ever issued, so that no fence is issued twice). Writing the lost leases back is the
    /// caller's, before anything new.
    async fn recover(&self, fence: Fence) -> Result<(), PortError>;
    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), PortError>;
    /// Writes under leadership `term` from now on, and refuses every write of an older term from then on
    /// ([`Deposed`]); refused itself when a newer term was claimed.
    async fn claim_term(&self, term: Term) -> Result<(), PortError>;
    /// The newest term claimed ([`Leases::claim_term`]; 0 when none, or for a store without terms): a
    /// leadership that may read back an older term than was led (a Postgres standby promoted after it
    /// missed the last commits) takes its next term above it.
    async fn term(&self) -> Result<Term, PortError>;
}

// ----- the gateway ----------------------------------------------------------------------------------

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
    fn answers(&self) -> &gpu_coordinator_client::AnswerReader;
    /// Whether the bus can be used now (readiness): why not, if not. Bounded in time by the caller.
    async fn health(&self) -> Result<(), String>;
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

// ----- leadership -----------------------------------------------------------------------------------

/// A leadership term: strictly increases with each new leader of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

/// Whether this process may act for its prefix. The composition root waits for
/// [`Leadership::acquire`] before it starts a driver, the driver stops acting when
/// [`Leadership::lost`] resolves, and a graceful stop hands the leadership on at once with
/// [`Leadership::release`].
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits until this process leads; answers its term.
    async fn acquire(&self) -> Result<Term, PortError>;
    /// Resolves when this process may no longer act under `term`: before its leadership can have
    /// expired from any other coordinator's point of view.
    async fn lost(&self, term: Term);
    /// Gives the leadership of `term` up (a graceful stop), so that a standby takes over at once.
    async fn release(&self, term: Term);
    /// Who leads now, as far as this process knows: `(term, holder)`.
    async fn leader(&self) -> Option<(Term, String)>;
    /// While this process leads: its name, its term and the standbys seen lately (kept up to date by the
    /// renewals, so it costs nothing to read).
    fn roster(&self) -> Option<Roster>;
    /// Why this process does not take the leadership even when it is free (its clock is too far from
    /// the leadership's), if it does not.
    fn refusal(&self) -> Option<String>;
}

/// The coordinators of a deployment as the leader sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub holder: String,
    pub term: Term,
    pub standbys: Vec<String>,
}

/// The leadership of a deployment with one coordinator: always the leader, in term 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysLeader;

#[async_trait]
impl Leadership for AlwaysLeader {
    async fn acquire(&self) -> Result<Term, PortError> {
        Ok(Term(1))
    }

    async fn lost(&self, _term: Term) {
        std::future::pending::<()>().await
    }

    /// Nobody else could take it: nothing to hand on.
    async fn release(&self, _term: Term) {}

    /// Not known: nobody else leads, and no term is read back.
    async fn leader(&self) -> Option<(Term, String)> {
        None
    }

    /// No standbys, and no name to give.
    fn roster(&self) -> Option<Roster> {
        None
    }

    /// Never refuses.
    fn refusal(&self) -> Option<String> {
        None
    }
}

/// The adapters the driver runs on, one per port.
#[derive(Clone)]
pub struct Ports {
    pub journal: std::sync::Arc<dyn Journal>,
    pub leases: std::sync::Arc<dyn Leases>,
    /// The inputs, read in order and acknowledged.
    pub input_log: std::sync::Arc<dyn InputLog>,
    /// The outputs, published in order (often the same adapter as `input_log`).
    pub output_log: std::sync::Arc<dyn OutputLog>,
    pub leadership: std::sync::Arc<dyn Leadership>,
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
