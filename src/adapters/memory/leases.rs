//! The lease store in memory, with the checks of the Redis scripts: a fence above every fence stored
//! (any fence for a rewrite), one lease per request, the GPU's capacity, the count of writes (a store
//! that lost writes it acknowledged answers [`LeaseOutcome::Behind`]); leases expire at `expires_at`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use gpu_coordinator_core::{Fence, Lease, LeaseOp, RequestId};

use super::{lock, stall, Faults, Step, Trace, Verdict};
use crate::clock::now_ms;
use crate::ports::{Deposed, LeaseOutcome, Leases, PortError, Refused, Term};

/// What the store holds (see [`MemLeases::replica`]).
#[derive(Debug, Default, Clone)]
pub struct LeaseState {
    leases: HashMap<RequestId, Lease>,
    max_fence: Fence,
    epoch: bool,
    /// The newest leadership term claimed.
    term: u64,
    /// How many writes the store carried out, as the Redis `writes` key counts them.
    writes: u64,
}

impl LeaseState {
    /// Drops what expired by `now`, as Redis does with its key TTLs.
    fn expire(&mut self, now: u64) {
        self.leases.retain(|_, l| l.expires_at > now);
    }

    fn write(&mut self, lease: &Lease, rewrite: bool) -> Result<(), Refused> {
        if let Some(held) = self.leases.get(&lease.request_id) {
            if held.fence == lease.fence {
                return Ok(());
            }
            return Err(Refused::Held {
                request_id: lease.request_id.clone(),
                fence: held.fence,
            });
        }
        // A rewrite writes a lost lease back under its own fence, as the Redis script does.
        if !rewrite && lease.fence <= self.max_fence {
            return Err(Refused::StaleFence {
                fence: lease.fence,
                stored: self.max_fence,
            });
        }
        let used: u64 = self
            .leases
            .values()
            .filter(|l| l.gpu == lease.gpu)
            .map(|l| l.vram_mb)
            .sum();
        if used + lease.vram_mb > lease.capacity_mb {
            return Err(Refused::Capacity {
                gpu: lease.gpu.clone(),
                used_mb: used,
                vram_mb: lease.vram_mb,
                capacity_mb: lease.capacity_mb,
            });
        }
        self.leases.insert(lease.request_id.clone(), lease.clone());
        self.max_fence = self.max_fence.max(lease.fence);
        Ok(())
    }

    fn apply(&mut self, op: &LeaseOp) -> LeaseOutcome {
        self.expire(now_ms());
        let outcome = self.carry_out(op);
        if outcome == LeaseOutcome::Done {
            self.writes += 1;
        }
        outcome
    }

    fn carry_out(&mut self, op: &LeaseOp) -> LeaseOutcome {
        let held = |state: &LeaseState, request_id: &str, fence: Fence| {
            state
                .leases
                .get(request_id)
                .is_some_and(|l| l.fence == fence)
        };
        match op {
            LeaseOp::Acquire(lease) => self.write(lease, false).into(),
            LeaseOp::Restore(lease) => self.write(lease, true).into(),
            LeaseOp::Renew {
                request_id,
                fence,
                expires_at,
                ..
            } => {
                if !held(self, request_id, *fence) {
                    return LeaseOutcome::NotHeld;
                }
                if let Some(lease) = self.leases.get_mut(request_id) {
                    lease.expires_at = *expires_at;
                }
                LeaseOutcome::Done
            }
            LeaseOp::Release {
                request_id, fence, ..
            } => {
                if !held(self, request_id, *fence) {
                    return LeaseOutcome::NotHeld;
                }
                self.leases.remove(request_id);
                LeaseOutcome::Done
            }
        }
    }
}

/// The request an operation is about, and its name, for the trace.
fn describe(op: &LeaseOp) -> (&'static str, String) {
    match op {
        LeaseOp::Acquire(l) => ("acquire", l.request_id.to_string()),
        LeaseOp::Restore(l) => ("restore", l.request_id.to_string()),
        LeaseOp::Renew { request_id, .. } => ("renew", request_id.to_string()),
        LeaseOp::Release { request_id, .. } => ("release", request_id.to_string()),
    }
}

/// A [`Leases`] store in memory with the Redis scripts' checks.
#[derive(Debug, Clone, Default)]
pub struct MemLeases {
    state: Arc<Mutex<LeaseState>>,
    /// The term this handle writes under (0: unfenced).
    term: Arc<std::sync::atomic::AtomicU64>,
    /// The highest write count this handle saw.
    seen: Arc<std::sync::atomic::AtomicU64>,
    trace: Trace,
    faults: Faults,
}

impl MemLeases {
    /// A store recording into `trace`, subject to `faults`.
    pub fn new(trace: Trace, faults: Faults) -> MemLeases {
        MemLeases {
            state: Arc::default(),
            term: Arc::default(),
            seen: Arc::default(),
            trace,
            faults,
        }
    }

    /// The live leases, in fence order.
    pub fn live(&self) -> Vec<Lease> {
        let mut state = lock(&self.state);
        state.expire(now_ms());
        let mut leases: Vec<Lease> = state.leases.values().cloned().collect();
        leases.sort_by_key(|l| l.fence);
        leases
    }

    /// Loses every lease and the epoch mark, as a Redis restarted without its data would.
    pub fn lose_everything(&self) {
        let mut state = lock(&self.state);
        state.leases.clear();
        state.epoch = false;
    }

    /// Loses the lease of one request (evicted, say), keeping the others and the highest fence.
    pub fn lose(&self, request_id: &str) {
        lock(&self.state).leases.remove(request_id);
    }

    /// A copy of the store as it is now, as a replica that stops receiving its master's writes holds it.
    pub fn replica(&self) -> LeaseState {
        lock(&self.state).clone()
    }

    /// Becomes `replica` (a failover to a replica that missed the writes made since it was taken): the
    /// leases, fence, term and write count the replica held.
    pub fn fail_over_to(&self, replica: LeaseState) {
        *lock(&self.state) = replica;
    }

    /// Puts a lease in place behind the coordinator's back (an old snapshot brought it back).
    pub fn plant(&self, lease: Lease) {
        let mut state = lock(&self.state);
        state.max_fence = state.max_fence.max(lease.fence);
        state.leases.insert(lease.request_id.clone(), lease);
    }
}

#[async_trait]
impl Leases for MemLeases {
    async fn apply(&self, op: &LeaseOp) -> Result<LeaseOutcome, PortError> {
        let mine = self.term.load(std::sync::atomic::Ordering::SeqCst);
        let leader = lock(&self.state).term;
        if mine > 0 && mine < leader {
            return Err(PortError::new(Deposed {
                term: mine,
                detail: format!("the lease store is in term {leader}"),
            }));
        }
        let verdict = self.faults.next();
        if let Verdict::StallBefore = verdict {
            return stall().await;
        }
        let outcome = {
            let mut state = lock(&self.state);
            let seen = self.seen.load(std::sync::atomic::Ordering::SeqCst);
            if state.writes < seen {
                LeaseOutcome::Behind
            } else {
                let outcome = state.apply(op);
                self.seen
                    .fetch_max(state.writes, std::sync::atomic::Ordering::SeqCst);
                outcome
            }
        };
        if outcome != LeaseOutcome::Behind {
            let (name, request_id) = describe(op);
            self.trace.push(Step::Lease {
                op: name,
                request_id,
            });
        }
        if let Verdict::StallAfter = verdict {
            return stall().await;
        }
        Ok(outcome)
    }

    async fn leases(&self) -> Result<Vec<Lease>, PortError> {
        Ok(self.live())
    }

    async fn max_fence(&self) -> Result<Fence, PortError> {
        Ok(lock(&self.state).max_fence)
    }

    async fn ensure_epoch(&self) -> Result<bool, PortError> {
        let mut state = lock(&self.state);
        let missing = !state.epoch;
        state.epoch = true;
        Ok(missing || state.writes < self.seen.load(std::sync::atomic::Ordering::SeqCst))
    }

    async fn recover(&self, fence: Fence) -> Result<(), PortError> {
        use std::sync::atomic::Ordering::SeqCst;
        let mine = self.term.load(SeqCst);
        let mut state = lock(&self.state);
        if mine > 0 && mine < state.term {
            return Err(PortError::new(Deposed {
                term: mine,
                detail: format!("the lease store is in term {}", state.term),
            }));
        }
        state.term = state.term.max(mine);
        state.max_fence = state.max_fence.max(fence);
        state.writes = state.writes.max(self.seen.load(SeqCst)) + 1;
        state.epoch = true;
        self.seen.fetch_max(state.writes, SeqCst);
        self.trace.push(Step::Lease {
            op: "recover",
            request_id: String::new(),
        });
        Ok(())
    }

    async fn ping(&self) -> Result<(), PortError> {
        Ok(())
    }

    async fn claim_term(&self, term: Term) -> Result<(), PortError> {
        self.term.store(term.0, std::sync::atomic::Ordering::SeqCst);
        let mut state = lock(&self.state);
        if state.term > term.0 {
            return Err(PortError::new(Deposed {
                term: term.0,
                detail: format!("the lease store is in term {}", state.term),
            }));
        }
        state.term = term.0;
        state.writes += 1;
        self.seen
            .fetch_max(state.writes, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn term(&self) -> Result<Term, PortError> {
        Ok(Term(lock(&self.state).term))
    }
}
