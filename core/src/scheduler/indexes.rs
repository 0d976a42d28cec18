//! The indexes kept beside the records (live requests by arrival, by service, the hungry services,
//! the queue counts), the ended requests remembered, and what is to persist.

use super::*;

impl Scheduler {
    pub(super) fn live_rec(&self, seq: u64) -> &RequestRecord {
        &self
            .live
            .get(&seq)
            .expect("a live request by its arrival number")
            .rec
    }

    pub(super) fn issue_fence(&mut self) -> Fence {
        self.last_fence = Fence(self.last_fence.0 + 1);
        self.fence_dirty = true;
        self.last_fence
    }

    pub(super) fn insert_live(&mut self, rec: RequestRecord) {
        let seq = rec.arrival;
        self.ids.insert(rec.request_id.clone(), seq);
        // A service refused now (a restart with `services.allow_unknown` off) keeps what it had.
        let default = ServicePolicy::default();
        let policy = self
            .config
            .services
            .get(&rec.service_id)
            .unwrap_or(&default);
        let min_hold_ms = policy.min_hold_ms.unwrap_or(self.config.min_hold_ms);
        match self.services.get_mut(&rec.service_id) {
            Some(svc) => {
                svc.live.insert(seq);
            }
            None => {
                let mut svc = Svc::new(policy);
                svc.live.insert(seq);
                self.services.insert(rec.service_id.clone(), svc);
            }
        }
        let live = Live {
            eff: rec.priority,
            rec,
            timers: Vec::new(),
            min_hold_ms,
            reclaimed_from: Vec::new(),
        };
        self.attach_live(seq, live, None);
    }

    /// Removes a live request from the queue, the timers and its GPU, returning it (still in `ids`).
    pub(super) fn detach(&mut self, seq: u64) -> Live {
        let live = self
            .live
            .remove(&seq)
            .expect("a live request by its arrival number");
        if self.queue.remove(&(live.eff, seq)) {
            self.count_queued(&live.rec, live.eff, seq, false);
            if self.limits_on {
                let key = (live.eff, seq);
                let mut head_left = false;
                if let Some(svc) = self.services.get_mut(&live.rec.service_id) {
                    head_left = svc.waiting.first() == Some(&key);
                    svc.waiting.remove(&key);
                    svc.parked.remove(&key);
                }
                // Another request is first now: it may fit under the cap.
                if head_left {
                    self.unpark(&live.rec.service_id);
                }
                self.refresh_hungry(&live.rec.service_id);
            }
        }
        for gpu in &mut self.gpus {
            gpu.queue.remove(&(live.eff, seq));
        }
        for &(at, kind) in &live.timers {
            self.timers.remove(&(at, seq, kind));
        }
        if let Some(g) = live.rec.gpu.as_ref().and_then(|g| self.gpu_index.get(g)) {
            let gpu = &mut self.gpus[*g];
            if gpu.holders.remove(&seq) {
                gpu.held_mb -= live.rec.held_mb.unwrap_or(0);
                let charged = charge(&live.rec, gpu.spec.total_mb);
                if let Some(svc) = self.services.get_mut(&live.rec.service_id) {
                    svc.used_mb -= charged;
                    if live.rec.phase == Phase::Pausing {
                        svc.pausing_mb -= charged;
                    }
                }
                self.refresh_hungry(&live.rec.service_id);
            }
        }
        live
    }

    /// Puts a request that [`Scheduler::detach`] took out (or a new one) into `live` and the indexes
    /// its phase calls for. With `now`, recomputes aging.
    fn attach_live(&mut self, seq: u64, mut live: Live, now: Option<Millis>) {
        let rec = &live.rec;
        let mut timers = Vec::new();
        match rec.phase {
            Phase::Queued => {
                live.eff = rec.priority;
                let waited = now
                    .unwrap_or(rec.requested_at)
                    .saturating_sub(rec.requested_at);
                // Aging is off when aging_ms is 0.
                if let Some(periods) = waited.checked_div(self.config.aging_ms) {
                    let levels = periods.min(u64::from(rec.priority));
                    live.eff = rec.priority - levels as u8;
                    if live.eff > 0 {
                        timers.push((
                            rec.requested_at + (levels + 1) * self.config.aging_ms,
                            TimerKind::Aging,
                        ));
                    }
                }
                timers.push((rec.timeout_at, TimerKind::Timeout));
                if self.queue.insert((live.eff, seq)) {
                    self.count_queued(rec, live.eff, seq, true);
                    self.wait_in_service(rec, live.eff, seq);
                }
            }
            Phase::Paused => {
                live.eff = rec.priority;
                if self.queue.insert((live.eff, seq)) {
                    self.count_queued(rec, live.eff, seq, true);
                    self.wait_in_service(rec, live.eff, seq);
                }
            }
            Phase::Active | Phase::Pausing => {
                if let Some(at) = rec.expires_at {
                    timers.push((at, TimerKind::Expiry));
                }
                if let Some(at) = rec.pause_deadline {
                    timers.push((at, TimerKind::PauseDeadline));
                }
                if live.min_hold_ms > 0 && rec.phase == Phase::Active {
                    let at = rec.granted_at.unwrap_or(0).saturating_add(live.min_hold_ms);
                    if now.is_none_or(|n| at > n) {
                        timers.push((at, TimerKind::MinHold));
                    }
                }
                self.count_held(seq, rec);
            }
            Phase::Ended => {}
        }
        if matches!(rec.phase, Phase::Queued | Phase::Paused) {
            let allowed: Vec<usize> = self.allowed(rec).collect();
            for g in allowed {
                self.gpus[g].queue.insert((live.eff, seq));
            }
        }
        for &(at, kind) in &timers {
            self.timers.insert((at, seq, kind));
        }
        live.timers = timers;
        let service = self.guarantees_on.then(|| live.rec.service_id.clone());
        self.live.insert(seq, live);
        if let Some(service) = service {
            self.refresh_hungry(&service);
        }
    }

    /// Counts a holder on its GPU and against its service (pausing too, while it pauses).
    fn count_held(&mut self, seq: u64, rec: &RequestRecord) {
        let Some(&g) = rec.gpu.as_ref().and_then(|g| self.gpu_index.get(g)) else {
            return;
        };
        let gpu = &mut self.gpus[g];
        if gpu.holders.insert(seq) {
            gpu.held_mb += rec.held_mb.unwrap_or(0);
            let charged = charge(rec, gpu.spec.total_mb);
            if let Some(svc) = self.services.get_mut(&rec.service_id) {
                svc.used_mb += charged;
                if rec.phase == Phase::Pausing {
                    svc.pausing_mb += charged;
                }
            }
        }
    }

    /// Puts a request that enters the queue under `(eff, seq)` in its service's own order, when the
    /// service has a cap.
    fn wait_in_service(&mut self, rec: &RequestRecord, eff: u8, seq: u64) {
        if !self.limits_on {
            return;
        }
        let mut new_head = false;
        if let Some(svc) = self
            .services
            .get_mut(&rec.service_id)
            .filter(|svc| svc.limits)
        {
            new_head = svc.waiting.first().is_some_and(|&head| (eff, seq) < head);
            svc.waiting.insert((eff, seq));
        }
        // A request ahead of the first: it may fit under the cap.
        if new_head {
            self.unpark(&rec.service_id);
        }
    }

    /// Keeps `hungry` right for `service` after what it holds or its waiting requests changed.
    fn refresh_hungry(&mut self, service: &ServiceId) {
        if !self.guarantees_on {
            return;
        }
        let hungry = self
            .services
            .get(service)
            .is_some_and(|svc| self.is_hungry(svc));
        if hungry {
            if !self.hungry.contains(service) {
                self.hungry.insert(service.clone());
            }
        } else {
            self.hungry.remove(service);
        }
    }

    /// Whether a service is under its guarantee with its first waiting request within it on some GPU it
    /// may use (and under its cap): the guarantees' pass has something to do for it. (Its requests
    /// are taken in its grant order, up to the first that is not within: nothing to do when that is
    /// the first.)
    pub(super) fn is_hungry(&self, svc: &Svc) -> bool {
        svc.guarantee > svc.used_mb
            && svc.waiting.first().is_some_and(|&(_, head)| {
                self.live.get(&head).is_some_and(|first| {
                    self.allowed(&first.rec).any(|g| {
                        let after = svc.used_mb + charge(&first.rec, self.gpus[g].spec.total_mb);
                        after <= svc.guarantee && svc.cap.is_none_or(|cap| after <= cap)
                    })
                })
            })
    }

    /// Whether service `service` borrows: what its active holders hold, less `taken` (holders a
    /// plan is about to pause), is beyond its guarantee. Without guarantees configured, every service
    /// that holds anything borrows (and so the rules are today's).
    pub(super) fn borrows(&self, service: &str, taken: u64) -> bool {
        self.services.get(service).is_some_and(|svc| {
            svc.used_mb
                .saturating_sub(svc.pausing_mb)
                .saturating_sub(taken)
                > svc.guarantee
        })
    }

    /// Whether `victim`'s service may not reclaim from `reclaimer`'s yet: `reclaimer` reclaimed from
    /// it less than its grace ago.
    pub(super) fn guarded(&self, victim: &ServiceId, reclaimer: &ServiceId, now: Millis) -> bool {
        !self.reclaim_guards.is_empty()
            && self
                .reclaim_guards
                .get(&(victim.clone(), reclaimer.clone()))
                .is_some_and(|&until| until > now)
    }

    /// Counts a request that enters (`add`) or leaves the queue under `(eff, seq)` in `paused` and
    /// `queue_counts`.
    fn count_queued(&mut self, rec: &RequestRecord, eff: u8, seq: u64, add: bool) {
        use std::collections::btree_map::Entry;
        let is_paused = rec.phase == Phase::Paused;
        let gpu = if is_paused { &rec.gpu } else { &rec.gpu_pin };
        let step = |count: &mut (u64, u64)| {
            let n = if is_paused {
                &mut count.1
            } else {
                &mut count.0
            };
            if add {
                *n += 1;
            } else {
                *n -= 1;
            }
        };
        match self.queue_counts.entry((rec.priority, gpu.clone())) {
            Entry::Occupied(mut entry) => {
                step(entry.get_mut());
                if *entry.get() == (0, 0) {
                    entry.remove();
                }
            }
            Entry::Vacant(entry) => step(entry.insert((0, 0))),
        }
        if is_paused {
            if add {
                self.paused.insert((eff, seq));
            } else {
                self.paused.remove(&(eff, seq));
            }
        }
    }

    /// Changes a live request's record, keeping every index right, and marks it for persistence.
    pub(super) fn update(
        &mut self,
        seq: u64,
        now: Millis,
        change: impl FnOnce(&mut RequestRecord),
    ) {
        let used_before = self
            .limits_on
            .then(|| self.used_by(&self.live_rec(seq).service_id));
        let mut live = self.detach(seq);
        change(&mut live.rec);
        let id = live.rec.request_id.clone();
        let service = live.rec.service_id.clone();
        self.attach_live(seq, live, Some(now));
        // It holds less (a holder paused): its first waiting request may fit under its cap now.
        if used_before.is_some_and(|before| self.used_by(&service) < before) {
            self.unpark(&service);
        }
        self.mark_dirty(&id);
    }

    /// What a service's holders hold now (see `Svc::used_mb`).
    fn used_by(&self, service: &str) -> u64 {
        self.services.get(service).map_or(0, |svc| svc.used_mb)
    }

    pub(super) fn remember_ended(&mut self, rec: RequestRecord) {
        if self.config.retain_ended == 0 {
            self.persist_forgotten(rec);
            return;
        }
        let id = rec.request_id.clone();
        if self.ended.insert(id.clone(), rec).is_none() {
            self.ended_order.push_back(id);
        }
        while self.ended_order.len() > self.config.retain_ended {
            if let Some(old) = self.ended_order.pop_front() {
                if let Some(rec) = self.ended.remove(&old) {
                    self.persist_forgotten(rec);
                }
            }
        }
    }

    /// A record forgotten before the end of the input that changed it is persisted now: `flush` can no
    /// longer find it, and its end must reach the store.
    fn persist_forgotten(&mut self, rec: RequestRecord) {
        if self.dirty_set.remove(&rec.request_id) {
            self.actions.push_back(Action::Persist(rec));
        }
    }

    pub(super) fn mark_dirty(&mut self, request_id: &str) {
        if self.dirty_set.insert(request_id.into()) {
            self.dirty.push(request_id.into());
        }
    }

    /// Queues the persistence of every record changed by the current input.
    pub(super) fn flush(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            if let Some(rec) = self.record(&id) {
                let rec = rec.clone();
                self.actions.push_back(Action::Persist(rec));
            }
        }
        self.dirty_set.clear();
        if self.fence_dirty {
            self.fence_dirty = false;
            self.actions
                .push_back(Action::PersistFence(self.last_fence));
        }
    }

    /// Releases a lease the store holds for no holder of the scheduler's.
    pub(super) fn release_stale(&mut self, stale: Lease) {
        self.actions
            .push_back(Action::Lease(Self::stale_release(stale)));
    }

    /// The release of a stored lease this scheduler does not hold.
    pub(super) fn stale_release(stale: Lease) -> LeaseOp {
        LeaseOp::Release {
            request_id: stale.request_id,
            gpu: stale.gpu,
            fence: stale.fence,
        }
    }

    /// Releases the lease of a holding (active or pausing) request.
    pub(super) fn release_held(&mut self, rec: &RequestRecord) {
        self.actions.push_back(Action::Lease(LeaseOp::Release {
            request_id: rec.request_id.clone(),
            gpu: rec.gpu.clone().expect("a holding record has a GPU"),
            fence: rec.fence.expect("a holding record has a fence"),
        }));
    }

    pub(super) fn lease_of(&self, rec: &RequestRecord) -> Option<Lease> {
        let gpu = rec.gpu.clone()?;
        let capacity_mb = self
            .gpu_index
            .get(&gpu)
            .map(|&g| self.gpus[g].spec.total_mb)?;
        Some(Lease {
            request_id: rec.request_id.clone(),
            service_id: rec.service_id.clone(),
            gpu,
            fence: rec.fence?,
            // A whole-GPU lease claims the whole capacity in the lease store, so that the store too
            // refuses anyone beside it.
            vram_mb: if rec.vram_mb.is_none() {
                capacity_mb
            } else {
                rec.held_mb.unwrap_or(0)
            },
            capacity_mb,
            expires_at: rec.expires_at?,
        })
    }
}
