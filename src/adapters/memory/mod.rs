//! In-memory adapters for every port: [`MemJournal`], [`MemLeases`] and [`MemBus`]. They keep the
//! contracts of the real adapters (a journal batch is atomic; a lease write checks fence, owner and
//! capacity as the Redis scripts do and leases expire at `expires_at`; the bus delivers inputs in order
//! from a position, redelivers what was not acknowledged when the inputs are reopened, and stores a
//! message once per `msg_id`), so the whole driver runs on them without a server. [`MemLeases`] also
//! serves the embedded mode; [`MemJournal`] and [`MemBus`] are compiled only for tests (and with the
//! `testing` feature).
//!
//! They also serve the driver's tests:
//! - a shared [`Trace`] records every effect in the order it happened (journal writes, lease operations,
//!   publishes, acknowledgements), to check the effect order;
//! - [`Faults`] make the n-th effect stall forever, before or after it took place, which is what a crash
//!   at that point looks like to the others: the test then drops the driver and starts a new one over the
//!   same adapters, as a restarted process would find them.

// The journal and the bus are test doubles alone (the embedded mode's leases are in service): left
// out of the release binary, compiled for the tests, for the docs, and with the `testing` feature.
#[cfg(any(test, doc, feature = "testing"))]
mod bus;
#[cfg(any(test, doc, feature = "testing"))]
mod journal;
mod leases;

#[cfg(any(test, doc, feature = "testing"))]
pub use bus::MemBus;
#[cfg(any(test, doc, feature = "testing"))]
pub use journal::MemJournal;
pub use leases::{LeaseState, MemLeases};

use std::sync::{Arc, Mutex};

pub(crate) use crate::sync::lock;

/// One effect, as the adapters saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A journal batch: the input position it carried and the outbox ids it added.
    Write {
        input_seq: Option<u64>,
        msg_ids: Vec<String>,
        records: Vec<String>,
    },
    /// A lease operation, with the request it is about.
    Lease {
        op: &'static str,
        request_id: String,
    },
    /// A message stored by the bus.
    Publish { msg_id: String, subject: String },
    /// An input acknowledged (`terminate`: ended for good).
    Ack { seq: u64, terminate: bool },
}

/// The effects seen by the adapters that share it, in order. [`Trace::off`] records nothing (an
/// adapter in service, such as the embedded mode's leases, would otherwise grow it forever).
#[derive(Debug, Clone)]
pub struct Trace(Option<Arc<Mutex<Vec<Step>>>>);

impl Default for Trace {
    fn default() -> Trace {
        Trace(Some(Arc::default()))
    }
}

impl Trace {
    /// A trace that records nothing.
    pub fn off() -> Trace {
        Trace(None)
    }

    pub(crate) fn push(&self, step: Step) {
        if let Some(steps) = &self.0 {
            lock(steps).push(step);
        }
    }

    /// Everything recorded so far.
    pub fn steps(&self) -> Vec<Step> {
        self.0.as_ref().map(|s| lock(s).clone()).unwrap_or_default()
    }
}

/// Where a crash is injected: the effect numbered `at` (counting from 0 over every effect of the adapters
/// that share these faults) never returns; `after` says whether it took place first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    pub at: usize,
    pub after: bool,
}

/// The faults shared by a set of in-memory adapters.
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<FaultState>>);

#[derive(Debug, Default)]
struct FaultState {
    effects: usize,
    crash: Option<Crash>,
    crashed: bool,
}

/// What to do with the effect about to happen.
pub(crate) enum Verdict {
    Go,
    /// Stall before the effect.
    StallBefore,
    /// Do it, then stall.
    StallAfter,
}

impl Faults {
    /// Injects `crash` (none: every effect goes through).
    pub fn set(&self, crash: Option<Crash>) {
        let mut state = lock(&self.0);
        state.crash = crash;
        state.crashed = false;
    }

    /// Whether the injected crash has happened.
    pub fn crashed(&self) -> bool {
        lock(&self.0).crashed
    }

    /// How many effects were counted so far.
    pub fn effects(&self) -> usize {
        lock(&self.0).effects
    }

    pub(crate) fn next(&self) -> Verdict {
        let mut state = lock(&self.0);
        if state.crashed {
            return Verdict::StallBefore;
        }
        let n = state.effects;
        state.effects += 1;
        match state.crash {
            Some(Crash { at, after }) if at == n => {
                state.crashed = true;
                if after {
                    Verdict::StallAfter
                } else {
                    Verdict::StallBefore
                }
            }
            _ => Verdict::Go,
        }
    }
}

/// A crashed process: it never answers again.
pub(crate) async fn stall<T>() -> T {
    std::future::pending().await
}
