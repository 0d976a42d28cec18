//! One engine's sidecar: it asks for the GPU as its service (a [`Worker`] of the coordinator's client,
//! over HTTP or NATS), wakes the engine once granted, opens the [`Gate`], and puts the engine to sleep
//! when paused, revoked or idle.
//!
//! The order of things is what keeps the engines within the GPU:
//! - the engine is woken only once the grant (or the resume) is there, and the gate opens only once
//!   it serves;
//! - on a pause the gate closes first, what is in flight drains (cut after `drain_ms`), the engine is
//!   put to sleep, and the pause is acknowledged only once the engine's own API confirms the memory
//!   is free: an engine that never confirms is never acknowledged, and its lease is revoked;
//! - a request passes the gate only under a lease that is usable by this process's clock (the
//!   client's local expiry), so a sidecar that lost its lease without hearing it stops forwarding.

use std::sync::Arc;
use std::time::Duration;

use gpu_coordinator_client::{
    Client, ClientError, LeaseEvent, LeasePhase, LeaseWatch, PauseOrder, RequestOptions,
    ResumeOrder, Worker,
};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::board::{EngineState, Stats};
use super::config::{EngineConfig, Want};
use super::gate::Gate;
use super::switch::Switch;
use super::{backoff, next_wait};
use crate::adapters::nvml::GpuProbe;

/// How often the sidecar asks the engine whether a sleep or a wake finished.
const CONFIRM_POLL: Duration = Duration::from_millis(25);
/// How often the GPU's memory is sampled while a sleep frees it: every 10 ms for the first
/// [`MEMORY_POLL_FAST_FOR`] (a pause is short, and the next holder waits for it), then half as often
/// again after each look, up to every 100 ms (NVML's queries cost a few ms each and, polled often
/// for long, stall the GPU's other users).
const MEMORY_POLL_FIRST: Duration = Duration::from_millis(10);
const MEMORY_POLL_FAST_FOR: Duration = Duration::from_millis(500);
const MEMORY_POLL: Duration = Duration::from_millis(100);
/// How long a sleep outside a pause (idle, revoke, stop) waits for the memory to show freed before
/// the sidecar goes on regardless, with a warning.
const MEMORY_LIMIT: Duration = Duration::from_secs(60);
/// The longest a wake may take before it is given up and tried again (a cold load of a big model).
const WAKE_LIMIT: Duration = Duration::from_secs(600);

/// What the sidecar's tasks share.
pub struct Sidecar {
    pub engine: EngineConfig,
    pub gate: Arc<Gate>,
    pub switch: Switch,
    pub stats: Arc<Stats>,
    /// NVML (or a test's probe), when there is one: a sleep is confirmed only once the GPU's used
    /// memory shows the engine's share freed, whatever the engine's API says.
    probe: Option<Arc<dyn GpuProbe>>,
    /// Held around each sleep and wake, so that a pause, a resume and the idle timer never switch
    /// the engine at once.
    switching: Mutex<()>,
}

impl Sidecar {
    pub fn new(
        engine: EngineConfig,
        gate: Arc<Gate>,
        stats: Arc<Stats>,
        probe: Option<Arc<dyn GpuProbe>>,
    ) -> Arc<Sidecar> {
        Arc::new(Sidecar {
            switch: Switch::new(&engine),
            engine,
            gate,
            stats,
            probe,
            switching: Mutex::new(()),
        })
    }

    fn service(&self) -> &str {
        &self.engine.service
    }

    /// Runs the sidecar until `stop`: connects, makes sure the engine sleeps, then asks for the GPU
    /// whenever requests wait (or always) and follows the coordinator's orders.
    pub async fn run(self: Arc<Self>, client: Client, stop: CancellationToken) {
        let service = self.service().to_owned();
        // Whatever a previous life of this sidecar held is of no use: the engine sleeps now.
        if let Err(e) = client.release_all().await {
            tracing::warn!(service, "releasing the leases of a previous run: {e}");
        }
        if !self.put_to_sleep_at_start(&stop).await {
            return;
        }
        let worker = self.worker(&client);
        let mut waits = backoff();
        while !stop.is_cancelled() {
            if self.engine.want == Want::OnRequest {
                self.stats.set(EngineState::Asleep);
                tokio::select! {
                    () = self.gate.demanded() => {}
                    () = stop.cancelled() => return,
                }
            }
            self.stats.set(EngineState::Asking);
            let options = self.request_options();
            let lease = tokio::select! {
                lease = worker.request(options) => lease,
                () = stop.cancelled() => return,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(ClientError::TimedOut) => continue,
                Err(e) => {
                    let delay = next_wait(&mut waits);
                    tracing::warn!(
                        service,
                        "asking for the GPU: {e}; trying again in {delay:?}"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            waits = backoff();
            self.gate.set_lease(Some(lease.watch()));
            tracing::info!(service, gpu = lease.gpu(), fence = lease.fence(), "granted");
            let woke = {
                let _switching = self.switching.lock().await;
                self.wake_up(&lease.watch()).await
            };
            if woke {
                self.gate.open(lease.watch());
            }
            self.hold(&lease, &stop).await;
            self.gate.close();
            self.gate.set_lease(None);
            let released = match lease.is_revoked() {
                false => lease.release().await,
                true => Ok(()),
            };
            if let Err(e) = released {
                tracing::debug!(service, "releasing: {e}");
            }
        }
    }

    /// The options of each request: the engine's, and its last measured sleep time as the hint of how
    /// soon it frees the GPU.
    fn request_options(&self) -> RequestOptions {
        let mut options = RequestOptions::new(self.engine.priority.unwrap_or(0));
        options.vram_mb = self.engine.vram_mb;
        options.gpu = self.engine.gpu.clone();
        options.host = self.engine.host.clone();
        options.lease_ms = self.engine.lease_ms;
        options.pause_ms = self
            .stats
            .last_sleep()
            .map(|took| u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1));
        if self.engine.want == Want::OnRequest {
            // Nobody waits longer than this; a request still waiting then asks again.
            options.timeout_ms = Some(self.engine.max_wait_ms);
        }
        options
    }

    /// The worker whose handlers follow the pause and resume orders.
    fn worker(self: &Arc<Self>, client: &Client) -> Worker {
        let on_pause = Arc::clone(self);
        let on_resume = Arc::clone(self);
        Worker::new(client)
            .on_pause(move |order| {
                let sidecar = Arc::clone(&on_pause);
                async move { sidecar.pause(order).await }
            })
            .on_resume(move |order| {
                let sidecar = Arc::clone(&on_resume);
                async move { sidecar.resume(order).await }
            })
    }

    /// The engine found awake at the start holds VRAM without a lease: it is put to sleep before any
    /// request reaches it. An engine that does not answer yet is waited for.
    async fn put_to_sleep_at_start(&self, stop: &CancellationToken) -> bool {
        let service = self.service();
        let mut waits = backoff();
        loop {
            match self.switch.holds_memory().await {
                Ok(false) => return true,
                Ok(true) => {
                    tracing::info!(
                        service,
                        "the engine is awake without a lease: putting it to sleep"
                    );
                    if self.sleep_confirmed(None).await {
                        return true;
                    }
                }
                Err(e) => tracing::warn!(service, "the engine does not answer yet: {e}"),
            }
            tokio::select! {
                () = tokio::time::sleep(next_wait(&mut waits)) => {}
                () = stop.cancelled() => return false,
            }
        }
    }

    /// Holds the lease until it is revoked, released by the idle timer, or `stop`.
    async fn hold(&self, lease: &gpu_coordinator_client::Lease, stop: &CancellationToken) {
        let service = self.service();
        let mut events = lease.events();
        let idle = Duration::from_millis(self.engine.idle_ms);
        loop {
            let activity = self.gate.activity.notified();
            let idle_at = match self.engine.want {
                Want::OnRequest => self.gate.idle_at(idle),
                Want::Always => None,
            };
            let idle_timer = async {
                match idle_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => {
                    self.go_to_sleep(lease, "the sidecar stops").await;
                    return;
                }
                () = lease.revoked() => {
                    tracing::warn!(service, "lease revoked: the engine is put to sleep at once");
                    self.after_revoke().await;
                    return;
                }
                event = events.recv() => match event {
                    Some(LeaseEvent::Restart { reason }) => {
                        tracing::warn!(service, "the coordinator asks for a restart: {reason}");
                        self.after_revoke().await;
                        return;
                    }
                    Some(LeaseEvent::Released) | None => {
                        self.go_to_sleep(lease, "the lease was released").await;
                        return;
                    }
                    Some(_) => {}
                },
                () = activity => {}
                () = idle_timer => {
                    // Still idle, and neither pausing nor resuming: sleep, and give the GPU back.
                    if self.gate.idle_at(idle).is_some_and(|at| at <= Instant::now())
                        && matches!(lease.phase(), LeasePhase::Active | LeasePhase::Paused)
                    {
                        tracing::info!(service, "idle for {} ms: sleeping", self.engine.idle_ms);
                        self.go_to_sleep(lease, "idle").await;
                        return;
                    }
                }
            }
        }
    }

    /// Closes the gate and puts the engine to sleep, for a lease about to be given back.
    async fn go_to_sleep(&self, lease: &gpu_coordinator_client::Lease, why: &str) {
        self.gate.close();
        let _switching = self.switching.lock().await;
        if lease.phase() == LeasePhase::Paused {
            return; // asleep already
        }
        self.gate
            .drain(Duration::from_millis(self.engine.drain_ms))
            .await;
        tracing::debug!(service = self.service(), "sleeping: {why}");
        self.sleep_confirmed(None).await;
    }

    /// The GPU is not this service's any more: nothing more passes, what is in flight is cut, and the
    /// engine is put to sleep (a process is killed; it is started again on the next grant).
    async fn after_revoke(&self) {
        self.gate.close();
        self.gate.cut();
        let _switching = self.switching.lock().await;
        if self.switch.kind() == super::config::EngineKind::Process {
            self.switch.kill().await;
            self.stats.set(EngineState::Asleep);
        } else {
            self.sleep_confirmed(None).await;
        }
    }

    /// The `pause` order: close, drain, sleep, confirm. Returning acknowledges the pause, so it returns
    /// only once the engine's memory is free (or the lease is gone, when nothing is acknowledged).
    async fn pause(&self, order: PauseOrder) {
        let service = self.service();
        let started = Instant::now();
        self.gate.close();
        let _switching = self.switching.lock().await;
        let cut = self
            .gate
            .drain(Duration::from_millis(self.engine.drain_ms))
            .await;
        if cut > 0 {
            tracing::warn!(
                service,
                cut,
                "requests still in flight after drain_ms ({} ms) were cut",
                self.engine.drain_ms
            );
        }
        tracing::info!(
            service,
            reason = order.reason,
            "pausing: putting the engine to sleep"
        );
        let confirmed = self.sleep_confirmed(Some(&order)).await;
        if !confirmed {
            return;
        }
        if let Some(deadline) = order.deadline {
            if started.elapsed() > deadline {
                tracing::warn!(
                    service,
                    "the drain and the sleep took {} ms, past the ACK deadline of {} ms: the lease \
                     was likely revoked; raise preemption.ack_deadline_ms or lower drain_ms",
                    started.elapsed().as_millis(),
                    deadline.as_millis()
                );
            }
        }
    }

    /// Puts the engine to sleep and polls its API until the memory is free. Gives up (false) when
    /// the pause's lease is revoked meanwhile: there is nothing left to acknowledge.
    async fn sleep_confirmed(&self, order: Option<&PauseOrder>) -> bool {
        let service = self.service();
        self.stats.set(EngineState::GoingToSleep);
        let started = Instant::now();
        // Under a lease, the GPU's memory before the sleep, to see the engine's share freed.
        let gpu = self.gate.lease().map(|l| l.gpu());
        let before = match &gpu {
            Some(gpu) => self.used_mb(gpu).await,
            None => None,
        };
        if !self.ask_to_sleep(order).await || !self.wait_asleep(order, started).await {
            return false;
        }
        if let (Some(gpu), Some(before)) = (&gpu, before) {
            if !self.wait_memory_freed(order, started, gpu, before).await {
                return false;
            }
        }
        let took = started.elapsed();
        self.stats.slept(took);
        self.stats.set(EngineState::Asleep);
        tracing::info!(service, ms = took.as_millis() as u64, "the engine sleeps");
        true
    }

    /// Asks the engine to sleep until it takes the order; false when the lease went meanwhile.
    async fn ask_to_sleep(&self, order: Option<&PauseOrder>) -> bool {
        let mut waits = backoff();
        loop {
            match self.switch.sleep().await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(service = self.service(), "putting the engine to sleep: {e}");
                    if self.lease_gone(order) {
                        return false;
                    }
                    tokio::time::sleep(next_wait(&mut waits)).await;
                }
            }
        }
    }

    /// Polls the engine's API until it says it is asleep; false when the lease went meanwhile.
    /// Warns once when that takes past the order's ACK deadline.
    async fn wait_asleep(&self, order: Option<&PauseOrder>, started: Instant) -> bool {
        let service = self.service();
        let mut warned = false;
        loop {
            match self.switch.asleep().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::debug!(service, "is the engine asleep? {e}"),
            }
            if self.lease_gone(order) {
                tracing::warn!(
                    service,
                    "the engine has not confirmed its sleep after {} ms and the lease is gone",
                    started.elapsed().as_millis()
                );
                return false;
            }
            if !warned
                && order
                    .and_then(|o| o.deadline)
                    .is_some_and(|d| started.elapsed() > d)
            {
                warned = true;
                tracing::warn!(
                    service,
                    "the engine has not confirmed its sleep after {} ms, past the ACK deadline",
                    started.elapsed().as_millis()
                );
            }
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }

    /// Polls the memory used on `gpu` (`before` the sleep) until at least half the engine's share
    /// shows freed: the engines' APIs say "asleep" before the memory is back (vLLM's `/is_sleeping`
    /// from the moment the sleep starts). False when the lease went meanwhile; without an order,
    /// goes on after [`MEMORY_LIMIT`].
    async fn wait_memory_freed(
        &self,
        order: Option<&PauseOrder>,
        started: Instant,
        gpu: &str,
        before: u64,
    ) -> bool {
        let service = self.service();
        let share = self.engine.vram_mb.unwrap_or(before);
        let target = before.saturating_sub(share / 2);
        let mut poll = MEMORY_POLL_FIRST;
        loop {
            match self.used_mb(gpu).await {
                Some(used) if used > target => {}
                _ => return true,
            }
            if self.lease_gone(order) {
                tracing::warn!(
                    service,
                    "the GPU's memory has not shown the engine's {share} MB freed after {} ms, \
                     and the lease is gone",
                    started.elapsed().as_millis()
                );
                return false;
            }
            if order.is_none() && started.elapsed() > MEMORY_LIMIT {
                tracing::warn!(
                    service,
                    "the GPU's memory has not shown the engine's {share} MB freed after {} ms; \
                     going on",
                    started.elapsed().as_millis()
                );
                return true;
            }
            tokio::time::sleep(poll).await;
            if started.elapsed() > MEMORY_POLL_FAST_FOR {
                poll = (poll * 3 / 2).min(MEMORY_POLL);
            }
        }
    }

    /// The used memory of the device `gpu` names (its NVML index or UUID), by the probe; `None`
    /// without a probe or such a device.
    async fn used_mb(&self, gpu: &str) -> Option<u64> {
        let probe = self.probe.clone()?;
        let gpu = gpu.to_owned();
        tokio::task::spawn_blocking(move || {
            probe
                .devices()
                .ok()?
                .into_iter()
                .find(|d| d.index.to_string() == gpu || d.uuid == gpu)
                .map(|d| d.used_mb)
        })
        .await
        .ok()
        .flatten()
    }

    /// Whether the lease a pause is for was revoked or released (no lease: a sleep outside a
    /// pause, which always goes on).
    fn lease_gone(&self, order: Option<&PauseOrder>) -> bool {
        order.is_some()
            && self
                .gate
                .lease()
                .is_none_or(|l| matches!(l.phase(), LeasePhase::Revoked | LeasePhase::Released))
    }

    /// The `resume` order: the GPU is granted again; wake the engine, and open once it serves.
    async fn resume(&self, order: ResumeOrder) {
        tracing::info!(
            service = self.service(),
            gpu = order.gpu,
            "resumed: waking the engine"
        );
        let _switching = self.switching.lock().await;
        let Some(lease) = self.gate.lease() else {
            return;
        };
        if self.wake_up(&lease).await {
            self.gate.open(lease);
        }
    }

    /// Wakes the engine under `lease` and waits until it serves; false if the lease was lost first.
    async fn wake_up(&self, lease: &LeaseWatch) -> bool {
        let service = self.service();
        self.stats.set(EngineState::Waking);
        let started = Instant::now();
        let mut waits = backoff();
        loop {
            if matches!(lease.phase(), LeasePhase::Revoked | LeasePhase::Released) {
                self.stats.set(EngineState::Asleep);
                return false;
            }
            match self.switch.wake().await {
                Ok(()) => {}
                Err(e) => {
                    let delay = next_wait(&mut waits);
                    tracing::warn!(service, "waking the engine: {e}; trying again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            let wake_deadline = Instant::now() + WAKE_LIMIT;
            loop {
                if let Ok(true) = self.switch.serving().await {
                    let took = started.elapsed();
                    self.stats.woke(took);
                    self.stats.set(EngineState::Awake);
                    tracing::info!(service, ms = took.as_millis() as u64, "the engine serves");
                    return true;
                }
                if Instant::now() > wake_deadline
                    || matches!(lease.phase(), LeasePhase::Revoked | LeasePhase::Released)
                {
                    break;
                }
                tokio::time::sleep(CONFIRM_POLL).await;
            }
        }
    }
}
