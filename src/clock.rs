//! The clock as the core counts time: milliseconds since the Unix epoch. Only the edges read it (the
//! driver, the in-memory adapters, the commands); the core is handed `now`.
//!
//! It is read from the wall clock once, when the process first asks, and runs on the monotonic clock
//! from there: a step of the wall clock (NTP, an operator, a VM resumed) does not make leases, pause
//! deadlines or timeouts fire early or late while the coordinator runs. Instants persisted in the
//! journal are wall-clock milliseconds as before, so a restart carries on from them.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use gpu_coordinator_core::Millis;

/// The wall clock and the monotonic clock, read together once.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    wall_ms: Millis,
    at: Instant,
}

impl Anchor {
    fn now() -> Anchor {
        Anchor {
            wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            at: Instant::now(),
        }
    }

    /// The milliseconds at `instant`: the anchor's wall time plus the monotonic time since.
    fn ms_at(&self, instant: Instant) -> Millis {
        self.wall_ms
            .saturating_add(instant.saturating_duration_since(self.at).as_millis() as u64)
    }
}

static ANCHOR: OnceLock<Anchor> = OnceLock::new();

/// Milliseconds since the Unix epoch, the scheduler's `now`: never goes back, and follows the
/// monotonic clock once the process has started.
pub fn now_ms() -> Millis {
    ANCHOR.get_or_init(Anchor::now).ms_at(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn time_runs_on_the_monotonic_clock_from_the_anchor() {
        let anchor = Anchor {
            wall_ms: 1_000_000,
            at: Instant::now(),
        };
        // Whatever the wall clock does meanwhile, only the monotonic time elapsed counts.
        assert_eq!(
            anchor.ms_at(anchor.at + Duration::from_millis(2_500)),
            1_002_500
        );
        assert_eq!(anchor.ms_at(anchor.at), 1_000_000);
        let earlier = anchor.at.checked_sub(Duration::from_secs(1));
        if let Some(earlier) = earlier {
            assert_eq!(anchor.ms_at(earlier), 1_000_000, "never before the anchor");
        }
    }

    #[test]
    fn now_never_goes_back_and_is_near_the_wall_clock() {
        let a = now_ms();
        let b = now_ms();
        assert!(b >= a);
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(wall.abs_diff(b) < 60_000, "{wall} vs {b}");
    }
}
