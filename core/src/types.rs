//! The core's vocabulary: ids, configuration, inputs, actions and the records it persists.

use std::collections::BTreeMap;

use gpu_coordinator_wire::{AckAction, Encoding, Inbound, Rejection};

use crate::ids::{GpuId, RequestId, ServiceId};
use crate::outputs::{ControlOut, EventOut, ReplyOut};

/// Milliseconds since the Unix epoch. The core never reads a clock: every input carries `now`.
pub type Millis = u64;

/// A fencing token. Strictly increasing over the deployment's whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Fence(pub u64);

/// A GPU's capacity, from configuration or NVML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSpec {
    pub id: GpuId,
    pub total_mb: u64,
}

/// One GPU of a host, as its node agent sampled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGpu {
    /// Its id on its host: the scheduler names it `<host>/<id>`.
    pub id: String,
    pub uuid: Option<String>,
    pub total_mb: u64,
    /// VRAM used on it, whoever uses it, in MB.
    pub used_mb: u64,
    /// Where the figures come from (NVML, or the agent's configuration for simulated GPUs).
    pub source: gpu_coordinator_wire::VramSource,
}

/// The scheduling options (the `lease`, `preemption`, `request` and `queue` configuration keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedConfig {
    /// `lease.default_ms`: lease length when a request names none.
    pub lease_default_ms: u64,
    /// `lease.max_ms`: the cap on any lease length.
    pub lease_max_ms: u64,
    /// `preemption.ack_deadline_ms`: how long a holder has to ACK a `pause`.
    pub ack_deadline_ms: u64,
    /// `preemption.min_hold_ms`: a holder is not paused before it held this long (0: off).
    pub min_hold_ms: u64,
    /// `request.default_timeout_ms`: longest wait for a grant when a request names none.
    pub default_timeout_ms: u64,
    /// `queue.aging_ms`: each full period waited counts one level more urgent in grant order (0: off).
    pub aging_ms: u64,
    /// How many ended requests are remembered to answer a repeated `request_id`.
    pub retain_ended: usize,
    /// After a pause ACK, how long a GPU waits for an [`Input::ExternalVram`] sample showing the paused
    /// holder's VRAM freed before it grants anyway, with a warning (0: off; on only with NVML).
    pub settle_ms: u64,
    /// `nodes.ttl_ms` when node agents report the GPUs (`nodes.agents`): GPUs join with their host's
    /// first [`Input::HostSample`], and a host silent this long takes no new grants until it is heard
    /// again. `None`: the GPUs given at start are all there are.
    pub host_ttl_ms: Option<u64>,
    /// `queue.max_per_service`: the most live (queued, paused or holding) requests one service may
    /// have; one more is rejected with an error that names the limit.
    pub max_per_service: usize,
    /// `[services]`: what each service may ask for.
    pub services: ServicePolicies,
}

/// What one service may ask for: its `[services.<id>]` section, its unset keys taken from
/// `[services.default]`. The default is today's behaviour: no limit, no default, no guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePolicy {
    /// `max_priority`: the most urgent priority (the lowest number) its requests may give; `None`:
    /// any.
    pub max_priority: Option<u8>,
    /// `clamp_priority`: a request more urgent than `max_priority` is taken at `max_priority`
    /// rather than rejected.
    pub clamp_priority: bool,
    /// `default_priority`: the priority of a request that gives none. The wire contract requires
    /// `priority`, so only the HTTP API, where a body may leave it out, applies it (it fills it in
    /// before the input is stored); the core checks what it then gets like any other priority.
    pub default_priority: Option<u8>,
    /// `default_vram_mb`: the VRAM of a request that gives none (instead of the whole GPU).
    pub default_vram_mb: Option<u64>,
    /// `default_lease_ms`: the lease of a request that gives none (instead of `lease.default_ms`;
    /// capped by `lease.max_ms` all the same).
    pub default_lease_ms: Option<u64>,
    /// `max_vram_mb`: the most VRAM its live leases may hold together, over every GPU (a whole-GPU
    /// lease counts the GPU's capacity). A request beyond it waits; one that alone is beyond it is
    /// rejected.
    pub max_vram_mb: Option<u64>,
    /// `guaranteed_vram_mb`: VRAM it may always take back from services over their own guarantee,
    /// whatever their priority (0: none).
    pub guaranteed_vram_mb: u64,
    /// `min_hold_ms`: its holders are not paused before they held this long; `None`:
    /// `preemption.min_hold_ms`.
    pub min_hold_ms: Option<u64>,
    /// `preemptible`: `false`, its holders are never paused (a lease ends by release, revoke or
    /// expiry only), whatever its requests say.
    pub preemptible: bool,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            max_priority: None,
            clamp_priority: false,
            default_priority: None,
            default_vram_mb: None,
            default_lease_ms: None,
            max_vram_mb: None,
            guaranteed_vram_mb: 0,
            min_hold_ms: None,
            preemptible: true,
        }
    }
}

impl ServicePolicy {
    /// Whether it limits or guarantees VRAM (so that the scheduler keeps its waiting requests in an
    /// order of their own).
    pub fn limits_vram(&self) -> bool {
        self.max_vram_mb.is_some() || self.guaranteed_vram_mb > 0
    }
}

/// `[services]`: the policy of each named service, and of every other service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePolicies {
    /// `[services.<id>]`, resolved over `[services.default]`.
    pub named: BTreeMap<String, ServicePolicy>,
    /// A service without a section: `[services.default]`, or `None` when `services.allow_unknown` is
    /// false (its requests are rejected).
    pub others: Option<ServicePolicy>,
}

impl Default for ServicePolicies {
    fn default() -> Self {
        ServicePolicies {
            named: BTreeMap::new(),
            others: Some(ServicePolicy::default()),
        }
    }
}

impl ServicePolicies {
    /// The policy of `service`; `None`: it is refused (no section, and unknown services are not
    /// allowed).
    pub fn get(&self, service: &str) -> Option<&ServicePolicy> {
        self.named.get(service).or(self.others.as_ref())
    }

    /// Whether any service has a cap or a guarantee.
    pub fn limit_vram(&self) -> bool {
        self.named
            .values()
            .chain(self.others.iter())
            .any(ServicePolicy::limits_vram)
    }

    /// Whether any service has a guarantee.
    pub fn guarantee_vram(&self) -> bool {
        self.named
            .values()
            .chain(self.others.iter())
            .any(|p| p.guaranteed_vram_mb > 0)
    }
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            host_ttl_ms: None,
            lease_default_ms: 30_000,
            lease_max_ms: 3_600_000,
            ack_deadline_ms: 10_000,
            min_hold_ms: 0,
            default_timeout_ms: 60_000,
            aging_ms: 0,
            retain_ended: 100_000,
            settle_ms: 0,
            max_per_service: 10_000,
            services: ServicePolicies::default(),
        }
    }
}

/// What the driver feeds the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A decoded, valid message from `<svc>`, in the encoding it came in.
    Inbound {
        service: String,
        encoding: Encoding,
        input: Inbound,
    },
    /// A message that could not be accepted: it gets a `rejected` reply and event.
    Invalid(Rejection),
    /// VRAM used on a GPU as NVML samples it, in MB, whoever uses it: the core works out the use
    /// outside its leases (this figure minus what its leases hold there, never below zero).
    GpuUsed { gpu: GpuId, used_mb: u64 },
    /// A node agent's sample of its host's GPUs, heard at `heard_at` (with node agents, see
    /// [`SchedConfig::host_ttl_ms`]): also its heartbeat.
    HostSample {
        host: String,
        heard_at: Millis,
        gpus: Vec<HostGpu>,
    },
    /// What the lease store holds now. The core answers with a `Release` for every stored lease it does
    /// not hold under that fence, and a `Restore` for each of its unexpired leases the store lacks, in
    /// fence order (the store refuses a fence below the highest it has seen). Nothing when they agree.
    LeaseStoreHolds { leases: Vec<Lease> },
    /// The lease store answered a `Renew` with "not held" (it lost the lease): the core writes the
    /// lease back if it still holds it under `fence`, else does nothing.
    LeaseNotHeld { request_id: RequestId, fence: Fence },
    /// The lease store refused a lease the core granted (another holder is in its place): the core
    /// revokes it.
    LeaseRefused {
        request_id: RequestId,
        fence: Fence,
        why: String,
    },
}

impl Input {
    /// Whether it is the lease store's answer to writes the core decided before (see
    /// [`crate::Scheduler::handle_inputs`]).
    pub fn answers_the_lease_store(&self) -> bool {
        matches!(
            self,
            Input::LeaseNotHeld { .. } | Input::LeaseRefused { .. }
        )
    }
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Waiting in the queue for a first grant.
    Queued,
    /// Holding a lease and running.
    Active,
    /// Holding a lease, asked to pause, ACK not yet in.
    Pausing,
    /// Paused: no lease, back in the queue, waiting for `resume`.
    Paused,
    /// Ended; the outcome says how.
    Ended,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Active => "active",
            Phase::Pausing => "pausing",
            Phase::Paused => "paused",
            Phase::Ended => "ended",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "queued" => Phase::Queued,
            "active" => Phase::Active,
            "pausing" => Phase::Pausing,
            "paused" => Phase::Paused,
            "ended" => Phase::Ended,
            _ => return None,
        })
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    Released,
    TimedOut,
    Cancelled,
    Revoked,
    Rejected,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Released => "released",
            End::TimedOut => "timed_out",
            End::Cancelled => "cancelled",
            End::Revoked => "revoked",
            End::Rejected => "rejected",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "released" => End::Released,
            "timed_out" => End::TimedOut,
            "cancelled" => End::Cancelled,
            "revoked" => End::Revoked,
            "rejected" => End::Rejected,
            _ => return None,
        })
    }
}

/// Everything the core knows of one request: what is persisted (one row per request) and restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub request_id: RequestId,
    pub service_id: ServiceId,
    pub priority: u8,
    /// Arrival number: unique, never reused; grant order among equal priorities. (Not an input's
    /// position in the input stream, which the driver calls the stream sequence.)
    pub arrival: u64,
    pub encoding: Encoding,
    /// `None`: the whole GPU.
    pub vram_mb: Option<u64>,
    /// A pinned GPU.
    pub gpu_pin: Option<GpuId>,
    pub preemptible: bool,
    /// The request's `pause_ms` hint: how long the holder says it takes to pause. It only breaks ties
    /// between holders the rules would pause alike (see [`crate::Scheduler`]); `None`: unknown, taken
    /// as slower than any known value.
    pub pause_ms: Option<u64>,
    /// The lease length granted on each grant or resume.
    pub lease_ms: u64,
    pub requested_at: Millis,
    /// When a queued request times out (`requested_at + timeout_ms`).
    pub timeout_at: Millis,
    pub phase: Phase,
    /// The GPU held (Active, Pausing) or last held (Paused, and Ended after a grant).
    pub gpu: Option<GpuId>,
    /// VRAM counted against `gpu` while held.
    pub held_mb: Option<u64>,
    /// The current (or last) fence.
    pub fence: Option<Fence>,
    pub granted_at: Option<Millis>,
    pub expires_at: Option<Millis>,
    /// While Pausing: when the ACK is due.
    pub pause_deadline: Option<Millis>,
    /// While Paused: since when.
    pub paused_at: Option<Millis>,
    /// When first granted: how long it waited.
    pub waited_ms: Option<u64>,
    pub end: Option<End>,
    pub ended_at: Option<Millis>,
    /// Why it ended, for a person.
    pub detail: Option<String>,
    /// When it ended rejected: why, for a program.
    pub code: Option<gpu_coordinator_wire::RejectCode>,
}

/// A lease as the lease store (Redis) holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub request_id: RequestId,
    pub service_id: ServiceId,
    pub gpu: GpuId,
    pub fence: Fence,
    pub vram_mb: u64,
    /// The GPU's capacity, for the store's own capacity check.
    pub capacity_mb: u64,
    pub expires_at: Millis,
}

/// A change to the lease store. Each is conditional on the fence (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOp {
    /// Write a new lease (grant or resume), checking capacity and that the fence is new.
    Acquire(Lease),
    /// Extend a lease whose fence matches.
    Renew {
        request_id: RequestId,
        gpu: GpuId,
        fence: Fence,
        expires_at: Millis,
    },
    /// Delete a lease whose fence matches (release, pause ACK, revoke, expiry).
    Release {
        request_id: RequestId,
        gpu: GpuId,
        fence: Fence,
    },
    /// Write back a lease the store lost (it restarted empty, or the coordinator stopped between its
    /// Postgres commit and the store): same checks as `Acquire`, but the fence may equal the stored one.
    Restore(Lease),
}

/// What the core asks the driver to carry out, in this order of durability: persist, then the lease store,
/// then publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Upsert this request's row.
    Persist(RequestRecord),
    /// Record the highest fence issued so far.
    PersistFence(Fence),
    /// Change the lease store.
    Lease(LeaseOp),
    /// Publish on `<prefix>.reply.<service>`.
    Reply {
        service: ServiceId,
        encoding: Encoding,
        reply: ReplyOut,
    },
    /// Publish on `<prefix>.control.<service>`.
    Control {
        service: ServiceId,
        encoding: Encoding,
        control: ControlOut,
    },
    /// Publish on `<prefix>.event.<kind>.<service>`.
    Event { encoding: Encoding, event: EventOut },
}

/// What the driver hands the core at start: the durable state (Postgres) and the live leases (Redis).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every request not ended, and recently ended ones (to answer repeated ids).
    pub requests: Vec<RequestRecord>,
    /// The highest fence ever issued (Postgres and the lease store, whichever is higher).
    pub max_fence: Fence,
    /// The leases the lease store holds now.
    pub leases: Vec<Lease>,
    /// The highest arrival number ever given (ended requests that were not reloaded included), so that
    /// arrival numbers are never reused.
    pub max_arrival: u64,
}

/// An ACK's action, re-exported for the driver.
pub type AckKind = AckAction;
