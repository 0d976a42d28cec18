//! The one render step: the core's typed outputs become the wire contract's documents, on their subjects,
//! in the encoding of the request they are about, with instants as RFC 3339 strings. Nothing else turns a
//! core value into wire text, and this module decides nothing.

use gpu_coordinator_core::{unscope_text, unscoped};
use gpu_coordinator_core::{
    Action, ControlOut, EventOut, GpuView, HolderView, PausedView, QueueView, ReplyOut, StatusView,
};
use gpu_coordinator_wire::time::rfc3339;
use gpu_coordinator_wire::{
    codec, Control, Encoding, Event, GpuStatus, HolderStatus, HostState, HostStatus, PausedStatus,
    QueueCount, QueueEntry, Reply, ServiceStatus, StatusDoc, Subjects,
};

/// A message ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub encoding: Encoding,
    pub payload: Vec<u8>,
}

/// The message an action is, on its subject and in its encoding; `None` for the actions that are not
/// messages (persist, lease store). Control orders are logged at `info`, events at `debug`.
pub fn message(subjects: &Subjects, action: &Action) -> Option<Rendered> {
    let (subject, encoding, payload) = match action {
        Action::Reply {
            service,
            encoding,
            reply: out,
        } => (
            subjects.reply(service),
            *encoding,
            codec::encode(*encoding, &reply(out)),
        ),
        Action::Control {
            service,
            encoding,
            control: out,
        } => {
            tracing::info!(
                service = %service, request_id = %out.request_id, fence = out.fence,
                "{:?}: {}", out.action, out.reason
            );
            (
                subjects.control(service),
                *encoding,
                codec::encode(*encoding, &control(out)),
            )
        }
        Action::Event {
            encoding,
            event: out,
        } => {
            tracing::debug!(kind = out.kind.as_str(), service = %out.service_id, request_id = ?out.request_id, "event");
            (
                subjects.event(out.kind, &out.service_id),
                *encoding,
                codec::encode(*encoding, &event(out)),
            )
        }
        Action::Persist(_) | Action::PersistFence(_) | Action::Lease(_) => return None,
    };
    Some(Rendered {
        subject,
        encoding,
        payload,
    })
}

/// `<prefix>.reply.<svc>`.
pub fn reply(out: &ReplyOut) -> Reply {
    let mut reply = Reply::new(unscoped(&out.request_id), out.outcome);
    reply.gpu = text(&out.gpu);
    reply.fence = out.fence;
    reply.lease_ms = out.lease_ms;
    reply.expires_at = out.expires_at.map(rfc3339);
    reply.vram_mb = out.vram_mb;
    reply.waited_ms = out.waited_ms;
    reply.error = out.error.as_deref().map(|e| unscope_text(e).into_owned());
    reply.code = out.code;
    reply
}

/// `<prefix>.control.<svc>`.
pub fn control(out: &ControlOut) -> Control {
    Control {
        action: out.action,
        request_id: unscoped(&out.request_id).to_owned(),
        fence: out.fence,
        deadline_ms: out.deadline_ms,
        reason: unscope_text(&out.reason.to_string()).into_owned(),
        lease_ms: out.lease_ms,
        expires_at: out.expires_at.map(rfc3339),
        gpu: text(&out.gpu),
    }
}

/// `<prefix>.event.<kind>.<svc>`.
pub fn event(out: &EventOut) -> Event {
    Event {
        at: rfc3339(out.at),
        kind: out.kind,
        request_id: out.request_id.as_deref().map(|id| unscoped(id).to_owned()),
        service_id: out.service_id.to_string(),
        priority: out.priority,
        gpu: text(&out.gpu),
        fence: out.fence,
        detail: out.detail.as_deref().map(|d| unscope_text(d).into_owned()),
        reclaim_for: out.reclaim_for.as_ref().map(|s| s.to_string()),
        code: out.code,
        capacity_mb: out.capacity_mb,
    }
}

/// The status document of `<prefix>.status` and `GET /gpu/status`.
pub fn status(view: &StatusView) -> StatusDoc {
    StatusDoc {
        hosts: view
            .hosts
            .iter()
            .map(|h| HostStatus {
                host: h.host.clone(),
                state: if h.up {
                    HostState::Up
                } else {
                    HostState::Unreachable
                },
                last_sample_age_ms: h.last_sample_age_ms,
                gpus: h.gpus,
            })
            .collect(),
        at: rfc3339(view.at),
        vram_source: view.vram_source,
        gpus: view.gpus.iter().map(gpu).collect(),
        paused: view.paused.iter().map(paused).collect(),
        queue: view.queue.iter().map(queued).collect(),
        queue_total: view.queue_total,
        queue_offset: view.queue_offset,
        queue_counts: view
            .queue_counts
            .iter()
            .map(|c| QueueCount {
                priority: c.priority,
                gpu: c.gpu.as_ref().map(|g| g.to_string()),
                queued: c.queued,
                paused: c.paused,
            })
            .collect(),
        services: view
            .services
            .iter()
            .map(|s| ServiceStatus {
                service_id: s.service_id.to_string(),
                used_mb: s.used_mb,
                borrowed_mb: s.borrowed_mb,
                guaranteed_vram_mb: s.guaranteed_mb,
                max_vram_mb: s.max_vram_mb,
            })
            .collect(),
        leader: None,
        storage_full: None,
    }
}

fn gpu(g: &GpuView) -> GpuStatus {
    GpuStatus {
        host: g.host.clone(),
        reachable: g.reachable,
        uuid: g.uuid.clone(),
        id: g.id.to_string(),
        total_mb: g.total_mb,
        used_mb: g.used_mb,
        free_mb: g.free_mb,
        external_mb: g.external_mb,
        vram_source: g.vram_source,
        holders: g.holders.iter().map(holder).collect(),
    }
}

fn holder(h: &HolderView) -> HolderStatus {
    HolderStatus {
        request_id: unscoped(&h.request_id).to_owned(),
        service_id: h.service_id.to_string(),
        priority: h.priority,
        fence: h.fence,
        vram_mb: h.vram_mb,
        granted_at: rfc3339(h.granted_at),
        expires_at: rfc3339(h.expires_at),
        state: h.state,
        preemptible: h.preemptible,
        pause_ms: h.pause_ms,
    }
}

fn paused(p: &PausedView) -> PausedStatus {
    PausedStatus {
        request_id: unscoped(&p.request_id).to_owned(),
        service_id: p.service_id.to_string(),
        priority: p.priority,
        gpu: p.gpu.to_string(),
        vram_mb: p.vram_mb,
        paused_at: rfc3339(p.paused_at),
    }
}

fn queued(q: &QueueView) -> QueueEntry {
    QueueEntry {
        position: q.position,
        request_id: unscoped(&q.request_id).to_owned(),
        service_id: q.service_id.to_string(),
        priority: q.priority,
        vram_mb: q.vram_mb,
        gpu: text(&q.gpu),
        requested_at: rfc3339(q.requested_at),
        paused: q.paused,
        timeout_at: q.timeout_at.map(rfc3339),
        estimated_wait_ms: q.estimated_wait_ms,
    }
}

/// An optional id as the text the contract carries.
fn text(id: &Option<impl ToString>) -> Option<String> {
    id.as_ref().map(ToString::to_string)
}
