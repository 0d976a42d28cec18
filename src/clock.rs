//! The wall clock as the core counts time: milliseconds since the Unix epoch. Only the edges read it
//! (the driver, the in-memory adapters, the commands); the core is handed `now`.

use std::time::{SystemTime, UNIX_EPOCH};

use gpu_coordinator_core::Millis;

/// Milliseconds since the Unix epoch, the scheduler's `now`.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
