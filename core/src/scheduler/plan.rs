//! A plan to free room on a GPU: the holders to pause (victims), ranked against other plans.

use super::*;

/// How soon a holder says it frees its VRAM once asked to pause, for ordering victims (smaller is
/// sooner): its `pause_ms` hint, an unknown one after every known one.
pub(super) fn pause_key(rec: &RequestRecord) -> u64 {
    rec.pause_ms.unwrap_or(u64::MAX)
}

/// A holder a preemption plan pauses, with what the rules and the hint compare of it.
#[derive(Debug, Clone)]
pub(super) struct Victim {
    pub(super) arrival: u64,
    pub(super) held_mb: u64,
    /// It holds the whole GPU.
    pub(super) whole: bool,
    pub(super) priority: u8,
    pub(super) granted_at: Millis,
    /// [`pause_key`].
    pub(super) pause: u64,
    /// Paused by a reclaim: priority alone would not pause it.
    pub(super) reclaim: bool,
    pub(super) service: ServiceId,
    /// What it counts against its service's guarantee ([`charge`]).
    pub(super) charged: u64,
}

impl Victim {
    pub(super) fn of(rec: &RequestRecord, reclaim: bool, gpu_total_mb: u64) -> Victim {
        Victim {
            arrival: rec.arrival,
            held_mb: rec.held_mb.unwrap_or(0),
            whole: rec.vram_mb.is_none(),
            priority: rec.priority,
            granted_at: rec.granted_at.unwrap_or(0),
            pause: pause_key(rec),
            reclaim,
            service: rec.service_id.clone(),
            charged: charge(rec, gpu_total_mb),
        }
    }
}

/// A preemption plan chosen: the GPU, the holders to pause (arrival number, and whether the pause is
/// a reclaim), and whether it waits for a holder past its ACK deadline.
pub(super) type Chosen = (usize, Vec<(u64, bool)>, bool);

/// The holders to pause on one GPU for one request.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) victims: Vec<Victim>,
    /// It waits for a holder that missed its ACK deadline.
    pub(super) stuck: bool,
}

impl Plan {
    pub(super) fn victim_mb(&self) -> u64 {
        self.victims.iter().map(|v| v.held_mb).sum()
    }

    /// How plans on different GPUs compare, the smallest first: one that waits for an overdue ACK
    /// last; then the fewest holders paused; then the least VRAM; then, between plans equal on
    /// those, the one whose victims pause soonest.
    pub(super) fn rank(&self) -> (bool, usize, u64, u64) {
        (
            self.stuck,
            self.victims.len(),
            self.victim_mb(),
            self.slowest(),
        )
    }

    /// When the room is made: when the slowest victim has paused (0: no victim).
    pub(super) fn slowest(&self) -> u64 {
        self.victims.iter().map(|v| v.pause).max().unwrap_or(0)
    }

    /// Whether the rules see the two plans as one: as many holders and as much VRAM paused, of the
    /// same priorities and grant instants.
    pub(super) fn alike(&self, other: &Plan) -> bool {
        let kinds = |plan: &Plan| {
            let mut kinds: Vec<(u8, Millis)> = plan
                .victims
                .iter()
                .map(|v| (v.priority, v.granted_at))
                .collect();
            kinds.sort_unstable();
            kinds
        };
        self.stuck == other.stuck
            && self.victim_mb() == other.victim_mb()
            && kinds(self) == kinds(other)
    }
}
