//! The coordinator's orders for this lease, and the handlers that pause and resume run.

use std::time::{Duration, Instant, SystemTime};

use gpu_coordinator_wire::{AckAction, AckMsg, Control, ControlAction};

use super::{expiry, Action, Input, Machine, Running, ACK_RETRY};
use crate::lease::{LeaseEvent, LeasePhase};
use crate::worker::{PauseOrder, ResumeOrder};

impl Machine {
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
        match control.action {
            ControlAction::Pause => self.pause(control, now),
            ControlAction::Resume => self.resume(control, now, wall),
            ControlAction::Revoke | ControlAction::Restart => {
                unreachable!("handle_control handles revoke and restart itself")
            }
        }
    }

    /// A pause for the current fence: stop renewing and run `on_pause`, or, without one, only warn.
    fn pause(&mut self, control: Control, now: Instant) {
        let fence = self.snapshot.fence;
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

    /// A resume under a newer fence: the lease holds the GPU again from now, and `on_resume` runs,
    /// or, without one, the resume is acknowledged at once.
    fn resume(&mut self, control: Control, now: Instant, wall: SystemTime) {
        let fence = self.snapshot.fence;
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

    /// The resume is done (`on_resume` returned, or there is none): acknowledge it, tell the user.
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
}
