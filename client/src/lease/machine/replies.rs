//! The coordinator's replies about this lease: `renewed`, `released`, `rejected`, `revoked`.

use std::time::{Instant, SystemTime};

use gpu_coordinator_wire::{Outcome, RejectCode, Reply};

use super::{expiry, Machine};
use crate::lease::{LeaseEvent, LeasePhase};
use crate::ClientError;

impl Machine {
    /// A reply about this request.
    pub(crate) fn handle_reply(&mut self, reply: Reply, now: Instant, wall: SystemTime) {
        match reply.outcome {
            Outcome::Renewed => self.renewed(&reply, now, wall),
            Outcome::Released => self.released(),
            Outcome::Rejected => self.rejected(reply),
            Outcome::Revoked => self.revoke("the coordinator reports the lease revoked".to_owned()),
            // A `granted` again (the answer to a repeated request), `queued`, `paused`: nothing new.
            _ => {}
        }
    }

    /// A `renewed`: the lease runs to the expiry it names, and the next renewal is planned from now.
    fn renewed(&mut self, reply: &Reply, now: Instant, wall: SystemTime) {
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

    /// A `released`: the answer to `release()` when one waits, else news of a release by someone
    /// else.
    fn released(&mut self) {
        self.end(LeasePhase::Released);
        if self.releasing() {
            self.finish_release(Ok(()));
        } else {
            self.event(LeaseEvent::Released);
        }
    }

    /// A `rejected`, of a renewal, a release or an ACK.
    fn rejected(&mut self, reply: Reply) {
        if self.rejection_crossed_release(reply.fence) {
            return;
        }
        let error = reply
            .error
            .unwrap_or_else(|| "the coordinator rejected an input".to_owned());
        // A reply names no input: a rejection is the renew's while one is in flight, else
        // the release's while one is pending, else an ACK's.
        if self.renew_in_flight {
            self.renew_rejected(reply.code, error);
            return;
        }
        if self.releasing() {
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

    /// Whether a rejection that names the fence `current` is settled by the release under way.
    ///
    /// A stale fence's rejection names the current fence. While releasing, a newer one means that
    /// the coordinator resumed the request before it took the release (the two crossed): release
    /// again under it. The current one means that the rejection is of an input sent under an older
    /// fence, and a release under this one is on its way.
    fn rejection_crossed_release(&mut self, current: Option<u64>) -> bool {
        let (true, Some(current)) = (self.releasing(), current) else {
            return false;
        };
        if current > self.snapshot.fence {
            tracing::debug!(
                request_id = self.request_id,
                "the release crossed a resume to fence {current}: releasing again"
            );
            self.snapshot.fence = current;
            self.renew_in_flight = false;
            self.send_release();
            return true;
        }
        current == self.snapshot.fence
    }

    /// The renewal in flight was rejected.
    fn renew_rejected(&mut self, code: Option<RejectCode>, error: String) {
        self.renew_in_flight = false;
        // The coordinator says the lease is gone (the request ended, holds nothing, or
        // missed its pause deadline): stop now rather than at the local expiry.
        if code.is_some_and(RejectCode::lease_gone) {
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
        self.event(LeaseEvent::Rejected { error });
    }
}
