//! Restoring the state persisted before a restart, reconciled with the lease store.

use super::*;

impl Scheduler {
    /// Restores the state persisted before a restart and reconciles it with the lease store. Call once,
    /// on a new scheduler, before any other input.
    ///
    /// No timer fires here, nothing is scheduled, and the core's clock stays where it was: the inputs
    /// stored while no coordinator acted (renewals, ACKs) are handled next, each at the time it was
    /// stored, and only then the timers that fell due since (the next [`Scheduler::handle_timeout`],
    /// which also schedules). A lease renewed in time during the gap is kept.
    pub fn restore(&mut self, snapshot: Snapshot, now: Millis) {
        self.next_seq = self.next_seq.max(snapshot.max_arrival + 1);
        self.last_fence = self.last_fence.max(snapshot.max_fence).max(
            snapshot
                .leases
                .iter()
                .map(|l| l.fence)
                .max()
                .unwrap_or_default(),
        );
        let mut records = snapshot.requests;
        records.sort_by_key(|r| r.arrival);
        self.restore_fleet_gpus(&records, &snapshot.leases);
        let mut leases: HashMap<RequestId, Lease> = snapshot
            .leases
            .into_iter()
            .map(|l| (l.request_id.clone(), l))
            .collect();
        // Room for them all at once: growing the tables step by step copies every request again at
        // each step (most of a long queue's restore).
        let open = records.iter().filter(|r| r.phase != Phase::Ended).count();
        self.live.reserve(open);
        self.ids.reserve(open);
        // Leases written back go after every stale lease is released: a stale one would otherwise
        // count against a GPU's capacity and get a legitimate holder refused.
        let mut write_back = Vec::new();
        for rec in records {
            self.next_seq = self.next_seq.max(rec.arrival + 1);
            if let Some(fence) = rec.fence {
                self.last_fence = self.last_fence.max(fence);
            }
            if rec.phase == Phase::Ended {
                self.remember_ended(rec);
                continue;
            }
            let holding = matches!(rec.phase, Phase::Active | Phase::Pausing);
            let seq = rec.arrival;
            let lease = if leases.is_empty() {
                None
            } else {
                leases.remove(&rec.request_id)
            };
            self.insert_live(rec);
            if !holding {
                if let Some(stale) = lease {
                    self.release_stale(stale);
                }
                self.end_if_unplaceable(seq, now);
                continue;
            }
            self.restore_holder(seq, lease, now, &mut write_back);
        }
        for (_, stale) in leases {
            self.release_stale(stale);
        }
        // In fence order: the store refuses a fence below the highest it has seen.
        write_back.sort_by_key(|a| match a {
            Action::Lease(LeaseOp::Restore(lease)) => lease.fence,
            _ => Fence(0),
        });
        self.actions.extend(write_back);
        // Nothing is scheduled yet either: a holder whose lease ran out meanwhile is still counted
        // until the timers fire, and must not be paused (its lease extended) before.
        self.flush();
    }

    /// A restored holder against the lease store's `lease` of it: its GPU gone (revoked), the store
    /// behind a renewal that was committed (caught up) or the source of the expiry, or its lease lost
    /// or stale (written back, in `write_back`, unless it ran out meanwhile).
    fn restore_holder(
        &mut self,
        seq: u64,
        lease: Option<Lease>,
        now: Millis,
        write_back: &mut Vec<Action>,
    ) {
        let gpu_known = self
            .live_rec(seq)
            .gpu
            .as_ref()
            .is_some_and(|g| self.gpu_index.contains_key(g));
        if !gpu_known {
            self.revoke(seq, now, Reason::GpuRemoved, false);
            return;
        }
        match lease {
            Some(l) if Some(l.fence) == self.live_rec(seq).fence => {
                let persisted = self.live_rec(seq).expires_at.unwrap_or(0);
                if persisted > l.expires_at && persisted > now {
                    // A renewal committed, and answered, but stopped before the store heard of
                    // it: the store catches up.
                    self.actions.push_back(Action::Lease(LeaseOp::Renew {
                        request_id: l.request_id.clone(),
                        gpu: l.gpu.clone(),
                        fence: l.fence,
                        expires_at: persisted,
                    }));
                } else {
                    // Otherwise the lease store is the source of truth for the expiry.
                    self.update(seq, now, |rec| rec.expires_at = Some(l.expires_at));
                }
            }
            other => {
                if let Some(stale) = other {
                    self.release_stale(stale);
                }
                let expires_at = self.live_rec(seq).expires_at.unwrap_or(0);
                if expires_at > now {
                    let lease = self
                        .lease_of(self.live_rec(seq))
                        .expect("a holding record has a GPU and a fence");
                    write_back.push(Action::Lease(LeaseOp::Restore(lease)));
                }
                // A lease that ran out while the coordinator was down expires in handle_timeout.
            }
        }
    }
}
