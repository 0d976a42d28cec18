//! Carrying out the scheduler's actions, in the order that makes each effect durable before it is seen:
//! the journal batch and the lease store first (concurrently), then the messages, handed to the
//! publishing stage, which publishes them in order under their outbox ids. The input position and the
//! outbox are the journal's bookkeeping, kept here.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use gpu_coordinator_core::{Action, Fence, Input, LeaseOp, RequestId, RequestRecord};
use gpu_coordinator_wire::Encoding;
use tokio_util::sync::CancellationToken;

use super::Driver;
use crate::metrics::{Metrics, Stage};
use crate::ports::{Batch, InputLog, LeaseOutcome, Outbound, OutboxRow, OutputLog};
use crate::render;
use crate::retry::with_retry;

/// Where the driver is in the input stream.
#[derive(Debug, Default)]
pub(super) struct InputPosition {
    /// The stream sequence of the last input whose effects are committed: inputs at or below it were
    /// handled before (a redelivery after a crash) and are only acknowledged.
    pub handled: u64,
    /// The last input of the batch being handled, committed with its effects.
    pub pending: Option<u64>,
}

/// The outbox: messages committed with the batch that caused them, deleted once the bus stored them.
#[derive(Debug)]
pub(super) struct Outbox {
    /// The next row id.
    next: u64,
    /// Rows up to this id are deleted (or their deletion is in the batch being written).
    deleted_upto: u64,
    /// Makes this process's message ids unique: `<boot>-<row id>`.
    boot: String,
}

impl Outbox {
    /// Goes on after the rows left from before a restart (`left`, oldest first), which are published
    /// again at start.
    pub fn after(left: &[OutboxRow]) -> Outbox {
        Outbox {
            next: left.last().map_or(1, |row| row.id + 1),
            deleted_upto: 0,
            boot: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// What the next write deletes, given that the bus stored the rows up to `stored`: up to there, or
    /// nothing when those are deleted already.
    pub fn deletion(&mut self, stored: Option<u64>) -> Option<u64> {
        let stored = stored.filter(|&upto| upto > self.deleted_upto)?;
        self.deleted_upto = stored;
        Some(stored)
    }

    /// The rows for these messages, numbered on from the last.
    fn rows(&mut self, messages: Vec<(String, Encoding, Vec<u8>)>) -> Vec<OutboxRow> {
        messages
            .into_iter()
            .map(|(subject, encoding, payload)| {
                let id = self.next;
                self.next += 1;
                OutboxRow {
                    id,
                    msg_id: format!("{}-{id}", self.boot),
                    subject,
                    msgpack: encoding == Encoding::MsgPack,
                    payload,
                }
            })
            .collect()
    }
}

/// What one round of the scheduler's actions amounts to.
#[derive(Default)]
struct Round {
    records: Vec<RequestRecord>,
    fence: Option<Fence>,
    lease_ops: Vec<LeaseOp>,
    messages: Vec<(String, Encoding, Vec<u8>)>,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.fence.is_none()
            && self.lease_ops.is_empty()
            && self.messages.is_empty()
    }
}

impl Driver {
    /// Drains the scheduler's pending actions into one round, the later record of a request replacing
    /// the earlier one.
    fn drain_round(&mut self) -> Round {
        let mut round = Round::default();
        let mut index: HashMap<RequestId, usize> = HashMap::new();
        while let Some(action) = self.sched.poll_action() {
            self.recorder.observe(&action);
            if let Some(m) = render::message(&self.subjects, &action) {
                round.messages.push((m.subject, m.encoding, m.payload));
                continue;
            }
            match action {
                Action::Persist(rec) => match index.get(&rec.request_id) {
                    Some(&i) => round.records[i] = rec,
                    None => {
                        index.insert(rec.request_id.clone(), round.records.len());
                        round.records.push(rec);
                    }
                },
                Action::PersistFence(f) => {
                    round.fence = Some(round.fence.map_or(f, |old: Fence| old.max(f)))
                }
                Action::Lease(op) => round.lease_ops.push(op),
                Action::Reply { .. } | Action::Control { .. } | Action::Event { .. } => {}
            }
        }
        round
    }

    /// Carries out every pending action: the journal and the lease store, then the bus. Retries each
    /// server with backoff; gives up only at shutdown (the inputs then stay unacknowledged and come again).
    pub(super) async fn carry_out(&mut self) -> anyhow::Result<()> {
        loop {
            let round = self.drain_round();
            if round.is_empty() {
                return Ok(());
            }
            let outbox = self.outbox.rows(round.messages);
            let batch = Batch {
                records: &round.records,
                max_fence: round.fence,
                input_seq: self.position.pending.take(),
                input_reset: false,
                outbox: &outbox,
                published_upto: self.outbox.deletion(self.publisher.stored_upto()),
                term: Some(self.term),
            };
            // The journal and the lease store together: both are fenced by the leadership term (a
            // deposed coordinator's writes are refused by each), and both finish before anything is
            // published or acknowledged. A restart reconciles a crash between the two: a lease without
            // its grant in the journal is released; a grant without its lease is written back.
            let journal = &self.ports.journal;
            let metrics = self.recorder.metrics();
            let written = with_retry("writing the journal", &self.shutdown, || {
                journal.write(&batch)
            });
            let (written, leased) = timed(metrics, Stage::Durable, async {
                tokio::join!(
                    timed(metrics, Stage::Journal, written),
                    self.apply_leases(&round.lease_ops)
                )
            })
            .await;
            written?;
            let (mut refused, mut lost, mut behind) = leased?;
            // The store lost writes it had acknowledged (a failover to a replica that was behind): it
            // wrote none of the round's. It is repaired first (its term and fence raised, the leases
            // written back), then the round's writes go again, all before anything is published.
            while behind {
                let ops = self.repair_lease_store(&round.lease_ops).await?;
                (refused, lost, behind) = self.apply_leases(&ops).await?;
            }
            if let Some(seq) = batch.input_seq {
                self.position.handled = self.position.handled.max(seq);
            }
            // What the store said belongs to the round's time, however long the store took: the core
            // takes it at its own time, firing no timer (see `Scheduler::handle_inputs`).
            let now = self.time_floor;
            for (request_id, fence, why) in refused {
                tracing::error!(%request_id, "the lease store refused a lease: {why}");
                self.sched.handle_input(
                    Input::LeaseRefused {
                        request_id,
                        fence,
                        why,
                    },
                    now,
                );
            }
            // A renewed lease the store no longer had (it ended there early): the scheduler writes it
            // back while it holds it, in the next round.
            for (request_id, fence) in lost {
                tracing::warn!(%request_id, "the lease store had lost a renewed lease");
                self.sched
                    .handle_input(Input::LeaseNotHeld { request_id, fence }, now);
            }
            // Committed: the publishing stage takes the messages, while this loop goes on.
            if let Some(last) = outbox.last().map(|row| row.id) {
                let outputs: Vec<Outbound> = outbox.iter().map(OutboxRow::outbound).collect();
                self.publisher.publish(outputs, last).await?;
            }
        }
    }

    /// Applies lease operations in order, sent together. Answers the leases the store refused (request,
    /// fence, why), the renewed ones it no longer held (request, fence), and whether it was behind
    /// (it lost writes it had acknowledged, and wrote none of these).
    #[allow(clippy::type_complexity)]
    async fn apply_leases(
        &self,
        ops: &[LeaseOp],
    ) -> anyhow::Result<(
        Vec<(RequestId, Fence, String)>,
        Vec<(RequestId, Fence)>,
        bool,
    )> {
        let mut refused = Vec::new();
        let mut lost = Vec::new();
        if ops.is_empty() {
            return Ok((refused, lost, false));
        }
        let leases = &self.ports.leases;
        let written = with_retry("writing the lease store", &self.shutdown, || {
            leases.apply_all(ops)
        });
        let outcomes = timed(self.recorder.metrics(), Stage::Leases, written).await?;
        if outcomes.contains(&LeaseOutcome::Behind) {
            return Ok((refused, lost, true));
        }
        for (outcome, op) in outcomes.iter().zip(ops) {
            match (outcome, op) {
                (LeaseOutcome::Refused(why), LeaseOp::Acquire(lease) | LeaseOp::Restore(lease)) => {
                    refused.push((lease.request_id.clone(), lease.fence, why.to_string()))
                }
                (
                    LeaseOutcome::NotHeld,
                    LeaseOp::Renew {
                        request_id, fence, ..
                    },
                ) => lost.push((request_id.clone(), *fence)),
                _ => {}
            }
        }
        Ok((refused, lost, false))
    }

    /// Writes what no batch of effects carried: the input position, when given (`reset`: even below
    /// the stored one, for an input stream made anew), and the deletion of the outbox rows the bus has
    /// stored. Nothing when there is neither.
    pub(super) async fn write_bookkeeping(
        &mut self,
        input_seq: Option<u64>,
        reset: bool,
    ) -> anyhow::Result<()> {
        let batch = Batch {
            input_seq,
            input_reset: reset,
            published_upto: self.outbox.deletion(self.publisher.stored_upto()),
            term: Some(self.term),
            ..Batch::default()
        };
        let journal = &self.ports.journal;
        with_retry("writing the journal", &self.shutdown, || {
            journal.write(&batch)
        })
        .await?;
        if let Some(seq) = input_seq {
            self.position.handled = seq;
        }
        Ok(())
    }
}

/// `work`, its time recorded as `stage` (from its first poll: a future does nothing before).
async fn timed<T>(metrics: &Metrics, stage: Stage, work: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let done = work.await;
    metrics.observe_stage(stage, start.elapsed());
    done
}

/// Publishes messages in order, retrying with backoff from the first one not surely stored: after a
/// failure one at a time, so that order holds even across a reconnect (a `restart` never before its
/// `revoke`), and under their ids, so that the bus keeps one copy of any sent twice. `input_log` keeps
/// the streams: a retry makes them anew first.
pub(super) async fn publish(
    (input_log, output_log): (&dyn InputLog, &dyn OutputLog),
    outputs: &[Outbound],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let done = AtomicUsize::new(0);
    let retried = AtomicBool::new(false);
    with_retry("publishing to the bus", shutdown, || {
        let from = done.load(Relaxed);
        let pipelined = !retried.swap(true, Relaxed);
        let (done, rest) = (&done, &outputs[from..]);
        async move {
            if !pipelined {
                // A retry: the output stream may be what was lost; it is made anew if so.
                if let Err(e) = input_log.ensure_streams(None).await {
                    tracing::debug!("making the streams before a retry: {e}");
                }
            }
            output_log
                .publish_in_order(rest, pipelined)
                .await
                .inspect_err(|failure| done.store(from + failure.stored, Relaxed))
        }
    })
    .await
}
