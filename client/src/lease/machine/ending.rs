//! How a lease ends: released by the user, dropped, or revoked.

use std::time::Instant;

use gpu_coordinator_wire::ReleaseMsg;

use super::{Action, Input, Machine, RELEASE_TIMEOUT};
use crate::lease::{LeaseEvent, LeasePhase};
use crate::ClientError;

impl Machine {
    pub(super) fn finish_release(&mut self, result: Result<(), ClientError>) {
        self.release_deadline = None;
        self.actions.push_back(Action::ReleaseDone(result));
        self.done = true;
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

    pub(super) fn send_release(&mut self) {
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

    pub(super) fn revoke(&mut self, reason: String) {
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

    pub(super) fn end(&mut self, phase: LeasePhase) {
        self.snapshot.phase = phase;
        self.next_renew = None;
        self.snapshot.lost_at = None;
        self.renew_in_flight = false;
        self.queued.clear();
    }
}
