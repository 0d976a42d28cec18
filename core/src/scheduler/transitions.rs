//! The changes of a request's state: grant, pause, paused, revoke, end, and the end of a request
//! that no GPU can take any more.

use super::*;

impl Scheduler {
    pub(super) fn grant(&mut self, seq: u64, gpu: usize, now: Millis) {
        let fence = self.issue_fence();
        let gpu_id = self.gpus[gpu].spec.id.clone();
        let whole = self.gpus[gpu]
            .spec
            .total_mb
            .saturating_sub(self.gpus[gpu].external_mb);
        let resumed = self.live_rec(seq).phase == Phase::Paused;
        self.update(seq, now, |rec| {
            rec.phase = Phase::Active;
            rec.gpu = Some(gpu_id.clone());
            rec.held_mb = Some(rec.vram_mb.unwrap_or(whole));
            rec.fence = Some(fence);
            rec.granted_at = Some(now);
            rec.expires_at = Some(now.saturating_add(rec.lease_ms));
            rec.paused_at = None;
            if rec.waited_ms.is_none() {
                rec.waited_ms = Some(now.saturating_sub(rec.requested_at));
            }
        });
        // Granted after reclaiming: the services it reclaimed from may not reclaim from its service
        // for its grace.
        if let Some(live) = self.live.get_mut(&seq) {
            let from = std::mem::take(&mut live.reclaimed_from);
            let until = now.saturating_add(live.min_hold_ms);
            if live.min_hold_ms > 0 {
                for victim in from {
                    let key = (live.rec.service_id.clone(), victim);
                    self.reclaim_guards.insert(key, until);
                }
            }
        }
        let rec = self.live_rec(seq).clone();
        let expires_at = rec.expires_at.unwrap_or(now);
        self.actions.push_back(Action::Lease(LeaseOp::Acquire(
            self.lease_of(&rec)
                .expect("a granted record has a GPU and a fence"),
        )));
        if resumed {
            self.control(
                &rec,
                ControlAction::Resume,
                None,
                Reason::Free,
                Some(expires_at),
            );
            let warning = self.gpus[gpu].settle_warning.take();
            self.event(&rec, EventKind::Resumed, now, warning);
        } else {
            let mut reply = ReplyOut::new(&rec.request_id, Outcome::Granted);
            reply.gpu = rec.gpu.clone();
            reply.fence = Some(fence.0);
            reply.lease_ms = Some(rec.lease_ms);
            reply.expires_at = Some(expires_at);
            reply.vram_mb = rec.held_mb;
            reply.waited_ms = rec.waited_ms;
            self.reply(&rec.service_id, rec.encoding, reply);
            let mut detail = format!("waited {} ms", rec.waited_ms.unwrap_or(0));
            if let Some(warning) = self.gpus[gpu].settle_warning.take() {
                detail = format!("{detail}; {warning}");
            }
            self.push_event(&rec, EventKind::Granted, now, Some(detail), rec.waited_ms);
        }
    }

    /// Asks holder `seq` to pause for request `for_seq`; `reclaim`: for `for_seq`'s guarantee.
    pub(super) fn pause(&mut self, seq: u64, for_seq: u64, now: Millis, reclaim: bool) {
        let deadline = now.saturating_add(self.config.ack_deadline_ms);
        // A holder told to pause stops renewing: its lease lasts at least until the pause deadline,
        // so that it ends by its ACK (or by the deadline's revoke), never by an expiry meanwhile.
        let extended = self
            .live_rec(seq)
            .expires_at
            .filter(|&at| at < deadline)
            .map(|_| deadline);
        self.update(seq, now, |rec| {
            rec.phase = Phase::Pausing;
            rec.pause_deadline = Some(deadline);
            if let Some(at) = extended {
                rec.expires_at = Some(at);
            }
        });
        if extended.is_some() {
            self.renew_in_store(seq);
        }
        let urgent = self.live_rec(for_seq);
        let reclaim_for = reclaim.then(|| urgent.service_id.clone());
        let reason = Reason::Preempted {
            request_id: urgent.request_id.clone(),
            service_id: urgent.service_id.clone(),
            priority: urgent.priority,
            reclaim: reclaim_for
                .as_ref()
                .map(|svc| self.services.get(svc).map_or(0, |svc| svc.guarantee)),
        };
        let rec = self.live_rec(seq).clone();
        if reclaim {
            // Remembered for the guard at the urgent request's grant.
            if let Some(live) = self.live.get_mut(&for_seq) {
                if !live.reclaimed_from.contains(&rec.service_id) {
                    live.reclaimed_from.push(rec.service_id.clone());
                }
            }
        }
        let detail = reason.to_string();
        self.control(
            &rec,
            ControlAction::Pause,
            Some(self.config.ack_deadline_ms),
            reason,
            None,
        );
        self.push_event_with(
            &rec,
            EventKind::Preempting,
            now,
            Some(detail),
            None,
            reclaim_for,
        );
    }

    pub(super) fn paused(&mut self, seq: u64, now: Millis) {
        let rec = self.live_rec(seq).clone();
        self.release_held(&rec);
        self.update(seq, now, |rec| {
            rec.phase = Phase::Paused;
            rec.paused_at = Some(now);
            rec.pause_deadline = None;
            rec.expires_at = None;
        });
        if self.config.settle_ms > 0 {
            // Only NVML sees the VRAM freed (not a simulated GPU of a node agent).
            let sampled = rec
                .gpu
                .as_ref()
                .and_then(|g| self.gpu_index.get(g))
                .filter(|&&g| self.gpus[g].source == VramSource::Nvml);
            if let Some(&g) = sampled {
                let gpu = &mut self.gpus[g];
                let (external_before_mb, freed_mb) = match &gpu.settle {
                    // Another holder paused while the first is settling: wait for both shares.
                    Some(s) => (s.external_before_mb, s.freed_mb + rec.held_mb.unwrap_or(0)),
                    None => (gpu.external_mb, rec.held_mb.unwrap_or(0)),
                };
                gpu.settle = Some(Settle {
                    until: now.saturating_add(self.config.settle_ms),
                    external_before_mb,
                    freed_mb,
                    request_id: rec.request_id.clone(),
                });
            }
        }
        let rec = self.live_rec(seq).clone();
        self.event(&rec, EventKind::Paused, now, None);
    }

    /// Ends a holding request's lease by force: `revoke` (and `restart` after an expiry).
    pub(super) fn revoke(&mut self, seq: u64, now: Millis, reason: Reason, expired: bool) {
        let rec = self.live_rec(seq).clone();
        if let (Some(gpu), Some(fence)) = (&rec.gpu, rec.fence) {
            self.actions.push_back(Action::Lease(LeaseOp::Release {
                request_id: rec.request_id.clone(),
                gpu: gpu.clone(),
                fence,
            }));
        }
        let detail = reason.to_string();
        if expired {
            self.event(&rec, EventKind::Expired, now, Some(detail.clone()));
        }
        self.control(&rec, ControlAction::Revoke, None, reason, None);
        if expired {
            self.control(
                &rec,
                ControlAction::Restart,
                None,
                Reason::RestartAfterExpiry,
                None,
            );
        }
        self.end(seq, End::Revoked, Some(detail), now);
    }

    /// Ends a restored queued or paused request that no GPU managed now can take (its pinned GPU was
    /// removed from the inventory, or every GPU left is smaller than it needs): it would wait forever.
    pub(super) fn end_if_unplaceable(&mut self, seq: u64, now: Millis) {
        let rec = self.live_rec(seq);
        let cap = self.services.get(&rec.service_id).and_then(|svc| svc.cap);
        let any_gpu = self.allowed(rec).next().is_some();
        // With node agents a host may join with a GPU it may use.
        if !any_gpu && self.fleet() {
            return;
        }
        if self
            .allowed(rec)
            .any(|g| cap.is_none_or(|cap| charge(rec, self.gpus[g].spec.total_mb) <= cap))
        {
            return;
        }
        let named = self
            .config
            .services
            .named
            .contains_key(rec.service_id.as_str());
        let why = match (&rec.gpu_pin, rec.vram_mb) {
            _ if any_gpu => format!(
                "it needs more than its service may hold at once (`{}` is {} MB)",
                policy_key(named, &rec.service_id, "max_vram_mb"),
                cap.unwrap_or(0)
            ),
            (Some(pin), _) if !self.gpu_index.contains_key(pin) => {
                format!("the GPU `{pin}` it is pinned to is no longer managed by this coordinator")
            }
            (_, Some(mb)) => format!("it needs {mb} MB, more than any GPU it may use has now"),
            _ => "no GPU it may use is managed by this coordinator now".to_owned(),
        };
        let rec = rec.clone();
        if rec.phase == Phase::Paused {
            let reason = Reason::Unplaceable { why };
            let detail = reason.to_string();
            self.control(&rec, ControlAction::Revoke, None, reason, None);
            self.end(seq, End::Revoked, Some(detail), now);
        } else {
            let code = if any_gpu {
                RejectCode::OverServiceLimit
            } else {
                RejectCode::Unplaceable
            };
            let mut reply = ReplyOut::new(&rec.request_id, Outcome::Rejected);
            reply.error = Some(why.clone());
            reply.code = Some(code);
            self.reply(&rec.service_id, rec.encoding, reply);
            // Kept with the record, for its `rejected` event and a repeated request's answer.
            if let Some(live) = self.live.get_mut(&seq) {
                live.rec.code = Some(code);
            }
            self.end(seq, End::Rejected, Some(why), now);
        }
    }

    /// Ends a live request: it leaves every index, its lease is released where it held one (except after
    /// a revoke, which released it already), and it is remembered as ended.
    pub(super) fn end(&mut self, seq: u64, end: End, detail: Option<String>, now: Millis) {
        let mut live = self.detach(seq);
        let holding = matches!(live.rec.phase, Phase::Active | Phase::Pausing);
        // It held VRAM: its service's first waiting request may fit under its cap now.
        if holding && self.limits_on {
            self.unpark(&live.rec.service_id);
        }
        if holding && end != End::Revoked {
            self.release_held(&live.rec);
        }
        live.rec.phase = Phase::Ended;
        live.rec.end = Some(end);
        live.rec.ended_at = Some(now);
        live.rec.detail = detail.clone();
        live.rec.pause_deadline = None;
        let kind = match end {
            End::Released => EventKind::Released,
            End::TimedOut => EventKind::TimedOut,
            End::Cancelled => EventKind::Cancelled,
            End::Revoked => EventKind::Revoked,
            End::Rejected => EventKind::Rejected,
        };
        if end == End::TimedOut {
            let mut reply = ReplyOut::new(&live.rec.request_id, Outcome::TimedOut);
            reply.waited_ms = Some(now.saturating_sub(live.rec.requested_at));
            reply.error = detail.clone();
            self.reply(&live.rec.service_id, live.rec.encoding, reply);
        }
        self.event(&live.rec, kind, now, detail);
        self.mark_dirty(&live.rec.request_id);
        self.ids.remove(&live.rec.request_id);
        if let Some(svc) = self.services.get_mut(&live.rec.service_id) {
            svc.live.remove(&seq);
            if svc.live.is_empty() {
                self.services.remove(&live.rec.service_id);
                self.hungry.remove(&live.rec.service_id);
            }
        }
        self.remember_ended(live.rec);
    }
}
