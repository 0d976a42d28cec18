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
    Outcome, RejectCode, Rejection, ReleaseMsg, RenewMsg, RequestMsg, VramSource,
};

use crate::ids::*;
use crate::outputs::*;
use crate::types::*;

mod emit;
mod handlers;
mod hosts;
mod indexes;
mod inputs;
mod invariants;
mod pass;
mod plan;
mod restore;
mod status;
mod transitions;

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
    /// The host it is on (the part of its id before `/`), with node agents.
    host: Option<String>,
    /// Its UUID, as its agent reported it.
    uuid: Option<String>,
    /// Whether it takes new grants: always for the GPUs given at start; with node agents, while its
    /// host is heard and its agent lists it.
    up: bool,
    /// Where its VRAM figures come from.
    source: VramSource,
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
    fn new(spec: GpuSpec, up: bool) -> Gpu {
        Gpu {
            host: hosts::host_of(&spec.id).map(str::to_owned),
            spec,
            uuid: None,
            up,
            source: VramSource::Config,
            external_mb: 0,
            holders: BTreeSet::new(),
            held_mb: 0,
            queue: BTreeSet::new(),
            settle: None,
            settle_warning: None,
        }
    }

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
    /// With node agents: the hosts heard, by name.
    hosts: BTreeMap<String, hosts::Host>,
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
            hosts: BTreeMap::new(),
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
        let source = self.vram_source;
        self.gpus = specs
            .into_iter()
            .map(|spec| Gpu {
                host: None,
                source,
                ..Gpu::new(spec, true)
            })
            .collect();
    }

    /// Says where the VRAM figures come from, for the status document.
    pub fn set_vram_source(&mut self, source: VramSource) {
        self.vram_source = source;
        for gpu in self.gpus.iter_mut().filter(|g| g.host.is_none()) {
            gpu.source = source;
        }
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
            .chain(self.next_host_deadline())
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
}
