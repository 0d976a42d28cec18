//! The event loop: one `select!` over shutdown, the scheduler's next deadline, the inputs, reconnects,
//! status questions, NVML samples, commands and the once-a-second bookkeeping. Each branch turns what
//! came into scheduler inputs and carries out the actions before the next one.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use gpu_coordinator_core::Input;
use gpu_coordinator_core::QueuePage;
use gpu_coordinator_wire::{codec, decode_input, Inbound, LeaderStatus, StatusDoc, StatusPage};
use tokio::sync::mpsc;

use super::{now_ms, Command, Driver, NvmlFeed};
use crate::ports::gpu::{used_by_gpu, DeviceSample};
use crate::ports::{Delivery, Inputs, StatusQuery};
use crate::render;
use crate::retry::with_retry;

/// The most queue entries one status document lists, whatever the question asks: 1,000 entries
/// keep it far below NATS's 1 MB payload limit.
pub const MAX_STATUS_LIMIT: u64 = 1_000;

/// How often (in seconds) the input stream is looked at, to make room when it is nearly full.
const TRIM_EVERY_TICKS: u64 = 5;

/// How many inputs one batch takes at most: they share one journal write.
const MAX_BATCH: usize = 256;

/// How often outbox rows already stored leave the journal and the lease store is compared with the
/// scheduler.
const EVERY_SECOND: Duration = Duration::from_secs(1);

/// How long a stopping driver waits for the bus to take what it buffered.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// How long timers wait at most for the inputs stored before they fell due.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// How often the node agents' latest samples are handed to the scheduler: one look at the bus and
/// one pass for all of them, however many hosts there are.
const NODES_EVERY: Duration = Duration::from_millis(200);

/// How long the loop sleeps when the scheduler wants no wake-up.
const IDLE: Duration = Duration::from_secs(3600);

impl Driver {
    /// The event loop, until shutdown or until leadership is lost.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let bus = self.ports.bus.clone();
        let leadership = self.ports.leadership.clone();
        let lost = leadership.lost(self.term);
        tokio::pin!(lost);
        let mut inputs = None;
        self.reopen_inputs(&mut inputs).await?;
        let mut status = self.status_questions().await?;
        let mut reconnects = bus.reconnects();
        let mut every_second = tokio::time::interval(EVERY_SECOND);
        let mut ticks = 0u64;
        every_second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nodes_tick = tokio::time::interval(NODES_EVERY);
        nodes_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!("coordinator ready");
        loop {
            let wake = match self.catching_up_left() {
                Some(left) => left,
                None => self
                    .sched
                    .poll_timeout()
                    .map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
                    .unwrap_or(IDLE),
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = &mut lost => {
                    tracing::warn!("leadership of term {} lost: no longer acting", self.term.0);
                    break;
                }
                // Inputs before timers: after a stall (a server away, the process stopped) the inputs
                // stored meanwhile are handled at the time they were stored, before the timers that
                // fell due since, so a renewal stored in time still counts.
                next = next_input(&mut inputs) => match next {
                    Some(Ok(first)) => {
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match inputs.as_mut().and_then(|s| s.next().now_or_never()) {
                                Some(Some(Ok(d))) => batch.push(d),
                                _ => break,
                            }
                        }
                        if self.handle_batch(batch).await? == Batch::Gap {
                            self.reopen_inputs(&mut inputs).await?;
                        }
                    }
                    Some(Err(e)) => {
                        // A consumer that failed (its stream or itself deleted, heartbeats missed)
                        // is made anew after the last input handled.
                        tracing::warn!("input consumer: {e}; reopening");
                        self.reopen_inputs(&mut inputs).await?;
                    }
                    None => {
                        tracing::warn!("input consumer ended; reopening");
                        self.reopen_inputs(&mut inputs).await?;
                    }
                },
                _ = tokio::time::sleep(wake) => {
                    if let Some(at) = self.inputs_caught_up().await {
                        let now = self.core_time(at);
                        self.sched.handle_timeout(now);
                        self.carry_out().await?;
                    }
                }
                Ok(()) = reconnects.changed() => {
                    tracing::info!("the bus reconnected; reopening the input consumer");
                    self.reopen_inputs(&mut inputs).await?;
                }
                Some(query) = status.next() => self.answer_status(query).await,
                Some(samples) = next_sample(&mut self.nvml) => self.handle_samples(samples).await?,
                Some(heard) = next_node(&self.nodes) => {
                    if let Some(feed) = self.nodes.as_mut() {
                        feed.keep(heard);
                    }
                }
                _ = nodes_tick.tick(), if self.nodes.as_ref().is_some_and(|f| f.has_pending()) => {
                    self.handle_node_samples().await?;
                }
                Some(command) = commands.recv() => match command {
                    Command::Status(page, reply) => {
                        let _ = reply.send(self.status_doc(page));
                    }
                },
                _ = every_second.tick() => {
                    ticks += 1;
                    self.every_second(ticks).await?;
                }
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Whether the inputs stored until now are handled, so that what is due now may fire: a renewal
    /// or an ACK stored in time (during a stall of this process, a server away, a takeover) counts
    /// before the expiry or the deadline it beat. Answers the time up to which that holds (when the
    /// bus was asked), the time at which timers may fire; `None` while inputs stored before it are
    /// still to be handled. Once those are, the bus is asked again (more may have been stored
    /// meanwhile, before timers that fell due meanwhile), until it has nothing more; the timers wait
    /// at most [`CATCH_UP_LIMIT`] in all (a consumer that does not deliver does not stop them). A bus
    /// that cannot tell does not hold them.
    pub(super) async fn inputs_caught_up(&mut self) -> Option<gpu_coordinator_core::Millis> {
        let since = match self.catching_up {
            Some((_, since)) if since.elapsed() >= CATCH_UP_LIMIT => {
                self.catching_up = None;
                return Some(now_ms());
            }
            Some((end, _)) if self.position.handled < end => return None,
            Some((_, since)) => Some(since),
            None => None,
        };
        // Whatever the bus says it holds was stored before this instant.
        let asked_at = now_ms();
        match self.ports.bus.input_end().await {
            Ok(end) if end > self.position.handled => {
                tracing::debug!(
                    "timers wait for the inputs up to #{end} (#{} handled)",
                    self.position.handled
                );
                self.catching_up = Some((end, since.unwrap_or_else(std::time::Instant::now)));
                None
            }
            _ => {
                self.catching_up = None;
                Some(asked_at)
            }
        }
    }

    /// While timers wait for inputs: how much longer they may wait (nothing once the inputs they
    /// wait for are handled: the bus is asked again). `None` when they do not wait.
    pub(super) fn catching_up_left(&mut self) -> Option<Duration> {
        let (end, since) = self.catching_up?;
        if self.position.handled >= end {
            return Some(Duration::ZERO);
        }
        Some(CATCH_UP_LIMIT.saturating_sub(since.elapsed()))
    }

    /// The time to hand the core for something that happened `at`: never before the last time it was
    /// handed, so that its clock never goes back.
    pub(super) fn core_time(
        &mut self,
        at: gpu_coordinator_core::Millis,
    ) -> gpu_coordinator_core::Millis {
        self.time_floor = self.time_floor.max(at);
        self.time_floor
    }

    /// The status questions: those subscribed at the start, or a new subscription.
    async fn status_questions(&mut self) -> anyhow::Result<crate::ports::StatusQueries> {
        let subscribed = self
            .status
            .take()
            .and_then(|status| status.into_inner().ok());
        match subscribed {
            Some(status) => Ok(status),
            None => {
                let bus = self.ports.bus.clone();
                with_retry("subscribing to status", &self.shutdown, || {
                    bus.status_queries()
                })
                .await
            }
        }
    }

    /// What is done every second, busy or idle (`tick` counts the seconds).
    async fn every_second(&mut self, tick: u64) -> anyhow::Result<()> {
        // Rows stored by the bus leave the outbox within a second, so a restart much later does not
        // publish them again past the duplicate window.
        self.write_bookkeeping(None, false).await?;
        // Reconciling hands the core the time now: after the inputs stored until now.
        if self.catching_up.is_none() {
            if let Some(at) = self.inputs_caught_up().await {
                self.check_lease_store(at).await?;
            }
        }
        if tick.is_multiple_of(TRIM_EVERY_TICKS) {
            self.trim_inputs().await;
            self.trim_ended();
        }
        Ok(())
    }

    /// Deletes the ended requests beyond `queue.retain_ended` from the journal, in a task of its own
    /// and a batch at a time (see [`crate::ports::Journal::trim_ended`]), so that the journal does not
    /// grow with every request ever made and the grant path's writes are not held up; one such task at
    /// a time. A failure only waits for the next try.
    fn trim_ended(&self) {
        use std::sync::atomic::Ordering;
        if self.trimming.swap(true, Ordering::SeqCst) {
            return;
        }
        let (journal, retain, trimming) = (
            self.ports.journal.clone(),
            self.retain_ended,
            self.trimming.clone(),
        );
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut deleted = 0;
            while !shutdown.is_cancelled() {
                match journal.trim_ended(retain).await {
                    Ok(n) => {
                        deleted += n;
                        if n < crate::ports::TRIM_ENDED_BATCH {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("deleting ended requests beyond queue.retain_ended: {e}");
                        break;
                    }
                }
                tokio::task::yield_now().await;
            }
            if deleted > 0 {
                tracing::debug!(
                    "{deleted} ended request(s) beyond queue.retain_ended ({retain}) deleted"
                );
            }
            trimming.store(false, Ordering::SeqCst);
        });
    }

    /// Makes room in a nearly full input stream (see [`crate::ports::Bus::trim_inputs`]); a failure only
    /// waits for the next try.
    async fn trim_inputs(&self) {
        match self.ports.bus.trim_inputs(self.position.handled).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!("{n} handled input(s) removed from the input stream"),
            Err(e) => tracing::warn!("making room in the input stream: {e}"),
        }
    }

    /// Leaves the journal and the bus in order: what the bus stored need not be published again at the
    /// next start, and a bus that is away is not waited for.
    async fn stop(&mut self) {
        tracing::info!("stopping: intake closed, flushing the bus");
        self.publisher.finish(FLUSH_WAIT).await;
        if let Err(e) = self.write_bookkeeping(None, false).await {
            tracing::warn!("{e:#}");
        }
        match tokio::time::timeout(FLUSH_WAIT, self.ports.bus.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(_) => {
                tracing::warn!("the bus did not take the last messages within {FLUSH_WAIT:?}")
            }
        }
    }

    /// (Re)opens the inputs after the last input handled. The old stream is dropped first, so that none
    /// of its pulls reaches the new one; a position that changed (a new journal beside an old consumer,
    /// or an input stream made anew) is persisted before reading.
    pub(super) async fn reopen_inputs(
        &mut self,
        inputs: &mut Option<Inputs>,
    ) -> anyhow::Result<()> {
        *inputs = None;
        let shutdown = self.shutdown.clone();
        let bus = self.ports.bus.clone();
        let handled = self.position.handled;
        // A stream lost at run time (deleted, or a server that came back without it) is made anew.
        with_retry("making the streams", &shutdown, || {
            bus.ensure_streams(Some(handled))
        })
        .await?;
        let after = with_retry("finding where the inputs go on", &shutdown, || {
            bus.input_position(handled)
        })
        .await?;
        if after != handled {
            // Lower only for an input stream made anew, numbered from its start again.
            self.write_bookkeeping(Some(after), after < handled).await?;
        }
        *inputs = Some(
            with_retry("opening the input consumer", &shutdown, || {
                bus.open_inputs(after)
            })
            .await?,
        );
        Ok(())
    }

    /// Feeds a batch of inputs to the scheduler, makes their effects durable and published, then
    /// acknowledges them.
    ///
    /// Inputs come in stream order, so one at or below the last handled is a redelivery. An input
    /// after a gap (its predecessor never came) ends the batch before it, once: the caller reads the
    /// inputs again from the last handled, and what the stream still holds of the gap comes in order
    /// (an input handled out of order would make its predecessor look handled). A gap found again at
    /// the same place is inputs the stream no longer holds (removed by `nats.max_age`, or purged):
    /// said loudly, and gone on from.
    pub(super) async fn handle_batch(&mut self, batch: Vec<Delivery>) -> anyhow::Result<Batch> {
        let taken = std::time::Instant::now();
        let mut settle = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        let mut handled = self.position.handled;
        let mut outcome = Batch::Handled;
        for delivery in batch {
            if delivery.seq > handled + 1 && handled > 0 {
                if self.gap_checked != Some(handled) {
                    tracing::warn!(
                        "input #{} came after #{handled}: reading the inputs again from #{}",
                        delivery.seq,
                        handled + 1
                    );
                    self.gap_checked = Some(handled);
                    outcome = Batch::Gap;
                    break;
                }
                tracing::error!(
                    "inputs #{}..#{} are no longer in the input stream and were never handled \
                     (removed by nats.max_age, or purged): their senders got no answer",
                    handled + 1,
                    delivery.seq - 1
                );
            }
            let Delivery {
                seq,
                stored_at,
                subject,
                content_type,
                payload,
                ack,
            } = delivery;
            if seq != 0 && seq <= handled {
                // Handled before (before a crash, or a redelivery in this very batch): acknowledge only.
                settle.push((ack, false));
                continue;
            }
            if seq != 0 {
                handled = seq;
                self.position.pending = Some(seq);
            }
            let input = match decode_input(
                &self.subjects,
                &subject,
                content_type.as_deref(),
                &payload,
                seq,
            ) {
                Ok(d) => Input::Inbound {
                    input: scope(&d.service, d.input),
                    service: d.service,
                    encoding: d.encoding,
                },
                Err(mut rejection) => {
                    tracing::warn!(subject = %subject, "rejected input: {}", rejection.error);
                    if let (Some(service), Some(id)) = (&rejection.service, &rejection.request_id) {
                        rejection.request_id = Some(gpu_coordinator_core::scoped(service, id));
                    }
                    Input::Invalid(rejection)
                }
            };
            settle.push((ack, matches!(input, Input::Invalid(_))));
            // At the time it was stored (never after now; the core takes a time before its latest
            // as that one, and matches an ACK without a fence by the time it was stored).
            let now = now_ms();
            let at = stored_at.map_or(now, |stored| stored.min(now));
            self.core_time(at);
            inputs.push((input, at));
        }
        // One scheduling pass for the whole batch.
        self.sched.handle_inputs(inputs);
        self.carry_out().await?;
        // A GPU now waits for NVML to see a paused holder's VRAM freed: sample it now, not at the
        // next tick (`nvml.sample_ms`, a second by default).
        if let Some(feed) = &self.nvml {
            if feed.devices.keys().any(|gpu| self.sched.settling(gpu)) {
                feed.sample_now.notify_one();
            }
        }
        self.recorder
            .metrics()
            .observe_stage(crate::metrics::Stage::Batch, taken.elapsed());
        if let Some(seq) = self.position.pending.take() {
            // Nothing to write (every input in the batch was handled before): record it anyway, so
            // that the position survives.
            self.write_bookkeeping(Some(seq), false).await?;
        }
        // Acknowledged once the messages they caused are stored; by the last alone where that covers
        // the inputs before it (a rejected input needs no acknowledgement of its own: it is handled).
        if self.ports.bus.acks_cover_earlier() {
            settle = settle
                .pop()
                .map(|(ack, _)| vec![(ack, false)])
                .unwrap_or_default();
        }
        self.publisher.acknowledge(settle).await?;
        Ok(outcome)
    }

    /// Feeds the scheduler NVML's figure of the VRAM used on each sampled GPU; the scheduler works out
    /// what is used outside its leases. Every sample is fed, changed or not: an unchanged figure after a
    /// pause ACK is what tells the scheduler that the paused holder's VRAM was freed.
    pub(super) async fn handle_samples(
        &mut self,
        samples: Vec<DeviceSample>,
    ) -> anyhow::Result<()> {
        // A sample hands the core the time now: after the inputs stored until now (the next sample
        // comes soon).
        if self.catching_up.is_some() {
            return Ok(());
        }
        let Some(at) = self.inputs_caught_up().await else {
            return Ok(());
        };
        // Samples come only from an NVML feed.
        let now = self.core_time(at);
        let Some(feed) = self.nvml.as_mut() else {
            return Ok(());
        };
        self.recorder
            .metrics()
            .set_processes(feed.devices.iter().filter_map(|(gpu, index)| {
                samples
                    .iter()
                    .find(|s| s.index == *index)
                    .map(|s| (gpu.as_str(), s))
            }));
        for (gpu, used_mb) in used_by_gpu(&feed.devices, &samples) {
            if feed.fed.get(&gpu) != Some(&used_mb) {
                tracing::debug!(gpu = %gpu, used_mb, "VRAM used on the GPU");
                feed.fed.insert(gpu.clone(), used_mb);
            }
            self.sched.handle_input(
                Input::GpuUsed {
                    gpu: gpu.into(),
                    used_mb,
                },
                now,
            );
        }
        self.carry_out().await
    }

    /// Hands the scheduler the node agents' latest samples, one batch for all hosts, once the inputs
    /// stored until now are handled (a sample hands the core the time now); until then they wait.
    async fn handle_node_samples(&mut self) -> anyhow::Result<()> {
        if self.catching_up.is_some() {
            return Ok(());
        }
        let Some(at) = self.inputs_caught_up().await else {
            return Ok(());
        };
        let now = self.core_time(at);
        let Some(feed) = self.nodes.as_mut() else {
            return Ok(());
        };
        let batch: Vec<_> = feed.take().iter().map(|h| (h.input(), now)).collect();
        self.sched.handle_inputs(batch);
        self.carry_out().await
    }

    /// The status document, with who leads and the standbys it knows of.
    fn status_doc(&self, page: StatusPage) -> StatusDoc {
        let page = QueuePage {
            offset: page.offset.unwrap_or(0),
            limit: page
                .limit
                .unwrap_or(self.status_limit)
                .min(MAX_STATUS_LIMIT),
        };
        let mut doc = render::status(&self.sched.status_page(now_ms(), page));
        doc.leader = self.ports.leadership.roster().map(|roster| LeaderStatus {
            holder: roster.holder,
            term: roster.term.0,
            standbys: roster.standbys,
        });
        doc.storage_full = self.ports.journal.full();
        doc
    }

    /// Answers a status question with the status document, in the encoding it was asked in.
    async fn answer_status(&mut self, query: StatusQuery) {
        let doc = self.status_doc(query.page);
        let payload = codec::encode(query.encoding, &doc);
        if let Err(e) = (query.respond)(payload).await {
            tracing::warn!("answering status: {e}");
        }
    }
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Batch {
    /// Every input handled (or acknowledged as handled before).
    Handled,
    /// Cut short before an input that came after a gap: read the inputs again from the last handled.
    Gap,
}

/// `input` with its request id scoped to `service` (see [`gpu_coordinator_core::SCOPE`]).
fn scope(service: &str, mut input: Inbound) -> Inbound {
    let id = match &mut input {
        Inbound::Request(m) => m.request_id.as_mut(),
        Inbound::Release(m) => m.request_id.as_mut(),
        Inbound::Renew(m) => Some(&mut m.request_id),
        Inbound::Ack(m) => Some(&mut m.request_id),
        Inbound::Cancel(m) => Some(&mut m.request_id),
    };
    if let Some(id) = id {
        *id = gpu_coordinator_core::scoped(service, id);
    }
    input
}

/// The next NVML sample, or never when NVML is not in use.
async fn next_sample(nvml: &mut Option<NvmlFeed>) -> Option<Vec<DeviceSample>> {
    match nvml {
        Some(feed) => feed.samples.lock().await.recv().await,
        None => std::future::pending().await,
    }
}

/// The next node agent's sample, or never without node agents.
async fn next_node(
    nodes: &Option<crate::ports::nodes::NodeFeed>,
) -> Option<crate::ports::nodes::NodeHeard> {
    match nodes {
        Some(feed) => feed.next().await,
        None => std::future::pending().await,
    }
}

/// The next input, or never while the inputs are being reopened.
async fn next_input(inputs: &mut Option<Inputs>) -> Option<<Inputs as futures::Stream>::Item> {
    match inputs {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}
