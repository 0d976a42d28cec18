//! The status document (`<prefix>.status`, `GET /gpu/status`) and its parts, as serde types.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where the VRAM figures of the status document come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VramSource {
    Nvml,
    Config,
}

/// A holder's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HolderState {
    Active,
    Pausing,
}

/// One lease in the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HolderStatus {
    pub request_id: String,
    pub service_id: String,
    pub priority: u8,
    pub fence: u64,
    pub vram_mb: u64,
    pub granted_at: String,
    pub expires_at: String,
    pub state: HolderState,
    pub preemptible: bool,
    /// Extension: the request's `pause_ms` hint, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}

/// One GPU in the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GpuStatus {
    pub id: String,
    /// Extension, with node agents: the host the GPU is on (the part of `id` before `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Extension, with node agents: the GPU's UUID as its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Extension, with node agents: `false` while its host's agent is silent (no new grants there)
    /// or its agent no longer reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// Capacity in MB.
    pub total_mb: u64,
    /// Held by leases plus used outside them.
    pub used_mb: u64,
    pub free_mb: u64,
    /// Used by processes outside the coordinator's leases (NVML only).
    pub external_mb: u64,
    pub vram_source: VramSource,
    pub holders: Vec<HolderStatus>,
}

/// A paused request in the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PausedStatus {
    pub request_id: String,
    pub service_id: String,
    pub priority: u8,
    pub gpu: String,
    pub vram_mb: u64,
    pub paused_at: String,
}

/// A queued (or paused, waiting to resume) request in the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct QueueEntry {
    /// 1-based position in grant order.
    pub position: u64,
    pub request_id: String,
    pub service_id: String,
    pub priority: u8,
    /// `None`: the whole GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    pub requested_at: String,
    /// `true` for a paused request waiting to be resumed.
    pub paused: bool,
    /// RFC 3339 instant at which the request times out (absent for paused requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_at: Option<String>,
    /// A rough estimate of the wait still ahead, in milliseconds, from the leases ahead of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_wait_ms: Option<u64>,
}

/// `<prefix>.status` and `GET /gpu/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusDoc {
    /// RFC 3339 instant of the snapshot.
    pub at: String,
    pub vram_source: VramSource,
    pub gpus: Vec<GpuStatus>,
    pub paused: Vec<PausedStatus>,
    /// The queue in grant order: the first `queue.status_limit` entries (100 by default), or the page
    /// asked for (`?offset=&limit=` over HTTP, `{"offset":..,"limit":..}` over NATS).
    pub queue: Vec<QueueEntry>,
    /// How many requests the whole queue holds (queued and paused); more than `queue` lists when the
    /// queue is longer than the page.
    #[serde(default)]
    pub queue_total: u64,
    /// How many entries of the queue come before `queue`'s first.
    #[serde(default)]
    pub queue_offset: u64,
    /// The whole queue counted by priority and GPU.
    #[serde(default)]
    pub queue_counts: Vec<QueueCount>,
    /// Extension: each service with a `[services.<id>]` section, and each other service holding
    /// VRAM, with what it holds against its guarantee and cap (absent when there is none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
    /// The coordinator that answers (the leader), its term, and the standbys it knows of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderStatus>,
    /// Extension, with node agents: each host heard since this leader started, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostStatus>,
    /// Present while a store of the coordinator is full (a disk, JetStream's store, a stream's or the
    /// embedded bus's byte limit): which, and what it said. Inputs are then refused at submission and
    /// the coordinator's own writes wait; it goes on by itself once space is freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_full: Option<String>,
}

/// Whether a host's agent is heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Its last sample is younger than `nodes.ttl_ms`: its GPUs take grants.
    Up,
    /// Silent past `nodes.ttl_ms`: no new grants there; its holders keep their leases until they
    /// end.
    Unreachable,
}

/// One host of the fleet (node agents) in the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HostStatus {
    pub host: String,
    pub state: HostState,
    /// How long ago its agent's last sample came in, in milliseconds.
    pub last_sample_age_ms: u64,
    /// How many GPUs its last sample listed.
    pub gpus: u64,
}

/// A service's VRAM against its limits (`[services.<id>]`), in MB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceStatus {
    pub service_id: String,
    /// What its holders hold (active and pausing), as its cap and guarantee count it: a whole-GPU
    /// holder counts its GPU's capacity.
    pub used_mb: u64,
    /// What its active holders hold beyond its guarantee (all they hold, without one): what a
    /// service under its guarantee may take back.
    pub borrowed_mb: u64,
    /// `guaranteed_vram_mb`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed_vram_mb: Option<u64>,
    /// `max_vram_mb`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vram_mb: Option<u64>,
}

/// How many requests of one priority wait for one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct QueueCount {
    pub priority: u8,
    /// The GPU a queued request is pinned to, or a paused one's GPU; absent: any GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    pub queued: u64,
    pub paused: u64,
}

/// What part of the queue a status question asks for (the body of `<prefix>.status`, optional; `GET /gpu/status?offset=&limit=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StatusPage {
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub limit: Option<u64>,
}

/// Who leads the deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeaderStatus {
    /// The leader's name: `<host>-<pid>-<random>`.
    pub holder: String,
    /// Its leadership term: strictly increases with each new leader.
    pub term: u64,
    /// The other coordinators seen lately, standing by.
    pub standbys: Vec<String>,
}
