//! Keeping the lease store equal to the scheduler's leases: a store that lost its data (a restart without
//! persistence, a flush) gets the live leases written back, and a lease the scheduler does not know (an
//! old snapshot brought it back) is released, so that no second holder can appear. What to release and
//! what to write back is the scheduler's decision ([`Input::LeaseStoreHolds`]); this only reads the
//! store and hands it over.

use gpu_coordinator_core::Input;

use super::retry::causes;
use super::Driver;

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
            Ok(true) => tracing::warn!(
                "the lease store lost its data (restart or flush); writing the live leases back"
            ),
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
}
