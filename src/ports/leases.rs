//! The lease store: the source of truth for who holds a GPU. The real adapter is Redis
//! ([`RedisLeases`](crate::adapters::redis::RedisLeases)); the in-memory one
//! [`MemLeases`](crate::adapters::memory::MemLeases).

use async_trait::async_trait;
use gpu_coordinator_core::{Fence, GpuId, Lease, LeaseOp, RequestId};

use super::{PortError, Term};

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
    /// (refused, [`Deposed`](super::Deposed), when a newer one is stored) and its highest fence to `fence` (the
    /// highest ever issued, so that no fence is issued twice). Writing the lost leases back is the
    /// caller's, before anything new.
    async fn recover(&self, fence: Fence) -> Result<(), PortError>;
    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), PortError>;
    /// Writes under leadership `term` from now on, and refuses every write of an older term from then on
    /// ([`Deposed`](super::Deposed)); refused itself when a newer term was claimed.
    async fn claim_term(&self, term: Term) -> Result<(), PortError>;
    /// The newest term claimed ([`Leases::claim_term`]; 0 when none, or for a store without terms): a
    /// leadership that may read back an older term than was led (a Postgres standby promoted after it
    /// missed the last commits) takes its next term above it.
    async fn term(&self) -> Result<Term, PortError>;
}
