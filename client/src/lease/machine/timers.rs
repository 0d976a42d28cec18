//! When the lease renews, and when the client gives it up on its own.

use std::time::{Duration, Instant, SystemTime};

use gpu_coordinator_wire::{ReleaseMsg, RenewMsg};

use super::{Input, Machine, MAX_LOCAL_MARGIN, MIN_RENEW_INTERVAL, RELEASE_TIMEOUT};
use crate::ClientError;

impl Machine {
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

    /// When to give the lease up locally, for the expiry in the snapshot (see
    /// [`super::Snapshot::lost_at`]): the earlier of the coordinator's expiry read on this clock
    /// and, for a renewal, its sending plus the lease (the coordinator handles it after it was
    /// sent), less the margin.
    pub(super) fn lost_after(&self, now: Instant, wall: SystemTime) -> Instant {
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
    pub(super) fn renew_after(&self, wall: SystemTime) -> Duration {
        let remaining = self
            .snapshot
            .expires_at
            .duration_since(wall)
            .unwrap_or_default();
        self.renew_interval().min(remaining / 3)
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
}
