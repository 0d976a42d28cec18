//! What the core tells the world, as typed domain values: ids, instants as [`Millis`], fences as
//! numbers, outcomes, kinds and reasons as enums. Rendering them into subjects, JSON or MessagePack, with
//! RFC 3339 instants, is the driver's business (`src/render.rs`), done once at the edge; metrics read
//! these values, never rendered text.
//!
//! The field names follow the wire contract's documents, so that the render step is a plain mapping.

use std::fmt;

use gpu_coordinator_wire::{
    ControlAction, EventKind, HolderState, Outcome, RejectCode, VramSource,
};

use crate::ids::{GpuId, RequestId, ServiceId};
use crate::types::Millis;

/// The answer to a request, for `<prefix>.reply.<svc>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyOut {
    pub request_id: RequestId,
    pub outcome: Outcome,
    pub gpu: Option<GpuId>,
    pub fence: Option<u64>,
    pub lease_ms: Option<u64>,
    pub expires_at: Option<Millis>,
    pub vram_mb: Option<u64>,
    pub waited_ms: Option<u64>,
    /// Why it was rejected, for a person.
    pub error: Option<String>,
    /// Why it was rejected, for a program.
    pub code: Option<RejectCode>,
}

impl ReplyOut {
    /// A reply with only the request and the outcome.
    pub fn new(request_id: &str, outcome: Outcome) -> ReplyOut {
        ReplyOut {
            request_id: request_id.into(),
            outcome,
            gpu: None,
            fence: None,
            lease_ms: None,
            expires_at: None,
            vram_mb: None,
            waited_ms: None,
            error: None,
            code: None,
        }
    }
}

/// Why an order is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A more urgent request needs the GPU (`pause`); or, with `reclaim`, a request within its
    /// service's guarantee (of that many MB) takes back VRAM that the holder's service borrowed.
    Preempted {
        request_id: RequestId,
        service_id: ServiceId,
        priority: u8,
        reclaim: Option<u64>,
    },
    /// The GPU is free again (`resume`).
    Free,
    /// The lease ran out: neither renewed nor released (`revoke`).
    Expired,
    /// The holder did not ACK its pause in time (`revoke`).
    NoPauseAck { deadline_ms: u64 },
    /// The lease store refused the lease (`revoke`).
    Refused { why: String },
    /// The GPU it held is no longer managed (`revoke`, after a restart with another inventory).
    GpuRemoved,
    /// A paused request can no longer be placed on any GPU (after a restart with another inventory).
    Unplaceable { why: String },
    /// The watchdog asks for a restart after an expiry (`restart`).
    RestartAfterExpiry,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Preempted {
                request_id,
                service_id,
                priority,
                reclaim: None,
            } => write!(
                f,
                "request `{request_id}` of `{service_id}` at priority {priority} needs the GPU"
            ),
            Reason::Preempted {
                request_id,
                service_id,
                priority,
                reclaim: Some(guaranteed_mb),
            } => write!(
                f,
                "request `{request_id}` of `{service_id}` at priority {priority} takes back VRAM \
                 within its guarantee of {guaranteed_mb} MB, which this holder's service borrowed \
                 beyond its own"
            ),
            Reason::Free => f.write_str("the GPU is free again: reload and go on"),
            Reason::Expired => {
                f.write_str("the lease expired: it was neither renewed nor released")
            }
            Reason::NoPauseAck { deadline_ms } => {
                write!(f, "no pause ACK within the deadline ({deadline_ms} ms)")
            }
            Reason::Refused { why } => write!(f, "the lease store refused the lease: {why}"),
            Reason::GpuRemoved => f.write_str("its GPU is no longer managed by this coordinator"),
            Reason::Unplaceable { why } => write!(f, "it can no longer be resumed: {why}"),
            Reason::RestartAfterExpiry => f.write_str("the lease expired: restart the service"),
        }
    }
}

/// An order to a holder, for `<prefix>.control.<svc>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlOut {
    pub action: ControlAction,
    pub request_id: RequestId,
    pub fence: u64,
    /// For `pause`: how long the holder has to ACK.
    pub deadline_ms: Option<u64>,
    pub reason: Reason,
    /// For `resume`: the new lease.
    pub lease_ms: Option<u64>,
    pub expires_at: Option<Millis>,
    pub gpu: Option<GpuId>,
}

/// A change of state, for `<prefix>.event.<kind>.<svc>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOut {
    pub at: Millis,
    pub kind: EventKind,
    pub request_id: Option<RequestId>,
    pub service_id: ServiceId,
    /// `None` on the rejection of an input that is not a request's own (it changes no request).
    pub priority: Option<u8>,
    pub gpu: Option<GpuId>,
    pub fence: Option<u64>,
    pub detail: Option<String>,
    /// On a first `granted`: how long the request waited (for metrics; the detail says it too).
    pub waited_ms: Option<u64>,
    /// On `preempting`: the pause is a reclaim, for this service's guarantee (priority alone would
    /// not have paused the holder).
    pub reclaim_for: Option<ServiceId>,
    /// On `rejected`: why, for a program.
    pub code: Option<RejectCode>,
    /// On `granted` and `resumed`: the GPU's capacity then, in MB (with node agents the GPUs are
    /// known only from their hosts, so the history says what each held against).
    pub capacity_mb: Option<u64>,
}

/// What the core holds now: each GPU with its VRAM and holders, the paused requests, the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    pub at: Millis,
    pub vram_source: VramSource,
    pub gpus: Vec<GpuView>,
    pub paused: Vec<PausedView>,
    /// One page of the queue in grant order (see [`QueuePage`]).
    pub queue: Vec<QueueView>,
    /// How many requests the whole queue holds (queued and paused).
    pub queue_total: u64,
    /// How many entries come before the page.
    pub queue_offset: u64,
    /// The whole queue counted by priority and GPU (the pinned GPU of a queued request, `None`: any;
    /// the GPU of a paused one), in that order.
    pub queue_counts: Vec<QueueCountView>,
    /// Each service with a `[services.<id>]` section, and each other service that holds VRAM, by id:
    /// what it holds against its guarantee and cap.
    pub services: Vec<ServiceView>,
    /// With node agents: each host heard, by name.
    pub hosts: Vec<HostView>,
}

/// A host of the fleet (node agents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub host: String,
    /// Heard within the TTL: its GPUs take grants.
    pub up: bool,
    pub last_sample_age_ms: u64,
    pub gpus: u64,
}

/// A service's VRAM against its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub service_id: ServiceId,
    /// What its holders (active and pausing) hold, as its cap and guarantee count it (a whole-GPU
    /// holder counts its GPU's capacity).
    pub used_mb: u64,
    /// What its active holders hold beyond its guarantee (all they hold, without one).
    pub borrowed_mb: u64,
    /// `guaranteed_vram_mb`, when it has one.
    pub guaranteed_mb: Option<u64>,
    /// `max_vram_mb`, when it has one.
    pub max_vram_mb: Option<u64>,
}

/// Which part of the queue a status view lists: `limit` entries after the first `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePage {
    pub offset: u64,
    pub limit: u64,
}

impl QueuePage {
    /// The whole queue.
    pub const ALL: QueuePage = QueuePage {
        offset: 0,
        limit: u64::MAX,
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCountView {
    pub priority: u8,
    pub gpu: Option<GpuId>,
    pub queued: u64,
    pub paused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    pub id: GpuId,
    /// With node agents: its host, its UUID, and whether it takes new grants.
    pub host: Option<String>,
    pub uuid: Option<String>,
    pub reachable: Option<bool>,
    pub total_mb: u64,
    pub used_mb: u64,
    pub free_mb: u64,
    /// Used outside the leases (NVML's used figure minus what the leases hold).
    pub external_mb: u64,
    pub vram_source: VramSource,
    pub holders: Vec<HolderView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderView {
    pub request_id: RequestId,
    pub service_id: ServiceId,
    pub priority: u8,
    pub fence: u64,
    pub vram_mb: u64,
    pub granted_at: Millis,
    pub expires_at: Millis,
    pub state: HolderState,
    pub preemptible: bool,
    /// The request's `pause_ms` hint, when it gave one.
    pub pause_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedView {
    pub request_id: RequestId,
    pub service_id: ServiceId,
    pub priority: u8,
    pub gpu: GpuId,
    pub vram_mb: u64,
    pub paused_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueView {
    pub position: u64,
    pub request_id: RequestId,
    pub service_id: ServiceId,
    pub priority: u8,
    pub vram_mb: Option<u64>,
    pub gpu: Option<GpuId>,
    pub requested_at: Millis,
    pub paused: bool,
    pub timeout_at: Option<Millis>,
    pub estimated_wait_ms: Option<u64>,
}
