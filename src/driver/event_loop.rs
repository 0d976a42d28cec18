//! The event loop: one `select!` over shutdown, the scheduler's next deadline, the inputs, reconnects,
//! status questions, NVML samples, commands and the once-a-second bookkeeping. Each branch turns what
//! came into scheduler inputs and carries out the actions before the next one.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use gpu_coordinator_core::Input;
use gpu_coordinator_core::QueuePage;
use gpu_coordinator_wire::{codec, LeaderStatus, StatusDoc, StatusPage};
use tokio::sync::mpsc;

use super::batch::Batch;
use super::{now_ms, Command, Driver, NvmlFeed};
use crate::ports::gpu::{used_by_gpu, DeviceSample};
use crate::ports::{Inputs, StatusQuery};
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
        let input_log = self.ports.input_log.clone();
        let leadership = self.ports.leadership.clone();
        let lost = leadership.lost(self.term);
        tokio::pin!(lost);
        let mut inputs = None;
        self.reopen_inputs(&mut inputs).await?;
        let mut status = self.status_questions().await?;
        let mut reconnects = input_log.reconnects();
        let mut every_second = ticker(EVERY_SECOND);
        let mut ticks = 0u64;
        let mut nodes_tick = ticker(NODES_EVERY);
        tracing::info!("coordinator ready");
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = &mut lost => {
                    tracing::warn!("leadership of term {} lost: no longer acting", self.term.0);
                    break;
                }
                // Status questions, and the hosts' samples, before inputs: a backlog of inputs that
                // never drains (a journal write slower than inputs come) must neither leave the
                // status unanswered nor every host silent. A sample waits for the inputs stored
                // before it all the same (`handle_node_samples`).
                Some(query) = status.next() => self.answer_status(query).await,
                Some(command) = commands.recv() => self.answer_command(command),
                Some(heard) = next_node(&self.nodes) => self.keep_node_sample(heard),
                _ = nodes_tick.tick(), if self.nodes.as_ref().is_some_and(|f| f.has_pending()) => {
                    self.handle_node_samples().await?;
                }
                // Inputs before timers: after a stall (a server away, the process stopped) the inputs
                // stored meanwhile are handled at the time they were stored, before the timers that
                // fell due since, so a renewal stored in time still counts.
                next = next_input(&mut inputs) => self.handle_next_input(next, &mut inputs).await?,
                _ = tokio::time::sleep(wake) => self.fire_due_timers().await?,
                Ok(()) = reconnects.changed() => {
                    tracing::info!("the bus reconnected; reopening the input consumer");
                    self.reopen_inputs(&mut inputs).await?;
                }
                Some(samples) = next_sample(&mut self.nvml) => self.handle_samples(samples).await?,
                _ = every_second.tick() => {
                    ticks += 1;
                    self.every_second(ticks).await?;
                }
            }
        }
        // No question is answered any more: the subscription and the commands go before the stop's
        // waits (for the bus, the journal), so that an asker hears at once that nobody answers here
        // (and asks the next leader) rather than waiting out its timeout on a term that ended.
        drop(status);
        drop(commands);
        self.stop().await;
        Ok(())
    }

    /// How long the loop may sleep: while timers wait for inputs, what is left of that wait; else until
    /// the scheduler's next deadline ([`IDLE`] when it has none).
    fn next_wake(&mut self) -> Duration {
        match self.catching_up_left() {
            Some(left) => left,
            None => self
                .sched
                .poll_timeout()
                .map(|at| Duration::from_millis(at.saturating_sub(now_ms())))
                .unwrap_or(IDLE),
        }
    }

    /// What the input consumer gave: an input starts a batch, which takes what else is already there
    /// (up to [`MAX_BATCH`]); a consumer that failed or ended, or a batch cut short by a gap, reopens
    /// the inputs.
    async fn handle_next_input(
        &mut self,
        next: Option<<Inputs as futures::Stream>::Item>,
        inputs: &mut Option<Inputs>,
    ) -> anyhow::Result<()> {
        match next {
            Some(Ok(first)) => {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match inputs.as_mut().and_then(|s| s.next().now_or_never()) {
                        Some(Some(Ok(d))) => batch.push(d),
                        _ => break,
                    }
                }
                if self.handle_batch(batch).await? == Batch::Gap {
                    self.reopen_inputs(inputs).await?;
                }
            }
            Some(Err(e)) => {
                // A consumer that failed (its stream or itself deleted, heartbeats missed)
                // is made anew after the last input handled.
                tracing::warn!("input consumer: {e}; reopening");
                self.reopen_inputs(inputs).await?;
            }
            None => {
                tracing::warn!("input consumer ended; reopening");
                self.reopen_inputs(inputs).await?;
            }
        }
        Ok(())
    }

    /// The wake-up: once the inputs stored until now are handled, the scheduler's timers that fell due
    /// fire and their actions are carried out.
    async fn fire_due_timers(&mut self) -> anyhow::Result<()> {
        if let Some(at) = self.inputs_caught_up().await {
            let now = self.core_time(at);
            self.sched.handle_timeout(now);
            self.carry_out().await?;
        }
        Ok(())
    }

    /// Keeps a node agent's sample until the next pass hands the latest of each host to the scheduler.
    fn keep_node_sample(&mut self, heard: crate::ports::nodes::NodeHeard) {
        if let Some(feed) = self.nodes.as_mut() {
            feed.keep(heard);
        }
    }

    /// Answers a command from another task.
    fn answer_command(&self, command: Command) {
        match command {
            Command::Status(page, reply) => {
                let _ = reply.send(self.status_doc(page));
            }
        }
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
        match self.ports.input_log.input_end().await {
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
                let output_log = self.ports.output_log.clone();
                with_retry("subscribing to status", &self.shutdown, || {
                    output_log.status_queries()
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

    /// Makes room in a nearly full input stream (see [`crate::ports::InputLog::trim_inputs`]); a
    /// failure only waits for the next try.
    async fn trim_inputs(&self) {
        match self
            .ports
            .input_log
            .trim_inputs(self.position.handled)
            .await
        {
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
        match tokio::time::timeout(FLUSH_WAIT, self.ports.output_log.flush()).await {
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
        let input_log = self.ports.input_log.clone();
        let handled = self.position.handled;
        // A stream lost at run time (deleted, or a server that came back without it) is made anew.
        with_retry("making the streams", &shutdown, || {
            input_log.ensure_streams(Some(handled))
        })
        .await?;
        let after = with_retry("finding where the inputs go on", &shutdown, || {
            input_log.input_position(handled)
        })
        .await?;
        if after != handled {
            // Lower only for an input stream made anew, numbered from its start again.
            self.write_bookkeeping(Some(after), after < handled).await?;
        }
        *inputs = Some(
            with_retry("opening the input consumer", &shutdown, || {
                input_log.open_inputs(after)
            })
            .await?,
        );
        Ok(())
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
        // While inputs stored earlier wait (at most `CATCH_UP_LIMIT`): a backlog that never drains
        // (a slow journal) must not keep the hosts' samples out for good, or every host would fall
        // silent in the core's eyes and nothing be granted.
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

/// An interval of `period` that, after a late tick, waits a whole period for the next.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}
