//! The journal in memory: a batch is applied whole, and a restarted driver loads what the last write left.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use gpu_coordinator_core::{Fence, Phase, RequestId, RequestRecord};

use super::{lock, stall, Faults, Step, Trace, Verdict};
use crate::ports::{Batch, Deposed, Journal, Loaded, OutboxRow, PortError, Term};

#[derive(Debug, Default)]
struct JournalState {
    records: HashMap<RequestId, RequestRecord>,
    max_fence: Fence,
    input_seq: u64,
    outbox: BTreeMap<u64, OutboxRow>,
    /// The leader's term, as the leader row holds it; `None`: no leader row (every write goes).
    leader: Option<Term>,
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
        records.sort_by_key(|r| r.arrival);
        records
    }

    /// Another coordinator takes the leadership in `term`: a batch of any other term is refused.
    pub fn lead(&self, term: Term) {
        lock(&self.state).leader = Some(term);
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
            // Only raised, but for an input stream made anew.
            state.input_seq = if batch.input_reset {
                seq
            } else {
                state.input_seq.max(seq)
            };
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
            records: batch
                .records
                .iter()
                .map(|r| r.request_id.to_string())
                .collect(),
        });
    }
}

#[async_trait]
impl Journal for MemJournal {
    /// Writes nothing behind: nothing to bring up to date, nor to fence off.
    async fn take_over(&self, _term: Term) -> Result<(), PortError> {
        Ok(())
    }

    /// Writes nothing behind: no writer to stop.
    async fn stand_down(&self, _finish: bool) {}

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
        live.sort_by_key(|r| r.arrival);
        let mut ended: Vec<RequestRecord> = state
            .records
            .values()
            .filter(|r| r.phase == Phase::Ended)
            .cloned()
            .collect();
        ended.sort_by_key(|r| (r.ended_at, r.arrival));
        let keep = ended.len().saturating_sub(retain_ended);
        live.extend(ended.into_iter().skip(keep));
        let record_fence = state.records.values().filter_map(|r| r.fence).max();
        Ok(Loaded {
            max_fence: state.max_fence.max(record_fence.unwrap_or_default()),
            max_arrival: state.records.values().map(|r| r.arrival).max().unwrap_or(0),
            input_seq: state.input_seq,
            outbox: state.outbox.values().cloned().collect(),
            records: live,
        })
    }

    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        if batch.is_empty() && batch.term.is_none() {
            return Ok(());
        }
        let leader = lock(&self.state).leader;
        if let (Some(mine), Some(leader)) = (batch.term, leader) {
            if mine != leader {
                return Err(PortError::new(Deposed {
                    term: mine.0,
                    detail: format!("the leader is in term {}", leader.0),
                }));
            }
        }
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

    /// Keeps nothing on disk: deletes nothing.
    async fn trim_ended(&self, _retain_ended: usize) -> Result<u64, PortError> {
        Ok(0)
    }

    async fn ping(&self) -> Result<(), PortError> {
        Ok(())
    }

    /// In memory: never full.
    fn full(&self) -> Option<String> {
        None
    }

    async fn close(&self) {}
}
