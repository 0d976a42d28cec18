//! The life of one lease as a state machine without I/O, clock or async: the lease task feeds it
//! replies, orders, commands and the current instant (`handle_*`), and carries out what it asks for
//! (`poll_action`) until the next wake-up (`poll_timeout`).
//!
//! It decides when to renew, what to acknowledge under which fence, which handler to run, and when a
//! `release()` is answered. It never sends anything itself, so every rule here is tested with plain
//! `#[test]`s.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpu_coordinator_wire::{
    AckAction, AckMsg, Control, ControlAction, Outcome, RejectCode, ReleaseMsg, RenewMsg, Reply,
};

use crate::lease::{LeaseEvent, LeasePhase};
use crate::worker::{PauseOrder, ResumeOrder};
use crate::ClientError;

/// How long `release()` waits for the `released` reply.
pub(crate) const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an ACK is retried when the order names no deadline.
pub(crate) const ACK_RETRY: Duration = Duration::from_secs(30);
/// The shortest renewal interval, whatever the lease length.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(50);
/// How long before the coordinator could revoke a lease that the client gives it up on its own, when
/// no renewal is confirmed: a tenth of the lease, at most this much (renewals go at a third and a
/// half of the lease, well before).
const MAX_LOCAL_MARGIN: Duration = Duration::from_secs(2);

/// An input to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    Renew(RenewMsg),
    Ack(AckMsg),
    Release(ReleaseMsg),
}

impl Input {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Input::Renew(_) => "renew",
            Input::Ack(_) => "ack",
            Input::Release(_) => "release",
        }
    }
}

/// What the lease task must do.
#[derive(Debug)]
pub(crate) enum Action {
    /// Publish this input, retrying for at most `retry_for`.
    Publish { input: Input, retry_for: Duration },
    /// Run the user's `on_pause` handler, then call [`Machine::handle_handler_done`].
    RunPause(PauseOrder),
    /// Run the user's `on_resume` handler, then call [`Machine::handle_handler_done`].
    RunResume(ResumeOrder),
    /// Tell the user.
    Event(LeaseEvent),
    /// Answer the pending `release()`.
    ReleaseDone(Result<(), ClientError>),
}

/// What the user sees of a lease; the lease task publishes it after every step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub fence: u64,
    pub gpu: String,
    pub vram_mb: Option<u64>,
    pub lease_ms: u64,
    pub expires_at: SystemTime,
    pub phase: LeasePhase,
    /// When the client gives the lease up on its own, unless a renewal is confirmed before: a margin
    /// before the earliest instant the coordinator could revoke it (a client cut off from NATS
    /// must stop before the GPU is granted on).
    pub lost_at: Option<Instant>,
}

/// A lease as granted (or resumed, for a reused request id found paused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub fence: u64,
    pub gpu: String,
    pub vram_mb: Option<u64>,
    pub lease_ms: u64,
    pub expires_at: Option<String>,
}

impl Grant {
    /// The grant a `granted` reply carries; `fallback_lease_ms` where it names no lease length.
    pub(crate) fn from_reply(reply: &Reply, fallback_lease_ms: u64) -> Grant {
        Grant {
            fence: reply.fence.unwrap_or_default(),
            gpu: reply.gpu.clone().unwrap_or_default(),
            vram_mb: reply.vram_mb,
            lease_ms: reply.lease_ms.unwrap_or(fallback_lease_ms),
            expires_at: reply.expires_at.clone(),
        }
    }
}

/// Which handler runs now.
#[derive(Debug, Clone, Copy)]
enum Running {
    Pause {
        fence: u64,
        started: Instant,
        deadline: Option<Duration>,
    },
    Resume {
        fence: u64,
    },
}

/// One lease's rules.
#[derive(Debug)]
pub(crate) struct Machine {
    request_id: String,
    snapshot: Snapshot,
    has_pause_handler: bool,
    has_resume_handler: bool,
    next_renew: Option<Instant>,
    /// When the renew in flight was sent: the coordinator's new expiry is at least that plus the lease.
    renew_sent: Option<Instant>,
    /// A renew was sent and its `renewed` (or `rejected`) has not come yet.
    renew_in_flight: bool,
    /// `release()` was called; when to give up waiting for `released`.
    release_deadline: Option<Instant>,
    release_started: Option<Instant>,
    running: Option<Running>,
    /// Pause and resume orders that came while a handler ran, in order.
    queued: VecDeque<Control>,
    actions: VecDeque<Action>,
    done: bool,
}

impl Machine {
    /// A lease that holds the GPU from `now`.
    pub(crate) fn granted(
        request_id: String,
        grant: Grant,
        has_pause_handler: bool,
        has_resume_handler: bool,
        now: Instant,
        wall: SystemTime,
    ) -> Machine {
        let mut machine = Machine::new(request_id, grant, LeasePhase::Active, wall);
        machine.has_pause_handler = has_pause_handler;
        machine.has_resume_handler = has_resume_handler;
        machine.next_renew = Some(now + machine.renew_after(wall));
        machine.snapshot.lost_at = Some(machine.lost_after(now, wall));
        machine
    }

    /// A request that is paused (a reused request id): it holds nothing until a `resume`.
    pub(crate) fn paused(
        request_id: String,
        has_pause_handler: bool,
        has_resume_handler: bool,
        wall: SystemTime,
    ) -> Machine {
        let grant = Grant {
            fence: 0,
            gpu: String::new(),
            vram_mb: None,
            lease_ms: 0,
            expires_at: None,
        };
        let mut machine = Machine::new(request_id, grant, LeasePhase::Paused, wall);
        machine.has_pause_handler = has_pause_handler;
        machine.has_resume_handler = has_resume_handler;
        machine
    }

    fn new(request_id: String, grant: Grant, phase: LeasePhase, wall: SystemTime) -> Machine {
        let expires_at = expiry(grant.expires_at.as_deref(), grant.lease_ms, wall);
        Machine {
            request_id,
            snapshot: Snapshot {
                fence: grant.fence,
                gpu: grant.gpu,
                vram_mb: grant.vram_mb,
                lease_ms: grant.lease_ms,
                expires_at,
                phase,
                lost_at: None,
            },
            has_pause_handler: false,
            has_resume_handler: false,
            next_renew: None,
            renew_sent: None,
            renew_in_flight: false,
            release_deadline: None,
            release_started: None,
            running: None,
            queued: VecDeque::new(),
            actions: VecDeque::new(),
            done: false,
        }
    }

    pub(crate) fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The lease task may end: the lease was released, or its handle is gone.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] wants to be called next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        // Giving up locally matters only while the lease runs: not while pausing, paused or releasing.
        let lost_at = self
            .snapshot
            .lost_at
            .filter(|_| self.holds() && !self.releasing());
        [self.next_renew, self.release_deadline, lost_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// When to give the lease up locally, for the expiry in the snapshot (see [`Snapshot::lost_at`]):
    /// the earlier of the coordinator's expiry read on this clock and, for a renewal, its sending
    /// plus the lease (the coordinator handles it after it was sent), less the margin.
    fn lost_after(&self, now: Instant, wall: SystemTime) -> Instant {
        let remaining = self
            .snapshot
            .expires_at
            .duration_since(wall)
            .unwrap_or_default();
        let lease = Duration::from_millis(self.snapshot.lease_ms);
        let mut at = now + remaining;
        if let Some(sent) = self.renew_sent {
            at = at.min(sent + lease);
        }
        let margin = (lease / 10).min(MAX_LOCAL_MARGIN);
        at.checked_sub(margin).map_or(now, |at| at.max(now))
    }

    /// A third of the lease: two renewals can fail before the lease runs out.
    fn renew_interval(&self) -> Duration {
        (Duration::from_millis(self.snapshot.lease_ms) / 3).max(MIN_RENEW_INTERVAL)
    }

    /// When to renew a lease that was just granted, renewed or resumed: after a third of it, or
    /// sooner when the coordinator's expiry says less is left (an answer that came late, after a
    /// NATS outage).
    fn renew_after(&self, wall: SystemTime) -> Duration {
        let remaining = self
            .snapshot
            .expires_at
            .duration_since(wall)
            .unwrap_or_default();
        self.renew_interval().min(remaining / 3)
    }

    fn holds(&self) -> bool {
        matches!(
            self.snapshot.phase,
            LeasePhase::Active | LeasePhase::Resuming
        )
    }

    fn ended(&self) -> bool {
        matches!(
            self.snapshot.phase,
            LeasePhase::Revoked | LeasePhase::Released
        )
    }

    fn releasing(&self) -> bool {
        self.release_deadline.is_some()
    }

    fn publish(&mut self, input: Input, retry_for: Duration) {
        self.actions.push_back(Action::Publish { input, retry_for });
    }

    fn event(&mut self, event: LeaseEvent) {
        self.actions.push_back(Action::Event(event));
    }

    fn finish_release(&mut self, result: Result<(), ClientError>) {
        self.release_deadline = None;
        self.actions.push_back(Action::ReleaseDone(result));
        self.done = true;
    }

    // ----- inputs ----------------------------------------------------------------------------------

    /// A reply about this request.
    pub(crate) fn handle_reply(&mut self, reply: Reply, now: Instant, wall: SystemTime) {
        match reply.outcome {
            Outcome::Renewed => {
                if reply.fence.is_some_and(|f| f != self.snapshot.fence) {
                    // The answer to a renewal of the lease before a pause, overtaken by the resume
                    // (replies and orders come through two consumers).
                    return;
                }
                self.renew_in_flight = false;
                if self.ended() {
                    return;
                }
                if let Some(lease_ms) = reply.lease_ms {
                    self.snapshot.lease_ms = lease_ms;
                }
                self.snapshot.expires_at =
                    expiry(reply.expires_at.as_deref(), self.snapshot.lease_ms, wall);
                if self.holds() && !self.releasing() {
                    self.next_renew = Some(now + self.renew_after(wall));
                    self.snapshot.lost_at = Some(self.lost_after(now, wall));
                }
                self.renew_sent = None;
                self.event(LeaseEvent::Renewed {
                    expires_at: self.snapshot.expires_at,
                });
            }
            Outcome::Released => {
                self.end(LeasePhase::Released);
                if self.releasing() {
                    self.finish_release(Ok(()));
                } else {
                    self.event(LeaseEvent::Released);
                }
            }
            Outcome::Rejected => {
                // A stale fence's rejection names the current fence. While releasing, a newer one
                // means that the coordinator resumed the request before it took the release (the two
                // crossed): release again under it. The current one means that the rejection is of an
                // input sent under an older fence, and a release under this one is on its way.
                if let (true, Some(current)) = (self.releasing(), reply.fence) {
                    if current > self.snapshot.fence {
                        tracing::debug!(
                            request_id = self.request_id,
                            "the release crossed a resume to fence {current}: releasing again"
                        );
                        self.snapshot.fence = current;
                        self.renew_in_flight = false;
                        self.send_release();
                        return;
                    }
                    if current == self.snapshot.fence {
                        return;
                    }
                }
                let error = reply
                    .error
                    .unwrap_or_else(|| "the coordinator rejected an input".to_owned());
                // A reply names no input: a rejection is the renew's while one is in flight, else
                // the release's while one is pending, else an ACK's.
                if self.renew_in_flight {
                    self.renew_in_flight = false;
                    // The coordinator says the lease is gone (the request ended, holds nothing, or
                    // missed its pause deadline): stop now rather than at the local expiry.
                    if reply.code.is_some_and(RejectCode::lease_gone) {
                        self.event(LeaseEvent::Rejected {
                            error: error.clone(),
                        });
                        self.revoke(format!("renewing the lease was rejected: {error}"));
                        return;
                    }
                    tracing::warn!(
                        request_id = self.request_id,
                        "renewing the lease was rejected: {error}"
                    );
                } else if self.releasing() {
                    self.finish_release(Err(ClientError::Rejected {
                        code: reply.code,
                        error: error.clone(),
                    }));
                } else {
                    tracing::warn!(
                        request_id = self.request_id,
                        "an input was rejected: {error}"
                    );
                }
                self.event(LeaseEvent::Rejected { error });
            }
            Outcome::Revoked => self.revoke("the coordinator reports the lease revoked".to_owned()),
            // A `granted` again (the answer to a repeated request), `queued`, `paused`: nothing new.
            _ => {}
        }
    }

    /// An order for this request.
    pub(crate) fn handle_control(&mut self, control: Control, now: Instant, wall: SystemTime) {
        match control.action {
            ControlAction::Revoke => {
                if control.fence >= self.snapshot.fence {
                    self.revoke(control.reason);
                }
            }
            ControlAction::Restart => {
                tracing::warn!(
                    request_id = self.request_id,
                    "the coordinator asks this service to restart: {}",
                    control.reason
                );
                self.event(LeaseEvent::Restart {
                    reason: control.reason,
                });
            }
            ControlAction::Pause | ControlAction::Resume => {
                if self.running.is_some() {
                    self.queued.push_back(control);
                } else {
                    self.order(control, now, wall);
                }
            }
        }
    }

    /// A pause or resume, when no handler runs.
    fn order(&mut self, control: Control, now: Instant, wall: SystemTime) {
        if self.ended() || self.releasing() {
            return;
        }
        let fence = self.snapshot.fence;
        match control.action {
            ControlAction::Pause => {
                if control.fence != fence || !self.holds() {
                    tracing::debug!(
                        request_id = self.request_id,
                        "ignoring a pause for fence {} (fence {fence}, {:?})",
                        control.fence,
                        self.snapshot.phase
                    );
                    return;
                }
                self.snapshot.phase = LeasePhase::Pausing;
                self.next_renew = None;
                let deadline = control.deadline_ms.map(Duration::from_millis);
                self.event(LeaseEvent::Pausing {
                    fence,
                    deadline,
                    reason: control.reason.clone(),
                });
                if self.has_pause_handler {
                    self.running = Some(Running::Pause {
                        fence,
                        started: now,
                        deadline,
                    });
                    self.actions.push_back(Action::RunPause(PauseOrder {
                        request_id: self.request_id.clone(),
                        fence,
                        deadline,
                        reason: control.reason,
                    }));
                } else {
                    tracing::warn!(
                        request_id = self.request_id,
                        "the coordinator asks to pause ({}), but this lease has no on_pause handler \
                         (see `Worker`): release it, or it is revoked when the deadline passes",
                        control.reason
                    );
                }
            }
            ControlAction::Resume => {
                if control.fence <= fence {
                    tracing::debug!(
                        request_id = self.request_id,
                        "ignoring a resume with the old fence {} (fence {fence})",
                        control.fence
                    );
                    return;
                }
                self.snapshot.fence = control.fence;
                if let Some(gpu) = control.gpu.clone() {
                    self.snapshot.gpu = gpu;
                }
                if let Some(lease_ms) = control.lease_ms {
                    self.snapshot.lease_ms = lease_ms;
                }
                self.snapshot.expires_at =
                    expiry(control.expires_at.as_deref(), self.snapshot.lease_ms, wall);
                self.renew_in_flight = false;
                self.renew_sent = None;
                self.snapshot.lost_at = Some(self.lost_after(now, wall));
                // The lease runs from the resume on, while `on_resume` reloads: renew it meanwhile,
                // so that a reload longer than the lease does not lose it.
                self.next_renew = Some(now + self.renew_after(wall));
                if self.has_resume_handler {
                    self.snapshot.phase = LeasePhase::Resuming;
                    self.running = Some(Running::Resume {
                        fence: control.fence,
                    });
                    self.actions.push_back(Action::RunResume(ResumeOrder {
                        request_id: self.request_id.clone(),
                        fence: control.fence,
                        gpu: self.snapshot.gpu.clone(),
                        lease_ms: self.snapshot.lease_ms,
                        expires_at: self.snapshot.expires_at,
                        reason: control.reason,
                    }));
                } else {
                    self.resumed(control.fence);
                }
            }
            ControlAction::Revoke | ControlAction::Restart => {
                unreachable!("handle_control handles revoke and restart itself")
            }
        }
    }

    fn resumed(&mut self, fence: u64) {
        self.snapshot.phase = LeasePhase::Active;
        self.publish(
            Input::Ack(AckMsg {
                request_id: self.request_id.clone(),
                fence: Some(fence),
                action: AckAction::Resumed,
            }),
            ACK_RETRY,
        );
        self.event(LeaseEvent::Resumed {
            fence,
            gpu: self.snapshot.gpu.clone(),
        });
    }

    /// The handler that [`Action::RunPause`] or [`Action::RunResume`] started has returned
    /// (`completed`), or panicked.
    pub(crate) fn handle_handler_done(&mut self, completed: bool, now: Instant, wall: SystemTime) {
        let Some(running) = self.running.take() else {
            return;
        };
        match running {
            Running::Pause {
                fence,
                started,
                deadline,
            } => {
                let elapsed = now.saturating_duration_since(started);
                if let Some(deadline) = deadline.filter(|d| elapsed > *d) {
                    tracing::warn!(
                        request_id = self.request_id,
                        "on_pause took {elapsed:?}, longer than the pause deadline of {deadline:?}: \
                         the lease may have been revoked"
                    );
                }
                let still_pausing = self.snapshot.phase == LeasePhase::Pausing
                    && self.snapshot.fence == fence
                    && !self.releasing();
                if !completed {
                    tracing::error!(
                        request_id = self.request_id,
                        "on_pause panicked: not acknowledging the pause, so the lease is revoked at \
                         its deadline"
                    );
                } else if still_pausing {
                    self.snapshot.phase = LeasePhase::Paused;
                    self.publish(
                        Input::Ack(AckMsg {
                            request_id: self.request_id.clone(),
                            fence: Some(fence),
                            action: AckAction::Paused,
                        }),
                        deadline.unwrap_or(ACK_RETRY).max(ACK_RETRY),
                    );
                    self.event(LeaseEvent::Paused { fence });
                }
            }
            Running::Resume { fence } => {
                let still_resuming = self.snapshot.phase == LeasePhase::Resuming
                    && self.snapshot.fence == fence
                    && !self.releasing();
                if !completed {
                    // Holding a GPU that nothing uses helps no one: stop renewing, and the
                    // coordinator revokes the lease at its expiry and asks for a restart.
                    tracing::error!(
                        request_id = self.request_id,
                        "on_resume panicked: no longer renewing the lease"
                    );
                    self.next_renew = None;
                } else if still_resuming {
                    self.resumed(fence);
                }
            }
        }
        while self.running.is_none() {
            let Some(control) = self.queued.pop_front() else {
                break;
            };
            self.order(control, now, wall);
        }
    }

    /// `release()` was called.
    pub(crate) fn handle_release(&mut self, now: Instant) {
        match self.snapshot.phase {
            LeasePhase::Revoked => self.finish_release(Err(ClientError::Revoked)),
            LeasePhase::Released => self.finish_release(Ok(())),
            _ if self.releasing() => {}
            _ => {
                self.send_release();
                self.release_deadline = Some(now + RELEASE_TIMEOUT);
                self.release_started = Some(now);
            }
        }
    }

    /// The [`crate::Lease`] was dropped: release it unless that is already done or under way.
    pub(crate) fn handle_drop(&mut self) {
        if !self.ended() && !self.releasing() {
            self.send_release();
        }
        self.done = true;
    }

    fn send_release(&mut self) {
        self.next_renew = None;
        self.queued.clear();
        // The fence makes sure that a late release never ends a later lease of the same request.
        let fence = (self.snapshot.fence != 0).then_some(self.snapshot.fence);
        self.publish(
            Input::Release(ReleaseMsg {
                request_id: Some(self.request_id.clone()),
                fence,
            }),
            RELEASE_TIMEOUT,
        );
    }

    /// The instant [`Machine::poll_timeout`] named (or later) has come.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.snapshot.lost_at.is_some_and(|at| at <= now) {
            self.snapshot.lost_at = None;
            if self.holds() && !self.releasing() {
                // No renewal was confirmed in time (cut off from NATS, or the coordinator away): stop
                // before the coordinator could grant the GPU on, and free it there when heard.
                self.publish(
                    Input::Release(ReleaseMsg {
                        request_id: Some(self.request_id.clone()),
                        fence: Some(self.snapshot.fence),
                    }),
                    RELEASE_TIMEOUT,
                );
                self.revoke(
                    "the lease ran out here: no renewal was confirmed before its expiry (is the \
                     coordinator reachable?)"
                        .to_owned(),
                );
                return;
            }
        }
        if let Some(deadline) = self.release_deadline.filter(|d| *d <= now) {
            let waited =
                deadline.saturating_duration_since(self.release_started.unwrap_or(deadline));
            self.finish_release(Err(ClientError::NoReply {
                expected: "released",
                waited,
            }));
            return;
        }
        if self.next_renew.is_some_and(|at| at <= now) {
            if !self.holds() || self.releasing() {
                self.next_renew = None;
                return;
            }
            self.renew_in_flight = true;
            if self.renew_sent.is_none() {
                self.renew_sent = Some(now);
            }
            let lease = Duration::from_millis(self.snapshot.lease_ms);
            self.publish(
                Input::Renew(RenewMsg {
                    request_id: self.request_id.clone(),
                    fence: Some(self.snapshot.fence),
                    lease_ms: None,
                }),
                lease,
            );
            // Try again halfway to the next renewal if no `renewed` comes before; a `renewed`
            // moves this to a full interval.
            self.next_renew = Some(now + (self.renew_interval() / 2).max(MIN_RENEW_INTERVAL));
        }
    }

    fn revoke(&mut self, reason: String) {
        if self.ended() {
            return;
        }
        tracing::warn!(
            request_id = self.request_id,
            "the lease was revoked: {reason}"
        );
        self.end(LeasePhase::Revoked);
        self.event(LeaseEvent::Revoked { reason });
        if self.releasing() {
            self.finish_release(Err(ClientError::Revoked));
        }
    }

    fn end(&mut self, phase: LeasePhase) {
        self.snapshot.phase = phase;
        self.next_renew = None;
        self.snapshot.lost_at = None;
        self.renew_in_flight = false;
        self.queued.clear();
    }
}

/// The expiry the coordinator names, or `lease_ms` from `wall` when it names none.
fn expiry(expires_at: Option<&str>, lease_ms: u64, wall: SystemTime) -> SystemTime {
    expires_at
        .and_then(gpu_coordinator_wire::time::parse_rfc3339)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .unwrap_or_else(|| wall + Duration::from_millis(lease_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "job-1";

    fn grant(fence: u64, lease_ms: u64) -> Grant {
        Grant {
            fence,
            gpu: "gpu0".into(),
            vram_mb: Some(1_000),
            lease_ms,
            expires_at: None,
        }
    }

    fn control(action: ControlAction, fence: u64) -> Control {
        Control {
            action,
            request_id: ID.into(),
            fence,
            deadline_ms: Some(5_000),
            reason: "test".into(),
            lease_ms: None,
            expires_at: None,
            gpu: None,
        }
    }

    fn resume(fence: u64, lease_ms: u64) -> Control {
        Control {
            lease_ms: Some(lease_ms),
            gpu: Some("gpu1".into()),
            deadline_ms: None,
            ..control(ControlAction::Resume, fence)
        }
    }

    fn reply(outcome: Outcome) -> Reply {
        Reply::new(ID, outcome)
    }

    fn drain(m: &mut Machine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn published(actions: &[Action]) -> Vec<Input> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish { input, .. } => Some(input.clone()),
                _ => None,
            })
            .collect()
    }

    fn worker(fence: u64, lease_ms: u64, t0: Instant) -> Machine {
        Machine::granted(
            ID.into(),
            grant(fence, lease_ms),
            true,
            true,
            t0,
            SystemTime::now(),
        )
    }

    #[test]
    fn a_lease_without_a_confirmed_renewal_is_given_up_before_the_coordinator_could() {
        let t0 = Instant::now();
        let mut m = worker(7, 3_000, t0);
        // A tenth of the lease before the coordinator's expiry.
        let lost = t0 + Duration::from_millis(2_700);
        // Renewals go out and nothing answers (the client is cut off).
        let mut renewals = 0;
        while let Some(at) = m.poll_timeout().filter(|at| *at < lost) {
            m.handle_timeout(at);
            let sent = published(&drain(&mut m));
            assert!(
                sent.iter().all(|i| matches!(i, Input::Renew(_))),
                "{sent:?}"
            );
            renewals += sent.len();
        }
        assert!(renewals >= 2, "renewals were tried first");
        assert_eq!(m.poll_timeout(), Some(lost));
        m.handle_timeout(lost);
        let actions = drain(&mut m);
        assert_eq!(
            published(&actions),
            vec![Input::Release(ReleaseMsg {
                request_id: Some(ID.into()),
                fence: Some(7),
            })],
            "the GPU is freed at the coordinator as soon as it is reachable"
        );
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Event(LeaseEvent::Revoked { .. }))),
            "the code holding the lease is told: {actions:?}"
        );
        assert_eq!(m.snapshot().phase, LeasePhase::Revoked);
    }

    #[test]
    fn a_confirmed_renewal_moves_the_local_expiry() {
        let t0 = Instant::now();
        let mut m = worker(7, 3_000, t0);
        let t1 = t0 + Duration::from_secs(1);
        m.handle_timeout(t1);
        drain(&mut m);
        let t2 = t1 + Duration::from_millis(10);
        let wall = SystemTime::now();
        let mut renewed = reply(Outcome::Renewed);
        renewed.fence = Some(7);
        renewed.lease_ms = Some(3_000);
        let at = wall.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + 3_000;
        renewed.expires_at = Some(gpu_coordinator_wire::time::rfc3339(at));
        m.handle_reply(renewed, t2, wall);
        drain(&mut m);
        // The coordinator handled the renewal after it was sent: its expiry is at least the sending
        // plus the lease; the local one is a tenth of the lease before that.
        assert_eq!(m.snapshot.lost_at, Some(t1 + Duration::from_millis(2_700)));
        assert_eq!(m.snapshot().phase, LeasePhase::Active);
    }

    #[test]
    fn renews_at_a_third_of_the_lease_with_the_fence() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        m.handle_timeout(t0 + Duration::from_secs(9));
        assert!(drain(&mut m).is_empty());
        let t1 = t0 + Duration::from_secs(10);
        m.handle_timeout(t1);
        assert_eq!(
            published(&drain(&mut m)),
            vec![Input::Renew(RenewMsg {
                request_id: ID.into(),
                fence: Some(7),
                lease_ms: None
            })]
        );
        // Without an answer it tries again sooner.
        assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        let mut renewed = reply(Outcome::Renewed);
        renewed.lease_ms = Some(30_000);
        renewed.expires_at = Some("2030-01-01T00:00:00.000Z".into());
        let t2 = t1 + Duration::from_millis(20);
        m.handle_reply(renewed, t2, SystemTime::now());
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::Event(LeaseEvent::Renewed { .. })]
        ));
        assert_eq!(m.poll_timeout(), Some(t2 + Duration::from_secs(10)));
        let expected = UNIX_EPOCH
            + Duration::from_millis(
                gpu_coordinator_wire::time::parse_rfc3339("2030-01-01T00:00:00.000Z").unwrap(),
            );
        assert_eq!(m.snapshot().expires_at, expected);
    }

    #[test]
    fn a_late_grant_renews_sooner() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut late = grant(7, 30_000);
        // Only 3 s of the 30 s lease left when the grant is handled.
        let ms = wall.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + 3_000;
        late.expires_at = Some(gpu_coordinator_wire::time::rfc3339(ms));
        let m = Machine::granted(ID.into(), late, false, false, t0, wall);
        let first = m.poll_timeout().unwrap() - t0;
        assert!(first <= Duration::from_secs(1), "{first:?}");
    }

    #[test]
    fn pause_stops_renewing_runs_the_handler_then_acks_with_the_fence() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        let actions = drain(&mut m);
        assert!(matches!(
            actions.as_slice(),
            [
                Action::Event(LeaseEvent::Pausing { fence: 7, .. }),
                Action::RunPause(PauseOrder { fence: 7, .. })
            ]
        ));
        assert_eq!(m.snapshot().phase, LeasePhase::Pausing);
        assert_eq!(m.poll_timeout(), None, "no renewing while pausing");
        m.handle_handler_done(true, t0 + Duration::from_secs(1), SystemTime::now());
        let actions = drain(&mut m);
        assert_eq!(
            published(&actions),
            vec![Input::Ack(AckMsg {
                request_id: ID.into(),
                fence: Some(7),
                action: AckAction::Paused
            })]
        );
        assert!(matches!(
            actions.last(),
            Some(Action::Event(LeaseEvent::Paused { fence: 7 }))
        ));
        assert_eq!(m.snapshot().phase, LeasePhase::Paused);
    }

    #[test]
    fn a_pause_handler_past_its_deadline_still_acks() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        drain(&mut m);
        m.handle_handler_done(true, t0 + Duration::from_secs(6), SystemTime::now());
        assert_eq!(published(&drain(&mut m)).len(), 1);
    }

    #[test]
    fn resume_takes_the_new_fence_and_lease_runs_the_handler_then_acks() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        m.handle_handler_done(true, t0, SystemTime::now());
        drain(&mut m);
        let t1 = t0 + Duration::from_secs(60);
        m.handle_control(resume(9, 12_000), t1, SystemTime::now());
        let actions = drain(&mut m);
        assert!(matches!(
            actions.as_slice(),
            [Action::RunResume(ResumeOrder {
                fence: 9,
                lease_ms: 12_000,
                ..
            })]
        ));
        assert_eq!(m.snapshot().fence, 9);
        assert_eq!(m.snapshot().gpu, "gpu1");
        assert_eq!(m.snapshot().phase, LeasePhase::Resuming);
        // The new lease is renewed from the resume on, even while the handler reloads.
        assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(4)));
        m.handle_handler_done(true, t1 + Duration::from_secs(1), SystemTime::now());
        let actions = drain(&mut m);
        assert_eq!(
            published(&actions),
            vec![Input::Ack(AckMsg {
                request_id: ID.into(),
                fence: Some(9),
                action: AckAction::Resumed
            })]
        );
        assert_eq!(m.snapshot().phase, LeasePhase::Active);
        m.handle_timeout(t1 + Duration::from_secs(4));
        assert_eq!(
            published(&drain(&mut m)),
            vec![Input::Renew(RenewMsg {
                request_id: ID.into(),
                fence: Some(9),
                lease_ms: None
            })]
        );
    }

    #[test]
    fn a_renewed_for_an_older_fence_is_ignored() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        m.handle_handler_done(true, t0, SystemTime::now());
        m.handle_control(resume(9, 12_000), t0, SystemTime::now());
        drain(&mut m);
        let mut late = reply(Outcome::Renewed);
        late.fence = Some(7);
        late.lease_ms = Some(30_000);
        m.handle_reply(late, t0, SystemTime::now());
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.snapshot().lease_ms, 12_000);
    }

    #[test]
    fn an_order_before_the_grant_is_handled_once_the_lease_exists() {
        // What `Lease::start` does with orders that overtook the grant.
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        assert!(matches!(
            drain(&mut m).as_slice(),
            [
                Action::Event(LeaseEvent::Pausing { .. }),
                Action::RunPause(_)
            ]
        ));
    }

    #[test]
    fn orders_during_a_handler_wait_for_it() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        m.handle_handler_done(true, t0, SystemTime::now());
        m.handle_control(resume(9, 30_000), t0, SystemTime::now());
        drain(&mut m);
        // Paused again while on_resume still runs.
        m.handle_control(control(ControlAction::Pause, 9), t0, SystemTime::now());
        assert!(drain(&mut m).is_empty());
        m.handle_handler_done(true, t0, SystemTime::now());
        let actions = drain(&mut m);
        assert!(matches!(
            actions.as_slice(),
            [
                Action::Publish {
                    input: Input::Ack(AckMsg {
                        action: AckAction::Resumed,
                        ..
                    }),
                    ..
                },
                Action::Event(LeaseEvent::Resumed { fence: 9, .. }),
                Action::Event(LeaseEvent::Pausing { fence: 9, .. }),
                Action::RunPause(PauseOrder { fence: 9, .. }),
            ]
        ));
    }

    #[test]
    fn stale_orders_are_ignored() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 6), t0, SystemTime::now());
        m.handle_control(control(ControlAction::Revoke, 6), t0, SystemTime::now());
        m.handle_control(resume(7, 30_000), t0, SystemTime::now());
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.snapshot().phase, LeasePhase::Active);
    }

    #[test]
    fn revoke_stops_renewing_and_restart_is_surfaced() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Revoke, 7), t0, SystemTime::now());
        m.handle_control(control(ControlAction::Restart, 7), t0, SystemTime::now());
        let actions = drain(&mut m);
        assert!(matches!(
            actions.as_slice(),
            [
                Action::Event(LeaseEvent::Revoked { .. }),
                Action::Event(LeaseEvent::Restart { .. })
            ]
        ));
        assert_eq!(m.snapshot().phase, LeasePhase::Revoked);
        assert_eq!(m.poll_timeout(), None);
        m.handle_release(t0);
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::ReleaseDone(Err(ClientError::Revoked))]
        ));
        assert!(m.is_done());
    }

    #[test]
    fn a_revoke_during_on_pause_means_no_ack() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        m.handle_control(control(ControlAction::Revoke, 7), t0, SystemTime::now());
        drain(&mut m);
        m.handle_handler_done(true, t0, SystemTime::now());
        assert!(published(&drain(&mut m)).is_empty());
    }

    #[test]
    fn a_panicking_on_pause_is_not_acknowledged() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        drain(&mut m);
        m.handle_handler_done(false, t0, SystemTime::now());
        assert!(published(&drain(&mut m)).is_empty());
        assert_eq!(m.snapshot().phase, LeasePhase::Pausing);
    }

    #[test]
    fn without_a_pause_handler_it_stops_renewing_and_does_not_ack() {
        let t0 = Instant::now();
        let mut m = Machine::granted(
            ID.into(),
            grant(7, 30_000),
            false,
            false,
            t0,
            SystemTime::now(),
        );
        m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
        let actions = drain(&mut m);
        assert!(matches!(
            actions.as_slice(),
            [Action::Event(LeaseEvent::Pausing { .. })]
        ));
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn release_waits_for_released() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_release(t0);
        assert_eq!(
            published(&drain(&mut m)),
            vec![Input::Release(ReleaseMsg {
                request_id: Some(ID.into()),
                fence: Some(7)
            })]
        );
        assert_eq!(m.poll_timeout(), Some(t0 + RELEASE_TIMEOUT), "no renewing");
        m.handle_reply(reply(Outcome::Released), t0, SystemTime::now());
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::ReleaseDone(Ok(()))]
        ));
        assert!(m.is_done());
    }

    #[test]
    fn a_release_that_crossed_a_resume_is_sent_again_under_the_new_fence() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_release(t0);
        drain(&mut m);
        // The coordinator resumed the request under fence 9 before it took the release under 7.
        let mut stale = reply(Outcome::Rejected);
        stale.error = Some("stale fence 7: the current fence of request `r` is 9".into());
        stale.fence = Some(9);
        m.handle_reply(stale.clone(), t0, SystemTime::now());
        assert!(!m.is_done());
        assert_eq!(
            published(&drain(&mut m)),
            vec![Input::Release(ReleaseMsg {
                request_id: Some(ID.into()),
                fence: Some(9)
            })]
        );
        // The resume itself, read after, and a second rejection of an input under 7 change nothing.
        m.handle_control(resume(9, 30_000), t0, SystemTime::now());
        m.handle_reply(stale, t0, SystemTime::now());
        assert!(drain(&mut m).is_empty());
        assert!(!m.is_done());
        m.handle_reply(reply(Outcome::Released), t0, SystemTime::now());
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::ReleaseDone(Ok(()))]
        ));
    }

    #[test]
    fn a_renewal_rejected_for_a_lease_that_is_gone_ends_the_lease_now() {
        let t0 = Instant::now();
        for (code, gone) in [
            (Some(RejectCode::AlreadyEnded), true),
            (Some(RejectCode::NotHolding), true),
            (Some(RejectCode::PauseDeadlinePassed), true),
            (Some(RejectCode::UnknownRequest), true),
            // Any other reason, or none (an older coordinator): the lease runs to its local
            // expiry, as before.
            (Some(RejectCode::InvalidInput), false),
            (Some(RejectCode::Other), false),
            (None, false),
        ] {
            let mut m = worker(7, 30_000, t0);
            m.handle_timeout(t0 + Duration::from_secs(10));
            drain(&mut m);
            let mut rejected = reply(Outcome::Rejected);
            rejected.error = Some("request `r` has already ended (released)".into());
            rejected.code = code;
            m.handle_reply(rejected, t0, SystemTime::now());
            let phase = m.snapshot().phase;
            if gone {
                assert_eq!(phase, LeasePhase::Revoked, "{code:?}");
                assert!(
                    drain(&mut m)
                        .iter()
                        .any(|a| matches!(a, Action::Event(LeaseEvent::Revoked { .. }))),
                    "{code:?}: the lease says it is lost"
                );
            } else {
                assert_eq!(phase, LeasePhase::Active, "{code:?}");
            }
        }
    }

    #[test]
    fn a_rejection_during_release_belongs_to_an_unanswered_renew_first() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_timeout(t0 + Duration::from_secs(10));
        m.handle_release(t0 + Duration::from_secs(10));
        drain(&mut m);
        m.handle_reply(reply(Outcome::Rejected), t0, SystemTime::now());
        assert!(!m.is_done());
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::Event(LeaseEvent::Rejected { .. })]
        ));
        let mut rejected = reply(Outcome::Rejected);
        rejected.error = Some("stale fence".into());
        rejected.code = Some(RejectCode::StaleFence);
        m.handle_reply(rejected, t0, SystemTime::now());
        let actions = drain(&mut m);
        assert!(matches!(
            actions.first(),
            Some(Action::ReleaseDone(Err(ClientError::Rejected { code: Some(RejectCode::StaleFence), error })))
                if error == "stale fence"
        ));
    }

    #[test]
    fn release_gives_up_without_an_answer() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_release(t0);
        drain(&mut m);
        m.handle_timeout(t0 + RELEASE_TIMEOUT);
        assert!(matches!(
            drain(&mut m).as_slice(),
            [Action::ReleaseDone(Err(ClientError::NoReply {
                expected: "released",
                ..
            }))]
        ));
    }

    #[test]
    fn drop_releases_once() {
        let t0 = Instant::now();
        let mut m = worker(7, 30_000, t0);
        m.handle_drop();
        assert_eq!(published(&drain(&mut m)).len(), 1);
        assert!(m.is_done());

        let mut m = worker(7, 30_000, t0);
        m.handle_release(t0);
        drain(&mut m);
        m.handle_drop();
        assert!(published(&drain(&mut m)).is_empty(), "already releasing");

        let mut m = worker(7, 30_000, t0);
        m.handle_control(control(ControlAction::Revoke, 7), t0, SystemTime::now());
        drain(&mut m);
        m.handle_drop();
        assert!(
            published(&drain(&mut m)).is_empty(),
            "nothing left to release"
        );
    }

    #[test]
    fn a_paused_request_starts_holding_on_resume() {
        let t0 = Instant::now();
        let mut m = Machine::paused(ID.into(), false, false, SystemTime::now());
        assert_eq!(m.poll_timeout(), None);
        m.handle_control(resume(9, 30_000), t0, SystemTime::now());
        let actions = drain(&mut m);
        assert_eq!(
            published(&actions),
            vec![Input::Ack(AckMsg {
                request_id: ID.into(),
                fence: Some(9),
                action: AckAction::Resumed
            })]
        );
        assert_eq!(m.snapshot().phase, LeasePhase::Active);
        assert_eq!(m.snapshot().gpu, "gpu1");
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    }
}
