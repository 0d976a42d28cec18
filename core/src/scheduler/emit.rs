//! What the scheduler says: replies, rejections, control orders and events, queued as actions.

use super::*;

impl Scheduler {
    pub(super) fn reply(&mut self, service: &str, encoding: Encoding, reply: ReplyOut) {
        self.actions.push_back(Action::Reply {
            service: service.into(),
            encoding,
            reply,
        });
    }

    pub(super) fn reject(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: Option<&str>,
        (code, error): (RejectCode, String),
        now: Millis,
    ) {
        self.reject_with_fence(service, encoding, request_id, None, (code, error), now);
    }

    /// [`Scheduler::reject`], the reply naming `fence` (the current one, for a stale fence).
    pub(super) fn reject_with_fence(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: Option<&str>,
        fence: Option<Fence>,
        (code, error): (RejectCode, String),
        now: Millis,
    ) {
        let mut reply = ReplyOut::new(request_id.unwrap_or_default(), Outcome::Rejected);
        reply.fence = fence.map(|f| f.0);
        reply.error = Some(error.clone());
        reply.code = Some(code);
        self.reply(service, encoding, reply);
        self.rejected_event(service, encoding, request_id, (code, error), now);
    }

    pub(super) fn rejected_event(
        &mut self,
        service: &str,
        encoding: Encoding,
        request_id: Option<&str>,
        (code, error): (RejectCode, String),
        now: Millis,
    ) {
        self.actions.push_back(Action::Event {
            encoding,
            event: EventOut {
                capacity_mb: None,
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
                code: Some(code),
            },
        });
    }

    pub(super) fn control(
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

    pub(super) fn event(
        &mut self,
        rec: &RequestRecord,
        kind: EventKind,
        now: Millis,
        detail: Option<String>,
    ) {
        self.push_event(rec, kind, now, detail, None)
    }

    pub(super) fn push_event(
        &mut self,
        rec: &RequestRecord,
        kind: EventKind,
        now: Millis,
        detail: Option<String>,
        waited_ms: Option<u64>,
    ) {
        self.push_event_with(rec, kind, now, detail, waited_ms, None)
    }

    pub(super) fn push_event_with(
        &mut self,
        rec: &RequestRecord,
        kind: EventKind,
        now: Millis,
        detail: Option<String>,
        waited_ms: Option<u64>,
        reclaim_for: Option<ServiceId>,
    ) {
        let capacity_mb = matches!(kind, EventKind::Granted | EventKind::Resumed)
            .then(|| rec.gpu.as_ref().and_then(|g| self.gpu_index.get(g)))
            .flatten()
            .map(|&g| self.gpus[g].spec.total_mb);
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
                code: (kind == EventKind::Rejected).then_some(rec.code).flatten(),
                capacity_mb,
            },
        });
    }

    /// The answer to a repeated request: its current state.
    pub(super) fn current_reply(&self, rec: &RequestRecord, now: Millis) -> ReplyOut {
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
            reply.code = rec.code;
        }
        reply
    }

    pub(super) fn queued_detail(&self, seq: u64) -> String {
        let rec = self.live_rec(seq);
        if self.fleet() && !self.allowed(rec).any(|g| self.gpus[g].up) {
            return "waiting for a host with a GPU it may use to be heard".to_string();
        }
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
}
