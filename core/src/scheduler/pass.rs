//! The scheduling pass: guarantees first, then the queue in order, each request granted where it
//! fits best or, if it is urgent enough, by pausing the fewest and least urgent holders.

use super::plan::{pause_key, Chosen, Plan, Victim};
use super::*;

impl Scheduler {
    /// Grants, preempts and reserves in grant order, until every GPU is reserved or the queue is done.
    pub(super) fn schedule(&mut self, now: Millis) {
        let mut open: Vec<bool> = self
            .gpus
            .iter()
            .map(|g| g.up && g.settle.is_none())
            .collect();
        let mut n_open = open.iter().filter(|&&o| o).count();
        let mut cursor: Option<(u8, u64)> = None;
        // The services whose waiting requests wait for their own leases to end (their cap), this pass.
        let mut capped: Vec<ServiceId> = Vec::new();
        // First the requests within their service's guarantee, which may reclaim.
        let mut handled: Vec<u64> = Vec::new();
        if self.guarantees_on && !self.hungry.is_empty() {
            self.schedule_guarantees(now, &mut open, &mut n_open, &mut handled);
        }
        while n_open > 0 {
            let lower = match cursor {
                Some(c) => Bound::Excluded(c),
                None => Bound::Unbounded,
            };
            // The next request in grant order that an open GPU may take.
            let next = (0..self.gpus.len())
                .filter(|&g| open[g])
                .filter_map(|g| self.gpus[g].queue.range((lower, Bound::Unbounded)).next())
                .min()
                .copied();
            let Some(key) = next else {
                break;
            };
            cursor = Some(key);
            let seq = key.1;
            if !handled.is_empty() && handled.contains(&seq) {
                continue;
            }
            let mut candidates = self.candidates(seq, &open);
            if self.limits_on && !candidates.is_empty() {
                let (under, blocked) = self.under_cap(seq, candidates, &mut capped);
                if blocked {
                    self.park(seq);
                }
                candidates = under;
            }
            if candidates.is_empty() {
                continue;
            }
            if let Some(gpu) = self.best_fit(seq, &candidates) {
                self.grant(seq, gpu, now);
                continue;
            }
            let reserve = match self.plan_preemption(seq, &candidates, now, false) {
                Some((gpu, victims, _)) => {
                    for (victim, reclaim) in victims {
                        self.pause(victim, seq, now, reclaim);
                    }
                    gpu
                }
                None => *candidates
                    .iter()
                    .max_by_key(|&&g| (self.gpus[g].free_mb(), std::cmp::Reverse(g)))
                    .expect("candidates is not empty"),
            };
            open[reserve] = false;
            n_open -= 1;
        }
    }

    /// The first pass: for each service under its guarantee with requests waiting (in the grant order
    /// of their first waiting request), its waiting requests in its own grant order, as long as each
    /// fits within the guarantee with what the service holds and the requests before it in this pass:
    /// each is granted where it fits within it, else where it fits at all (under its cap), or pauses
    /// holders as the rules allow a request within its guarantee (reclaim: holders of services
    /// beyond their own guarantee, whatever their priority; and by priority, any less urgent holder)
    /// and reserves that GPU. The service's first request beyond its guarantee, or that can do none
    /// of these (or only by waiting for a holder past its ACK deadline), ends its turn: the rest
    /// wait for the ordinary pass, as any request. The requests it took are added to `handled`, for
    /// the ordinary pass to skip.
    pub(super) fn schedule_guarantees(
        &mut self,
        now: Millis,
        open: &mut [bool],
        n_open: &mut usize,
        handled: &mut Vec<u64>,
    ) {
        let mut order: Vec<((u8, u64), ServiceId)> = self
            .hungry
            .iter()
            .filter_map(|id| {
                let first = *self.services.get(id)?.waiting.first()?;
                Some((first, id.clone()))
            })
            .collect();
        order.sort_unstable();
        for (_, service) in order {
            self.take_within_guarantee(&service, now, open, n_open, handled);
        }
    }

    /// Takes the waiting requests of `service` (under its guarantee, with requests waiting) in
    /// order, as long as each fits within its guarantee: granted where it fits, else on free VRAM
    /// beyond the guarantee under its cap, else by pausing borrowers (the GPU reserved for it).
    fn take_within_guarantee(
        &mut self,
        service: &ServiceId,
        now: Millis,
        open: &mut [bool],
        n_open: &mut usize,
        handled: &mut Vec<u64>,
    ) {
        // What the requests taken before in this pass will hold once their pauses are ACKed.
        let mut pending = 0u64;
        let mut cursor: Option<(u8, u64)> = None;
        while *n_open > 0 {
            let Some(svc) = self.services.get(service) else {
                break;
            };
            let lower = match cursor {
                Some(c) => Bound::Excluded(c),
                None => Bound::Unbounded,
            };
            let Some(&key) = svc.waiting.range((lower, Bound::Unbounded)).next() else {
                break;
            };
            cursor = Some(key);
            let seq = key.1;
            let (held, guarantee, cap) = (svc.used_mb + pending, svc.guarantee, svc.cap);
            let rec = self.live_rec(seq);
            let within = |g: &Gpu| {
                let after = held + charge(rec, g.spec.total_mb);
                after <= guarantee && cap.is_none_or(|cap| after <= cap)
            };
            if !self.allowed(rec).any(|g| within(&self.gpus[g])) {
                break;
            }
            let candidates: Vec<usize> = self
                .candidates(seq, open)
                .into_iter()
                .filter(|&g| within(&self.gpus[g]))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            if let Some(gpu) = self.best_fit(seq, &candidates) {
                handled.push(seq);
                self.grant(seq, gpu, now);
                continue;
            }
            // Where it does not fit within its guarantee, free VRAM beyond it (under its cap) is
            // taken rather than anyone paused for it (a whole-GPU request counts the GPU's
            // capacity, so the guarantee may be kept on one GPU and not on a bigger one).
            let anywhere: Vec<usize> = self
                .candidates(seq, open)
                .into_iter()
                .filter(|&g| {
                    let after = held + charge(self.live_rec(seq), self.gpus[g].spec.total_mb);
                    cap.is_none_or(|cap| after <= cap)
                })
                .collect();
            if let Some(gpu) = self.best_fit(seq, &anywhere) {
                handled.push(seq);
                self.grant(seq, gpu, now);
                continue;
            }
            // Nothing to take back now (holders within their grace, not preemptible, or within
            // their own guarantees), or only by waiting out the lease of a holder that missed
            // its ACK deadline: it waits in the ordinary pass, where it may still fit or preempt
            // elsewhere as any request, or reserve a GPU in grant order.
            let Some((gpu, victims, false)) = self.plan_preemption(seq, &candidates, now, true)
            else {
                break;
            };
            handled.push(seq);
            for (victim, reclaim) in victims {
                self.pause(victim, seq, now, reclaim);
            }
            open[gpu] = false;
            *n_open -= 1;
            pending += charge(self.live_rec(seq), self.gpus[gpu].spec.total_mb);
        }
    }

    /// Those of `candidates` where the request fits under its service's cap with what the service holds
    /// now (none: it waits, reserving nothing, for its service's own leases to end). The service's
    /// first waiting request in grant order keeps the cap for itself: while it does not fit under it,
    /// the service's later requests wait too, and the service is added to `capped` for the rest of
    /// the pass (what a service holds only grows during a pass); while it does, a later request fits
    /// only with the room the first one needs left under the cap. The flag says the service is so held
    /// back: its request may be parked.
    pub(super) fn under_cap(
        &self,
        seq: u64,
        candidates: Vec<usize>,
        capped: &mut Vec<ServiceId>,
    ) -> (Vec<usize>, bool) {
        let rec = self.live_rec(seq);
        let Some(svc) = self.services.get(&rec.service_id) else {
            return (candidates, false);
        };
        let Some(cap) = svc.cap else {
            return (candidates, false);
        };
        if capped.contains(&rec.service_id) {
            return (Vec::new(), true);
        }
        let head = svc.waiting.first().map(|&(_, head)| head);
        // The room under the cap that the first waiting request keeps for itself.
        let mut kept = 0;
        if let Some(head) = head.filter(|&head| head != seq) {
            let first = self.live_rec(head);
            let least = self
                .allowed(first)
                .map(|g| charge(first, self.gpus[g].spec.total_mb))
                .min()
                .unwrap_or(u64::MAX);
            if svc.used_mb.saturating_add(least) > cap {
                capped.push(rec.service_id.clone());
                return (Vec::new(), true);
            }
            kept = least;
        }
        let under: Vec<usize> = candidates
            .into_iter()
            .filter(|&g| svc.used_mb + kept + charge(rec, self.gpus[g].spec.total_mb) <= cap)
            .collect();
        if under.is_empty() && head == Some(seq) {
            let fits = self
                .allowed(rec)
                .any(|g| svc.used_mb + charge(rec, self.gpus[g].spec.total_mb) <= cap);
            if !fits {
                capped.push(rec.service_id.clone());
                return (under, true);
            }
        }
        (under, false)
    }

    /// Takes waiting request `seq`, whose service waits for its cap, out of the GPUs' queues: the pass
    /// would pass over it until its service's first waiting request fits under the cap, which only a
    /// holder of the service ending or pausing, or a change of that first request, can bring about;
    /// then [`Scheduler::unpark`] puts it back. So a long queue of a service at its cap costs one visit
    /// per request, not one per pass.
    pub(super) fn park(&mut self, seq: u64) {
        let live = self
            .live
            .get(&seq)
            .expect("a live request by its arrival number");
        let key = (live.eff, seq);
        let allowed: Vec<usize> = self.allowed(&live.rec).collect();
        for g in allowed {
            self.gpus[g].queue.remove(&key);
        }
        let service = live.rec.service_id.clone();
        if let Some(svc) = self.services.get_mut(&service) {
            svc.parked.insert(key);
        }
    }

    /// Puts a service's parked requests back in the GPUs' queues (see [`Scheduler::park`]).
    pub(super) fn unpark(&mut self, service: &str) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        if svc.parked.is_empty() {
            return;
        }
        for key in std::mem::take(&mut svc.parked) {
            let Some(live) = self.live.get(&key.1) else {
                continue;
            };
            let allowed: Vec<usize> = self.allowed(&live.rec).collect();
            for g in allowed {
                self.gpus[g].queue.insert(key);
            }
        }
    }

    /// The open GPUs that a request may use and that are big enough for it.
    fn candidates(&self, seq: u64, open: &[bool]) -> Vec<usize> {
        self.allowed(self.live_rec(seq))
            .filter(|&g| open[g])
            .collect()
    }

    /// The GPUs that a request may use (its pin) and that are big enough for it.
    pub(super) fn allowed<'a>(
        &'a self,
        rec: &'a RequestRecord,
    ) -> impl Iterator<Item = usize> + 'a {
        let host = rec.gpu_pin.as_deref().and_then(hosts::host_pin);
        let pinned = rec
            .gpu_pin
            .as_ref()
            .filter(|_| host.is_none())
            .map(|p| self.gpu_index.get(p).copied());
        (0..self.gpus.len())
            .filter(move |&g| pinned.is_none_or(|p| p == Some(g)))
            .filter(move |&g| host.is_none_or(|h| self.gpus[g].host.as_deref() == Some(h)))
            .filter(move |&g| rec.vram_mb.is_none_or(|v| v <= self.gpus[g].spec.total_mb))
    }

    /// Whether `rec` fits on a GPU with `free_mb` free and `holders` holders left, `whole` of which
    /// hold the whole GPU.
    fn fits(rec: &RequestRecord, free_mb: u64, holders: usize, whole: usize) -> bool {
        match rec.vram_mb {
            // Beside a whole-GPU holder nothing fits, however much VRAM NVML shows free (what the
            // holder uses can change after its grant, and outside usage can go).
            Some(v) => whole == 0 && v <= free_mb,
            // The whole GPU: no other holder, and something left beside outside usage.
            None => holders == 0 && free_mb > 0,
        }
    }

    /// How many holders of GPU `g` hold it whole (at most one).
    fn whole_holders(&self, g: usize) -> usize {
        self.gpus[g]
            .holders
            .iter()
            .filter(|&&h| self.live_rec(h).vram_mb.is_none())
            .count()
    }

    fn best_fit(&self, seq: u64, candidates: &[usize]) -> Option<usize> {
        let rec = self.live_rec(seq);
        candidates
            .iter()
            .copied()
            .filter(|&g| {
                let gpu = &self.gpus[g];
                Self::fits(rec, gpu.free_mb(), gpu.holders.len(), self.whole_holders(g))
            })
            .min_by_key(|&g| {
                let free = self.gpus[g].free_mb();
                (free - rec.vram_mb.unwrap_or(free), g)
            })
    }

    /// The GPU where the request fits with the fewest holders paused, and those holders (possibly none,
    /// when pauses already under way will make room).
    ///
    /// Each GPU's plan is made in the rules' order, without the `pause_ms` hints, then again with
    /// them, and the second is taken only when it pauses holders of the same priorities and grant
    /// instants, as many and as much VRAM, and its slowest victim pauses no later: the hints choose
    /// among holders the rules treat alike, and change nothing the rules compare.
    fn plan_preemption(
        &self,
        seq: u64,
        candidates: &[usize],
        now: Millis,
        within: bool,
    ) -> Option<Chosen> {
        let live = self
            .live
            .get(&seq)
            .expect("a live request by its arrival number");
        let (rec, urgency) = (&live.rec, live.eff);
        let mut best: Option<(usize, Plan)> = None;
        for &g in candidates {
            let Some(plain) = self.plan_on(g, rec, urgency, now, within, false) else {
                continue;
            };
            let hinted = self.gpus[g]
                .holders
                .iter()
                .any(|&h| self.live_rec(h).pause_ms.is_some())
                .then(|| self.plan_on(g, rec, urgency, now, within, true))
                .flatten();
            let plan = match hinted {
                Some(hinted) if hinted.alike(&plain) && hinted.slowest() <= plain.slowest() => {
                    hinted
                }
                _ => plain,
            };
            // The first GPU by id among plans that rank alike.
            if best
                .as_ref()
                .is_none_or(|(_, was)| plan.rank() < was.rank())
            {
                best = Some((g, plan));
            }
        }
        best.map(|(g, plan)| {
            let victims = plan
                .victims
                .iter()
                .map(|v| (v.arrival, v.reclaim))
                .collect();
            (g, victims, plan.stuck)
        })
    }

    /// Whether the active holder `live` may be paused for `rec` (at `urgency`; `within` its service's
    /// guarantee), and whether that pause is a reclaim (`Some(true)`: priority alone would not allow
    /// it). Never a holder that is not preemptible or is within its grace (`min_hold_ms`). By
    /// priority, a less urgent holder; but a request that borrows (not within its guarantee) only one
    /// of a service that borrows too: VRAM within a guarantee is not taken by priority, or it would be
    /// reclaimed at once, back and forth. By reclaim, a request within its guarantee takes a holder of
    /// another service that borrows, whatever its priority, unless that service reclaimed from its
    /// own less than its grace ago. Without guarantees, every holder's service borrows: today's rule.
    pub(super) fn may_pause(
        &self,
        live: &Live,
        rec: &RequestRecord,
        urgency: u8,
        within: bool,
        now: Millis,
    ) -> Option<bool> {
        let holder = &live.rec;
        let grace_over = holder
            .granted_at
            .unwrap_or(0)
            .saturating_add(live.min_hold_ms)
            <= now;
        if !holder.preemptible || !grace_over {
            return None;
        }
        let borrows = !self.guarantees_on || self.borrows(&holder.service_id, 0);
        if holder.priority > urgency && (within || borrows) {
            return Some(false);
        }
        let reclaim = within
            && borrows
            && holder.service_id != rec.service_id
            && !self.guarded(&holder.service_id, &rec.service_id, now);
        reclaim.then_some(true)
    }

    /// The holders of GPU `g` to pause so that `rec` (at `urgency`) fits there, or `None` when pausing
    /// every holder it may pause would not make room. Least urgent first; the most recently granted
    /// first among equals; with `by_hint`, among holders equal on both, the one that says it pauses
    /// soonest (`pause_ms`, unknown last); the latest arrival last of all, which makes the order total.
    /// `within`: `rec` is within its service's guarantee; then holders of services that borrow come
    /// before all others (see [`Scheduler::may_pause`] for who may be paused at all).
    fn plan_on(
        &self,
        g: usize,
        rec: &RequestRecord,
        urgency: u8,
        now: Millis,
        within: bool,
        by_hint: bool,
    ) -> Option<Plan> {
        let gpu = &self.gpus[g];
        let mut free = gpu.free_mb();
        let mut remaining = gpu.holders.len();
        let mut whole = self.whole_holders(g);
        let mut eligible = Vec::new();
        // A holder pausing past its ACK deadline frees its VRAM only when its lease runs out: a plan
        // that waits for one comes after any that does not.
        let mut stuck = false;
        for &h in &gpu.holders {
            let live = self
                .live
                .get(&h)
                .expect("a live request by its arrival number");
            let holder = &live.rec;
            if holder.phase == Phase::Pausing {
                stuck |= holder.pause_deadline.is_some_and(|d| d <= now);
                free += holder.held_mb.unwrap_or(0);
                remaining -= 1;
                whole -= usize::from(holder.vram_mb.is_none());
            } else if let Some(reclaim) = self.may_pause(live, rec, urgency, within, now) {
                // Reclaiming, the holders of services that borrow go first.
                let lender = within && !self.borrows(&holder.service_id, 0);
                eligible.push((holder, reclaim, lender));
            }
        }
        eligible.sort_by_key(|&(h, _, lender)| {
            (
                lender,
                std::cmp::Reverse(h.priority),
                std::cmp::Reverse(h.granted_at.unwrap_or(0)),
                if by_hint { pause_key(h) } else { 0 },
                std::cmp::Reverse(h.arrival),
            )
        });
        let mut victims: Vec<Victim> = Vec::new();
        for (holder, reclaim, _) in eligible {
            if Self::fits(rec, free, remaining, whole) {
                break;
            }
            let victim = Victim::of(holder, reclaim, gpu.spec.total_mb);
            // Paused for borrowing (a reclaim, or a borrower's priority), a holder is taken only while
            // its service still borrows with the victims taken before it.
            if self.guarantees_on && (reclaim || !within) {
                let taken: u64 = victims
                    .iter()
                    .filter(|v| v.service == holder.service_id)
                    .map(|v| v.charged)
                    .sum();
                if !self.borrows(&holder.service_id, taken) {
                    continue;
                }
            }
            free += victim.held_mb;
            remaining -= 1;
            whole -= usize::from(victim.whole);
            victims.push(victim);
        }
        if !Self::fits(rec, free, remaining, whole) {
            return None;
        }
        Self::spare_unneeded(rec, &mut victims, free, remaining, whole);
        Some(Plan { victims, stuck })
    }

    /// Only as many victims as needed: a small, less urgent victim taken first may be unnecessary
    /// once a bigger one is in; the most urgent victims are spared first. `free`, `remaining` and
    /// `whole` are the GPU's room with every victim paused.
    fn spare_unneeded(
        rec: &RequestRecord,
        victims: &mut Vec<Victim>,
        mut free: u64,
        mut remaining: usize,
        mut whole: usize,
    ) {
        let mut i = victims.len();
        while i > 0 {
            i -= 1;
            let Victim {
                held_mb,
                whole: is_whole,
                ..
            } = victims[i];
            let whole_if_spared = whole + usize::from(is_whole);
            if Self::fits(rec, free - held_mb, remaining + 1, whole_if_spared) {
                free -= held_mb;
                remaining += 1;
                whole = whole_if_spared;
                victims.remove(i);
            }
        }
    }
}
