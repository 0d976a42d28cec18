//! In-memory adapters for every port: [`MemJournal`], [`MemLeases`] and [`MemBus`]. They keep the
//! contracts of the real adapters (a journal batch is atomic; a lease write checks fence, owner and
//! capacity as the Redis scripts do and leases expire at `expires_at`; the bus delivers inputs in order
//! from a position, redelivers what was not acknowledged when the inputs are reopened, and stores a
//! message once per `msg_id`), so the whole driver runs on them without a server.
//!
//! They also serve the driver's tests:
//! - a shared [`Trace`] records every effect in the order it happened (journal writes, lease operations,
//!   publishes, acknowledgements), to check the effect order;
//! - [`Faults`] make the n-th effect stall forever, before or after it took place, which is what a crash
//!   at that point looks like to the others: the test then drops the driver and starts a new one over the
//!   same adapters, as a restarted process would find them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gpu_coordinator_core::{Fence, Lease, LeaseOp, Phase, RequestRecord};
use gpu_coordinator_wire::Encoding;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::driver::now_ms;
use crate::ports::{
    Batch, Bus, Delivery, Inputs, Journal, LeaseOutcome, Leases, Loaded, Outbound, OutboxRow,
    PortError, PublishFailure, Refused, Settle, StatusQueries, StatusQuery,
};

/// Locks a mutex, whose data stays consistent even if a holder panicked (each critical section here
/// is one assignment or one insert).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

/// The effects seen by the adapters that share it, in order.
#[derive(Debug, Clone, Default)]
pub struct Trace(Arc<Mutex<Vec<Step>>>);

impl Trace {
    fn push(&self, step: Step) {
        lock(&self.0).push(step);
    }

    /// Everything recorded so far.
    pub fn steps(&self) -> Vec<Step> {
        lock(&self.0).clone()
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
enum Verdict {
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

    fn next(&self) -> Verdict {
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
async fn stall<T>() -> T {
    std::future::pending().await
}

// ----- the journal ---------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct JournalState {
    records: HashMap<String, RequestRecord>,
    max_fence: Fence,
    input_seq: u64,
    outbox: BTreeMap<u64, OutboxRow>,
}

/// A [`Journal`] in memory: what a restarted process finds is what the last write left.
#[derive(Debug, Clone, Default)]
pub struct MemJournal {
    state: Arc<Mutex<JournalState>>,
    trace: Trace,
    faults: Faults,
}

impl MemJournal {
    /// A journal recording into `trace`, subject to `faults`.
    pub fn new(trace: Trace, faults: Faults) -> MemJournal {
        MemJournal {
            state: Arc::default(),
            trace,
            faults,
        }
    }

    /// Every request record held, in arrival order.
    pub fn records(&self) -> Vec<RequestRecord> {
        let mut records: Vec<_> = lock(&self.state).records.values().cloned().collect();
        records.sort_by_key(|r| r.seq);
        records
    }

    /// The input position stored.
    pub fn input_seq(&self) -> u64 {
        lock(&self.state).input_seq
    }

    /// The outbox rows not yet deleted.
    pub fn outbox(&self) -> Vec<OutboxRow> {
        lock(&self.state).outbox.values().cloned().collect()
    }

    fn apply(&self, batch: &Batch<'_>) {
        let mut state = lock(&self.state);
        for rec in batch.records {
            state.records.insert(rec.request_id.clone(), rec.clone());
        }
        if let Some(fence) = batch.max_fence {
            state.max_fence = state.max_fence.max(fence);
        }
        if let Some(seq) = batch.input_seq {
            state.input_seq = seq;
        }
        for row in batch.outbox {
            state.outbox.insert(row.id, row.clone());
        }
        if let Some(upto) = batch.published_upto {
            state.outbox.retain(|&id, _| id > upto);
        }
        self.trace.push(Step::Write {
            input_seq: batch.input_seq,
            msg_ids: batch.outbox.iter().map(|r| r.msg_id.clone()).collect(),
            records: batch.records.iter().map(|r| r.request_id.clone()).collect(),
        });
    }
}

#[async_trait]
impl Journal for MemJournal {
    async fn migrate(&self) -> Result<(), PortError> {
        Ok(())
    }

    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError> {
        let state = lock(&self.state);
        let mut live: Vec<RequestRecord> = state
            .records
            .values()
            .filter(|r| r.phase != Phase::Ended)
            .cloned()
            .collect();
        live.sort_by_key(|r| r.seq);
        let mut ended: Vec<RequestRecord> = state
            .records
            .values()
            .filter(|r| r.phase == Phase::Ended)
            .cloned()
            .collect();
        ended.sort_by_key(|r| (r.ended_at, r.seq));
        let keep = ended.len().saturating_sub(retain_ended);
        live.extend(ended.into_iter().skip(keep));
        let record_fence = state.records.values().filter_map(|r| r.fence).max();
        Ok(Loaded {
            max_fence: state.max_fence.max(record_fence.unwrap_or_default()),
            max_seq: state.records.values().map(|r| r.seq).max().unwrap_or(0),
            input_seq: state.input_seq,
            outbox: state.outbox.values().cloned().collect(),
            records: live,
        })
    }

    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        if batch.is_empty() {
            return Ok(());
        }
        match self.faults.next() {
            Verdict::Go => {}
            Verdict::StallBefore => return stall().await,
            Verdict::StallAfter => {
                self.apply(batch);
                return stall().await;
            }
        }
        self.apply(batch);
        Ok(())
    }

    async fn ping(&self) -> Result<(), PortError> {
        Ok(())
    }

    async fn close(&self) {}
}

// ----- the lease store ------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct LeaseState {
    leases: HashMap<String, Lease>,
    max_fence: Fence,
    epoch: bool,
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
        if lease.fence < self.max_fence || (lease.fence == self.max_fence && !rewrite) {
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
        LeaseOp::Acquire(l) => ("acquire", l.request_id.clone()),
        LeaseOp::Restore(l) => ("restore", l.request_id.clone()),
        LeaseOp::Renew { request_id, .. } => ("renew", request_id.clone()),
        LeaseOp::Release { request_id, .. } => ("release", request_id.clone()),
    }
}

/// A [`Leases`] store in memory with the Redis scripts' checks.
#[derive(Debug, Clone, Default)]
pub struct MemLeases {
    state: Arc<Mutex<LeaseState>>,
    trace: Trace,
    faults: Faults,
}

impl MemLeases {
    /// A store recording into `trace`, subject to `faults`.
    pub fn new(trace: Trace, faults: Faults) -> MemLeases {
        MemLeases {
            state: Arc::default(),
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
        let verdict = self.faults.next();
        if let Verdict::StallBefore = verdict {
            return stall().await;
        }
        let outcome = lock(&self.state).apply(op);
        let (name, request_id) = describe(op);
        self.trace.push(Step::Lease {
            op: name,
            request_id,
        });
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
        Ok(missing)
    }

    async fn ping(&self) -> Result<(), PortError> {
        Ok(())
    }
}

// ----- the bus --------------------------------------------------------------------------------------

/// One input in the stream.
#[derive(Debug, Clone)]
struct Stored {
    subject: String,
    content_type: Option<String>,
    payload: Bytes,
}

#[derive(Debug, Default)]
struct BusState {
    /// The input stream; sequence `i + 1` is at index `i`.
    inputs: Vec<Stored>,
    /// Acknowledged (or terminated) input sequences.
    acked: HashSet<u64>,
    /// Which opening of the inputs is current: an older one's stream ends.
    generation: u64,
    /// Every message stored, in order, once per `msg_id`.
    published: Vec<Outbound>,
    msg_ids: HashSet<String>,
}

/// A [`Bus`] in memory: an input stream and an output stream with duplicate detection.
#[derive(Clone)]
pub struct MemBus {
    state: Arc<Mutex<BusState>>,
    /// Wakes the input stream when an input arrives or the inputs are reopened.
    arrived: Arc<Notify>,
    reconnects: Arc<watch::Sender<u64>>,
    status: Arc<Mutex<Option<mpsc::Sender<StatusQuery>>>>,
    trace: Trace,
    faults: Faults,
}

impl MemBus {
    /// A bus recording into `trace`, subject to `faults`.
    pub fn new(trace: Trace, faults: Faults) -> MemBus {
        MemBus {
            state: Arc::default(),
            arrived: Arc::new(Notify::new()),
            reconnects: Arc::new(watch::channel(0).0),
            status: Arc::default(),
            trace,
            faults,
        }
    }

    /// Appends an input (JSON) to the stream; answers its sequence.
    pub fn push(&self, subject: &str, payload: impl Into<Bytes>) -> u64 {
        let seq = {
            let mut state = lock(&self.state);
            state.inputs.push(Stored {
                subject: subject.to_owned(),
                content_type: None,
                payload: payload.into(),
            });
            state.inputs.len() as u64
        };
        self.arrived.notify_waiters();
        seq
    }

    /// Every message stored so far, in order.
    pub fn published(&self) -> Vec<Outbound> {
        lock(&self.state).published.clone()
    }

    /// Whether input `seq` was acknowledged.
    pub fn acked(&self, seq: u64) -> bool {
        lock(&self.state).acked.contains(&seq)
    }

    /// Asks the driver for its status document.
    pub async fn status(&self, encoding: Encoding) -> Option<Vec<u8>> {
        let asker = lock(&self.status).clone()?;
        let (tx, rx) = oneshot::channel();
        let respond = Box::new(move |payload: Vec<u8>| -> Settle {
            Box::pin(async move {
                let _ = tx.send(payload);
                Ok(())
            })
        });
        asker.send(StatusQuery { encoding, respond }).await.ok()?;
        rx.await.ok()
    }

    /// Says a reconnect happened.
    pub fn reconnect(&self) {
        self.reconnects.send_modify(|n| *n += 1);
    }

    /// The delivery of input `seq`, if the stream has it and its opening is still current.
    fn delivery(&self, seq: u64, generation: u64) -> Option<Option<Delivery>> {
        let state = lock(&self.state);
        if state.generation != generation {
            return Some(None);
        }
        let stored = state.inputs.get(seq as usize - 1)?.clone();
        let bus = self.clone();
        Some(Some(Delivery {
            seq,
            subject: stored.subject,
            content_type: stored.content_type,
            payload: stored.payload,
            ack: Box::new(move |terminate| -> Settle {
                Box::pin(async move {
                    let verdict = bus.faults.next();
                    if let Verdict::StallBefore = verdict {
                        return stall().await;
                    }
                    lock(&bus.state).acked.insert(seq);
                    bus.trace.push(Step::Ack { seq, terminate });
                    if let Verdict::StallAfter = verdict {
                        return stall().await;
                    }
                    Ok(())
                })
            }),
        }))
    }
}

#[async_trait]
impl Bus for MemBus {
    async fn ensure_streams(&self) -> Result<(), PortError> {
        Ok(())
    }

    /// As JetStream's consumer: past what the journal handled and past the acknowledged floor (every
    /// input up to it acknowledged), from the start when the stream is shorter than the position.
    async fn input_position(&self, handled: u64) -> Result<u64, PortError> {
        let state = lock(&self.state);
        let last = state.inputs.len() as u64;
        let floor = (1..=last)
            .take_while(|seq| state.acked.contains(seq))
            .last()
            .unwrap_or(0);
        let after = handled.max(floor);
        Ok(if after > last { 0 } else { after })
    }

    async fn open_inputs(&self, after: u64) -> Result<Inputs, PortError> {
        let generation = {
            let mut state = lock(&self.state);
            state.generation += 1;
            state.generation
        };
        self.arrived.notify_waiters();
        let bus = self.clone();
        let stream = futures::stream::unfold(after + 1, move |seq| {
            let bus = bus.clone();
            async move {
                loop {
                    let notified = bus.arrived.notified();
                    match bus.delivery(seq, generation) {
                        Some(Some(delivery)) => return Some((Ok(delivery), seq + 1)),
                        Some(None) => return None,
                        None => notified.await,
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        _pipelined: bool,
    ) -> Result<(), PublishFailure> {
        for out in outputs {
            let verdict = self.faults.next();
            if let Verdict::StallBefore = verdict {
                return stall().await;
            }
            {
                let mut state = lock(&self.state);
                if state.msg_ids.insert(out.msg_id.clone()) {
                    state.published.push(out.clone());
                }
            }
            self.trace.push(Step::Publish {
                msg_id: out.msg_id.clone(),
                subject: out.subject.clone(),
            });
            if let Verdict::StallAfter = verdict {
                return stall().await;
            }
        }
        Ok(())
    }

    fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.subscribe()
    }

    async fn status_queries(&self) -> Result<StatusQueries, PortError> {
        let (tx, rx) = mpsc::channel(16);
        *lock(&self.status) = Some(tx);
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }

    async fn flush(&self) -> Result<(), PortError> {
        Ok(())
    }
}
