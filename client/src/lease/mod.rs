//! A granted lease: the handle the user holds, and the task that keeps the lease alive.
//!
//! The rules (when to renew, what to acknowledge, which fence) are in [`machine`]; the task here
//! only feeds it the coordinator's messages, the handle's commands and the clock, publishes what it
//! asks for, and runs the user's handlers.

pub(crate) mod machine;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::client::Client;
use crate::router::{Incoming, Route};
use crate::worker::Handlers;
use crate::ClientError;
use machine::{Action, Machine, Snapshot};

/// How many events a slow [`LeaseEvents`] reader may fall behind before it misses some.
const EVENT_CAPACITY: usize = 64;

/// Where a lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeasePhase {
    /// The GPU is this lease's; it renews itself.
    Active,
    /// The coordinator asked to pause; `on_pause` runs (or, without a handler, nothing happens and
    /// the lease is revoked at the deadline). No renewing.
    Pausing,
    /// Paused and acknowledged: the VRAM is free; waiting for `resume`.
    Paused,
    /// Resumed: `on_resume` runs; the lease is held (and renewed) again.
    Resuming,
    /// Revoked by the coordinator: the GPU is no longer this service's. Final.
    Revoked,
    /// Released. Final.
    Released,
}

/// What happened to a lease, as [`Lease::events`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// A renewal went through.
    Renewed { expires_at: SystemTime },
    /// The coordinator asks to pause (`deadline`: by when to acknowledge).
    Pausing {
        fence: u64,
        deadline: Option<Duration>,
        reason: String,
    },
    /// `on_pause` returned and the pause was acknowledged.
    Paused { fence: u64 },
    /// The lease holds the GPU again under a new fence, and `on_resume` returned.
    Resumed { fence: u64, gpu: String },
    /// The lease was revoked: stop using the GPU now.
    Revoked { reason: String },
    /// The coordinator's watchdog asks this service to restart.
    Restart { reason: String },
    /// The lease was released by someone else (e.g. [`Client::release_all`]).
    Released,
    /// An input about this lease (a renewal, an ACK) was rejected.
    Rejected { error: String },
}

/// The events of one lease, from the moment [`Lease::events`] was called.
#[derive(Debug)]
pub struct LeaseEvents {
    rx: broadcast::Receiver<LeaseEvent>,
}

impl LeaseEvents {
    /// The next event; `None` once the lease is gone.
    pub async fn recv(&mut self) -> Option<LeaseEvent> {
        loop {
            match self.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!("a lease event reader fell behind and missed {missed} events");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// A view of a [`Lease`] that does not own it, from [`Lease::watch`].
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    state: watch::Receiver<Snapshot>,
}

impl LeaseWatch {
    /// [`Lease::usable`]: active, and before its local expiry by this process's clock.
    pub fn usable(&self) -> bool {
        let state = self.state.borrow();
        state.phase == LeasePhase::Active && state.lost_at.is_some_and(|at| Instant::now() < at)
    }

    /// [`Lease::phase`].
    pub fn phase(&self) -> LeasePhase {
        self.state.borrow().phase
    }

    /// [`Lease::gpu`].
    pub fn gpu(&self) -> String {
        self.state.borrow().gpu.clone()
    }

    /// When the lease stops being usable unless a renewal is confirmed first (`None`: not active).
    pub fn usable_until(&self) -> Option<Instant> {
        let state = self.state.borrow();
        (state.phase == LeasePhase::Active)
            .then_some(state.lost_at)
            .flatten()
    }

    /// Waits until the lease changes (a phase, a renewal); `false` once the lease is gone.
    pub async fn changed(&mut self) -> bool {
        self.state.changed().await.is_ok()
    }
}

enum Command {
    Release(oneshot::Sender<Result<(), ClientError>>),
}

/// A GPU lease granted by the coordinator.
///
/// While it lives it renews itself in the background at a third of its length. [`Lease::release`]
/// ends it and waits for the coordinator's `released`; dropping it releases it too, without waiting
/// (best effort: call `release` before the runtime shuts down, or the lease lasts until it expires).
/// A `revoke` for it marks it revoked ([`Lease::is_revoked`], [`Lease::revoked`]) and stops the
/// renewals.
///
/// ```no_run
/// # async fn example() -> Result<(), gpu_coordinator_client::ClientError> {
/// use gpu_coordinator_client::{Client, RequestOptions};
///
/// let client = Client::connect("nats://127.0.0.1:4222", "gpu", "chat").await?;
/// let lease = client.request(RequestOptions::new(0).vram_mb(8_000)).await?;
/// println!(
///     "running on {} under fence {} until {:?}",
///     lease.gpu(),
///     lease.fence(),
///     lease.expires_at()
/// );
/// tokio::select! {
///     () = lease.revoked() => eprintln!("the GPU was taken away"),
///     () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {} // the work
/// }
/// lease.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Lease {
    request_id: String,
    waited_ms: Option<u64>,
    state: watch::Receiver<Snapshot>,
    events: broadcast::Sender<LeaseEvent>,
    cmds: mpsc::UnboundedSender<Command>,
}

impl Lease {
    /// Starts the lease task for a granted (or resumed) request. `early` are the orders that came
    /// before the grant was handled.
    pub(crate) fn start(
        client: Client,
        request_id: String,
        waited_ms: Option<u64>,
        mut machine: Machine,
        early: Vec<(Incoming, Instant, SystemTime)>,
        handlers: Handlers,
        route: Route,
    ) -> Lease {
        for (message, now, wall) in early {
            match message {
                Incoming::Reply(reply) => machine.handle_reply(reply, now, wall),
                Incoming::Control(control) => machine.handle_control(control, now, wall),
                Incoming::Event(_) => {}
            }
        }
        let (state_tx, state_rx) = watch::channel(machine.snapshot().clone());
        let (events_tx, _) = broadcast::channel(EVENT_CAPACITY);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let task = LeaseTask {
            client,
            machine,
            handlers,
            state: state_tx,
            events: events_tx.clone(),
            route,
            cmds: cmd_rx,
            release_reply: None,
        };
        tokio::spawn(task.run());
        Lease {
            request_id,
            waited_ms,
            state: state_rx,
            events: events_tx,
            cmds: cmd_tx,
        }
    }

    /// The request id: the handle of this lease in every message and in the status document.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The current fence: strictly greater after each resume. Pass it to whatever must refuse work of
    /// an older holder.
    pub fn fence(&self) -> u64 {
        self.state.borrow().fence
    }

    /// The GPU this lease holds (it may change on a resume).
    pub fn gpu(&self) -> String {
        self.state.borrow().gpu.clone()
    }

    /// The VRAM the lease holds, in MB, as the coordinator counts it.
    pub fn vram_mb(&self) -> Option<u64> {
        self.state.borrow().vram_mb
    }

    /// The lease length, which each renewal extends it by.
    pub fn lease_length(&self) -> Duration {
        Duration::from_millis(self.state.borrow().lease_ms)
    }

    /// When the lease runs out unless renewed, as the coordinator last said.
    pub fn expires_at(&self) -> SystemTime {
        self.state.borrow().expires_at
    }

    /// How long the request waited in the queue, as the coordinator measured it.
    pub fn waited(&self) -> Option<Duration> {
        self.waited_ms.map(Duration::from_millis)
    }

    /// Where the lease stands now.
    pub fn phase(&self) -> LeasePhase {
        self.state.borrow().phase
    }

    /// Whether the GPU may be used now, by this process's clock: the lease is active and its local
    /// expiry (a margin before the coordinator could revoke it) has not come. Check it before each
    /// unit of work, and keep units shorter than that margin (a tenth of the lease, at most 2 s).
    ///
    /// It reads the clock itself: after a stall of this process (SIGSTOP, a swap storm, a debugger)
    /// it is false at once, before the lease's own task has run and noticed; it turns true again
    /// only when a renewal is confirmed.
    pub fn usable(&self) -> bool {
        let state = self.state.borrow();
        state.phase == LeasePhase::Active && state.lost_at.is_some_and(|at| Instant::now() < at)
    }

    /// A view of this lease that does not own it (cheap to clone, and it does not keep the lease
    /// alive): for code beside the holder that must check [`Lease::usable`] or wait for a change.
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch {
            state: self.state.clone(),
        }
    }

    /// Whether the coordinator revoked the lease.
    pub fn is_revoked(&self) -> bool {
        self.phase() == LeasePhase::Revoked
    }

    /// Resolves once the lease is revoked (never, if it is not). Use it in a `select!` around the
    /// work, to stop using the GPU at once.
    pub fn revoked(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            if state
                .wait_for(|s| s.phase == LeasePhase::Revoked)
                .await
                .is_err()
            {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until the lease may use the GPU ([`LeasePhase::Active`]): at once, unless it is pausing,
    /// paused or reloading in `on_resume`. `Err(Revoked)` once revoked, `Err(Closed)` once released.
    pub async fn active(&self) -> Result<(), ClientError> {
        let mut state = self.state.clone();
        let phase = state
            .wait_for(|s| {
                matches!(
                    s.phase,
                    LeasePhase::Active | LeasePhase::Revoked | LeasePhase::Released
                )
            })
            .await
            .map_err(|_| ClientError::Closed)?
            .phase;
        match phase {
            LeasePhase::Active => Ok(()),
            LeasePhase::Revoked => Err(ClientError::Revoked),
            _ => Err(ClientError::Closed),
        }
    }

    /// The lease's events from now on: renewals, pause and resume, revoke and restart.
    ///
    /// ```no_run
    /// # async fn example(lease: gpu_coordinator_client::Lease) {
    /// use gpu_coordinator_client::LeaseEvent;
    ///
    /// let mut events = lease.events();
    /// tokio::spawn(async move {
    ///     while let Some(event) = events.recv().await {
    ///         match event {
    ///             LeaseEvent::Revoked { reason } => eprintln!("lease revoked: {reason}"),
    ///             LeaseEvent::Restart { reason } => {
    ///                 eprintln!("the coordinator asks for a restart: {reason}");
    ///                 std::process::exit(1);
    ///             }
    ///             _ => {}
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn events(&self) -> LeaseEvents {
        LeaseEvents {
            rx: self.events.subscribe(),
        }
    }

    /// Ends the lease: publishes `release` with the current fence and waits for the coordinator's
    /// `released` (at most 30 s). `Err(Revoked)` if the lease had been revoked: the GPU was not this
    /// service's any more.
    pub async fn release(self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Command::Release(tx))
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }
}

/// The background task of one lease.
struct LeaseTask {
    client: Client,
    machine: Machine,
    handlers: Handlers,
    state: watch::Sender<Snapshot>,
    events: broadcast::Sender<LeaseEvent>,
    /// This request's messages, until the task ends.
    route: Route,
    cmds: mpsc::UnboundedReceiver<Command>,
    release_reply: Option<oneshot::Sender<Result<(), ClientError>>>,
}

impl LeaseTask {
    async fn run(mut self) {
        // Handlers run as tasks of their own, so that a revoke is seen while they run and a panic
        // in one does not take the lease task down; each says here when it is done.
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<bool>();
        let mut cmds_open = true;
        let mut incoming_open = true;
        loop {
            while let Some(action) = self.machine.poll_action() {
                self.carry_out(action, &done_tx);
            }
            let snapshot = self.machine.snapshot();
            self.state.send_if_modified(|s| {
                let changed = s != snapshot;
                if changed {
                    *s = snapshot.clone();
                }
                changed
            });
            if self.machine.is_done() {
                return;
            }
            let wake_at = self.machine.poll_timeout();
            tokio::select! {
                command = self.cmds.recv(), if cmds_open => match command {
                    Some(Command::Release(reply)) => {
                        self.release_reply = Some(reply);
                        self.machine.handle_release(Instant::now());
                    }
                    None => {
                        cmds_open = false;
                        self.machine.handle_drop();
                    }
                },
                message = self.route.recv(), if incoming_open => match message {
                    Some(Incoming::Reply(reply)) => {
                        self.machine.handle_reply(reply, Instant::now(), SystemTime::now());
                    }
                    Some(Incoming::Control(control)) => {
                        self.machine.handle_control(control, Instant::now(), SystemTime::now());
                    }
                    Some(Incoming::Event(_)) => {}
                    None => incoming_open = false,
                },
                Some(completed) = done_rx.recv() => {
                    self.machine.handle_handler_done(completed, Instant::now(), SystemTime::now());
                }
                () = sleep_until(wake_at), if wake_at.is_some() => {
                    self.machine.handle_timeout(Instant::now());
                }
            }
        }
    }

    fn carry_out(&mut self, action: Action, done: &mpsc::UnboundedSender<bool>) {
        match action {
            Action::Publish { input, retry_for } => {
                self.client.spawn_publish_input(input, retry_for);
            }
            Action::RunPause(order) => {
                let handler = self.handlers.on_pause.as_ref().map(|f| f(order));
                spawn_handler(handler, done.clone());
            }
            Action::RunResume(order) => {
                let handler = self.handlers.on_resume.as_ref().map(|f| f(order));
                spawn_handler(handler, done.clone());
            }
            Action::Event(event) => {
                // No receiver is fine: nobody listens.
                let _ = self.events.send(event);
            }
            Action::ReleaseDone(result) => {
                if let Some(reply) = self.release_reply.take() {
                    let _ = reply.send(result);
                }
            }
        }
    }
}

fn spawn_handler(handler: Option<crate::worker::HandlerFuture>, done: mpsc::UnboundedSender<bool>) {
    tokio::spawn(async move {
        let completed = match handler {
            Some(handler) => AssertUnwindSafe(handler).catch_unwind().await.is_ok(),
            None => true,
        };
        let _ = done.send(completed);
    });
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
