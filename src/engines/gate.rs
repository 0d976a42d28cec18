//! The gate in front of an engine: a request passes only while the engine is awake under a usable
//! lease; otherwise it waits (and says so, for the controller to ask for the GPU), up to its
//! `max_wait_ms`. The gate counts what is in flight, so that a pause can drain it, and can cut it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpu_coordinator_client::LeaseWatch;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Gate {
    state: Mutex<State>,
    /// Bumped on every open and close, for the requests waiting.
    opened: watch::Sender<u64>,
    /// A request waits: the controller may want the GPU (see [`Gate::demanded`]).
    demand: Notify,
    /// In flight went down, or a request came or went: for drains and the idle timer.
    pub activity: Notify,
}

struct State {
    open: bool,
    lease: Option<LeaseWatch>,
    in_flight: usize,
    waiting: usize,
    last_activity: Instant,
    /// Cancelled to cut what is in flight; a fresh one for each opening.
    cut: CancellationToken,
}

/// One request let through: counted in flight until dropped.
pub struct Pass {
    gate: Arc<Gate>,
    pub cut: CancellationToken,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().expect("gate lock");
        state.in_flight -= 1;
        state.last_activity = Instant::now();
        drop(state);
        self.gate.activity.notify_waiters();
    }
}

/// Counts a waiting request until dropped.
struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().expect("gate lock");
        state.waiting -= 1;
        state.last_activity = Instant::now();
        drop(state);
        self.0.activity.notify_waiters();
    }
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate {
            state: Mutex::new(State {
                open: false,
                lease: None,
                in_flight: 0,
                waiting: 0,
                last_activity: Instant::now(),
                cut: CancellationToken::new(),
            }),
            opened: watch::channel(0).0,
            demand: Notify::new(),
            activity: Notify::new(),
        })
    }

    /// Lets a request through, waiting until `deadline` for the engine to be awake under a usable
    /// lease; `None` if it was not by then.
    pub async fn enter(self: &Arc<Gate>, deadline: Instant) -> Option<Pass> {
        let mut opened = self.opened.subscribe();
        let mut waiting = None;
        loop {
            // Open under a lease that is not usable now (resuming, or a renewal late): its next
            // change is worth a look.
            let mut unusable = {
                let mut state = self.state.lock().expect("gate lock");
                if state.open && state.lease.as_ref().is_some_and(LeaseWatch::usable) {
                    state.in_flight += 1;
                    state.last_activity = Instant::now();
                    return Some(Pass {
                        gate: Arc::clone(self),
                        cut: state.cut.clone(),
                    });
                }
                if waiting.is_none() {
                    state.waiting += 1;
                    waiting = Some(Waiting(self));
                }
                state.lease.clone().filter(|_| state.open)
            };
            self.demand.notify_one();
            let lease_changed = async {
                let gone = match unusable.as_mut() {
                    Some(lease) => !lease.changed().await,
                    None => true,
                };
                if gone {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = opened.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = lease_changed => {}
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Returns once a request waits. A wake-up alone is no proof (a waiting request signals each
    /// time it looks, and a signal nobody took yet is kept), so the count decides.
    pub async fn demanded(&self) {
        loop {
            let demand = self.demand.notified();
            if self.counts().1 > 0 {
                return;
            }
            demand.await;
        }
    }

    /// Opens the gate under `lease`: the engine is awake and serves.
    pub fn open(&self, lease: LeaseWatch) {
        let mut state = self.state.lock().expect("gate lock");
        state.open = true;
        state.lease = Some(lease);
        state.cut = CancellationToken::new();
        drop(state);
        self.opened.send_modify(|n| *n += 1);
    }

    /// Closes the gate: new requests wait. What is in flight goes on (see [`Gate::drain`]).
    pub fn close(&self) {
        self.state.lock().expect("gate lock").open = false;
        self.opened.send_modify(|n| *n += 1);
    }

    /// Whether the gate lets requests through.
    pub fn is_open(&self) -> bool {
        self.state.lock().expect("gate lock").open
    }

    /// Sets the lease the gate checks (or none); the gate stays as it is.
    pub fn set_lease(&self, lease: Option<LeaseWatch>) {
        self.state.lock().expect("gate lock").lease = lease;
    }

    /// The lease, if any.
    pub fn lease(&self) -> Option<LeaseWatch> {
        self.state.lock().expect("gate lock").lease.clone()
    }

    /// Waits until nothing is in flight, for at most `drain`; then cuts what still is. Returns how
    /// many were cut.
    pub async fn drain(&self, drain: Duration) -> usize {
        let deadline = Instant::now() + drain;
        loop {
            let notified = self.activity.notified();
            let in_flight = self.state.lock().expect("gate lock").in_flight;
            if in_flight == 0 {
                return 0;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    let state = self.state.lock().expect("gate lock");
                    state.cut.cancel();
                    return state.in_flight;
                }
            }
        }
    }

    /// Cuts everything in flight now.
    pub fn cut(&self) {
        self.state.lock().expect("gate lock").cut.cancel();
    }

    /// Requests in flight, and waiting.
    pub fn counts(&self) -> (usize, usize) {
        let state = self.state.lock().expect("gate lock");
        (state.in_flight, state.waiting)
    }

    /// When the engine goes idle: `None` while something is in flight or waits, else the instant of
    /// the last request's end (or arrival) plus `idle`.
    pub fn idle_at(&self, idle: Duration) -> Option<Instant> {
        let state = self.state.lock().expect("gate lock");
        (state.in_flight == 0 && state.waiting == 0).then_some(state.last_activity + idle)
    }
}
