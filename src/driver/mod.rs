//! The driver: the one task that owns the scheduler. It turns inputs from the
//! [`InputLog`](crate::ports::InputLog), timer wake-ups, status questions, NVML samples and commands
//! into scheduler inputs, and carries out the
//! scheduler's actions through the [ports](crate::ports), in the order that keeps every effect durable
//! before it is acknowledged:
//!
//! 1. write the changed requests, the highest fence, the position of the last input and the messages to
//!    publish (the outbox) to the [`Journal`](crate::ports::Journal) as one batch, and at the same time
//!    the lease changes to the [`Leases`](crate::ports::Leases) store, sent together; both are fenced
//!    by the leadership term (a refused lease goes back to the scheduler as an input);
//! 2. publish replies, control orders and events under their outbox ids, and wait until the bus stored
//!    them (a later batch deletes those rows);
//! 3. acknowledge the inputs (an invalid input is terminated, never redelivered).
//!
//! Steps 2 and 3 run in a publishing stage of their own (`publisher`), in order: the loop goes on to
//! the next batch while the bus stores the last one's messages.
//!
//! At start the outbox left by a crash is published again, and the inputs are read again from the one
//! after the last handled, so inputs are handled once and in order.
//!
//! A server that goes away is waited for with backoff ([`retry`](crate::retry)): the loop stops taking inputs until it
//! is back. A write refused because a newer term leads is not retried: the driver stops with that
//! error, having published nothing of the refused batch. Every action also goes to the metrics recorder. Nothing here decides who gets a GPU, and
//! nothing here names a server: the adapters are chosen by [`crate::app`].
//!
//! - [`start`](Driver::start): leadership, then the state restored from the journal and the lease store.
//! - `event_loop`: the `select!` over inputs, timers, status, samples and commands.
//! - `batch`: a batch of inputs decoded, fed to the scheduler in one pass, then acknowledged.
//! - `effects`: carrying out the scheduler's actions in order; the outbox and the input position.
//! - `reconcile`: keeping the lease store equal to the scheduler's leases.

mod batch;
mod effects;
mod event_loop;
mod publisher;
mod reconcile;
mod start;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use gpu_coordinator_core::Scheduler;
use gpu_coordinator_wire::{StatusDoc, StatusPage, Subjects};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::clock::now_ms;
use crate::metrics::Recorder;
use crate::ports::gpu::DeviceSample;
use crate::ports::{DriverStatus, Ports, Term};

use effects::{InputPosition, Outbox};

/// What other tasks (HTTP handlers, operators) ask of the driver.
pub enum Command {
    /// The status document, with this page of the queue.
    Status(StatusPage, oneshot::Sender<StatusDoc>),
}

/// A handle to send commands to the driver of this process, whichever term it runs: between terms (a
/// standby, or one starting or stopping) there is none, and the handle says so at once.
#[derive(Clone, Default)]
pub struct DriverHandle {
    tx: Arc<RwLock<Option<mpsc::Sender<Command>>>>,
}

#[async_trait::async_trait]
impl DriverStatus for DriverHandle {
    /// The status document, or `None` when no driver of this process runs (standby, stopping).
    async fn status(&self, page: StatusPage) -> Option<StatusDoc> {
        let sender = self.tx.read().ok()?.clone()?;
        let (tx, rx) = oneshot::channel();
        sender.send(Command::Status(page, tx)).await.ok()?;
        rx.await.ok()
    }
}

impl DriverHandle {
    /// Whether a driver of this process runs now.
    pub fn leading(&self) -> bool {
        self.tx.read().map(|tx| tx.is_some()).unwrap_or(false)
    }

    /// Commands go to `driver` from now on.
    pub fn attach(&self, driver: &Driver) {
        if let Ok(mut tx) = self.tx.write() {
            *tx = Some(driver.commands.clone());
        }
    }

    /// No driver runs any more.
    pub fn detach(&self) {
        if let Ok(mut tx) = self.tx.write() {
            *tx = None;
        }
    }
}

/// What the driver keeps of NVML: which device each GPU is, the samples as they come (shared by the
/// drivers of successive terms), and the last figure it fed the scheduler (to log changes only).
#[derive(Clone)]
pub struct NvmlFeed {
    devices: BTreeMap<String, u32>,
    samples: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<DeviceSample>>>>,
    fed: HashMap<String, u64>,
    /// Asks the sampler for a sample now (a GPU waits to see a paused holder's VRAM freed).
    sample_now: Arc<tokio::sync::Notify>,
}

impl NvmlFeed {
    /// `devices`: managed GPU id -> NVML device index; `samples`: the sampler's output.
    /// `sample_now` is the sampler's (see [`crate::adapters::nvml::sample`]).
    pub fn new(
        devices: BTreeMap<String, u32>,
        samples: mpsc::Receiver<Vec<DeviceSample>>,
        sample_now: Arc<tokio::sync::Notify>,
    ) -> NvmlFeed {
        NvmlFeed {
            devices,
            samples: Arc::new(tokio::sync::Mutex::new(samples)),
            fed: HashMap::new(),
            sample_now,
        }
    }
}

/// What the composition root hands the driver besides the ports.
pub struct Setup {
    /// The scheduler, configured with the GPUs to manage; the driver restores its state.
    pub sched: Scheduler,
    /// The subjects messages are rendered on.
    pub subjects: Subjects,
    pub recorder: Recorder,
    /// NVML's samples, when NVML is in use.
    pub nvml: Option<NvmlFeed>,
    /// The node agents' samples, with `[nodes] agents = true`.
    pub nodes: Option<crate::ports::nodes::NodeFeed>,
    /// How many ended requests to load, to answer repeated ids.
    pub retain_ended: usize,
    /// `queue.status_limit`: queue entries a status document lists when the question names none.
    pub status_limit: u64,
    pub shutdown: CancellationToken,
}

/// The driver's state: the scheduler and the ports.
pub struct Driver {
    sched: Scheduler,
    ports: Ports,
    /// The leadership term this driver acts under.
    term: Term,
    subjects: Subjects,
    shutdown: CancellationToken,
    /// Where commands to this driver are sent.
    commands: mpsc::Sender<Command>,
    recorder: Recorder,
    nvml: Option<NvmlFeed>,
    nodes: Option<crate::ports::nodes::NodeFeed>,
    position: InputPosition,
    outbox: Outbox,
    /// The publishing stage: messages of committed batches, then their inputs' acknowledgements.
    publisher: publisher::Publisher,
    status_limit: u64,
    /// `queue.retain_ended`: ended requests kept in the journal beyond it are deleted in the background.
    retain_ended: usize,
    /// Whether a background deletion of ended requests is running (one at a time).
    trimming: Arc<std::sync::atomic::AtomicBool>,
    /// The last time handed to the core (its clock never goes back).
    time_floor: gpu_coordinator_core::Millis,
    /// Timers wait for the inputs stored before they fell due: the last of them, and since when.
    catching_up: Option<(u64, std::time::Instant)>,
    /// The last handled input after which a gap was already read again (see `handle_batch`).
    gap_checked: Option<u64>,
    /// Status questions, subscribed before the driver is handed out, so that a leader reported by
    /// the HTTP status also answers over NATS.
    /// (In a mutex only so that the driver is `Sync`; never contended.)
    status: Option<std::sync::Mutex<crate::ports::StatusQueries>>,
}

impl Driver {
    /// The leadership term it acts under.
    pub fn term(&self) -> Term {
        self.term
    }
}
