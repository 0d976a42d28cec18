//! The life of one lease as a state machine without I/O, clock or async: the lease task feeds it
//! replies, orders, commands and the current instant (`handle_*`), and carries out what it asks for
//! (`poll_action`) until the next wake-up (`poll_timeout`).
//!
//! It decides when to renew, what to acknowledge under which fence, which handler to run, and when a
//! `release()` is answered. It never sends anything itself, so every rule here is tested with plain
//! `#[test]`s.
//!
//! The rules are cut along what feeds them: `replies` (the coordinator's answers to this lease's
//! inputs), `orders` (pause, resume, revoke, restart, and the handlers they run), `timers` (when to
//! renew, when to give the lease up locally), `ending` (release, drop, revoke).

mod ending;
mod orders;
mod replies;
mod timers;

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpu_coordinator_wire::{AckMsg, Control, ReleaseMsg, RenewMsg, Reply};

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
}

/// The expiry the coordinator names, or `lease_ms` from `wall` when it names none.
fn expiry(expires_at: Option<&str>, lease_ms: u64, wall: SystemTime) -> SystemTime {
    expires_at
        .and_then(gpu_coordinator_wire::time::parse_rfc3339)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .unwrap_or_else(|| wall + Duration::from_millis(lease_ms))
}

#[cfg(test)]
mod tests;
