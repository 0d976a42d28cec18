//! One handler per kind of input (request, release, renew, ACK, cancel, an invalid input), and the
//! check that an input is about a live request of its service under its current fence.

use super::*;

impl Scheduler {
    pub(super) fn on_request(
        &mut self,
        service: String,
        encoding: Encoding,
        msg: RequestMsg,
        now: Millis,
    ) {
        let request_id = msg.request_id.clone().unwrap_or_default();
        if let Some(existing) = self.record(&request_id) {
            if existing.service_id != service {
                let error = format!(
                    "request_id `{request_id}` is already used by service `{}`; choose another id",
                    existing.service_id
                );
                let rejection = (RejectCode::RequestIdTaken, error);
                return self.reject(&service, encoding, Some(&request_id), rejection, now);
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
            let rejection = (RejectCode::UnknownService, error);
            return self.reject(&service, encoding, Some(&request_id), rejection, now);
        };
        let named = self.config.services.named.contains_key(service.as_str());
        let key = |name: &str| policy_key(named, &service, name);
        let (priority, requested_detail, priority_refusal) = match policy.max_priority {
            Some(max) if msg.priority < max && policy.clamp_priority => {
                let detail = format!(
                    "priority {} taken as {max}, the most urgent that `{}` allows (`{}` is true)",
                    msg.priority,
                    key("max_priority"),
                    key("clamp_priority")
                );
                (max, Some(detail), None)
            }
            Some(max) if msg.priority < max => {
                let error = format!(
                    "field `priority`: {} is more urgent than service `{service}` may ask for: \
                     `{}` is {max} (0 is the most urgent; give {max} or a greater number)",
                    msg.priority,
                    key("max_priority")
                );
                (
                    msg.priority,
                    None,
                    Some((RejectCode::PriorityNotAllowed, error)),
                )
            }
            _ => (msg.priority, None, None),
        };
        let refusal = priority_refusal.or_else(|| self.refusal(&service, &policy, named, &msg));
        let rec = self.new_record(&service, encoding, &policy, priority, msg, now);
        let seq = rec.arrival;
        self.event(&rec, EventKind::Requested, now, requested_detail);
        match refusal {
            Some(rejection) => self.reject_new(rec, rejection, now),
            None => {
                self.insert_live(rec);
                self.mark_dirty(&request_id);
                // Granted, or said `queued`, once the whole batch is handled.
                self.arrived.push(seq);
            }
        }
    }

    /// Why a new request of `service` can never be granted, if it cannot: it names no GPU managed
    /// here, its service has too many live requests, or it needs more than any GPU it may use has or
    /// than its service may hold at once.
    fn refusal(
        &self,
        service: &str,
        policy: &ServicePolicy,
        named: bool,
        msg: &RequestMsg,
    ) -> Option<(RejectCode, String)> {
        let key = |name: &str| policy_key(named, service, name);
        let vram_mb = msg.vram_mb.or(policy.default_vram_mb);
        if let Some(rejection) = self.host_refusal(msg) {
            return Some(rejection);
        }
        let candidates = self.candidate_gpus(msg);
        // With node agents a GPU or a host not heard yet may join: the request waits for it.
        let fleet = self.fleet();
        if candidates.is_empty() && !fleet {
            let known: Vec<&str> = self.gpus.iter().map(|g| g.spec.id.as_str()).collect();
            let error = match &msg.gpu {
                Some(pin) => format!(
                    "field `gpu`: no GPU `{pin}` is managed here; the GPUs are: {}",
                    known.join(", ")
                ),
                None => "no GPU is managed by this coordinator".to_string(),
            };
            return Some((RejectCode::UnknownGpu, error));
        }
        let live = self.services.get(service).map(|svc| svc.live.len());
        if let Some(live) = live.filter(|&n| n >= self.config.max_per_service) {
            let error = format!(
                "service `{service}` already has {live} live requests, the most that \
                 `queue.max_per_service` allows ({}): release or cancel some first",
                self.config.max_per_service
            );
            return Some((RejectCode::TooManyRequests, error));
        }
        let largest = candidates
            .iter()
            .map(|g| g.spec.total_mb)
            .max()
            .unwrap_or(0);
        if let Some(vram) = vram_mb.filter(|&vram| vram > largest && !fleet) {
            let given = if msg.vram_mb.is_some() {
                "field `vram_mb`".to_owned()
            } else {
                format!("`{}`", key("default_vram_mb"))
            };
            let error =
                format!("{given}: {vram} MB is more than any GPU it may use has ({largest} MB)");
            return Some((RejectCode::TooLarge, error));
        }
        let smallest = candidates
            .iter()
            .map(|g| g.spec.total_mb)
            .min()
            .unwrap_or(0);
        let cap = policy.max_vram_mb.filter(|&cap| {
            !candidates.is_empty()
                && candidates
                    .iter()
                    .all(|g| vram_mb.unwrap_or(g.spec.total_mb) > cap)
        })?;
        let asked = match vram_mb {
            Some(vram) => format!("{vram} MB"),
            None => format!("a whole GPU (the smallest it may use has {smallest} MB)"),
        };
        let error = format!(
            "{asked} is more than service `{service}` may hold at once: `{}` is {cap} MB, so the \
             request could never be granted",
            key("max_vram_mb")
        );
        Some((RejectCode::OverServiceLimit, error))
    }

    /// The GPUs a new request may use: the one it names, its host's, or all.
    fn candidate_gpus(&self, msg: &RequestMsg) -> Vec<&Gpu> {
        match (&msg.gpu, &msg.host) {
            (Some(pin), _) => self
                .gpu_index
                .get(pin.as_str())
                .map(|&i| &self.gpus[i])
                .into_iter()
                .collect(),
            (None, Some(host)) => self
                .gpus
                .iter()
                .filter(|g| g.host.as_ref() == Some(host))
                .collect(),
            (None, None) => self.gpus.iter().collect(),
        }
    }

    /// Why a request naming a host cannot be taken: this coordinator has no node agents, so its
    /// GPUs have no hosts.
    fn host_refusal(&self, msg: &RequestMsg) -> Option<(RejectCode, String)> {
        let host = msg.host.as_ref().filter(|_| !self.fleet())?;
        let error = format!(
            "field `host`: {host:?} names a host, but this coordinator manages one box's GPUs \
             (nodes.agents is false): leave `host` out"
        );
        Some((RejectCode::UnknownGpu, error))
    }

    /// The record of a new request, queued, with its service's defaults filled in and the next
    /// arrival number.
    fn new_record(
        &mut self,
        service: &str,
        encoding: Encoding,
        policy: &ServicePolicy,
        priority: u8,
        msg: RequestMsg,
        now: Millis,
    ) -> RequestRecord {
        let lease_ms = msg
            .lease_ms
            .or(policy.default_lease_ms)
            .unwrap_or(self.config.lease_default_ms)
            .min(self.config.lease_max_ms)
            .max(1);
        let timeout_ms = msg.timeout_ms.unwrap_or(self.config.default_timeout_ms);
        let seq = self.next_seq;
        self.next_seq += 1;
        RequestRecord {
            request_id: msg.request_id.unwrap_or_default().into(),
            service_id: service.into(),
            priority,
            arrival: seq,
            encoding,
            vram_mb: msg.vram_mb.or(policy.default_vram_mb),
            // A GPU named, else a host named (`<host>/*`), else any GPU.
            gpu_pin: msg
                .gpu
                .map(GpuId::from)
                .or_else(|| msg.host.as_deref().map(hosts::pin_host)),
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
            code: None,
        }
    }

    /// Ends a new request at once, rejected: answered, its `rejected` event, and remembered (a
    /// repeated id gets the same answer).
    fn reject_new(
        &mut self,
        mut rec: RequestRecord,
        (code, error): (RejectCode, String),
        now: Millis,
    ) {
        rec.phase = Phase::Ended;
        rec.end = Some(End::Rejected);
        rec.ended_at = Some(now);
        rec.detail = Some(error.clone());
        rec.code = Some(code);
        let mut reply = ReplyOut::new(&rec.request_id, Outcome::Rejected);
        reply.error = Some(error.clone());
        reply.code = Some(code);
        let service = rec.service_id.clone();
        self.reply(&service, rec.encoding, reply);
        self.event(&rec, EventKind::Rejected, now, Some(error));
        self.mark_dirty(&rec.request_id.clone());
        self.remember_ended(rec);
    }

    pub(super) fn on_release(
        &mut self,
        service: String,
        encoding: Encoding,
        msg: ReleaseMsg,
        now: Millis,
    ) {
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

    pub(super) fn on_renew(
        &mut self,
        service: String,
        encoding: Encoding,
        msg: RenewMsg,
        now: Millis,
    ) {
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
            let rejection = (RejectCode::PauseDeadlinePassed, error);
            return self.reject(
                &service,
                rec.encoding,
                Some(&msg.request_id),
                rejection,
                now,
            );
        }
        if !matches!(rec.phase, Phase::Active | Phase::Pausing) {
            let error = format!(
                "request `{}` is {}, not holding a lease: only a held lease can be renewed",
                msg.request_id,
                rec.phase.as_str()
            );
            let rejection = (RejectCode::NotHolding, error);
            return self.reject(
                &service,
                rec.encoding,
                Some(&msg.request_id),
                rejection,
                now,
            );
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
    pub(super) fn renew_in_store(&mut self, seq: u64) {
        let rec = self.live_rec(seq);
        self.actions.push_back(Action::Lease(LeaseOp::Renew {
            request_id: rec.request_id.clone(),
            gpu: rec.gpu.clone().expect("a holding record has a GPU"),
            fence: rec.fence.expect("a holding record has a fence"),
            expires_at: rec.expires_at.expect("a holding record has an expiry"),
        }));
    }

    pub(super) fn on_ack(
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
            let rejection = (RejectCode::UnexpectedAck, error);
            return self.reject(&service, encoding, Some(&msg.request_id), rejection, now);
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
                let rejection = (RejectCode::UnexpectedAck, error);
                self.reject(&service, encoding, Some(&msg.request_id), rejection, now);
            }
        }
    }

    pub(super) fn on_cancel(
        &mut self,
        service: String,
        encoding: Encoding,
        msg: CancelMsg,
        now: Millis,
    ) {
        let Some(seq) = self.find_own(&service, encoding, &msg.request_id, None, now) else {
            return;
        };
        let rec = self.live_rec(seq);
        if matches!(rec.phase, Phase::Active | Phase::Pausing) {
            let error = format!(
                "request `{}` holds the GPU: cancel only withdraws queued or paused requests; release it instead",
                msg.request_id
            );
            let rejection = (RejectCode::HoldsGpu, error);
            return self.reject(
                &service,
                rec.encoding,
                Some(&msg.request_id),
                rejection,
                now,
            );
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

    pub(super) fn on_invalid(&mut self, rejection: Rejection, now: Millis) {
        let request_id = rejection.request_id.as_deref();
        match &rejection.service {
            Some(service) => self.reject(
                service,
                rejection.encoding,
                request_id,
                (RejectCode::InvalidInput, rejection.error),
                now,
            ),
            // No valid service in the subject: nobody to reply to (a reply to `unknown` would reach
            // a service of that name); the event alone records it.
            None => self.rejected_event(
                "unknown",
                rejection.encoding,
                request_id,
                (RejectCode::InvalidInput, rejection.error),
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
                    let error = format!(
                        "request `{request_id}` has already ended ({})",
                        rec.end.map(End::as_str).unwrap_or("ended")
                    );
                    (RejectCode::AlreadyEnded, error)
                }
                _ => (
                    RejectCode::UnknownRequest,
                    format!("unknown request_id `{request_id}` for service `{service}`"),
                ),
            },
            Some(&seq) => {
                let rec = self.live_rec(seq);
                if rec.service_id != service {
                    (
                        RejectCode::UnknownRequest,
                        format!("unknown request_id `{request_id}` for service `{service}`"),
                    )
                } else if fence.is_some_and(|f| Some(Fence(f)) != rec.fence) {
                    encoding = rec.encoding;
                    current = rec.fence;
                    let error = format!(
                        "stale fence {}: the current fence of request `{request_id}` is {}",
                        fence.unwrap_or_default(),
                        rec.fence
                            .map(|f| f.0.to_string())
                            .unwrap_or_else(|| "none".into())
                    );
                    (RejectCode::StaleFence, error)
                } else {
                    return Some(seq);
                }
            }
        };
        self.reject_with_fence(service, encoding, Some(request_id), current, error, now);
        None
    }
}
