//! The ports: what the driver needs from the outside world, as traits it owns. The driver holds each as
//! an `Arc<dyn ...>` ([`Ports`]) and never names a server; which adapter fills which port is decided once,
//! at start, in [`crate::app`].
//!
//! | port | what it is for | real adapter | in-memory adapter |
//! |---|---|---|---|
//! | [`Journal`] | the durable state: requests, the highest fence, the input position, the outbox | [`PgJournal`](crate::adapters::postgres::PgJournal) (Postgres, sea-orm) | [`MemJournal`](crate::adapters::memory::MemJournal) |
//! | [`Leases`] | the lease store, source of truth for who holds a GPU | [`RedisLeases`](crate::adapters::redis::RedisLeases) (Redis, Lua scripts) | [`MemLeases`](crate::adapters::memory::MemLeases) |
//! | [`InputLog`] | the inputs in stream order, acknowledged once handled; the streams kept | [`NatsBus`](crate::adapters::nats::NatsBus) (NATS JetStream) | [`MemBus`](crate::adapters::memory::MemBus) |
//! | [`OutputLog`] | ordered publishing of outputs, status requests | [`NatsBus`](crate::adapters::nats::NatsBus) (NATS JetStream) | [`MemBus`](crate::adapters::memory::MemBus) |
//! | [`Leadership`] | whether this process may act, and under which term | [`PgLeadership`](crate::adapters::postgres::PgLeadership) (a lease row in Postgres) | [`AlwaysLeader`] |
//! | [`DriverStatus`] | the status document of the driver this process runs, for the HTTP API | [`DriverHandle`](crate::driver::DriverHandle) | - |
//! | [`Gateway`] | the bus as the HTTP API and `audit` see it: inputs submitted, outputs read, the coordinator's [`Answers`] | [`NatsGateway`](crate::adapters::nats_gateway::NatsGateway) | - |
//!
//! The embedded mode fills the same ports with no server: [`SqliteJournal`](crate::adapters::sqlite::SqliteJournal)
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
//! The ports speak the core's types ([`RequestRecord`](gpu_coordinator_core::RequestRecord),
//! [`Lease`](gpu_coordinator_core::Lease), [`LeaseOp`](gpu_coordinator_core::LeaseOp),
//! [`Fence`](gpu_coordinator_core::Fence)) and already rendered messages ([`Outbound`]); nothing here
//! decides who gets a GPU.

pub mod driver_status;
pub mod gateway;
pub mod gpu;
pub mod input_log;
pub mod journal;
pub mod leadership;
pub mod leases;
pub mod nodes;
pub mod output_log;

pub use driver_status::DriverStatus;
pub use gateway::{
    subject_matches, Answer, AnswerRoute, Answers, Gateway, ReadFrom, Stored, StoredStream, Which,
};
pub use input_log::{Ack, Delivery, InputLog, Inputs, Settle};
pub use journal::{Batch, Journal, Loaded, OutboxRow, TRIM_ENDED_BATCH};
pub use leadership::{AlwaysLeader, Leadership, Roster, Term};
pub use leases::{LeaseOutcome, Leases, Refused};
pub use output_log::{Outbound, OutputLog, PublishFailure, StatusQueries, StatusQuery};

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
