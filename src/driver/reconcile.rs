//! Keeping the lease store equal to the scheduler's leases: a store that lost its data (a restart without
//! persistence, a flush) gets the live leases written back, and a lease the scheduler does not know (an
//! old snapshot brought it back) is released, so that no second holder can appear. What to release and
//! what to write back is the scheduler's decision ([`Input::LeaseStoreHolds`]); this only reads the
//! store and hands it over.
//!
//! A store that lost only its newest writes (Sentinel promoted a replica that had not received them,
//! or Redis restarted from an older snapshot) keeps its epoch but may lack the newest leases, hold
//! leases released since, and store a fence and a term below those already used. The store says so
//! (a write answers [`LeaseOutcome::Behind`], or [`Leases::ensure_epoch`]); the driver then raises
//! its term and fence to its own ([`Leases::recover`]: no fence is issued twice, a deposed leader
//! stays refused) and writes the leases back before anything new.
//!
//! [`LeaseOutcome::Behind`]: crate::ports::LeaseOutcome::Behind
//! [`Leases::ensure_epoch`]: crate::ports::Leases::ensure_epoch
//! [`Leases::recover`]: crate::ports::Leases::recover

use gpu_coordinator_core::{Input, Lease, LeaseOp};

use super::Driver;
use crate::retry::{causes, with_retry};

impl Driver {
    /// Once a second: says when the store lost its data, and reconciles it with the scheduler, at
    /// `at` (a time the inputs stored before are handled). A store that does not answer is left for
    /// the next check.
    pub(super) async fn check_lease_store(
        &mut self,
        at: gpu_coordinator_core::Millis,
    ) -> anyhow::Result<()> {
        match self.ports.leases.ensure_epoch().await {
            Ok(false) => {}
            Ok(true) => {
                tracing::warn!(
                    "the lease store lost data (a restart, a flush, or a failover to a replica that \
                     was behind); raising its fence to {} and writing the live leases back",
                    self.sched.last_fence().0
                );
                if let Err(e) = self.ports.leases.recover(self.sched.last_fence()).await {
                    tracing::warn!("recovering the lease store: {}", causes(&e));
                    return Ok(());
                }
            }
            Err(e) => {
                tracing::warn!("checking the lease store: {}", causes(&e));
                return Ok(());
            }
        }
        let leases = match self.ports.leases.leases().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!("reading the lease store: {}", causes(&e));
                return Ok(());
            }
        };
        let now = self.core_time(at);
        self.sched
            .handle_input(Input::LeaseStoreHolds { leases }, now);
        self.carry_out().await
    }

    /// After a write answered [`crate::ports::LeaseOutcome::Behind`]: raises the store's term and fence to this
    /// coordinator's (the highest fence it ever issued), then answers the writes that make it hold the
    /// scheduler's leases again (stale ones released, lost ones written back, in fence order), followed
    /// by `then`, the writes it refused, less the acquires of leases written back already. Waits for
    /// the store like every write.
    pub(super) async fn repair_lease_store(
        &mut self,
        then: &[LeaseOp],
    ) -> anyhow::Result<Vec<LeaseOp>> {
        let fence = self.sched.last_fence();
        tracing::warn!(
            "the lease store lacks writes it had acknowledged (a failover to a replica that was \
             behind, or a restart from an old snapshot); raising its fence to {} and writing the \
             leases back before anything new",
            fence.0
        );
        let leases = self.ports.leases.clone();
        with_retry("recovering the lease store", &self.shutdown, || {
            leases.recover(fence)
        })
        .await?;
        let stored = with_retry("reading the lease store", &self.shutdown, || {
            leases.leases()
        })
        .await?;
        let mut ops = self.sched.lease_store_fixes(&stored, self.time_floor);
        tracing::warn!(
            "the lease store held {} lease(s): {} write(s) to bring it back",
            stored.len(),
            ops.len()
        );
        // A lease the round acquires is among those written back (the scheduler holds it, and its
        // fence is counted in the raised one): its acquire would only find it held.
        let restored = |lease: &Lease| ops.contains(&LeaseOp::Restore(lease.clone()));
        let rest: Vec<LeaseOp> = then
            .iter()
            .filter(|op| !matches!(op, LeaseOp::Acquire(lease) if restored(lease)))
            .cloned()
            .collect();
        ops.extend(rest);
        Ok(ops)
    }
}
