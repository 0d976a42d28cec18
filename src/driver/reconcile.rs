//! Keeping the lease store equal to the scheduler's leases: a store that lost its data (a restart without
//! persistence, a flush) gets the live leases written back, and a lease the scheduler does not know (an
//! old snapshot brought it back) is released, so that no second holder can appear.

use gpu_coordinator_core::{Input, Lease, LeaseOp};

use super::retry::causes;
use super::{now_ms, Driver};

impl Driver {
    /// Once a second: says when the store lost its data, and reconciles it with the scheduler.
    pub(super) async fn check_lease_store(&mut self) -> anyhow::Result<()> {
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
        self.reconcile_leases().await
    }

    /// Makes the store hold exactly the scheduler's leases: releases any other and writes back any
    /// missing one; one the store refuses is revoked. A store that does not answer is left for the next
    /// check.
    pub(super) async fn reconcile_leases(&mut self) -> anyhow::Result<()> {
        // What is due first: an expired lease ends in the scheduler as it ended in the store.
        self.sched.handle_timeout(now_ms());
        self.carry_out().await?;
        let stored = match self.ports.leases.leases().await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!("reading the lease store: {}", causes(&e));
                return Ok(());
            }
        };
        let wanted = self.sched.leases();
        let now = now_ms();
        let same = |a: &Lease, b: &Lease| a.request_id == b.request_id && a.fence == b.fence;
        let stale: Vec<&Lease> = stored
            .iter()
            .filter(|l| !wanted.iter().any(|w| same(w, l)))
            .collect();
        let mut missing: Vec<&Lease> = wanted
            .iter()
            .filter(|w| w.expires_at > now && !stored.iter().any(|l| same(w, l)))
            .collect();
        // In fence order: the store refuses a fence below the highest it has seen.
        missing.sort_by_key(|l| l.fence);
        if stale.is_empty() && missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            "the lease store disagreed with the coordinator: releasing {} lease(s) it should not hold, \
             writing back {} it lost",
            stale.len(),
            missing.len()
        );
        for lease in stale {
            let op = LeaseOp::Release {
                request_id: lease.request_id.clone(),
                gpu: lease.gpu.clone(),
                fence: lease.fence,
            };
            if let Err(e) = self.ports.leases.apply(&op).await {
                tracing::warn!("releasing a stale lease: {}", causes(&e));
            }
        }
        for lease in missing {
            match self
                .ports
                .leases
                .apply(&LeaseOp::Restore(lease.clone()))
                .await
            {
                Ok(outcome) => {
                    if let Some(why) = outcome.refusal() {
                        tracing::error!(request_id = %lease.request_id, "the lease store refused a lease: {why}");
                        self.sched.handle_input(
                            Input::LeaseRefused {
                                request_id: lease.request_id.clone(),
                                fence: lease.fence,
                                why,
                            },
                            now,
                        );
                    }
                }
                Err(e) => tracing::warn!("writing a lease back: {}", causes(&e)),
            }
        }
        self.carry_out().await
    }
}
