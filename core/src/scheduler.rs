//! The scheduler: the rules of the wire contract as a deterministic state machine.
//!
//! It owns every live request (queued, holding, pausing, paused), the GPUs' capacities, and the timers
//! (request timeouts, lease expiries, pause deadlines, aging, minimum holds). Inputs arrive with `now`;
//! every handler ends by running [`Scheduler::schedule`] and by queuing the records to persist.
//!
//! # Grant order and blocked heads
//!
//! The queue is ordered by effective priority (the priority, made more urgent by aging when it is on), then
//! by arrival. A paused request keeps its arrival number, so it goes back ahead of later arrivals of its
//! priority. One scheduling pass walks the queue in that order:
//!
//! - a request that fits a GPU now is granted, on the GPU where it fits best (least VRAM left over);
//! - a request that does not fit pauses strictly less urgent, preemptible holders (least urgent first, the
//!   most recently granted first among equals, only as many as it needs) on the GPU where that takes the
//!   fewest, and reserves that GPU;
//! - among holders (and among GPUs' plans) those rules treat alike, the one that frees its VRAM soonest
//!   is paused: the smaller `pause_ms` hint, a request without one after any with one. The hint
//!   changes no choice those rules already make, nor how many holders or how much VRAM a plan pauses
//!   (a plan made with the hints replaces the one made without only when the two pause holders of
//!   the same priorities and grant instants, as many and as much VRAM); before it, such ties went to
//!   the latest arrival (and to the first GPU by id), which still decide when the hints are equal too;
//! - a request that can neither fit nor preempt reserves the GPU among its candidates with the most free
//!   VRAM, so that it is the next to get it.
//!
//! A reserved GPU takes no grant for a request later in the order: a smaller request may pass a blocked
//! head only on a GPU the head cannot use or has not reserved. That keeps big and urgent requests from
//! starving behind a stream of small ones, and it keeps the pass short: it stops as soon as every GPU is
//! reserved, so an input costs O(log n) in the number of queued requests.
//!
//! With aging on, a waiting request counts one level more urgent per `queue.aging_ms` waited, in grant
//! order and when it preempts (an aged background request may pause a background holder: that is what
//! keeps it from starving); a holder is always preempted by its own priority. Without aging, equal
//! priorities never preempt each other.
//!
//! With NVML (`settle_ms` > 0), a GPU where a holder just paused takes no grant until a VRAM sample shows
//! the paused share freed, or until `settle_ms` passes: then the grant goes ahead, and its event says so.
//!
//! # What a service may ask for
//!
//! [`SchedConfig::services`] holds each service's policy (`[services.<id>]`). A request more urgent than
//! its service's `max_priority` is rejected naming the limit (or taken at it, with `clamp_priority`);
//! its defaults fill the VRAM and lease a request leaves out; `preemptible = false` makes its holders
//! never paused; its `min_hold_ms` replaces the global one for its holders; and, with
//! `allow_unknown` off, a service without a section is refused. A service's cap (`max_vram_mb`) bounds
//! what its holders hold together (a whole-GPU holder counts its GPU's capacity): in the pass, a
//! request that would take its service beyond it is skipped, reserving nothing, and while its
//! service's first waiting request does not fit under the cap, the service's later ones are skipped
//! too (`Scheduler::under_cap`).
//!
//! # Guarantees, borrowing and reclaim
//!
//! What a service's active holders hold beyond its `guaranteed_vram_mb` is borrowed (without
//! guarantees, all a service holds is: the rules above are then unchanged). A scheduling pass first
//! takes the services under their guarantee with requests waiting (`Scheduler::schedule_guarantees`):
//! each of their requests that stays within the guarantee is granted where it fits within it, or
//! pauses holders and reserves that GPU; besides less urgent holders it may pause, whatever their
//! priority, holders of other services that borrow, only while they still borrow (a reclaim, said on
//! the `preempting` event). A request that borrows pauses by priority only holders of services that
//! borrow too (`Scheduler::may_pause`). Once a request that reclaimed from a service is granted, that
//! service may not reclaim from its service for its `min_hold_ms` (`reclaim_guards`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;

use gpu_coordinator_wire::{
    AckAction, AckMsg, CancelMsg, ControlAction, Encoding, EventKind, HolderState, Inbound,
    Outcome, Rejection, ReleaseMsg, RenewMsg, RequestMsg, VramSource,
};

use crate::ids::*;
use crate::outputs::*;
use crate::types::*;

/// Why a timer was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum TimerKind {
    /// A queued request's `timeout_ms` passes.
    Timeout,
    /// A queued request moves one level more urgent.
    Aging,
    /// A lease's TTL ends.
    Expiry,
    /// A pause ACK is due.
    PauseDeadline,
    /// A holder becomes preemptible (`preemption.min_hold_ms`).
    MinHold,
}

struct Gpu {
    spec: GpuSpec,
    /// VRAM used outside the coordinator's leases (NVML).
    external_mb: u64,
    /// Arrival numbers of the requests holding this GPU (active or pausing).
    holders: BTreeSet<u64>,
    /// Sum of the holders' `held_mb`.
    held_mb: u64,
    /// The queued and paused requests that may use this GPU (pin, size), in grant order: the pass
    /// looks only at requests some open GPU can take, so a GPU nobody in the queue can use does not
    /// make it walk the whole queue.
    queue: BTreeSet<(u8, u64)>,
    /// After a pause ACK (NVML on): no grant here until a sample shows the VRAM freed, or until `until`.
    settle: Option<Settle>,
    /// Said on the next grant here: it was made without NVML seeing the paused holder's VRAM freed.
    settle_warning: Option<String>,
}

/// A GPU waiting for NVML to see a paused holder's VRAM freed.
struct Settle {
    until: Millis,
    /// The external usage NVML showed before the ACK: what it shows again once the memory is freed.
    external_before_mb: u64,
    /// The paused holder's share.
    freed_mb: u64,
    request_id: RequestId,
}

impl Gpu {
    fn free_mb(&self) -> u64 {
        self.spec
            .total_mb
            .saturating_sub(self.external_mb)
            .saturating_sub(self.held_mb)
    }
}

struct Live {
    rec: RequestRecord,
    /// Effective priority in the queue (aging).
    eff: u8,
    /// The timers set for this request, to remove them exactly.
    timers: Vec<(Millis, TimerKind)>,
    /// How long it holds before it may be paused: its service's `min_hold_ms`, else
    /// `preemption.min_hold_ms`.
    min_hold_ms: u64,
    /// The services whose holders were paused by a reclaim for it: at its grant, they may not reclaim
    /// from its service for its `min_hold_ms` (see `Scheduler::reclaim_guards`).
    reclaimed_from: Vec<ServiceId>,
}

/// One service: its live requests, what its holders count against its limits, and the limits.
struct Svc {
    /// Its live requests, by arrival number.
    live: BTreeSet<u64>,
    /// What its holders (active and pausing) hold, as its cap and guarantee count it: each holder's
    /// `vram_mb`, or its GPU's capacity for a whole-GPU holder ([`charge`]).
    used_mb: u64,
    /// The part of `used_mb` held by pausing holders: it leaves at their ACK, so it is not borrowed
    /// any more.
    pausing_mb: u64,
    /// `max_vram_mb`.
    cap: Option<u64>,
    /// `guaranteed_vram_mb` (0: none).
    guarantee: u64,
    /// Its waiting (queued and paused) requests in grant order, kept only when it has a cap or a
    /// guarantee (`limits`): its first one holds its cap (see [`Scheduler::under_cap`]), and its
    /// requests reclaim in this order (see [`Scheduler::schedule_guarantees`]).
    waiting: BTreeSet<(u8, u64)>,
    /// Those of `waiting` taken out of the GPUs' queues while the service waits for its cap (its
    /// first waiting request does not fit under it), so that the pass does not walk them again: put
    /// back as soon as that may have changed (a holder of the service ended or paused, or its first
    /// waiting request changed). See [`Scheduler::park`].
    parked: BTreeSet<(u8, u64)>,
    limits: bool,
}

impl Svc {
    fn new(policy: &ServicePolicy) -> Svc {
        Svc {
            live: BTreeSet::new(),
            used_mb: 0,
            pausing_mb: 0,
            cap: policy.max_vram_mb,
            guarantee: policy.guaranteed_vram_mb,
            waiting: BTreeSet::new(),
            parked: BTreeSet::new(),
            limits: policy.limits_vram(),
        }
    }
}

/// The configuration key `name` of `service`'s policy, as an operator writes it: in its own section
/// (`named`), or in `[services.default]`.
fn policy_key(named: bool, service: &str, name: &str) -> String {
    if named {
        format!("services.{service}.{name}")
    } else {
        format!("services.default.{name}")
    }
}

/// What a request counts against its service's cap and guarantee on a GPU of `total_mb`: its VRAM,
/// or for the whole GPU, the GPU's capacity (its lease claims that much in the lease store too).
fn charge(rec: &RequestRecord, total_mb: u64) -> u64 {
    rec.vram_mb.unwrap_or(total_mb)
}

/// The scheduling core. See the module docs for the rules.
pub struct Scheduler {
    config: SchedConfig,
    gpus: Vec<Gpu>,
    gpu_index: HashMap<GpuId, usize>,
    /// Live requests by arrival number.
    live: HashMap<u64, Live>,
    /// Live requests by id.
    ids: HashMap<RequestId, u64>,
    /// Live requests by service, with what each holds and may hold.
    services: HashMap<ServiceId, Svc>,
    /// Whether some service has a cap or a guarantee (else the pass checks none).
    limits_on: bool,
    /// Whether some service has a guarantee (else nothing is borrowed, and nothing reclaimed).
    guarantees_on: bool,
    /// The services under their guarantee with requests waiting: the first pass of
    /// [`Scheduler::schedule`] is theirs.
    hungry: BTreeSet<ServiceId>,
    /// `(S, T)` -> until: service `S` reclaimed VRAM from `T`, and `T` may not reclaim from `S` before
    /// then (`S`'s `min_hold_ms` after the grant the reclaim was for), so that a reclaim is not undone
    /// by the same pair sooner.
    reclaim_guards: BTreeMap<(ServiceId, ServiceId), Millis>,
    /// Queued and paused requests in grant order: (effective priority, arrival).
    queue: BTreeSet<(u8, u64)>,
    /// The paused requests of `queue`, by the same keys.
    paused: BTreeSet<(u8, u64)>,
    /// How many requests `queue` holds by (priority, GPU): (queued, paused). The GPU is a queued
    /// request's pin, a paused one's GPU. Kept as the queue changes, so that the status needs no walk
    /// of the whole queue.
    queue_counts: BTreeMap<(u8, Option<GpuId>), (u64, u64)>,
    timers: BTreeSet<(Millis, u64, TimerKind)>,
    /// Recently ended requests, to answer a repeated id with the final state.
    ended: HashMap<RequestId, RequestRecord>,
    ended_order: VecDeque<RequestId>,
    next_seq: u64,
    last_fence: Fence,
    fence_dirty: bool,
    /// Request ids whose records changed during the current input.
    dirty: Vec<RequestId>,
    dirty_set: HashSet<RequestId>,
    actions: VecDeque<Action>,
    vram_source: VramSource,
    /// The latest time handed in: a time before it is taken as it, so that the core's clock never
    /// goes back.
    clock: Millis,
    /// Requests that arrived in the current batch, to say `queued` for those the batch's scheduling
    /// left waiting.
    arrived: Vec<u64>,
}

impl Scheduler {
    /// A scheduler for these GPUs (sorted by id), with nothing queued and fences starting at 1.
    pub fn new(config: SchedConfig, gpus: Vec<GpuSpec>) -> Self {
        let mut scheduler = Scheduler {
            config,
            gpus: Vec::new(),
            gpu_index: HashMap::new(),
            live: HashMap::new(),
            ids: HashMap::new(),
            services: HashMap::new(),
            limits_on: false,
            guarantees_on: false,
            hungry: BTreeSet::new(),
            reclaim_guards: BTreeMap::new(),
            queue: BTreeSet::new(),
            paused: BTreeSet::new(),
            queue_counts: BTreeMap::new(),
            timers: BTreeSet::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            next_seq: 1,
            last_fence: Fence(0),
            fence_dirty: false,
            dirty: Vec::new(),
            dirty_set: HashSet::new(),
            actions: VecDeque::new(),
            vram_source: VramSource::Config,
            clock: 0,
            arrived: Vec::new(),
        };
        scheduler.limits_on = scheduler.config.services.limit_vram();
        scheduler.guarantees_on = scheduler.config.services.guarantee_vram();
        scheduler.set_gpus(gpus);
        scheduler
    }

    fn set_gpus(&mut self, mut specs: Vec<GpuSpec>) {
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        specs.dedup_by(|a, b| a.id == b.id);
        self.gpu_index = specs
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id.clone(), i))
            .collect();
        self.gpus = specs
            .into_iter()
            .map(|spec| Gpu {
                spec,
                external_mb: 0,
                holders: BTreeSet::new(),
                held_mb: 0,
                queue: BTreeSet::new(),
                settle: None,
                settle_warning: None,
            })
            .collect();
    }

    /// Says where the VRAM figures come from, for the status document.
    pub fn set_vram_source(&mut self, source: VramSource) {
        self.vram_source = source;
    }

    /// The GPUs managed, sorted by id.
    pub fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.iter().map(|g| g.spec.clone()).collect()
    }

    /// The highest fence issued so far.
    pub fn last_fence(&self) -> Fence {
        self.last_fence
    }

    /// The next action to carry out, if any. Drain it after every input.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the scheduler next wants [`Scheduler::handle_timeout`] called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        // A guard's end lets a reclaim it held back go ahead.
        let settle = self
            .gpus
            .iter()
            .filter_map(|g| g.settle.as_ref().map(|s| s.until))
            .chain(self.reclaim_guards.values().copied())
            .min();
        match (self.timers.first().map(|&(at, _, _)| at), settle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// VRAM held by leases on a GPU (active and pausing holders), in MB.
    pub fn held_mb(&self, gpu: &str) -> u64 {
        self.gpu_index.get(gpu).map_or(0, |&g| self.gpus[g].held_mb)
    }

    /// Whether a GPU waits for NVML to see a paused holder's VRAM freed (see `SchedConfig::settle_ms`).
    pub fn settling(&self, gpu: &str) -> bool {
        self.gpu_index
            .get(gpu)
            .is_some_and(|&g| self.gpus[g].settle.is_some())
    }

    /// The number of live (not ended) requests.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// The leases that should be in the lease store now (to write them back after it lost them).
    pub fn leases(&self) -> Vec<Lease> {
        self.gpus
            .iter()
            .flat_map(|g| g.holders.iter())
            .filter_map(|seq| self.live.get(seq))
            .filter_map(|l| self.lease_of(&l.rec))
            .collect()
    }

    /// The record of a request the scheduler knows (live or recently ended).
    pub fn record(&self, request_id: &str) -> Option<&RequestRecord> {
        match self.ids.get(request_id) {
            Some(seq) => self.live.get(seq).map(|l| &l.rec),
            None => self.ended.get(request_id),
        }
    }

    // ----- inputs -------------------------------------------------------------------------------------

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
        let mut leases: HashMap<RequestId, Lease> = snapshot
            .leases
            .into_iter()
            .map(|l| (l.request_id.clone(), l))
            .collect();
        let mut records = snapshot.requests;
        records.sort_by_key(|r| r.arrival);
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
            let gpu_known = self
                .live_rec(seq)
                .gpu
                .as_ref()
                .is_some_and(|g| self.gpu_index.contains_key(g));
            if !gpu_known {
                self.revoke(seq, now, Reason::GpuRemoved, false);
                continue;
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
            Input::GpuUsed { gpu, used_mb } => {
                if let Some(&i) = self.gpu_index.get(&gpu) {
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

    // ----- input handlers -----------------------------------------------------------------------------

    fn on_request(&mut self, service: String, encoding: Encoding, msg: RequestMsg, now: Millis) {
        let request_id = msg.request_id.clone().unwrap_or_default();
        if let Some(existing) = self.record(&request_id) {
            if existing.service_id != service {
                let error = format!(
                    "request_id `{request_id}` is already used by service `{}`; choose another id",
                    existing.service_id
                );
                return self.reject(&service, encoding, Some(&request_id), error, now);
            }
            let reply = self.current_reply(existing, now);
            let existing_encoding = existing.encoding;
            return self.reply(&service, existing_encoding, reply);
        }
        // What the service may ask for, and what it gets when it leaves something out.
        let Some(policy) = self.config.services.get(&service).cloned() else {
            let error = format!(
                "service `{service}` is not configured: it has no [services.{service}] section, and \
                 `services.allow_unknown` is false"
            );
            return self.reject(&service, encoding, Some(&request_id), error, now);
        };
        let named = self.config.services.named.contains_key(service.as_str());
        let key = |name: &str| policy_key(named, &service, name);
        let mut priority = msg.priority;
        let mut requested_detail = None;
        let mut priority_error = None;
        if let Some(max) = policy.max_priority.filter(|&max| msg.priority < max) {
            if policy.clamp_priority {
                priority = max;
                requested_detail = Some(format!(
                    "priority {} taken as {max}, the most urgent that `{}` allows (`{}` is true)",
                    msg.priority,
                    key("max_priority"),
                    key("clamp_priority")
                ));
            } else {
                priority_error = Some(format!(
                    "field `priority`: {} is more urgent than service `{service}` may ask for: \
                     `{}` is {max} (0 is the most urgent; give {max} or a greater number)",
                    msg.priority,
                    key("max_priority")
                ));
            }
        }
        let vram_mb = msg.vram_mb.or(policy.default_vram_mb);
        let candidates: Vec<&Gpu> = match &msg.gpu {
            Some(pin) => self
                .gpu_index
                .get(pin.as_str())
                .map(|&i| &self.gpus[i])
                .into_iter()
                .collect(),
            None => self.gpus.iter().collect(),
        };
        let known: Vec<&str> = self.gpus.iter().map(|g| g.spec.id.as_str()).collect();
        let error = if priority_error.is_some() {
            priority_error
        } else if candidates.is_empty() {
            Some(match &msg.gpu {
                Some(pin) => format!(
                    "field `gpu`: no GPU `{pin}` is managed here; the GPUs are: {}",
                    known.join(", ")
                ),
                None => "no GPU is managed by this coordinator".to_string(),
            })
        } else if let Some(live) = self
            .services
            .get(service.as_str())
            .map(|svc| svc.live.len())
            .filter(|&n| n >= self.config.max_per_service)
        {
            Some(format!(
                "service `{service}` already has {live} live requests, the most that \
                 `queue.max_per_service` allows ({}): release or cancel some first",
                self.config.max_per_service
            ))
        } else if let Some((vram, largest)) = vram_mb
            .map(|vram| {
                let largest = candidates.iter().map(|g| g.spec.total_mb).max();
                (vram, largest.unwrap_or(0))
            })
            .filter(|&(vram, largest)| vram > largest)
        {
            let given = if msg.vram_mb.is_some() {
                "field `vram_mb`".to_owned()
            } else {
                format!("`{}`", key("default_vram_mb"))
            };
            Some(format!(
                "{given}: {vram} MB is more than any GPU it may use has ({largest} MB)"
            ))
        } else if let Some(cap) = policy.max_vram_mb.filter(|&cap| {
            candidates
                .iter()
                .all(|g| vram_mb.unwrap_or(g.spec.total_mb) > cap)
        }) {
            let asked = match vram_mb {
                Some(vram) => format!("{vram} MB"),
                None => format!(
                    "a whole GPU (the smallest it may use has {} MB)",
                    candidates
                        .iter()
                        .map(|g| g.spec.total_mb)
                        .min()
                        .unwrap_or(0)
                ),
            };
            Some(format!(
                "{asked} is more than service `{service}` may hold at once: `{}` is {cap} MB, so \
                 the request could never be granted",
                key("max_vram_mb")
            ))
        } else {
            None
        };
        let lease_ms = msg
            .lease_ms
            .or(policy.default_lease_ms)
            .unwrap_or(self.config.lease_default_ms)
            .min(self.config.lease_max_ms)
            .max(1);
        let timeout_ms = msg.timeout_ms.unwrap_or(self.config.default_timeout_ms);
        let seq = self.next_seq;
        self.next_seq += 1;
        let rec = RequestRecord {
            request_id: request_id.clone().into(),
            service_id: service.clone().into(),
            priority,
            arrival: seq,
            encoding,
            vram_mb,
            gpu_pin: msg.gpu.clone().map(GpuId::from),
            // A service that is not preemptible is not, whatever its requests say.
            preemptible: msg.preemptible.unwrap_or(true) && policy.preemptible,
            pause_ms: msg.pause_ms,
            lease_ms,
            requested_at: now,
            // Kept within what Postgres's bigint holds, whatever the input said.
            timeout_at: now.saturating_add(timeout_ms).min(i64::MAX as u64),
            phase: Phase::Queued,
            gpu: None,
            held_mb: None,
            fence: None,
            granted_at: None,
            expires_at: None,
            pause_deadline: None,
            paused_at: None,
            waited_ms: None,
            end: None,
            ended_at: None,
            detail: None,
        };
        self.event(&rec, EventKind::Requested, now, requested_detail);
        if let Some(error) = error {
            let mut rec = rec;
            rec.phase = Phase::Ended;
            rec.end = Some(End::Rejected);
            rec.ended_at = Some(now);
            rec.detail = Some(error.clone());
            let mut reply = ReplyOut::new(&request_id, Outcome::Rejected);
            reply.error = Some(error.clone());
            self.reply(&service, encoding, reply);
            self.event(&rec, EventKind::Rejected, now, Some(error));
            self.mark_dirty(&request_id);
            self.remember_ended(rec);
            return;
        }
        self.insert_live(rec);
        self.mark_dirty(&request_id);
        // Granted, or said `queued`, once the whole batch is handled.
        self.arrived.push(seq);
    }

    fn on_release(&mut self, service: String, encoding: Encoding, msg: ReleaseMsg, now: Millis) {
        let Some(request_id) = msg.request_id else {
            let all: Vec<u64> = self
                .services
                .get(service.as_str())
                .map(|svc| svc.live.iter().copied().collect())
                .unwrap_or_default();
            for seq in all {
                self.release(
                    seq,
                    now,
                    format!("service `{service}` released everything it held"),
                );
            }
            return;
        };
        let Some(seq) = self.find_own(&service, encoding, &request_id, msg.fence, now) else {
            return;
        };
        self.release(seq, now, "released by its service".to_string());
    }

    fn release(&mut self, seq: u64, now: Millis, detail: String) {
        let rec = self.live_rec(seq);
        let mut reply = ReplyOut::new(&rec.request_id, Outcome::Released);
        reply.gpu = rec.gpu.clone();
        reply.fence = rec.fence.map(|f| f.0);
        let (service, encoding) = (rec.service_id.clone(), rec.encoding);
        self.reply(&service, encoding, reply);
        self.end(seq, End::Released, Some(detail), now);
    }

    fn on_renew(&mut self, service: String, encoding: Encoding, msg: RenewMsg, now: Millis) {
        let Some(seq) = self.find_own(&service, encoding, &msg.request_id, msg.fence, now) else {
            return;
        };
        let rec = self.live_rec(seq);
        if rec.phase == Phase::Pausing && rec.pause_deadline.is_some_and(|d| d <= now) {
            let error = format!(
                "request `{}` was asked to pause and did not ACK within the deadline ({} ms): its \
                 lease is not renewed, and is revoked when it runs out",
                msg.request_id, self.config.ack_deadline_ms
            );
            return self.reject(&service, rec.encoding, Some(&msg.request_id), error, now);
        }
        if !matches!(rec.phase, Phase::Active | Phase::Pausing) {
            let error = format!(
                "request `{}` is {}, not holding a lease: only a held lease can be renewed",
                msg.request_id,
                rec.phase.as_str()
            );
            return self.reject(&service, rec.encoding, Some(&msg.request_id), error, now);
        }
        let lease_ms = msg
            .lease_ms
            .unwrap_or(rec.lease_ms)
            .min(self.config.lease_max_ms)
            .max(1);
        let expires_at = now.saturating_add(lease_ms);
        self.update(seq, now, |rec| {
            rec.expires_at = Some(expires_at);
            rec.lease_ms = lease_ms;
        });
        let rec = self.live_rec(seq).clone();
        let mut reply = ReplyOut::new(&rec.request_id, Outcome::Renewed);
        reply.gpu = rec.gpu.clone();
        reply.fence = rec.fence.map(|f| f.0);
        reply.lease_ms = Some(lease_ms);
        reply.expires_at = Some(expires_at);
        reply.vram_mb = rec.held_mb;
        self.reply(&rec.service_id, rec.encoding, reply);
        self.event(
            &rec,
            EventKind::Renewed,
            now,
            Some(format!("lease extended by {lease_ms} ms")),
        );
        self.renew_in_store(seq);
    }

    /// Extends the lease of holder `seq` in the lease store to its record's expiry.
    fn renew_in_store(&mut self, seq: u64) {
        let rec = self.live_rec(seq);
        self.actions.push_back(Action::Lease(LeaseOp::Renew {
            request_id: rec.request_id.clone(),
            gpu: rec.gpu.clone().expect("a holding record has a GPU"),
            fence: rec.fence.expect("a holding record has a fence"),
            expires_at: rec.expires_at.expect("a holding record has an expiry"),
        }));
    }

    fn on_ack(
        &mut self,
        service: String,
        encoding: Encoding,
        msg: AckMsg,
        stored_at: Millis,
        now: Millis,
    ) {
        let Some(seq) = self.find_own(&service, encoding, &msg.request_id, msg.fence, now) else {
            return;
        };
        let rec = self.live_rec(seq);
        let phase = rec.phase;
        // An ACK without a fence answers the pause ordered before it was stored: one stored earlier is a
        // late copy of an ACK to an earlier pause (the holder has not answered this one yet).
        let ordered_at = rec
            .pause_deadline
            .map(|deadline| deadline.saturating_sub(self.config.ack_deadline_ms));
        if msg.fence.is_none()
            && msg.action == AckAction::Paused
            && phase == Phase::Pausing
            && ordered_at.is_some_and(|ordered| stored_at < ordered)
        {
            let error = format!(
                "an ACK `paused` without a fence, stored before the pause of request `{}` was ordered: \
                 a late copy of an earlier ACK, ignored (send the fence to be matched exactly)",
                msg.request_id
            );
            let encoding = rec.encoding;
            return self.reject(&service, encoding, Some(&msg.request_id), error, now);
        }
        match (msg.action, phase) {
            (AckAction::Paused, Phase::Pausing) => self.paused(seq, now),
            // A repeated ACK (a redelivery) changes nothing; nor does the ACK of a resume that a new
            // pause followed before the holder answered it (the pause waits for its own ACK).
            (AckAction::Paused, Phase::Paused)
            | (AckAction::Resumed, Phase::Active)
            | (AckAction::Resumed, Phase::Pausing) => {}
            (action, phase) => {
                let error = format!(
                    "request `{}` is {}: an ACK `{}` is not expected now",
                    msg.request_id,
                    phase.as_str(),
                    match action {
                        AckAction::Paused => "paused",
                        AckAction::Resumed => "resumed",
                    }
                );
                let encoding = self.live_rec(seq).encoding;
                self.reject(&service, encoding, Some(&msg.request_id), error, now);
            }
        }
    }

    fn on_cancel(&mut self, service: String, encoding: Encoding, msg: CancelMsg, now: Millis) {
        let Some(seq) = self.find_own(&service, encoding, &msg.request_id, None, now) else {
            return;
        };
        let rec = self.live_rec(seq);
        if matches!(rec.phase, Phase::Active | Phase::Pausing) {
            let error = format!(
                "request `{}` holds the GPU: cancel only withdraws queued or paused requests; release it instead",
                msg.request_id
            );
            return self.reject(&service, rec.encoding, Some(&msg.request_id), error, now);
        }
        let reply = ReplyOut::new(&rec.request_id, Outcome::Cancelled);
        let (service, encoding) = (rec.service_id.clone(), rec.encoding);
        self.reply(&service, encoding, reply);
        self.end(
            seq,
            End::Cancelled,
            Some("cancelled by its service".into()),
            now,
        );
    }

    fn on_invalid(&mut self, rejection: Rejection, now: Millis) {
        let request_id = rejection.request_id.as_deref();
        match &rejection.service {
            Some(service) => self.reject(
                service,
                rejection.encoding,
                request_id,
                rejection.error,
                now,
            ),
            // No valid service in the subject: nobody to reply to (a reply to `unknown` would reach
            // a service of that name); the event alone records it.
            None => self.rejected_event(
                "unknown",
                rejection.encoding,
                request_id,
                rejection.error,
                now,
            ),
        }
    }

    /// Finds a live request of `service` for an input about it, checking owner and fence; rejects and
    /// returns `None` otherwise.
    fn find_own(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: &str,
        fence: Option<u64>,
        now: Millis,
    ) -> Option<u64> {
        // About a request of this service: answered in the request's own encoding.
        let mut encoding = encoding;
        // A stale fence's rejection names the current one: a holder whose release crossed a resume
        // can release again under it.
        let mut current = None;
        let error = match self.ids.get(request_id) {
            None => match self.ended.get(request_id) {
                Some(rec) if rec.service_id == service => {
                    encoding = rec.encoding;
                    format!(
                        "request `{request_id}` has already ended ({})",
                        rec.end.map(End::as_str).unwrap_or("ended")
                    )
                }
                _ => format!("unknown request_id `{request_id}` for service `{service}`"),
            },
            Some(&seq) => {
                let rec = self.live_rec(seq);
                if rec.service_id != service {
                    format!("unknown request_id `{request_id}` for service `{service}`")
                } else if fence.is_some_and(|f| Some(Fence(f)) != rec.fence) {
                    encoding = rec.encoding;
                    current = rec.fence;
                    format!(
                        "stale fence {}: the current fence of request `{request_id}` is {}",
                        fence.unwrap_or_default(),
                        rec.fence
                            .map(|f| f.0.to_string())
                            .unwrap_or_else(|| "none".into())
                    )
                } else {
                    return Some(seq);
                }
            }
        };
        self.reject_with_fence(service, encoding, Some(request_id), current, error, now);
        None
    }

    // ----- transitions --------------------------------------------------------------------------------

    fn grant(&mut self, seq: u64, gpu: usize, now: Millis) {
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
    fn pause(&mut self, seq: u64, for_seq: u64, now: Millis, reclaim: bool) {
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

    fn paused(&mut self, seq: u64, now: Millis) {
        let rec = self.live_rec(seq).clone();
        self.release_held(&rec);
        self.update(seq, now, |rec| {
            rec.phase = Phase::Paused;
            rec.paused_at = Some(now);
            rec.pause_deadline = None;
            rec.expires_at = None;
        });
        if self.config.settle_ms > 0 {
            if let Some(&g) = rec.gpu.as_ref().and_then(|g| self.gpu_index.get(g)) {
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
    fn revoke(&mut self, seq: u64, now: Millis, reason: Reason, expired: bool) {
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
    fn end_if_unplaceable(&mut self, seq: u64, now: Millis) {
        let rec = self.live_rec(seq);
        let cap = self.services.get(&rec.service_id).and_then(|svc| svc.cap);
        let any_gpu = self.allowed(rec).next().is_some();
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
            let mut reply = ReplyOut::new(&rec.request_id, Outcome::Rejected);
            reply.error = Some(why.clone());
            self.reply(&rec.service_id, rec.encoding, reply);
            self.end(seq, End::Rejected, Some(why), now);
        }
    }

    /// Ends a live request: it leaves every index, its lease is released where it held one (except after
    /// a revoke, which released it already), and it is remembered as ended.
    fn end(&mut self, seq: u64, end: End, detail: Option<String>, now: Millis) {
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

    // ----- the scheduling pass ------------------------------------------------------------------------

    /// Grants, preempts and reserves in grant order, until every GPU is reserved or the queue is done.
    fn schedule(&mut self, now: Millis) {
        let mut open: Vec<bool> = self.gpus.iter().map(|g| g.settle.is_none()).collect();
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
    fn schedule_guarantees(
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
            // What the requests taken before in this pass will hold once their pauses are ACKed.
            let mut pending = 0u64;
            let mut cursor: Option<(u8, u64)> = None;
            while *n_open > 0 {
                let Some(svc) = self.services.get(&service) else {
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
    }

    /// Those of `candidates` where the request fits under its service's cap with what the service holds
    /// now (none: it waits, reserving nothing, for its service's own leases to end). The service's
    /// first waiting request in grant order keeps the cap for itself: while it does not fit under it,
    /// the service's later requests wait too, and the service is added to `capped` for the rest of
    /// the pass (what a service holds only grows during a pass); while it does, a later request fits
    /// only with the room the first one needs left under the cap. The flag says the service is so held
    /// back: its request may be parked.
    fn under_cap(
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
    fn park(&mut self, seq: u64) {
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
    fn unpark(&mut self, service: &str) {
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
    fn allowed<'a>(&'a self, rec: &'a RequestRecord) -> impl Iterator<Item = usize> + 'a {
        let pinned = rec.gpu_pin.as_ref().map(|p| self.gpu_index.get(p).copied());
        (0..self.gpus.len())
            .filter(move |&g| pinned.is_none_or(|p| p == Some(g)))
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
    fn may_pause(
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
        // Only as many as needed: a small, less urgent victim taken first may be unnecessary once
        // a bigger one is in; spare the most urgent victims first.
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
        Some(Plan { victims, stuck })
    }

    // ----- bookkeeping --------------------------------------------------------------------------------

    fn live_rec(&self, seq: u64) -> &RequestRecord {
        &self
            .live
            .get(&seq)
            .expect("a live request by its arrival number")
            .rec
    }

    fn issue_fence(&mut self) -> Fence {
        self.last_fence = Fence(self.last_fence.0 + 1);
        self.fence_dirty = true;
        self.last_fence
    }

    fn insert_live(&mut self, rec: RequestRecord) {
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
    fn detach(&mut self, seq: u64) -> Live {
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
                let g = rec
                    .gpu
                    .as_ref()
                    .and_then(|g| self.gpu_index.get(g))
                    .copied();
                if let Some(g) = g {
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
    fn is_hungry(&self, svc: &Svc) -> bool {
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
    fn borrows(&self, service: &str, taken: u64) -> bool {
        self.services.get(service).is_some_and(|svc| {
            svc.used_mb
                .saturating_sub(svc.pausing_mb)
                .saturating_sub(taken)
                > svc.guarantee
        })
    }

    /// Whether `victim`'s service may not reclaim from `reclaimer`'s yet: `reclaimer` reclaimed from
    /// it less than its grace ago.
    fn guarded(&self, victim: &ServiceId, reclaimer: &ServiceId, now: Millis) -> bool {
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
    fn update(&mut self, seq: u64, now: Millis, change: impl FnOnce(&mut RequestRecord)) {
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

    fn remember_ended(&mut self, rec: RequestRecord) {
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

    fn mark_dirty(&mut self, request_id: &str) {
        if self.dirty_set.insert(request_id.into()) {
            self.dirty.push(request_id.into());
        }
    }

    /// Queues the persistence of every record changed by the current input.
    fn flush(&mut self) {
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
    fn release_stale(&mut self, stale: Lease) {
        self.actions
            .push_back(Action::Lease(Self::stale_release(stale)));
    }

    /// The release of a stored lease this scheduler does not hold.
    fn stale_release(stale: Lease) -> LeaseOp {
        LeaseOp::Release {
            request_id: stale.request_id,
            gpu: stale.gpu,
            fence: stale.fence,
        }
    }

    /// Releases the lease of a holding (active or pausing) request.
    fn release_held(&mut self, rec: &RequestRecord) {
        self.actions.push_back(Action::Lease(LeaseOp::Release {
            request_id: rec.request_id.clone(),
            gpu: rec.gpu.clone().expect("a holding record has a GPU"),
            fence: rec.fence.expect("a holding record has a fence"),
        }));
    }

    fn lease_of(&self, rec: &RequestRecord) -> Option<Lease> {
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

    // ----- outputs ------------------------------------------------------------------------------------

    fn reply(&mut self, service: &str, encoding: Encoding, reply: ReplyOut) {
        self.actions.push_back(Action::Reply {
            service: service.into(),
            encoding,
            reply,
        });
    }

    fn reject(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: Option<&str>,
        error: String,
        now: Millis,
    ) {
        self.reject_with_fence(service, encoding, request_id, None, error, now);
    }

    /// [`Scheduler::reject`], the reply naming `fence` (the current one, for a stale fence).
    fn reject_with_fence(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: Option<&str>,
        fence: Option<Fence>,
        error: String,
        now: Millis,
    ) {
        let mut reply = ReplyOut::new(request_id.unwrap_or_default(), Outcome::Rejected);
        reply.fence = fence.map(|f| f.0);
        reply.error = Some(error.clone());
        self.reply(service, encoding, reply);
        self.rejected_event(service, encoding, request_id, error, now);
    }

    fn rejected_event(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: Option<&str>,
        error: String,
        now: Millis,
    ) {
        self.actions.push_back(Action::Event {
            encoding,
            event: EventOut {
                at: now,
                kind: EventKind::Rejected,
                request_id: request_id.map(RequestId::from),
                service_id: service.into(),
                priority: None,
                gpu: None,
                fence: None,
                detail: Some(error),
                waited_ms: None,
                reclaim_for: None,
            },
        });
    }

    fn control(
        &mut self,
        rec: &RequestRecord,
        action: ControlAction,
        deadline_ms: Option<u64>,
        reason: Reason,
        expires_at: Option<Millis>,
    ) {
        let resume = action == ControlAction::Resume;
        self.actions.push_back(Action::Control {
            service: rec.service_id.clone(),
            encoding: rec.encoding,
            control: ControlOut {
                action,
                request_id: rec.request_id.clone(),
                fence: rec.fence.map(|f| f.0).unwrap_or(0),
                deadline_ms,
                reason,
                lease_ms: resume.then_some(rec.lease_ms),
                expires_at,
                gpu: if resume { rec.gpu.clone() } else { None },
            },
        });
    }

    fn event(&mut self, rec: &RequestRecord, kind: EventKind, now: Millis, detail: Option<String>) {
        self.push_event(rec, kind, now, detail, None)
    }

    fn push_event(
        &mut self,
        rec: &RequestRecord,
        kind: EventKind,
        now: Millis,
        detail: Option<String>,
        waited_ms: Option<u64>,
    ) {
        self.push_event_with(rec, kind, now, detail, waited_ms, None)
    }

    fn push_event_with(
        &mut self,
        rec: &RequestRecord,
        kind: EventKind,
        now: Millis,
        detail: Option<String>,
        waited_ms: Option<u64>,
        reclaim_for: Option<ServiceId>,
    ) {
        self.actions.push_back(Action::Event {
            encoding: rec.encoding,
            event: EventOut {
                at: now,
                kind,
                request_id: Some(rec.request_id.clone()),
                service_id: rec.service_id.clone(),
                priority: Some(rec.priority),
                gpu: rec.gpu.clone().or_else(|| rec.gpu_pin.clone()),
                fence: rec.fence.map(|f| f.0),
                detail,
                waited_ms,
                reclaim_for,
            },
        });
    }

    /// The answer to a repeated request: its current state.
    fn current_reply(&self, rec: &RequestRecord, now: Millis) -> ReplyOut {
        let outcome = match (rec.phase, rec.end) {
            (Phase::Queued, _) => Outcome::Queued,
            (Phase::Active | Phase::Pausing, _) => Outcome::Granted,
            (Phase::Paused, _) => Outcome::Paused,
            (Phase::Ended, Some(End::Released)) | (Phase::Ended, None) => Outcome::Released,
            (Phase::Ended, Some(End::TimedOut)) => Outcome::TimedOut,
            (Phase::Ended, Some(End::Cancelled)) => Outcome::Cancelled,
            (Phase::Ended, Some(End::Revoked)) => Outcome::Revoked,
            (Phase::Ended, Some(End::Rejected)) => Outcome::Rejected,
        };
        let mut reply = ReplyOut::new(&rec.request_id, outcome);
        reply.gpu = rec.gpu.clone();
        reply.fence = rec.fence.map(|f| f.0);
        if matches!(rec.phase, Phase::Active | Phase::Pausing) {
            reply.lease_ms = Some(rec.lease_ms);
            reply.expires_at = rec.expires_at;
            reply.vram_mb = rec.held_mb;
        }
        reply.waited_ms = rec
            .waited_ms
            .or_else(|| (rec.phase == Phase::Queued).then(|| now.saturating_sub(rec.requested_at)));
        if rec.end == Some(End::Rejected) {
            reply.error = rec.detail.clone();
        }
        reply
    }

    fn queued_detail(&self, seq: u64) -> String {
        let rec = self.live_rec(seq);
        let pausing = self
            .gpus
            .iter()
            .flat_map(|g| g.holders.iter())
            .filter(|&&h| self.live_rec(h).phase == Phase::Pausing)
            .count();
        if pausing > 0 && rec.priority < 255 {
            format!("waiting for {pausing} holder(s) to pause")
        } else {
            "waiting for VRAM to be released".to_string()
        }
    }

    // ----- status -------------------------------------------------------------------------------------

    /// What it holds now: each GPU with its VRAM and holders, the paused requests, and the queue in
    /// grant order with positions and rough wait estimates.
    pub fn status(&self, now: Millis) -> StatusView {
        self.status_page(now, QueuePage::ALL)
    }

    /// The status with one page of the queue, its total and its counts by priority and GPU: the
    /// document stays small however long the queue is. O(page's end + paused) in time (the counts are
    /// kept as the queue changes), O(page) in size.
    pub fn status_page(&self, now: Millis, page: QueuePage) -> StatusView {
        let holder = |seq: &u64| {
            let rec = self.live_rec(*seq);
            HolderView {
                request_id: rec.request_id.clone(),
                service_id: rec.service_id.clone(),
                priority: rec.priority,
                fence: rec.fence.map(|f| f.0).unwrap_or(0),
                vram_mb: rec.held_mb.unwrap_or(0),
                granted_at: rec.granted_at.unwrap_or(0),
                expires_at: rec.expires_at.unwrap_or(0),
                state: if rec.phase == Phase::Pausing {
                    HolderState::Pausing
                } else {
                    HolderState::Active
                },
                preemptible: rec.preemptible,
                pause_ms: rec.pause_ms,
            }
        };
        let gpus = self
            .gpus
            .iter()
            .map(|g| GpuView {
                id: g.spec.id.clone(),
                total_mb: g.spec.total_mb,
                used_mb: (g.held_mb + g.external_mb).min(g.spec.total_mb),
                free_mb: g.free_mb(),
                external_mb: g.external_mb,
                vram_source: self.vram_source,
                holders: g.holders.iter().map(holder).collect(),
            })
            .collect();
        // Rough wait: until the soonest lease on a usable GPU ends, plus the leases queued ahead.
        let soonest_end = |rec: &RequestRecord| {
            self.gpus
                .iter()
                .filter(|g| rec.gpu_pin.as_ref().is_none_or(|p| *p == g.spec.id))
                .flat_map(|g| g.holders.iter())
                .filter_map(|h| self.live_rec(*h).expires_at)
                .min()
                .map(|at| at.saturating_sub(now))
                .unwrap_or(0)
        };
        let n_gpus = self.gpus.len().max(1) as u64;
        let page_end = page.offset.saturating_add(page.limit);
        let mut ahead_ms = 0u64;
        let mut queue = Vec::new();
        // The entries up to the page's end only: those before it for the wait ahead.
        for (i, &(_, seq)) in self.queue.iter().enumerate() {
            let i = i as u64;
            if i >= page_end {
                break;
            }
            let rec = self.live_rec(seq);
            if i >= page.offset {
                let is_paused = rec.phase == Phase::Paused;
                queue.push(QueueView {
                    position: i + 1,
                    request_id: rec.request_id.clone(),
                    service_id: rec.service_id.clone(),
                    priority: rec.priority,
                    vram_mb: rec.vram_mb,
                    gpu: rec.gpu_pin.clone(),
                    requested_at: rec.requested_at,
                    paused: is_paused,
                    timeout_at: (!is_paused).then_some(rec.timeout_at),
                    estimated_wait_ms: Some(soonest_end(rec) + ahead_ms / n_gpus),
                });
            }
            ahead_ms = ahead_ms.saturating_add(rec.lease_ms);
        }
        let paused = self
            .paused
            .iter()
            .map(|&(_, seq)| {
                let rec = self.live_rec(seq);
                PausedView {
                    request_id: rec.request_id.clone(),
                    service_id: rec.service_id.clone(),
                    priority: rec.priority,
                    gpu: rec.gpu.clone().unwrap_or_default(),
                    vram_mb: rec.held_mb.unwrap_or(0),
                    paused_at: rec.paused_at.unwrap_or(0),
                }
            })
            .collect();
        StatusView {
            at: now,
            vram_source: self.vram_source,
            gpus,
            paused,
            services: self.service_views(),
            queue,
            queue_total: self.queue.len() as u64,
            queue_offset: page.offset,
            queue_counts: self
                .queue_counts
                .iter()
                .map(|((priority, gpu), &(queued, paused))| QueueCountView {
                    priority: *priority,
                    gpu: gpu.clone(),
                    queued,
                    paused,
                })
                .collect(),
        }
    }

    /// Each service with a section, and each other service holding VRAM, with what it holds against
    /// its limits, by id. O(services with live requests + sections).
    fn service_views(&self) -> Vec<ServiceView> {
        let mut views: BTreeMap<&str, ServiceView> = BTreeMap::new();
        let policies = &self.config.services;
        let view = |id: &str, svc: Option<&Svc>| {
            let policy = policies.get(id);
            let guarantee = policy.map_or(0, |p| p.guaranteed_vram_mb);
            let (used, pausing) = svc.map_or((0, 0), |s| (s.used_mb, s.pausing_mb));
            ServiceView {
                service_id: id.into(),
                used_mb: used,
                borrowed_mb: used.saturating_sub(pausing).saturating_sub(guarantee),
                guaranteed_mb: (guarantee > 0).then_some(guarantee),
                max_vram_mb: policy.and_then(|p| p.max_vram_mb),
            }
        };
        for id in policies.named.keys() {
            views.insert(id, view(id, self.services.get(id.as_str())));
        }
        for (id, svc) in self.services.iter().filter(|(_, svc)| svc.used_mb > 0) {
            views
                .entry(id.as_str())
                .or_insert_with(|| view(id, Some(svc)));
        }
        views.into_values().collect()
    }

    /// Checks the invariants that must hold after every input; returns the first broken one.
    /// For tests and debugging: O(n).
    pub fn check_invariants(&self) -> Result<(), String> {
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
        self.check_services()
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
            // Parked only while its first waiting request does not fit under its cap.
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
}

/// How soon a holder says it frees its VRAM once asked to pause, for ordering victims (smaller is
/// sooner): its `pause_ms` hint, an unknown one after every known one.
fn pause_key(rec: &RequestRecord) -> u64 {
    rec.pause_ms.unwrap_or(u64::MAX)
}

/// A holder a preemption plan pauses, with what the rules and the hint compare of it.
#[derive(Debug, Clone)]
struct Victim {
    arrival: u64,
    held_mb: u64,
    /// It holds the whole GPU.
    whole: bool,
    priority: u8,
    granted_at: Millis,
    /// [`pause_key`].
    pause: u64,
    /// Paused by a reclaim: priority alone would not pause it.
    reclaim: bool,
    service: ServiceId,
    /// What it counts against its service's guarantee ([`charge`]).
    charged: u64,
}

impl Victim {
    fn of(rec: &RequestRecord, reclaim: bool, gpu_total_mb: u64) -> Victim {
        Victim {
            arrival: rec.arrival,
            held_mb: rec.held_mb.unwrap_or(0),
            whole: rec.vram_mb.is_none(),
            priority: rec.priority,
            granted_at: rec.granted_at.unwrap_or(0),
            pause: pause_key(rec),
            reclaim,
            service: rec.service_id.clone(),
            charged: charge(rec, gpu_total_mb),
        }
    }
}

/// A preemption plan chosen: the GPU, the holders to pause (arrival number, and whether the pause is
/// a reclaim), and whether it waits for a holder past its ACK deadline.
type Chosen = (usize, Vec<(u64, bool)>, bool);

/// The holders to pause on one GPU for one request.
#[derive(Debug)]
struct Plan {
    victims: Vec<Victim>,
    /// It waits for a holder that missed its ACK deadline.
    stuck: bool,
}

impl Plan {
    fn victim_mb(&self) -> u64 {
        self.victims.iter().map(|v| v.held_mb).sum()
    }

    /// How plans on different GPUs compare, the smallest first: one that waits for an overdue ACK
    /// last; then the fewest holders paused; then the least VRAM; then, between plans equal on
    /// those, the one whose victims pause soonest.
    fn rank(&self) -> (bool, usize, u64, u64) {
        (
            self.stuck,
            self.victims.len(),
            self.victim_mb(),
            self.slowest(),
        )
    }

    /// When the room is made: when the slowest victim has paused (0: no victim).
    fn slowest(&self) -> u64 {
        self.victims.iter().map(|v| v.pause).max().unwrap_or(0)
    }

    /// Whether the rules see the two plans as one: as many holders and as much VRAM paused, of the
    /// same priorities and grant instants.
    fn alike(&self, other: &Plan) -> bool {
        let kinds = |plan: &Plan| {
            let mut kinds: Vec<(u8, Millis)> = plan
                .victims
                .iter()
                .map(|v| (v.priority, v.granted_at))
                .collect();
            kinds.sort_unstable();
            kinds
        };
        self.stuck == other.stuck
            && self.victim_mb() == other.victim_mb()
            && kinds(self) == kinds(other)
    }
}
