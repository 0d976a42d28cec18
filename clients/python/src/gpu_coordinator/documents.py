"""The documents the coordinator answers with, as this client hands them on: the reply to a request or
an input (`ReplyDoc`), an order to a holder (`ControlDoc`), and the status document (`StatusDoc`),
after `schemas/reply.schema.json`, `control.schema.json` and `status.schema.json`.

At run time they are the plain dicts the JSON decodes to; these types only say which keys they carry.
A key the schema marks optional is absent when it has no value (the coordinator writes no `null`).
Enumerations (`outcome`, `action`, `code`, `state`, `vram_source`) are typed as `str`: a newer
coordinator may add values, and this client compares them as text.
"""

from __future__ import annotations

from typing import List, TypedDict

# Each document is two classes: the keys it always has, then (`total=False`) those it may lack. This
# is `Required`/`NotRequired` for Python 3.9 and 3.10.


class _ReplyKeys(TypedDict):
    request_id: str
    #: `granted`, `timed_out`, `cancelled`, `released`, `renewed`, `rejected`, `queued`, `paused`,
    #: `revoked`.
    outcome: str


class ReplyDoc(_ReplyKeys, total=False):
    """How a request, or an input about it, came out."""

    gpu: str
    fence: int
    lease_ms: int
    #: RFC 3339 UTC.
    expires_at: str
    vram_mb: int
    waited_ms: int
    #: A sentence a person can act on.
    error: str
    #: On `rejected`: why, as a stable code (see `RejectCode`).
    code: str


class _ControlKeys(TypedDict):
    #: `pause`, `resume`, `revoke`, `restart`.
    action: str
    request_id: str
    fence: int
    reason: str


class ControlDoc(_ControlKeys, total=False):
    """An order to a holder."""

    deadline_ms: int
    #: On `resume`: the new lease's length, its expiry (RFC 3339 UTC) and the GPU held again.
    lease_ms: int
    expires_at: str
    gpu: str


class _HolderKeys(TypedDict):
    request_id: str
    service_id: str
    priority: int
    vram_mb: int
    fence: int
    #: `active` or `pausing`.
    state: str
    preemptible: bool
    granted_at: str
    expires_at: str


class HolderStatus(_HolderKeys, total=False):
    """A lease on a GPU."""

    pause_ms: int


class _GpuKeys(TypedDict):
    id: str
    total_mb: int
    used_mb: int
    free_mb: int
    external_mb: int
    #: `nvml` or `config`.
    vram_source: str
    holders: List[HolderStatus]


class GpuStatus(_GpuKeys, total=False):
    """One GPU: its memory (MB) and its holders; with node agents, its host, its UUID, and whether
    it takes new grants."""

    host: str
    uuid: str
    reachable: bool


class HostStatus(TypedDict):
    """A host of the fleet (node agents): `up`, or `unreachable` once its agent is silent past
    `nodes.ttl_ms` (no new grants there)."""

    host: str
    state: str
    last_sample_age_ms: int
    gpus: int


class PausedStatus(TypedDict):
    """A paused request, waiting to be resumed."""

    request_id: str
    service_id: str
    priority: int
    vram_mb: int
    gpu: str
    paused_at: str


class _QueueEntryKeys(TypedDict):
    position: int
    request_id: str
    service_id: str
    priority: int
    paused: bool
    requested_at: str


class QueueEntry(_QueueEntryKeys, total=False):
    """A request in the queue, in grant order."""

    vram_mb: int
    gpu: str
    timeout_at: str
    estimated_wait_ms: int


class _QueueCountKeys(TypedDict):
    priority: int
    queued: int
    paused: int


class QueueCount(_QueueCountKeys, total=False):
    """How many requests of one priority wait for one GPU (`gpu` absent: any GPU)."""

    gpu: str


class _ServiceKeys(TypedDict):
    service_id: str
    used_mb: int
    borrowed_mb: int


class ServiceStatus(_ServiceKeys, total=False):
    """A service's VRAM against its guarantee and cap (MB)."""

    guaranteed_vram_mb: int
    max_vram_mb: int


class LeaderStatus(TypedDict):
    """The coordinator that answers, its term, and the standbys it knows of."""

    holder: str
    term: int
    standbys: List[str]


class _StatusKeys(TypedDict):
    #: RFC 3339 instant of the snapshot.
    at: str
    #: `nvml` or `config`.
    vram_source: str
    gpus: List[GpuStatus]
    paused: List[PausedStatus]
    queue: List[QueueEntry]


class StatusDoc(_StatusKeys, total=False):
    """The coordinator's status document (`Client.status()`)."""

    queue_total: int
    queue_offset: int
    queue_counts: List[QueueCount]
    services: List[ServiceStatus]
    leader: LeaderStatus
    #: Present while a store of the coordinator is full: which, and what it said.
    storage_full: str
    #: With node agents: each host heard, by name.
    hosts: List[HostStatus]
