//! Inputs and timers: a batch handled in order, each input dispatched to its handler, the timers
//! that fell due fired at their own instants, and the pass run once at the end.

use super::*;

impl Scheduler {
    /// Handles one input at `now` (see [`Scheduler::handle_inputs`]).
    pub fn handle_input(&mut self, input: Input, now: Millis) {
        self.handle_inputs([(input, now)]);
    }

    /// Handles a batch of inputs, each at the time it was stored (a time before the latest one handed
    /// in counts as that one), firing the timers due before each; then schedules once, after all of
    /// them. A release and a more urgent request in one batch hand the GPU to the urgent one, rather
    /// than resuming a paused holder only to pause it again in the same instant.
    ///
    /// An answer of the lease store ([`Input::LeaseNotHeld`], [`Input::LeaseRefused`]) belongs to the
    /// round whose writes it answers, whenever the store gave it: it is handled at the core's time
    /// (the time given only before any other input, just after a restore), fires no timer and moves
    /// no time. Only inputs and timers move time: a store that answers a renewal handled late (after
    /// a stall, a takeover, a restart) must not expire a lease whose later renewals are still to be
    /// handled.
    pub fn handle_inputs(&mut self, batch: impl IntoIterator<Item = (Input, Millis)>) {
        let mut last = None;
        for (input, stored_at) in batch {
            let now = if input.answers_the_lease_store() {
                if self.clock == 0 {
                    stored_at
                } else {
                    self.clock
                }
            } else {
                let now = self.advance(stored_at);
                self.fire_due(now);
                now
            };
            self.apply(input, stored_at, now);
            last = Some(last.map_or(now, |l: Millis| l.max(now)));
        }
        if let Some(now) = last {
            self.schedule(now);
            self.say_queued(now);
            self.flush();
        }
    }

    /// The core's time for something that happened `at`: never before the latest time handed in.
    fn advance(&mut self, at: Millis) -> Millis {
        self.clock = self.clock.max(at);
        self.clock
    }

    /// `queued` for the requests of the batch that its scheduling left waiting.
    fn say_queued(&mut self, now: Millis) {
        for seq in std::mem::take(&mut self.arrived) {
            if self
                .live
                .get(&seq)
                .is_some_and(|l| l.rec.phase == Phase::Queued)
            {
                let detail = self.queued_detail(seq);
                let rec = self.live_rec(seq).clone();
                self.event(&rec, EventKind::Queued, now, Some(detail));
            }
        }
    }

    /// One input, stored at `stored_at`, handled at `now`; the scheduling is left to the caller.
    fn apply(&mut self, input: Input, stored_at: Millis, now: Millis) {
        match input {
            Input::Inbound {
                service,
                encoding,
                input,
            } => match input {
                Inbound::Request(msg) => self.on_request(service, encoding, msg, now),
                Inbound::Release(msg) => self.on_release(service, encoding, msg, now),
                Inbound::Renew(msg) => self.on_renew(service, encoding, msg, now),
                Inbound::Ack(msg) => self.on_ack(service, encoding, msg, stored_at, now),
                Inbound::Cancel(msg) => self.on_cancel(service, encoding, msg, now),
            },
            Input::Invalid(rejection) => self.on_invalid(rejection, now),
            Input::GpuUsed { gpu, used_mb } => self.gpu_used(&gpu, used_mb),
            Input::HostSample {
                host,
                heard_at,
                gpus,
            } => self.on_host_sample(host, heard_at, gpus, now),
            Input::LeaseStoreHolds { leases } => self.reconcile(leases, now),
            Input::LeaseNotHeld { request_id, fence } => {
                let held = self.ids.get(&request_id).map(|&seq| self.live_rec(seq));
                if let Some(lease) = held
                    .filter(|rec| rec.fence == Some(fence))
                    .filter(|rec| rec.expires_at.is_some_and(|at| at > now))
                    .and_then(|rec| self.lease_of(rec))
                {
                    self.actions
                        .push_back(Action::Lease(LeaseOp::Restore(lease)));
                }
            }
            Input::LeaseRefused {
                request_id,
                fence,
                why,
            } => {
                if let Some(&seq) = self.ids.get(&request_id) {
                    let rec = self.live_rec(seq);
                    if rec.fence == Some(fence)
                        && matches!(rec.phase, Phase::Active | Phase::Pausing)
                    {
                        self.revoke(seq, now, Reason::Refused { why }, false);
                    }
                }
            }
        }
    }

    /// NVML's figure of the VRAM used on `gpu`, by anyone: what is outside the leases, and whether a
    /// paused holder's VRAM is freed.
    pub(super) fn gpu_used(&mut self, gpu: &str, used_mb: u64) {
        if let Some(&i) = self.gpu_index.get(gpu) {
            let gpu = &mut self.gpus[i];
            let external = used_mb.saturating_sub(gpu.held_mb);
            gpu.external_mb = external;
            // Freed once the outside usage is back near its level before the ACK (at least
            // half of the paused share gone).
            if gpu
                .settle
                .as_ref()
                .is_some_and(|s| external <= s.external_before_mb + s.freed_mb / 2)
            {
                gpu.settle = None;
            }
        }
    }

    /// Makes the lease store hold exactly this scheduler's leases (see [`Input::LeaseStoreHolds`]).
    fn reconcile(&mut self, stored: Vec<Lease>, now: Millis) {
        let fixes = self.lease_store_fixes(&stored, now);
        self.actions.extend(fixes.into_iter().map(Action::Lease));
    }

    /// The writes that make a lease store holding `stored` hold exactly this scheduler's leases: a
    /// `Release` for every stored lease it does not hold under that fence, then a `Restore` for each of
    /// its leases unexpired at `now` that the store lacks, in fence order. What
    /// [`Input::LeaseStoreHolds`] answers, for a driver that must write them before anything else
    /// (a store that lost writes is repaired before it takes new ones).
    pub fn lease_store_fixes(&self, stored: &[Lease], now: Millis) -> Vec<LeaseOp> {
        let wanted = self.leases();
        let same = |a: &Lease, b: &Lease| a.request_id == b.request_id && a.fence == b.fence;
        let mut fixes: Vec<LeaseOp> = stored
            .iter()
            .filter(|l| !wanted.iter().any(|w| same(w, l)))
            .map(|stale| Self::stale_release(stale.clone()))
            .collect();
        let mut missing: Vec<Lease> = wanted
            .into_iter()
            .filter(|w| w.expires_at > now && !stored.iter().any(|l| same(w, l)))
            .collect();
        missing.sort_by_key(|l| l.fence);
        fixes.extend(missing.into_iter().map(LeaseOp::Restore));
        fixes
    }

    /// Fires every timer due at `now` (timeouts, expiries, pause deadlines, aging), then schedules.
    pub fn handle_timeout(&mut self, now: Millis) {
        let now = self.advance(now);
        self.fire_due(now);
        self.schedule(now);
        self.flush();
    }

    /// Fires every timer due at `now`: an input that comes after a deadline is handled after it (a
    /// renewal that comes after the lease's expiry finds it revoked).
    fn fire_due(&mut self, now: Millis) {
        self.reclaim_guards.retain(|_, until| *until > now);
        self.hosts_due(now);
        for gpu in &mut self.gpus {
            if gpu.settle.as_ref().is_some_and(|s| s.until <= now) {
                let settle = gpu.settle.take().expect("checked above");
                // Past the bound: count the paused holder's VRAM as freed, and say so on the grant.
                gpu.external_mb = gpu.external_mb.min(settle.external_before_mb);
                gpu.settle_warning = Some(format!(
                    "NVML did not see the {} MB of paused `{}` freed within nvml.settle_ms ({} ms); granted anyway",
                    settle.freed_mb, settle.request_id, self.config.settle_ms
                ));
            }
        }
        while let Some(&(at, seq, kind)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(live) = self.live.get_mut(&seq) {
                live.timers.retain(|&t| t != (at, kind));
            } else {
                continue;
            }
            let phase = self.live_rec(seq).phase;
            match (kind, phase) {
                (TimerKind::Timeout, Phase::Queued) => {
                    let rec = self.live_rec(seq);
                    let error = format!(
                        "no GPU could be granted within timeout_ms ({} ms)",
                        rec.timeout_at.saturating_sub(rec.requested_at)
                    );
                    self.end(seq, End::TimedOut, Some(error), now);
                }
                (TimerKind::Aging, Phase::Queued) => self.update(seq, now, |_| {}),
                (TimerKind::Expiry, Phase::Active) => self.revoke(seq, now, Reason::Expired, true),
                // A pausing lease lasts at least until its pause deadline (see `pause`). Past the
                // deadline without an ACK it is revoked when it runs out, not before: a holder that
                // never heard the pause (cut off from NATS) knows only its lease, and uses the GPU
                // until then.
                (TimerKind::Expiry, Phase::Pausing) => {
                    let missed = self
                        .live_rec(seq)
                        .pause_deadline
                        .is_some_and(|deadline| deadline <= now);
                    if missed {
                        let reason = Reason::NoPauseAck {
                            deadline_ms: self.config.ack_deadline_ms,
                        };
                        self.revoke(seq, now, reason, false)
                    } else {
                        self.revoke(seq, now, Reason::Expired, true)
                    }
                }
                (TimerKind::PauseDeadline, Phase::Pausing) => {
                    let runs_until = self.live_rec(seq).expires_at;
                    if runs_until.is_none_or(|at| at <= now) {
                        let reason = Reason::NoPauseAck {
                            deadline_ms: self.config.ack_deadline_ms,
                        };
                        self.revoke(seq, now, reason, false)
                    }
                    // Otherwise the expiry revokes it; renewals are refused from now on.
                }
                // A holder became preemptible: the next pass reconsiders it.
                _ => {}
            }
        }
    }
}
