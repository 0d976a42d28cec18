//! The invariants checked after every step in tests: capacities, indexes and records agree.

use super::*;

impl Scheduler {
    /// Checks the invariants that must hold after every input; returns the first broken one.
    /// For tests and debugging: O(n).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_capacities()?;
        self.check_live()?;
        self.check_gpu_queues()?;
        self.check_counts()?;
        self.check_services()
    }

    /// Each GPU's count of VRAM held is its holders' sum, and within its capacity.
    fn check_capacities(&self) -> Result<(), String> {
        for g in &self.gpus {
            let held: u64 = g
                .holders
                .iter()
                .map(|h| self.live_rec(*h).held_mb.unwrap_or(0))
                .sum();
            if held != g.held_mb {
                return Err(format!(
                    "GPU {} counts {} MB held, holders sum to {held}",
                    g.spec.id, g.held_mb
                ));
            }
            if held > g.spec.total_mb {
                return Err(format!(
                    "GPU {} holds {held} MB over its {} MB",
                    g.spec.id, g.spec.total_mb
                ));
            }
        }
        Ok(())
    }

    /// Each live request is where its phase says (queued, or holding), under a fence already issued.
    fn check_live(&self) -> Result<(), String> {
        for (seq, live) in &self.live {
            let queued = self.queue.contains(&(live.eff, *seq));
            let holding = self.gpus.iter().any(|g| g.holders.contains(seq));
            let (want_queued, want_holding) = match live.rec.phase {
                Phase::Queued | Phase::Paused => (true, false),
                Phase::Active | Phase::Pausing => (false, true),
                Phase::Ended => {
                    return Err(format!("ended request {} is live", live.rec.request_id))
                }
            };
            if queued != want_queued || holding != want_holding {
                return Err(format!(
                    "request {} is {} but queued={queued} holding={holding}",
                    live.rec.request_id,
                    live.rec.phase.as_str()
                ));
            }
            if let Some(f) = live.rec.fence {
                if f > self.last_fence {
                    return Err(format!(
                        "request {} has fence {} above the last issued",
                        live.rec.request_id, f.0
                    ));
                }
            }
        }
        Ok(())
    }

    /// Each GPU's queue holds queue entries only, and each queued request is in the queue of every GPU it may use unless its service parks it.
    fn check_gpu_queues(&self) -> Result<(), String> {
        for g in &self.gpus {
            if let Some(key) = g.queue.iter().find(|k| !self.queue.contains(k)) {
                return Err(format!(
                    "GPU {} queues {key:?}, which is not in the queue",
                    g.spec.id
                ));
            }
        }
        for &(eff, seq) in &self.queue {
            let rec = self.live_rec(seq);
            let parked = self
                .services
                .get(&rec.service_id)
                .is_some_and(|svc| svc.parked.contains(&(eff, seq)));
            for g in self.allowed(rec) {
                if parked == self.gpus[g].queue.contains(&(eff, seq)) {
                    return Err(format!(
                        "{} may use GPU {} but is {} its queue (parked: {parked})",
                        rec.request_id,
                        self.gpus[g].spec.id,
                        if parked { "in" } else { "not in" }
                    ));
                }
            }
        }
        Ok(())
    }

    /// The queue counts and the paused set, kept as the queue changes, are the queue's; every live request is queued or held.
    fn check_counts(&self) -> Result<(), String> {
        let mut counts: BTreeMap<(u8, Option<GpuId>), (u64, u64)> = BTreeMap::new();
        let mut paused = BTreeSet::new();
        for &(eff, seq) in &self.queue {
            let rec = self.live_rec(seq);
            if rec.phase == Phase::Paused {
                paused.insert((eff, seq));
                counts.entry((rec.priority, rec.gpu.clone())).or_default().1 += 1;
            } else {
                counts
                    .entry((rec.priority, rec.gpu_pin.clone()))
                    .or_default()
                    .0 += 1;
            }
        }
        if counts != self.queue_counts || paused != self.paused {
            return Err(format!(
                "the queue counts {:?} and paused {:?}, kept, are not the queue's {counts:?} and {paused:?}",
                self.queue_counts, self.paused
            ));
        }
        if self.queue.len() + self.gpus.iter().map(|g| g.holders.len()).sum::<usize>()
            != self.live.len()
        {
            return Err("a live request is missing from the queue and the GPUs".into());
        }
        Ok(())
    }

    /// What each service holds, its live requests and its waiting order, as kept, are what the GPUs
    /// and the queue hold.
    fn check_services(&self) -> Result<(), String> {
        let mut used: HashMap<&str, u64> = HashMap::new();
        let mut pausing: HashMap<&str, u64> = HashMap::new();
        for g in &self.gpus {
            for &h in &g.holders {
                let rec = self.live_rec(h);
                let charged = charge(rec, g.spec.total_mb);
                *used.entry(&rec.service_id).or_default() += charged;
                if rec.phase == Phase::Pausing {
                    *pausing.entry(&rec.service_id).or_default() += charged;
                }
            }
        }
        let mut live: HashMap<&str, BTreeSet<u64>> = HashMap::new();
        let mut waiting: HashMap<&str, BTreeSet<(u8, u64)>> = HashMap::new();
        for (&seq, l) in &self.live {
            live.entry(&l.rec.service_id).or_default().insert(seq);
            if self.queue.contains(&(l.eff, seq)) {
                waiting
                    .entry(&l.rec.service_id)
                    .or_default()
                    .insert((l.eff, seq));
            }
        }
        if live.len() != self.services.len() {
            return Err(format!(
                "{} services have live requests, {} are kept",
                live.len(),
                self.services.len()
            ));
        }
        for (id, svc) in &self.services {
            let want_used = used.get(id.as_str()).copied().unwrap_or(0);
            if svc.used_mb != want_used {
                return Err(format!(
                    "service {id} counts {} MB held, its holders {want_used} MB",
                    svc.used_mb
                ));
            }
            let want_pausing = pausing.get(id.as_str()).copied().unwrap_or(0);
            if svc.pausing_mb != want_pausing {
                return Err(format!(
                    "service {id} counts {} MB pausing, its pausing holders {want_pausing} MB",
                    svc.pausing_mb
                ));
            }
            let hungry = self.is_hungry(svc);
            if self.guarantees_on && hungry != self.hungry.contains(id) {
                return Err(format!(
                    "service {id} is {}kept as under its guarantee with requests waiting",
                    if hungry { "not " } else { "" }
                ));
            }
            if live.get(id.as_str()) != Some(&svc.live) {
                return Err(format!("service {id}'s live requests are not those kept"));
            }
            let want_waiting = waiting.remove(id.as_str()).unwrap_or_default();
            if svc.limits && self.limits_on && svc.waiting != want_waiting {
                return Err(format!(
                    "service {id} keeps {:?} waiting, the queue holds {want_waiting:?}",
                    svc.waiting
                ));
            }
            self.check_parked(id, svc)?;
        }
        if let Some(gone) = self
            .hungry
            .iter()
            .find(|id| !self.services.contains_key(*id))
        {
            return Err(format!(
                "service {gone} is kept as hungry but has no live request"
            ));
        }
        Ok(())
    }

    /// A service's requests are parked only while its first waiting request does not fit under its
    /// cap, and only waiting ones.
    fn check_parked(&self, id: &str, svc: &Svc) -> Result<(), String> {
        if !svc.parked.is_empty() {
            let blocked = svc.cap.is_some_and(|cap| {
                svc.waiting.first().is_some_and(|&(_, head)| {
                    let first = self.live_rec(head);
                    self.allowed(first)
                        .all(|g| svc.used_mb + charge(first, self.gpus[g].spec.total_mb) > cap)
                })
            });
            if !blocked || !svc.parked.is_subset(&svc.waiting) {
                return Err(format!(
                    "service {id} has {:?} parked but its first waiting request fits under \
                     its cap, or they are not waiting",
                    svc.parked
                ));
            }
        }
        Ok(())
    }
}
