//! A simulated driver for the scheduling core, in the style of quinn-proto's `tests/util.rs`: a clock
//! that only moves when the test says so, inputs built the way the wire layer builds them, the actions
//! of each step collected in [`Acts`], and every invariant of the contract checked after every step.
//!
//! The harness also plays the driver's durable side: it keeps the last persisted record of every
//! request, the highest persisted fence and a model of the lease store (compare-and-set on the fence),
//! so that a test can restart the core from what it persisted ([`Sim::restart`]).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};

use gpu_coordinator_core::{
    Action, ControlOut, End, EventOut, Fence, GpuId, GpuSpec, GpuView, Input, Lease, LeaseOp,
    Millis, Phase, Reason, ReplyOut, RequestId, RequestRecord, SchedConfig, Scheduler, ServiceId,
    Snapshot, StatusView,
};
use gpu_coordinator_wire::{
    AckAction, AckMsg, CancelMsg, ControlAction, Encoding, EventKind, HolderState, Inbound,
    Outcome, Rejection, ReleaseMsg, RenewMsg, RequestMsg,
};

/// The simulated clock starts here (2023-11-14T22:13:20Z): far from zero, so that a
/// `saturating_sub` hiding a bug does not look like a right answer.
pub const T0: Millis = 1_700_000_000_000;

/// GPU specs from `(id, total_mb)` pairs.
pub fn gpus(specs: &[(&str, u64)]) -> Vec<GpuSpec> {
    specs
        .iter()
        .map(|&(id, total_mb)| GpuSpec {
            id: (*id).into(),
            total_mb,
        })
        .collect()
}

/// A request message under construction; the service and request ids are filled by [`Sim::request`]
/// the way the wire layer fills them.
#[derive(Debug, Clone)]
pub struct Req(pub RequestMsg);

/// A request `id` at `priority`, for the whole GPU, with every other field left to the defaults.
pub fn req(id: &str, priority: u8) -> Req {
    Req(RequestMsg {
        host: None,
        request_id: Some(id.to_string()),
        service_id: None,
        priority,
        timeout_ms: None,
        lease_ms: None,
        vram_mb: None,
        gpu: None,
        preemptible: None,
        pause_ms: None,
    })
}

impl Req {
    pub fn vram(mut self, mb: u64) -> Self {
        self.0.vram_mb = Some(mb);
        self
    }
    pub fn gpu(mut self, id: &str) -> Self {
        self.0.gpu = Some(id.to_string());
        self
    }
    pub fn host(mut self, host: &str) -> Self {
        self.0.host = Some(host.to_string());
        self
    }

    pub fn preemptible(mut self, yes: bool) -> Self {
        self.0.preemptible = Some(yes);
        self
    }
    pub fn timeout(mut self, ms: u64) -> Self {
        self.0.timeout_ms = Some(ms);
        self
    }
    pub fn lease(mut self, ms: u64) -> Self {
        self.0.lease_ms = Some(ms);
        self
    }
    pub fn pause_ms(mut self, ms: u64) -> Self {
        self.0.pause_ms = Some(ms);
        self
    }
}

/// The actions of one step (or several), with finders by request id and kind.
#[derive(Debug, Clone, Default)]
pub struct Acts(pub Vec<Action>);

impl Acts {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: Acts) {
        self.0.extend(other.0);
    }

    /// Every reply, with the service it goes to.
    pub fn replies(&self) -> Vec<(&str, &ReplyOut)> {
        self.0
            .iter()
            .filter_map(|a| match a {
                Action::Reply { service, reply, .. } => Some((service.as_str(), reply)),
                _ => None,
            })
            .collect()
    }

    /// The replies about `id`.
    pub fn replies_for(&self, id: &str) -> Vec<&ReplyOut> {
        self.replies()
            .into_iter()
            .filter(|(_, r)| r.request_id == id)
            .map(|(_, r)| r)
            .collect()
    }

    /// The one reply about `id`.
    #[track_caller]
    pub fn reply(&self, id: &str) -> &ReplyOut {
        let replies = self.replies_for(id);
        assert_eq!(
            replies.len(),
            1,
            "want exactly one reply for {id}, got {replies:#?}\nall: {self:#?}"
        );
        replies[0]
    }

    #[track_caller]
    pub fn no_reply(&self, id: &str) {
        let replies = self.replies_for(id);
        assert!(
            replies.is_empty(),
            "want no reply for {id}, got {replies:#?}"
        );
    }

    /// Every control, with the service it goes to.
    pub fn all_controls(&self) -> Vec<(&str, &ControlOut)> {
        self.0
            .iter()
            .filter_map(|a| match a {
                Action::Control {
                    service, control, ..
                } => Some((service.as_str(), control)),
                _ => None,
            })
            .collect()
    }

    /// The controls about `id`, in order.
    pub fn controls(&self, id: &str) -> Vec<&ControlOut> {
        self.all_controls()
            .into_iter()
            .filter(|(_, c)| c.request_id == id)
            .map(|(_, c)| c)
            .collect()
    }

    /// The actions of the controls about `id`, in order.
    pub fn control_actions(&self, id: &str) -> Vec<ControlAction> {
        self.controls(id).iter().map(|c| c.action).collect()
    }

    /// The one control `action` about `id`.
    #[track_caller]
    pub fn control(&self, id: &str, action: ControlAction) -> &ControlOut {
        let found: Vec<&ControlOut> = self
            .controls(id)
            .into_iter()
            .filter(|c| c.action == action)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "want exactly one {action:?} control for {id}\nall: {self:#?}"
        );
        found[0]
    }

    /// Every event, in order.
    pub fn all_events(&self) -> Vec<&EventOut> {
        self.0
            .iter()
            .filter_map(|a| match a {
                Action::Event { event, .. } => Some(event),
                _ => None,
            })
            .collect()
    }

    /// The kinds of the events about `id`, in order.
    pub fn events(&self, id: &str) -> Vec<EventKind> {
        self.all_events()
            .into_iter()
            .filter(|e| e.request_id.as_deref() == Some(id))
            .map(|e| e.kind)
            .collect()
    }

    /// The one event `kind` about `id`.
    #[track_caller]
    pub fn event(&self, id: &str, kind: EventKind) -> &EventOut {
        let found: Vec<&EventOut> = self
            .all_events()
            .into_iter()
            .filter(|e| e.request_id.as_deref() == Some(id) && e.kind == kind)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "want exactly one {kind:?} event for {id}\nall: {self:#?}"
        );
        found[0]
    }

    /// The request ids of the `granted` events, in order.
    pub fn granted(&self) -> Vec<String> {
        self.all_events()
            .into_iter()
            .filter(|e| e.kind == EventKind::Granted)
            .filter_map(|e| e.request_id.as_ref().map(|id| id.to_string()))
            .collect()
    }

    /// Every lease-store operation, in order.
    pub fn lease_ops(&self) -> Vec<&LeaseOp> {
        self.0
            .iter()
            .filter_map(|a| match a {
                Action::Lease(op) => Some(op),
                _ => None,
            })
            .collect()
    }

    /// The lease-store operations about `id`, in order.
    pub fn lease_ops_for(&self, id: &str) -> Vec<&LeaseOp> {
        self.lease_ops()
            .into_iter()
            .filter(|op| lease_op_id(op) == id)
            .collect()
    }

    /// The last record of `id` persisted in these actions.
    pub fn persisted(&self, id: &str) -> Option<&RequestRecord> {
        self.0.iter().rev().find_map(|a| match a {
            Action::Persist(rec) if rec.request_id == id => Some(rec),
            _ => None,
        })
    }

    /// The fences persisted with `PersistFence`.
    pub fn persisted_fences(&self) -> Vec<Fence> {
        self.0
            .iter()
            .filter_map(|a| match a {
                Action::PersistFence(f) => Some(*f),
                _ => None,
            })
            .collect()
    }
}

pub fn lease_op_id(op: &LeaseOp) -> &str {
    match op {
        LeaseOp::Acquire(l) | LeaseOp::Restore(l) => &l.request_id,
        LeaseOp::Renew { request_id, .. } | LeaseOp::Release { request_id, .. } => request_id,
    }
}

/// The terminal event kind of an end.
pub fn end_kind(end: End) -> EventKind {
    match end {
        End::Released => EventKind::Released,
        End::TimedOut => EventKind::TimedOut,
        End::Cancelled => EventKind::Cancelled,
        End::Revoked => EventKind::Revoked,
        End::Rejected => EventKind::Rejected,
    }
}

/// Whether an event ends its request. A `rejected` event ends a request only when it is the request's
/// own (it then carries the request's priority); a rejected *input* about a live request does not.
pub fn is_terminal(event: &EventOut) -> bool {
    match event.kind {
        EventKind::Released | EventKind::TimedOut | EventKind::Cancelled | EventKind::Revoked => {
            true
        }
        EventKind::Rejected => event.priority.is_some(),
        _ => false,
    }
}

/// What a holder counts against its service's cap and guarantee on a GPU of `total_mb`.
fn rec_charge(rec: &RequestRecord, total_mb: u64) -> u64 {
    rec.vram_mb.unwrap_or(total_mb)
}

/// A simulated driver around one scheduler.
pub struct Sim {
    pub sched: Scheduler,
    pub config: SchedConfig,
    pub specs: Vec<GpuSpec>,
    pub now: Millis,
    /// Every action since the start, across restarts.
    pub history: Acts,
    /// Check the preemption-liveness property after every step (see [`Sim::check_liveness`]).
    pub liveness: bool,
    /// What the driver persisted: the last record of every request and the highest fence.
    pub records: BTreeMap<RequestId, RequestRecord>,
    pub max_fence: Fence,
    /// A model of the lease store.
    pub store: BTreeMap<RequestId, Lease>,
    pub steps: usize,
    /// The highest fence of a new lease (grant or resume) seen so far.
    last_acquired: u64,
    /// How many `requested` events each request id had.
    requested: HashMap<RequestId, u32>,
    /// The terminal event of each ended request.
    ended: HashMap<RequestId, EventKind>,
    /// Since when each queued request has been waiting on less urgent preemptible holders.
    waiting_since: HashMap<RequestId, Millis>,
    /// The harness's own account of reclaims: the services each waiting request reclaimed from (by
    /// the `pause` orders), and `(S, T)` -> until: `S` reclaimed from `T` for a request granted at
    /// `until - S's min_hold_ms`, so `T` may not reclaim from `S` before `until`.
    pub reclaiming: HashMap<RequestId, Vec<ServiceId>>,
    pub guards: HashMap<(ServiceId, ServiceId), Millis>,
    /// Every reclaim seen: (instant, the service reclaiming, the service reclaimed from).
    pub reclaims: Vec<(Millis, ServiceId, ServiceId)>,
    /// With node agents: the sizes of the GPUs a host's sample lists (GPU `i` of the `i`-th).
    pub host_gpu_totals: Vec<u64>,
    /// The current step is the lease store's answer, handled at the core's own clock (it moves no
    /// time and fires no timer), which may be behind `now` when the harness moved its clock without
    /// a timer due.
    answer_step: bool,
}

impl Sim {
    pub fn new(config: SchedConfig, specs: Vec<GpuSpec>) -> Sim {
        let sched = Scheduler::new(config.clone(), specs.clone());
        Sim {
            sched,
            config,
            specs,
            now: T0,
            history: Acts::default(),
            liveness: false,
            records: BTreeMap::new(),
            max_fence: Fence(0),
            store: BTreeMap::new(),
            steps: 0,
            last_acquired: 0,
            requested: HashMap::new(),
            ended: HashMap::new(),
            waiting_since: HashMap::new(),
            reclaiming: HashMap::new(),
            guards: HashMap::new(),
            reclaims: Vec::new(),
            host_gpu_totals: Vec::new(),
            answer_step: false,
        }
    }

    /// A scheduler restored at `now` from `snapshot` (a coordinator starting on existing state). The
    /// records of the snapshot are taken as already persisted; its leases as the lease store's content.
    pub fn restored(
        config: SchedConfig,
        specs: Vec<GpuSpec>,
        snapshot: Snapshot,
        now: Millis,
    ) -> (Sim, Acts) {
        let mut sim = Sim::new(config, specs);
        sim.now = now;
        for rec in &snapshot.requests {
            sim.records.insert(rec.request_id.clone(), rec.clone());
            // A request in the snapshot was accepted before: it counts as requested once.
            sim.requested.insert(rec.request_id.clone(), 1);
            if let Some(end) = rec.end.filter(|_| rec.phase == Phase::Ended) {
                sim.ended.insert(rec.request_id.clone(), end_kind(end));
            }
        }
        sim.last_acquired = snapshot
            .requests
            .iter()
            .filter_map(|r| r.fence)
            .chain(snapshot.leases.iter().map(|l| l.fence))
            .chain(std::iter::once(snapshot.max_fence))
            .max()
            .map(|f| f.0)
            .unwrap_or(0);
        // The driver reads the highest fence from Postgres and the lease store alike.
        sim.max_fence = Fence(sim.last_acquired);
        sim.store = snapshot
            .leases
            .iter()
            .map(|l| (l.request_id.clone(), l.clone()))
            .collect();
        sim.sched.restore(snapshot, now);
        // No input waits (the driver handles those stored meanwhile first): the timers due fire.
        sim.sched.handle_timeout(now);
        let acts = sim.finish_step("restore");
        (sim, acts)
    }

    /// What the driver would hand a new coordinator: the persisted records and fence, and the lease
    /// store (or an empty one, when it lost its data too).
    pub fn snapshot(&self, keep_store: bool) -> Snapshot {
        // As Postgres's `load`: the live requests and the `retain_ended` most recent ended ones, and the
        // highest arrival number of all.
        let mut ended: Vec<&RequestRecord> = self
            .records
            .values()
            .filter(|r| r.phase == Phase::Ended)
            .collect();
        ended.sort_by_key(|r| (r.ended_at, r.arrival));
        let keep = ended.len().saturating_sub(self.config.retain_ended);
        Snapshot {
            requests: self
                .records
                .values()
                .filter(|r| r.phase != Phase::Ended)
                .chain(ended.into_iter().skip(keep))
                .cloned()
                .collect(),
            max_arrival: self.records.values().map(|r| r.arrival).max().unwrap_or(0),
            max_fence: self.max_fence,
            leases: if keep_store {
                self.store.values().cloned().collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Stops the coordinator and starts a new one `gap_ms` later from what was persisted, which first
    /// handles `waiting` (inputs stored during the gap, each with the time it was stored), then fires
    /// the timers due.
    pub fn restart_with_inputs(&mut self, gap_ms: u64, waiting: Vec<(Input, Millis)>) -> Acts {
        let snapshot = self.snapshot(true);
        self.now += gap_ms;
        self.sched = Scheduler::new(self.config.clone(), self.specs.clone());
        self.forget_reclaims();
        self.sched.restore(snapshot, self.now);
        self.sched.handle_inputs(waiting);
        self.sched.handle_timeout(self.now);
        self.finish_step("restart with inputs")
    }

    /// Stops the coordinator and starts a new one `gap_ms` later from what was persisted.
    pub fn restart(&mut self, gap_ms: u64, keep_store: bool) -> Acts {
        let snapshot = self.snapshot(keep_store);
        if !keep_store {
            self.store.clear();
        }
        self.now += gap_ms;
        self.sched = Scheduler::new(self.config.clone(), self.specs.clone());
        self.forget_reclaims();
        self.sched.restore(snapshot, self.now);
        self.sched.handle_timeout(self.now);
        self.finish_step("restart")
    }

    /// A new coordinator starts with no liveness clock and no reclaim guard (the scheduler keeps
    /// its guards in memory only).
    fn forget_reclaims(&mut self) {
        self.waiting_since.clear();
        self.reclaiming.clear();
        self.guards.clear();
    }

    // ----- inputs -------------------------------------------------------------------------------------

    pub fn input(&mut self, input: Input) -> Acts {
        let what = format!("{input:?}");
        self.answer_step = input.answers_the_lease_store();
        self.sched.handle_input(input, self.now);
        let acts = self.finish_step(&what);
        self.answer_step = false;
        acts
    }

    /// Inputs handled as one batch at the current time, each stored at its own time (at most now).
    pub fn batch(&mut self, inputs: Vec<(Input, Millis)>) -> Acts {
        let what = format!("batch {inputs:?}");
        self.sched.handle_inputs(inputs);
        self.finish_step(&what)
    }

    /// An input from `service`, for [`Sim::batch`].
    /// A sample of `host`'s GPUs `(id, total_mb, used_mb)` from its node agent, heard now.
    pub fn host_sample(&mut self, host: &str, gpus: &[(&str, u64, u64)]) -> Acts {
        let heard_at = self.now;
        self.host_sample_at(host, heard_at, gpus)
    }

    /// A sample of `host`'s GPUs, heard at `heard_at` (before now: it waited in a queue).
    pub fn host_sample_at(
        &mut self,
        host: &str,
        heard_at: Millis,
        gpus: &[(&str, u64, u64)],
    ) -> Acts {
        let gpus = gpus
            .iter()
            .map(|&(id, total_mb, used_mb)| gpu_coordinator_core::HostGpu {
                id: id.to_string(),
                uuid: Some(format!("GPU-{host}-{id}")),
                total_mb,
                used_mb,
                source: gpu_coordinator_wire::VramSource::Config,
            })
            .collect();
        self.input(Input::HostSample {
            host: host.to_string(),
            heard_at,
            gpus,
        })
    }

    pub fn from(service: &str, input: Inbound) -> Input {
        Input::Inbound {
            service: service.to_string(),
            encoding: Encoding::Json,
            input,
        }
    }

    pub fn inbound_enc(&mut self, service: &str, encoding: Encoding, input: Inbound) -> Acts {
        self.input(Input::Inbound {
            service: service.to_string(),
            encoding,
            input,
        })
    }

    pub fn inbound(&mut self, service: &str, input: Inbound) -> Acts {
        self.inbound_enc(service, Encoding::Json, input)
    }

    /// A request from `service`, with `service_id` filled as the wire layer does.
    pub fn request(&mut self, service: &str, req: Req) -> Acts {
        self.request_enc(service, Encoding::Json, req)
    }

    pub fn request_enc(&mut self, service: &str, encoding: Encoding, req: Req) -> Acts {
        let mut msg = req.0;
        msg.service_id = Some(service.to_string());
        if msg.request_id.is_none() {
            msg.request_id = Some(format!("{service}-{}", self.steps + 1));
        }
        self.inbound_enc(service, encoding, Inbound::Request(msg))
    }

    pub fn release(&mut self, service: &str, id: &str, fence: Option<u64>) -> Acts {
        self.inbound(
            service,
            Inbound::Release(ReleaseMsg {
                request_id: Some(id.to_string()),
                fence,
            }),
        )
    }

    /// A release without `request_id`: everything the service holds.
    pub fn release_all(&mut self, service: &str) -> Acts {
        self.inbound(service, Inbound::Release(ReleaseMsg::default()))
    }

    pub fn renew(
        &mut self,
        service: &str,
        id: &str,
        fence: Option<u64>,
        lease_ms: Option<u64>,
    ) -> Acts {
        self.inbound(
            service,
            Inbound::Renew(RenewMsg {
                request_id: id.to_string(),
                fence,
                lease_ms,
            }),
        )
    }

    pub fn ack(&mut self, service: &str, id: &str, fence: Option<u64>, action: AckAction) -> Acts {
        self.inbound(
            service,
            Inbound::Ack(AckMsg {
                request_id: id.to_string(),
                fence,
                action,
            }),
        )
    }

    /// The holder's `paused` ACK with its current fence.
    pub fn ack_paused(&mut self, service: &str, id: &str) -> Acts {
        let fence = self.fence(id);
        self.ack(service, id, Some(fence), AckAction::Paused)
    }

    pub fn cancel(&mut self, service: &str, id: &str) -> Acts {
        self.inbound(
            service,
            Inbound::Cancel(CancelMsg {
                request_id: id.to_string(),
            }),
        )
    }

    pub fn invalid(
        &mut self,
        service: Option<&str>,
        request_id: Option<&str>,
        error: &str,
    ) -> Acts {
        self.input(Input::Invalid(Rejection {
            service: service.map(str::to_string),
            encoding: Encoding::Json,
            request_id: request_id.map(str::to_string),
            error: error.to_string(),
        }))
    }

    // ----- time ---------------------------------------------------------------------------------------

    /// Moves the clock `ms` forward, firing every timer due on the way at its own instant.
    pub fn advance(&mut self, ms: u64) -> Acts {
        let to = self.now + ms;
        self.advance_to(to)
    }

    /// Moves the clock to `to`, firing every timer due on the way at its own instant.
    pub fn advance_to(&mut self, to: Millis) -> Acts {
        let mut acts = Acts::default();
        while let Some(at) = self.sched.poll_timeout() {
            if at > to {
                break;
            }
            acts.extend(self.fire_at(at.max(self.now)));
        }
        self.now = self.now.max(to);
        acts
    }

    /// Moves the clock to the scheduler's next wake-up and calls `handle_timeout`; `None` when it
    /// wants none.
    pub fn step_to_next_timeout(&mut self) -> Option<Acts> {
        let at = self.sched.poll_timeout()?;
        Some(self.fire_at(at.max(self.now)))
    }

    fn fire_at(&mut self, at: Millis) -> Acts {
        self.now = at;
        self.sched.handle_timeout(at);
        self.finish_step("timeout")
    }

    // ----- reading the state --------------------------------------------------------------------------

    #[track_caller]
    pub fn record(&self, id: &str) -> &RequestRecord {
        self.sched
            .record(id)
            .unwrap_or_else(|| panic!("no record of {id}"))
    }

    #[track_caller]
    /// The arrival number of a request as last persisted.
    pub fn persisted_arrival(&self, id: &str) -> u64 {
        self.records
            .get(id)
            .unwrap_or_else(|| panic!("{id} was never persisted"))
            .arrival
    }

    pub fn phase(&self, id: &str) -> Phase {
        self.record(id).phase
    }

    /// The current (or last) fence of `id`.
    #[track_caller]
    pub fn fence(&self, id: &str) -> u64 {
        self.record(id)
            .fence
            .unwrap_or_else(|| panic!("{id} has no fence"))
            .0
    }

    pub fn status(&self) -> StatusView {
        self.sched.status(self.now)
    }

    /// The queue (queued and paused requests) in grant order.
    pub fn queue(&self) -> Vec<String> {
        self.status()
            .queue
            .into_iter()
            .map(|q| q.request_id.into_string())
            .collect()
    }

    /// The holders of `gpu`.
    pub fn holders(&self, gpu: &str) -> Vec<String> {
        self.status()
            .gpus
            .into_iter()
            .find(|g| g.id == gpu)
            .map(|g| {
                g.holders
                    .into_iter()
                    .map(|h| h.request_id.into_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The request ids that reached their end, with the kind of the terminal event.
    pub fn ended(&self) -> &HashMap<RequestId, EventKind> {
        &self.ended
    }

    /// The request ids that were accepted (had a `requested` event).
    pub fn requested(&self) -> impl Iterator<Item = &RequestId> {
        self.requested.keys()
    }

    /// Lets every timer run out (with no external VRAM left), then checks that every accepted request
    /// reached exactly one end and nothing is left live.
    /// NVML's sample of a GPU showing `mb` used outside the leases: what the leases hold plus `mb`.
    pub fn outside(&mut self, gpu: &str, mb: u64) -> Acts {
        let used_mb = mb + self.sched.held_mb(gpu);
        self.input(Input::GpuUsed {
            gpu: gpu.into(),
            used_mb,
        })
    }

    pub fn finish(&mut self) {
        let external: Vec<GpuId> = self
            .status()
            .gpus
            .iter()
            .filter(|g| g.external_mb > 0)
            .map(|g| g.id.clone())
            .collect();
        for gpu in external {
            self.outside(&gpu, 0);
        }
        let mut rounds = 0;
        while self.step_to_next_timeout().is_some() {
            rounds += 1;
            assert!(rounds < 100_000, "the scheduler keeps asking for timeouts");
        }
        assert_eq!(
            self.sched.live_count(),
            0,
            "requests left live with no timer to end them: {:#?}",
            self.status()
        );
        for id in self.requested.keys() {
            assert!(
                self.ended.contains_key(id),
                "request {id} never reached an end"
            );
        }
    }

    // ----- checks -------------------------------------------------------------------------------------

    /// Drains the actions of a step, updates the durable models and checks every invariant.
    fn finish_step(&mut self, what: &str) -> Acts {
        self.steps += 1;
        let mut acts = Acts::default();
        while let Some(action) = self.sched.poll_action() {
            acts.0.push(action);
        }
        if let Err(e) = self.check_step(&acts) {
            panic!(
                "invariant broken at step {} (t = T0 + {} ms) after {what}:\n{e}\nactions: {acts:#?}\nstatus: {:#?}",
                self.steps,
                self.now - T0,
                self.status()
            );
        }
        self.history.extend(acts.clone());
        acts
    }

    fn check_step(&mut self, acts: &Acts) -> Result<(), String> {
        self.sched.check_invariants()?;
        self.check_reclaims(acts)?;
        self.check_fences_and_leases(acts)?;
        self.check_ends(acts)?;
        self.check_outputs(acts)?;
        let status = self.status();
        self.check_capacity(&status, acts)?;
        self.check_no_idle_gpu(&status)?;
        if self.liveness {
            self.check_liveness(&status)?;
        }
        Ok(())
    }

    /// Fences strictly increase over all grants and resumes (restarts included); every grant and resume
    /// writes its lease; the lease store (modelled with compare-and-set on the fence) ends each step
    /// holding exactly the scheduler's leases.
    fn check_fences_and_leases(&mut self, acts: &Acts) -> Result<(), String> {
        let mut acquired: HashMap<&str, u64> = HashMap::new();
        for action in &acts.0 {
            match action {
                Action::Lease(LeaseOp::Acquire(lease)) => {
                    if lease.fence.0 <= self.last_acquired {
                        return Err(format!(
                            "lease of {} acquired with fence {}, not above the last one {}",
                            lease.request_id, lease.fence.0, self.last_acquired
                        ));
                    }
                    self.last_acquired = lease.fence.0;
                    acquired.insert(&lease.request_id, lease.fence.0);
                    if let Some(old) = self.store.get(&lease.request_id) {
                        return Err(format!(
                            "{} acquires a lease while it holds one: {old:?}",
                            lease.request_id
                        ));
                    }
                    self.store_insert(lease)?;
                }
                Action::Lease(LeaseOp::Restore(lease)) => {
                    if lease.fence.0 > self.sched.last_fence().0 {
                        return Err(format!("restored lease {lease:?} is above the last fence"));
                    }
                    self.store.remove(&lease.request_id);
                    self.store_insert(lease)?;
                }
                Action::Lease(LeaseOp::Renew {
                    request_id,
                    gpu,
                    fence,
                    expires_at,
                }) => match self.store.get_mut(request_id) {
                    Some(l) if l.fence == *fence && l.gpu == *gpu => l.expires_at = *expires_at,
                    other => {
                        return Err(format!(
                            "renew of {request_id} (fence {}) but the store has {other:?}",
                            fence.0
                        ))
                    }
                },
                // Compare-and-set: a release with another fence leaves the store as it is.
                Action::Lease(LeaseOp::Release {
                    request_id, fence, ..
                }) if self
                    .store
                    .get(request_id)
                    .is_some_and(|l| l.fence == *fence) =>
                {
                    self.store.remove(request_id);
                }
                Action::PersistFence(f) => {
                    if *f < self.max_fence {
                        return Err(format!(
                            "persisted fence {} below the persisted {}",
                            f.0, self.max_fence.0
                        ));
                    }
                    self.max_fence = *f;
                }
                Action::Persist(rec) => {
                    self.records.insert(rec.request_id.clone(), rec.clone());
                }
                _ => {}
            }
        }
        if self.max_fence.0 < self.last_acquired {
            return Err(format!(
                "fence {} was issued but only {} persisted",
                self.last_acquired, self.max_fence.0
            ));
        }
        if self.sched.last_fence().0 < self.last_acquired {
            return Err("the scheduler's last fence is below one it issued".into());
        }
        // Each new grant and resume carries the fence of a lease acquired in the same step.
        for event in acts.all_events() {
            if matches!(event.kind, EventKind::Granted | EventKind::Resumed) {
                let id = event.request_id.as_deref().unwrap_or_default();
                if event.fence.is_none() || acquired.get(id).copied() != event.fence {
                    return Err(format!(
                        "{:?} event of {id} with fence {:?} but no lease acquired with it",
                        event.kind, event.fence
                    ));
                }
            }
        }
        for (_, control) in acts.all_controls() {
            if control.action == ControlAction::Resume
                && acquired.get(control.request_id.as_str()) != Some(&control.fence)
            {
                return Err(format!(
                    "resume of {} with fence {} but no lease acquired with it",
                    control.request_id, control.fence
                ));
            }
        }
        for (_, reply) in acts.replies() {
            if reply.outcome == Outcome::Granted {
                let new = acquired.get(reply.request_id.as_str()).copied();
                if new.is_some() && reply.fence != new {
                    return Err(format!(
                        "granted reply of {} with fence {:?}, acquired {new:?}",
                        reply.request_id, reply.fence
                    ));
                }
            }
        }
        let want: BTreeMap<RequestId, Lease> = self
            .sched
            .leases()
            .into_iter()
            .map(|l| (l.request_id.clone(), l))
            .collect();
        // With node agents a GPU's size is what its host last said: a lease written before the
        // host was heard (a restart that lost the lease store) carries the size the scheduler knew
        // then. The store checks a lease's capacity only when it is written.
        let matches = if self.config.host_ttl_ms.is_some() {
            let sizeless = |l: &Lease| Lease {
                capacity_mb: 0,
                ..l.clone()
            };
            want.len() == self.store.len()
                && want
                    .iter()
                    .zip(&self.store)
                    .all(|((a, la), (b, lb))| a == b && sizeless(la) == sizeless(lb))
        } else {
            want == self.store
        };
        if !matches {
            return Err(format!(
                "the lease store does not match the scheduler's leases:\nstore: {:#?}\nscheduler: {want:#?}",
                self.store
            ));
        }
        Ok(())
    }

    fn store_insert(&mut self, lease: &Lease) -> Result<(), String> {
        let used: u64 = self
            .store
            .values()
            .filter(|l| l.gpu == lease.gpu)
            .map(|l| l.vram_mb)
            .sum();
        if used + lease.vram_mb > lease.capacity_mb {
            return Err(format!(
                "lease {lease:?} overbooks GPU {}: {used} MB already leased",
                lease.gpu
            ));
        }
        self.store.insert(lease.request_id.clone(), lease.clone());
        Ok(())
    }

    /// Every accepted request has one `requested` event and reaches exactly one end; nothing happens to
    /// a request after its end; a persisted end matches the terminal event.
    fn check_ends(&mut self, acts: &Acts) -> Result<(), String> {
        for event in acts.all_events() {
            let Some(id) = event.request_id.as_deref() else {
                continue;
            };
            if event.kind == EventKind::Requested {
                let n = self.requested.entry(id.into()).or_default();
                *n += 1;
                if *n > 1 {
                    // The id may come back only once its request ended and was forgotten (more than
                    // `retain_ended` requests ended since).
                    let accepted = self.requested.len() + self.ended.len();
                    if !self.ended.contains_key(id) || accepted <= self.config.retain_ended {
                        return Err(format!("request {id} was accepted twice"));
                    }
                    self.ended.remove(id);
                }
            }
            if let Some(end) = self.ended.get(id) {
                let after_end_ok = event.kind == EventKind::Rejected && event.priority.is_none();
                if !after_end_ok {
                    return Err(format!(
                        "{:?} event for {id} after its end ({end:?})",
                        event.kind
                    ));
                }
            }
            if is_terminal(event) {
                if !self.requested.contains_key(id) {
                    return Err(format!(
                        "{id} ends ({:?}) but was never requested",
                        event.kind
                    ));
                }
                self.ended.insert(id.into(), event.kind);
                // With few ended requests remembered, the id may be requested anew in the same step
                // (a deadline fires first, then the input): the record is then the new request's.
                let reused = acts
                    .all_events()
                    .iter()
                    .any(|e| e.kind == EventKind::Requested && e.request_id.as_deref() == Some(id));
                match self.sched.record(id) {
                    Some(rec) if rec.phase != Phase::Ended && !reused => {
                        return Err(format!(
                            "{id} has a {:?} event but is {:?}",
                            event.kind, rec.phase
                        ))
                    }
                    _ => {}
                }
            }
        }
        for event in acts.all_events() {
            if is_terminal(event) {
                let id = event.request_id.as_deref().unwrap_or_default();
                let persisted = acts.0.iter().any(|a| matches!(a, Action::Persist(rec) if rec.request_id == id && rec.phase == Phase::Ended));
                if !persisted {
                    return Err(format!(
                        "{id} ended ({:?}) but its end was not persisted",
                        event.kind
                    ));
                }
            }
        }
        for action in &acts.0 {
            if let Action::Persist(rec) = action {
                if rec.phase == Phase::Ended {
                    let want = rec.end.map(|e| e.as_str());
                    let got = self.ended.get(&rec.request_id).map(|k| k.as_str());
                    // An id ended and requested anew in one step: its end is this step's event.
                    let ended_here = acts.all_events().iter().any(|e| {
                        is_terminal(e)
                            && e.request_id.as_deref() == Some(rec.request_id.as_str())
                            && Some(e.kind.as_str()) == want
                    });
                    if !ended_here && (got.is_none() || got != want) {
                        return Err(format!(
                            "{} persisted as ended ({want:?}) with terminal event {got:?}",
                            rec.request_id
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Controls and the request's own events go to its service, in its encoding; a `pause` gives the
    /// configured deadline.
    fn check_outputs(&self, acts: &Acts) -> Result<(), String> {
        for action in &acts.0 {
            let (service, encoding, id) = match action {
                Action::Control {
                    service,
                    encoding,
                    control,
                } => {
                    if control.action == ControlAction::Pause
                        && control.deadline_ms != Some(self.config.ack_deadline_ms)
                    {
                        return Err(format!("pause with deadline {:?}", control.deadline_ms));
                    }
                    (service.as_str(), *encoding, control.request_id.as_str())
                }
                Action::Event { encoding, event } if event.priority.is_some() => (
                    event.service_id.as_str(),
                    *encoding,
                    event.request_id.as_deref().unwrap_or_default(),
                ),
                _ => continue,
            };
            let Some(rec) = self.records.get(id) else {
                return Err(format!("output about {id}, which was never persisted"));
            };
            // An id that ended and was requested anew in this step: the outputs about the old request
            // are checked against the new record; skip them.
            let reused = acts
                .all_events()
                .iter()
                .any(|e| e.kind == EventKind::Requested && e.request_id.as_deref() == Some(id))
                && acts
                    .all_events()
                    .iter()
                    .any(|e| is_terminal(e) && e.request_id.as_deref() == Some(id));
            if !reused && (rec.service_id != service || rec.encoding != encoding) {
                return Err(format!(
                    "output about {id} to {service} in {encoding:?}; the request is {}'s in {:?}",
                    rec.service_id, rec.encoding
                ));
            }
        }
        Ok(())
    }

    /// Held VRAM never exceeds a GPU; a request is never both holding and queued, nor on two GPUs; a
    /// GPU that got a lease this step fits it next to the external VRAM.
    fn check_capacity(&self, status: &StatusView, acts: &Acts) -> Result<(), String> {
        let mut seen = HashSet::new();
        let granted_on: HashSet<GpuId> = acts
            .lease_ops()
            .into_iter()
            .filter_map(|op| match op {
                LeaseOp::Acquire(l) => Some(l.gpu.clone()),
                _ => None,
            })
            .collect();
        for gpu in &status.gpus {
            let held: u64 = gpu.holders.iter().map(|h| h.vram_mb).sum();
            if held > gpu.total_mb {
                return Err(format!(
                    "GPU {} holds {held} MB of {} MB",
                    gpu.id, gpu.total_mb
                ));
            }
            if granted_on.contains(&gpu.id) && held + gpu.external_mb > gpu.total_mb {
                return Err(format!(
                    "GPU {} was granted with {held} MB held and {} MB external over {} MB",
                    gpu.id, gpu.external_mb, gpu.total_mb
                ));
            }
            for h in &gpu.holders {
                if !seen.insert(h.request_id.clone()) {
                    return Err(format!("{} holds two GPUs", h.request_id));
                }
                // Every timer due before now was fired: no lease outlives its expiry, no pause its
                // deadline. (One due now, set by this very input, fires at the next timeout; and a
                // lease store's answer is handled at the core's clock, which may be behind.)
                let rec = self.record(&h.request_id);
                if rec
                    .expires_at
                    .is_none_or(|at| at < self.now && !self.answer_step)
                {
                    return Err(format!(
                        "{} holds a lease past its expiry {:?}",
                        h.request_id, rec.expires_at
                    ));
                }
                // Pausing past the deadline is allowed while the lease runs (the expiry revokes it).
                if rec.phase == Phase::Pausing && rec.pause_deadline.is_none() {
                    return Err(format!("{} is pausing without a deadline", h.request_id));
                }
            }
        }
        // A grant or a resume never takes a service beyond its cap (a restart with a lower cap may
        // find one beyond it: it is then given nothing more).
        for op in acts.lease_ops() {
            if let LeaseOp::Acquire(lease) = op {
                let cap = self
                    .config
                    .services
                    .get(&lease.service_id)
                    .and_then(|p| p.max_vram_mb);
                let used = self.used_by(&lease.service_id, status);
                if let Some(cap) = cap.filter(|&cap| used > cap) {
                    return Err(format!(
                        "{} was granted and service {} holds {used} MB, beyond its cap of {cap} MB",
                        lease.request_id, lease.service_id
                    ));
                }
            }
        }
        for q in &status.queue {
            if seen.contains(&q.request_id) {
                return Err(format!("{} is both holding and queued", q.request_id));
            }
            if !seen.insert(q.request_id.clone()) {
                return Err(format!("{} is queued twice", q.request_id));
            }
        }
        Ok(())
    }

    /// The effective `min_hold_ms` of a service's holders.
    pub fn min_hold(&self, service: &str) -> u64 {
        self.config
            .services
            .get(service)
            .and_then(|p| p.min_hold_ms)
            .unwrap_or(self.config.min_hold_ms)
    }

    /// What a service's holders count against its cap: each one's `vram_mb`, a whole-GPU holder its
    /// GPU's capacity.
    pub fn used_by(&self, service: &str, status: &StatusView) -> u64 {
        status
            .gpus
            .iter()
            .flat_map(|g| g.holders.iter().map(move |h| (g, h)))
            .filter(|(_, h)| h.service_id == service)
            .map(|(g, h)| {
                self.sched
                    .record(&h.request_id)
                    .and_then(|r| r.vram_mb)
                    .unwrap_or(g.total_mb)
            })
            .sum()
    }

    /// Whether the queued `rec` waits on GPU `g` for its service's cap (the rule written in
    /// docs/scheduling.md, "A service's cap"): its service's first waiting request in grant order does not fit under it on any GPU
    /// it may use, or `rec` does not fit under it there with what its service holds and the room that
    /// first request keeps.
    pub fn held_back_by_cap(&self, rec: &RequestRecord, g: usize, status: &StatusView) -> bool {
        let Some(cap) = self
            .config
            .services
            .get(&rec.service_id)
            .and_then(|p| p.max_vram_mb)
        else {
            return false;
        };
        let used = self.used_by(&rec.service_id, status);
        let head = status
            .queue
            .iter()
            .find(|q| q.service_id == rec.service_id)
            .and_then(|q| self.sched.record(&q.request_id));
        let mut kept = 0;
        if let Some(head) = head.filter(|h| h.request_id != rec.request_id) {
            // The first waiting request keeps its room under the cap.
            let least = self
                .allowed(head, status)
                .into_iter()
                .map(|h| head.vram_mb.unwrap_or(status.gpus[h].total_mb))
                .min()
                .unwrap_or(u64::MAX);
            if used.saturating_add(least) > cap {
                return true;
            }
            kept = least;
        }
        used + kept + rec.vram_mb.unwrap_or(status.gpus[g].total_mb) > cap
    }

    /// Follows the reclaims of a step: a reclaim is a `pause` whose reason says so, and its event
    /// names the service it is for; once the reclaiming request is granted (or resumed), the services
    /// it reclaimed from may not reclaim from its service for its grace. Checks that no reclaim undoes
    /// one of the same pair sooner, and that a reclaim is only for a request within its service's
    /// guarantee, from a service that borrows.
    fn check_reclaims(&mut self, acts: &Acts) -> Result<(), String> {
        for action in &acts.0 {
            match action {
                Action::Control {
                    service: victim,
                    control,
                    ..
                } => {
                    let Reason::Preempted {
                        request_id,
                        service_id: reclaimer,
                        reclaim: Some(guaranteed),
                        ..
                    } = &control.reason
                    else {
                        continue;
                    };
                    let want = self.guarantee(reclaimer);
                    if *guaranteed != want || want == 0 {
                        return Err(format!(
                            "a reclaim for {reclaimer}'s guarantee of {guaranteed} MB, configured {want}"
                        ));
                    }
                    if victim == reclaimer {
                        return Err(format!("{reclaimer} reclaims from itself"));
                    }
                    if let Some(&until) = self
                        .guards
                        .get(&(victim.clone(), reclaimer.clone()))
                        .filter(|&&until| until > self.now)
                    {
                        return Err(format!(
                            "{reclaimer} reclaims from {victim} at T0 + {} ms, though {victim} \
                             reclaimed from it until T0 + {} ms (its grace)",
                            self.now - T0,
                            until - T0
                        ));
                    }
                    let event = acts.all_events().into_iter().find(|e| {
                        e.kind == EventKind::Preempting
                            && e.request_id.as_deref() == Some(control.request_id.as_str())
                    });
                    if event.and_then(|e| e.reclaim_for.as_ref()) != Some(reclaimer) {
                        return Err(format!(
                            "the preempting event of {} does not say it is a reclaim for {reclaimer}",
                            control.request_id
                        ));
                    }
                    self.reclaims
                        .push((self.now, reclaimer.clone(), victim.clone()));
                    let from = self.reclaiming.entry(request_id.clone()).or_default();
                    if !from.contains(victim) {
                        from.push(victim.clone());
                    }
                }
                Action::Event { event, .. }
                    if matches!(event.kind, EventKind::Granted | EventKind::Resumed) =>
                {
                    let id = event.request_id.clone().unwrap_or_default();
                    if let Some(from) = self.reclaiming.remove(&id) {
                        let hold = self.min_hold(&event.service_id);
                        if hold > 0 {
                            for victim in from {
                                self.guards
                                    .insert((event.service_id.clone(), victim), self.now + hold);
                            }
                        }
                    }
                }
                Action::Event { event, .. } if is_terminal(event) => {
                    if let Some(id) = &event.request_id {
                        self.reclaiming.remove(id);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A service's `guaranteed_vram_mb`.
    pub fn guarantee(&self, service: &str) -> u64 {
        self.config
            .services
            .get(service)
            .map_or(0, |p| p.guaranteed_vram_mb)
    }

    /// What a service's pausing holders count against its guarantee.
    fn pausing_by(&self, service: &str, status: &StatusView) -> u64 {
        status
            .gpus
            .iter()
            .flat_map(|g| g.holders.iter().map(move |h| (g, h)))
            .filter(|(_, h)| h.service_id == service && h.state == HolderState::Pausing)
            .map(|(g, h)| {
                self.sched
                    .record(&h.request_id)
                    .and_then(|r| r.vram_mb)
                    .unwrap_or(g.total_mb)
            })
            .sum()
    }

    /// What a service borrows: what its active holders hold beyond its guarantee (without
    /// guarantees configured, all it holds: the rules are then today's).
    fn borrowed(&self, service: &str, status: &StatusView) -> u64 {
        let active = self.used_by(service, status) - self.pausing_by(service, status);
        active.saturating_sub(self.guarantee(service))
    }

    /// Whether `rec`, waiting, is its service's first waiting request and fits within its
    /// service's guarantee on GPU `g` (it then reclaims).
    fn first_within_guarantee(&self, rec: &RequestRecord, g: usize, status: &StatusView) -> bool {
        let guarantee = self.guarantee(&rec.service_id);
        let first = status
            .queue
            .iter()
            .find(|q| q.service_id == rec.service_id)
            .is_some_and(|q| q.request_id == rec.request_id);
        let cap = self
            .config
            .services
            .get(&rec.service_id)
            .and_then(|p| p.max_vram_mb);
        let after =
            self.used_by(&rec.service_id, status) + rec.vram_mb.unwrap_or(status.gpus[g].total_mb);
        first && after <= guarantee && cap.is_none_or(|cap| after <= cap)
    }

    /// Whether a waiting `rec` may be within its service's guarantee on GPU `g` and so be taken in
    /// the guarantees' pass, which may reserve `g` ahead of the grant order: its service is under its
    /// guarantee, and `rec` alone fits within it there.
    fn maybe_within_guarantee(&self, rec: &RequestRecord, g: usize, status: &StatusView) -> bool {
        let guarantee = self.guarantee(&rec.service_id);
        self.used_by(&rec.service_id, status) + rec.vram_mb.unwrap_or(status.gpus[g].total_mb)
            <= guarantee
    }

    /// The GPUs a queued request may use at all (its pin, and big enough for its VRAM).
    fn allowed(&self, rec: &RequestRecord, status: &StatusView) -> Vec<usize> {
        let host = rec.gpu_pin.as_deref().and_then(|p| p.strip_suffix("/*"));
        (0..status.gpus.len())
            .filter(|&g| match host {
                Some(host) => status.gpus[g].host.as_deref() == Some(host),
                None => rec.gpu_pin.as_ref().is_none_or(|p| *p == status.gpus[g].id),
            })
            .filter(|&g| rec.vram_mb.is_none_or(|v| v <= status.gpus[g].total_mb))
            .collect()
    }

    /// A GPU with no holder is never left idle while a queued request fits it: the first request in
    /// grant order that may use it (nothing before it can have reserved it) does not fit it.
    fn check_no_idle_gpu(&self, status: &StatusView) -> Result<(), String> {
        let fits_on = |rec: &RequestRecord, gpu: &GpuView| match rec.vram_mb {
            Some(v) => v <= gpu.free_mb,
            None => gpu.free_mb > 0,
        };
        for (g, gpu) in status.gpus.iter().enumerate() {
            // A GPU waiting for NVML to see paused VRAM freed takes no grant, on purpose.
            // Nor does a GPU whose host's agent is silent.
            if !gpu.holders.is_empty()
                || self.sched.settling(&gpu.id)
                || gpu.reachable == Some(false)
            {
                continue;
            }
            // A request that waits for its own service's leases to end (its cap) reserves nothing.
            let first = status.queue.iter().find_map(|q| {
                let rec = self.sched.record(&q.request_id)?;
                (self.allowed(rec, status).contains(&g) && !self.held_back_by_cap(rec, g, status))
                    .then_some(rec)
            });
            if let Some(rec) = first {
                if fits_on(rec, gpu) {
                    return Err(format!(
                        "GPU {} is idle while {} fits it",
                        gpu.id, rec.request_id
                    ));
                }
            }
        }
        Ok(())
    }

    /// A more urgent request never waits on less urgent preemptible holders longer than the ACK
    /// deadline (or, for a holder that missed it, than its lease): whenever a queued request R that nothing ahead of it in grant order competes with
    /// could fit on some GPU by pausing strictly less urgent, preemptible, active holders (old enough
    /// for `min_hold_ms`), then within `ack_deadline_ms` it is granted or those holders are pausing or
    /// gone. (Aging must be off: it orders the queue, and a request aged ahead of R may hold R back.)
    fn check_liveness(&mut self, status: &StatusView) -> Result<(), String> {
        let mut waiting = HashMap::new();
        let records: Vec<&RequestRecord> = status
            .queue
            .iter()
            .filter_map(|q| self.sched.record(&q.request_id))
            .collect();
        for (i, rec) in records.iter().enumerate() {
            // A holder that did not ACK by its deadline is revoked when its lease runs out: a GPU
            // with one is waited on for that lease, not for the deadline.
            let by_preemption: Vec<usize> = self
                .allowed(rec, status)
                .into_iter()
                .filter(|&g| !self.held_back_by_cap(rec, g, status))
                .filter(|&g| self.fits_by_preemption(rec, g, status))
                .filter(|&g| !self.missed_a_deadline(&status.gpus[g]))
                .collect();
            if by_preemption.is_empty() {
                continue;
            }
            // Ahead of it: the requests before it in grant order, unless it is taken in the
            // guarantees' pass; and any request that may be taken in that pass.
            let reclaiming = by_preemption
                .iter()
                .any(|&g| self.first_within_guarantee(rec, g, status));
            let obstructed = records.iter().enumerate().any(|(j, other)| {
                j != i
                    && self.allowed(other, status).iter().any(|&g| {
                        by_preemption.contains(&g)
                            && ((j < i && !reclaiming)
                                || self.maybe_within_guarantee(other, g, status))
                    })
            });
            if obstructed {
                continue;
            }
            // A pause in flight (its deadline not passed) is progress: the wait is counted from when
            // none is, so that a victim that misses its deadline is followed by another pause within
            // the deadline.
            let in_flight = self.allowed(rec, status).into_iter().any(|g| {
                status.gpus[g].holders.iter().any(|h| {
                    self.sched.record(&h.request_id).is_some_and(|r| {
                        r.phase == Phase::Pausing && r.pause_deadline.is_some_and(|d| d > self.now)
                    })
                })
            });
            if in_flight {
                waiting.insert(rec.request_id.clone(), self.now);
                continue;
            }
            let since = self
                .waiting_since
                .get(&rec.request_id)
                .copied()
                .unwrap_or(self.now);
            if self.now - since > self.config.ack_deadline_ms {
                return Err(format!(
                    "{} (priority {}) has waited {} ms on less urgent preemptible holders (ACK deadline {} ms)",
                    rec.request_id,
                    rec.priority,
                    self.now - since,
                    self.config.ack_deadline_ms
                ));
            }
            waiting.insert(rec.request_id.clone(), since);
        }
        self.waiting_since = waiting;
        Ok(())
    }

    /// Whether a holder on `gpu` is pausing past its ACK deadline.
    fn missed_a_deadline(&self, gpu: &GpuView) -> bool {
        gpu.holders.iter().any(|h| {
            self.sched.record(&h.request_id).is_some_and(|r| {
                r.phase == Phase::Pausing && r.pause_deadline.is_some_and(|d| d <= self.now)
            })
        })
    }

    /// Whether `rec` fits `gpu` only by pausing active holders it may preempt.
    /// The rules of who may be paused, written again from docs/scheduling.md: by priority, a less urgent
    /// holder, but a request that borrows only one of a service that borrows too; by reclaim, for the
    /// first waiting request of a service within its guarantee, a holder of another service that
    /// borrows (and has not been reclaimed from by it within its grace); never one that is not
    /// preemptible or within its grace. A holder paused because its service borrows is counted only
    /// when all such holders of its service can be paused while it still borrows, whatever the
    /// order (else the scheduler's order decides, which this check does not follow).
    fn fits_by_preemption(&self, rec: &RequestRecord, g: usize, status: &StatusView) -> bool {
        let gpu = &status.gpus[g];
        let guarantees = self.config.services.guarantee_vram();
        let within = guarantees && self.first_within_guarantee(rec, g, status);
        let mut free = gpu.free_mb;
        let mut others = 0usize;
        let mut victims_mb = 0;
        let mut victims = 0usize;
        // Per service: the holders that may be paused only while it borrows, and their VRAM.
        let mut by_borrowing: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for h in &gpu.holders {
            let Some(holder) = self.sched.record(&h.request_id) else {
                continue;
            };
            if holder.phase == Phase::Pausing {
                free += h.vram_mb;
                continue;
            }
            let graceful = holder.preemptible
                && holder.granted_at.unwrap_or(0) + self.min_hold(&holder.service_id) <= self.now;
            let borrows = !guarantees || self.borrowed(&holder.service_id, status) > 0;
            let by_priority = holder.priority > rec.priority && (within || borrows);
            let by_reclaim = within
                && borrows
                && holder.service_id != rec.service_id
                && self
                    .guards
                    .get(&(holder.service_id.clone(), rec.service_id.clone()))
                    .is_none_or(|&until| until <= self.now);
            if !graceful || !(by_priority || by_reclaim) {
                others += 1;
            } else if guarantees && (!by_priority || !within) {
                by_borrowing
                    .entry(&holder.service_id)
                    .or_default()
                    .push((h.vram_mb, rec_charge(holder, gpu.total_mb)));
            } else {
                victims += 1;
                victims_mb += h.vram_mb;
            }
        }
        for (service, holders) in by_borrowing {
            let charged: u64 = holders.iter().map(|&(_, c)| c).sum();
            let smallest = holders.iter().map(|&(_, c)| c).min().unwrap_or(0);
            if self.borrowed(service, status) > charged - smallest {
                victims += holders.len();
                victims_mb += holders.iter().map(|&(mb, _)| mb).sum::<u64>();
            } else {
                others += holders.len();
            }
        }
        let fits = |free: u64, holders: usize| match rec.vram_mb {
            Some(v) => v <= free,
            None => holders == 0,
        };
        victims > 0 && !fits(free, others + victims) && fits(free + victims_mb, others)
    }
}
