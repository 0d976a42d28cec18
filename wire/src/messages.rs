//! Every message of the wire contract (`docs/protocol.md`) as a serde type.
//!
//! Field names are the contract's. Unknown fields are ignored (serde's default); optional fields are
//! `Option`s so that the coordinator applies its configured defaults. These types only carry data: the
//! checks a person can act on live in [`crate::validate`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `<prefix>.request.<svc>`: ask for a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RequestMsg {
    /// Idempotency key; defaults to `<svc>-<stream sequence>`. 1 to 128 characters, no control
    /// characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub request_id: Option<String>,
    /// If present, must equal the subject's `<svc>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub service_id: Option<String>,
    /// 0 to 255, lower is more urgent: 0 critical (chat), 1 high, 2 background.
    #[schemars(range(max = 255))]
    pub priority: u8,
    /// Longest wait for a grant, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Lease length after a grant, in milliseconds, > 0; capped by `lease.max_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub lease_ms: Option<u64>,
    /// VRAM the holder needs, in MB, > 0; absent means the whole GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub vram_mb: Option<u64>,
    /// The GPU id to use (1 to 64 characters of `[A-Za-z0-9_:./-]`; with node agents `<host>/<id>`);
    /// absent means any GPU that fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_:./-]{1,64}$"))]
    pub gpu: Option<String>,
    /// Extension: the host whose GPUs to use (with node agents; 1 to 64 characters of
    /// `[A-Za-z0-9_-]`); absent means any host. With `gpu`, the GPU must be on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub host: Option<String>,
    /// `false`: never paused; only release or lease expiry ends the lease. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemptible: Option<bool>,
    /// Extension, a hint: how long the holder takes to pause (finish its unit of work and free its
    /// VRAM), in milliseconds, as the service measured it; at most 3,600,000 (an hour). It changes
    /// only which holder is paused among holders the scheduling rules treat alike (the one that
    /// frees its VRAM soonest); absent counts as slower than any value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 3_600_000))]
    pub pause_ms: Option<u64>,
}

/// `<prefix>.release.<svc>`: end a lease, or a queued or paused request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReleaseMsg {
    /// Without it: everything the service holds, queued or paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub request_id: Option<String>,
    /// When present, must be the current lease's fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
}

/// `<prefix>.renew.<svc>`: extend a held lease from now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RenewMsg {
    /// The request whose lease to extend.
    #[schemars(length(min = 1, max = 128))]
    pub request_id: String,
    /// When present, must be the current lease's fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// New length from now, in milliseconds, > 0; default: the lease's own length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub lease_ms: Option<u64>,
}

/// What a holder acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckAction {
    /// The holder stopped and freed its VRAM.
    Paused,
    /// The holder is running again.
    Resumed,
}

/// `<prefix>.ack.<svc>`: answer a `pause` or a `resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AckMsg {
    /// The request that was paused or resumed.
    #[schemars(length(min = 1, max = 128))]
    pub request_id: String,
    /// When present, must be the current lease's fence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    pub action: AckAction,
}

/// `<prefix>.cancel.<svc>`: withdraw a queued or paused request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CancelMsg {
    /// The queued or paused request to withdraw.
    #[schemars(length(min = 1, max = 128))]
    pub request_id: String,
}

/// How a request, or an input about it, came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Granted,
    TimedOut,
    Cancelled,
    Released,
    Renewed,
    Rejected,
    /// Extension: the answer to a repeated request that is still waiting in the queue.
    Queued,
    /// Extension: the answer to a repeated request that is paused.
    Paused,
    /// Extension: the answer to a repeated request whose lease was revoked.
    Revoked,
}

/// Extension: why an input was rejected, as a stable code beside the sentence (`error`). Clients decide
/// on the code; the sentence is for a person and may change. A code this version does not know reads
/// as `other` (a newer coordinator may add codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The input is not valid (a field missing or of the wrong type, JSON that does not parse).
    InvalidInput,
    /// The service has no `[services.<id>]` section and unknown services are refused.
    UnknownService,
    /// The request id is another service's.
    RequestIdTaken,
    /// The priority is more urgent than the service's `max_priority`.
    PriorityNotAllowed,
    /// The GPU named in `gpu` is not managed here (or no GPU is).
    UnknownGpu,
    /// The service has `queue.max_per_service` live requests already.
    TooManyRequests,
    /// More VRAM than any GPU the request may use has.
    TooLarge,
    /// More VRAM than the service may hold at once (`max_vram_mb`): it could never be granted.
    OverServiceLimit,
    /// A queued or paused request that can no longer be placed (its GPU left, or shrank).
    Unplaceable,
    /// No live request of this service has that id.
    UnknownRequest,
    /// The request has already ended (the reply's `error` says how).
    AlreadyEnded,
    /// The fence is not the request's current one (the reply's `fence` names the current one).
    StaleFence,
    /// A renewal of a request that holds no lease (queued or paused).
    NotHolding,
    /// A renewal after the pause's ACK deadline passed: the lease runs out and is revoked.
    PauseDeadlinePassed,
    /// An ACK that does not match the request's phase, or a late copy of an earlier one.
    UnexpectedAck,
    /// A cancel of a request that holds the GPU (release it instead).
    HoldsGpu,
    /// A code this version does not know.
    #[serde(other)]
    Other,
}

impl RejectCode {
    /// The code as it is written on the wire, e.g. `stale_fence`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidInput => "invalid_input",
            RejectCode::UnknownService => "unknown_service",
            RejectCode::RequestIdTaken => "request_id_taken",
            RejectCode::PriorityNotAllowed => "priority_not_allowed",
            RejectCode::UnknownGpu => "unknown_gpu",
            RejectCode::TooManyRequests => "too_many_requests",
            RejectCode::TooLarge => "too_large",
            RejectCode::OverServiceLimit => "over_service_limit",
            RejectCode::Unplaceable => "unplaceable",
            RejectCode::UnknownRequest => "unknown_request",
            RejectCode::AlreadyEnded => "already_ended",
            RejectCode::StaleFence => "stale_fence",
            RejectCode::NotHolding => "not_holding",
            RejectCode::PauseDeadlinePassed => "pause_deadline_passed",
            RejectCode::UnexpectedAck => "unexpected_ack",
            RejectCode::HoldsGpu => "holds_gpu",
            RejectCode::Other => "other",
        }
    }

    /// Every code but `other`, for the contract's list and the schemas.
    pub const ALL: [RejectCode; 16] = [
        RejectCode::InvalidInput,
        RejectCode::UnknownService,
        RejectCode::RequestIdTaken,
        RejectCode::PriorityNotAllowed,
        RejectCode::UnknownGpu,
        RejectCode::TooManyRequests,
        RejectCode::TooLarge,
        RejectCode::OverServiceLimit,
        RejectCode::Unplaceable,
        RejectCode::UnknownRequest,
        RejectCode::AlreadyEnded,
        RejectCode::StaleFence,
        RejectCode::NotHolding,
        RejectCode::PauseDeadlinePassed,
        RejectCode::UnexpectedAck,
        RejectCode::HoldsGpu,
    ];

    /// The code written as `as_str`, if it is one.
    pub fn parse(text: &str) -> Option<RejectCode> {
        RejectCode::ALL.into_iter().find(|c| c.as_str() == text)
    }

    /// Whether a rejection with this code means the lease it was about is gone: the request ended,
    /// holds nothing, or missed its pause deadline.
    pub fn lease_gone(self) -> bool {
        matches!(
            self,
            RejectCode::AlreadyEnded
                | RejectCode::NotHolding
                | RejectCode::PauseDeadlinePassed
                | RejectCode::UnknownRequest
        )
    }
}

/// `<prefix>.reply.<svc>`: the answer to a request or to an input about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Reply {
    pub request_id: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
    /// A sentence a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Extension, on `rejected`: why, as a stable code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<RejectCode>,
}

impl Reply {
    /// A reply with only the request id and the outcome set.
    pub fn new(request_id: impl Into<String>, outcome: Outcome) -> Self {
        Reply {
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

/// An order to a holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Pause,
    Resume,
    Revoke,
    Restart,
}

/// `<prefix>.control.<svc>`: orders to a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Control {
    pub action: ControlAction,
    pub request_id: String,
    pub fence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    pub reason: String,
    /// Extension, on `resume`: the new lease's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Extension, on `resume`: the new lease's expiry (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Extension, on `resume`: the GPU the request holds again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
}

/// The kinds of audit events, the `<kind>` token of `<prefix>.event.<kind>.<svc>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Requested,
    Queued,
    Granted,
    Preempting,
    Paused,
    Resumed,
    Released,
    Renewed,
    Expired,
    Revoked,
    TimedOut,
    Cancelled,
    Rejected,
}

impl EventKind {
    /// The subject token, e.g. `timed_out`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Requested => "requested",
            EventKind::Queued => "queued",
            EventKind::Granted => "granted",
            EventKind::Preempting => "preempting",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Released => "released",
            EventKind::Renewed => "renewed",
            EventKind::Expired => "expired",
            EventKind::Revoked => "revoked",
            EventKind::TimedOut => "timed_out",
            EventKind::Cancelled => "cancelled",
            EventKind::Rejected => "rejected",
        }
    }
}

/// `<prefix>.event.<kind>.<svc>`: one change of state, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// RFC 3339 UTC.
    pub at: String,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    pub service_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extension, on `preempting`: the pause is a reclaim, for the guarantee of this service
    /// (`services.<id>.guaranteed_vram_mb`): the holder's service borrowed VRAM beyond its own
    /// guarantee, and priority alone would not have paused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reclaim_for: Option<String>,
    /// Extension, on `rejected`: why, as a stable code (see [`RejectCode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<RejectCode>,
    /// Extension, on `granted` and `resumed`: the GPU's capacity then, in MB (what `audit` checks
    /// the holders against; with node agents the GPUs are known only from their hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_mb: Option<u64>,
}

/// What a reader made by the coordinator reads: a service's replies or its control orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReaderTopic {
    /// `<prefix>.reply.<svc>`
    Reply,
    /// `<prefix>.control.<svc>`
    Control,
}

/// The body of `<prefix>.reader.<svc>` (request-reply): make this service a pull consumer on the
/// output stream, filtered to one of its two subjects, starting at `start_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReaderAsk {
    pub topic: ReaderTopic,
    /// The first stream sequence to deliver (at least 1).
    pub start_seq: u64,
}

/// The answer to a [`ReaderAsk`]: the consumer's name (random, known to the asker only), or why none
/// was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReaderAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// The output stream the consumer reads.
    #[serde(default)]
    pub stream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
