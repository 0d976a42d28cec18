//! The helper for preemptible services: requests whose leases run the user's `on_pause` and
//! `on_resume` handlers when the coordinator orders a pause or a resume, and acknowledge each order
//! once its handler returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::{Client, ClientError, Lease, RequestOptions};

/// A handler's future, boxed.
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
type PauseHandler = Arc<dyn Fn(PauseOrder) -> HandlerFuture + Send + Sync>;
type ResumeHandler = Arc<dyn Fn(ResumeOrder) -> HandlerFuture + Send + Sync>;

/// The handlers a lease runs; none for a plain [`Client::request`].
#[derive(Clone, Default)]
pub(crate) struct Handlers {
    pub(crate) on_pause: Option<PauseHandler>,
    pub(crate) on_resume: Option<ResumeHandler>,
}

/// The coordinator asks a holder to pause: finish the current unit of work and free the VRAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseOrder {
    pub request_id: String,
    /// The fence of the lease being paused.
    pub fence: u64,
    /// How long the coordinator waits for the acknowledgement before it revokes the lease.
    pub deadline: Option<Duration>,
    /// Why, for a person: which request needs the GPU.
    pub reason: String,
}

/// The paused request holds the GPU again: reload and go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeOrder {
    pub request_id: String,
    /// The new fence, already the lease's [`Lease::fence`].
    pub fence: u64,
    /// The GPU to reload on (it may differ from the one before the pause).
    pub gpu: String,
    /// The new lease's length, in milliseconds.
    pub lease_ms: u64,
    /// When the new lease runs out unless renewed (the client renews it while `on_resume` runs).
    pub expires_at: SystemTime,
    pub reason: String,
}

/// Requests leases that follow the coordinator's pause and resume orders.
///
/// On `pause` the lease stops renewing, runs `on_pause`, then publishes the ACK `paused` with the
/// lease's fence (and logs a warning if `on_pause` ran past the order's deadline, when the lease may
/// already be revoked). On `resume` it takes the new fence, GPU and lease length, renews again, runs
/// `on_resume`, then publishes the ACK `resumed`. Orders that come while a handler runs wait for it.
/// A handler that panics is not acknowledged.
///
/// Revoke and restart orders reach the user through [`Lease::revoked`] and [`Lease::events`].
///
/// ```no_run
/// # async fn example() -> Result<(), gpu_coordinator_client::ClientError> {
/// use gpu_coordinator_client::{Client, RequestOptions, Worker};
///
/// let client = Client::connect("nats://127.0.0.1:4222", "gpu", "transcriber").await?;
/// let worker = Worker::new(&client)
///     .on_pause(|order| async move {
///         // Stop after the current chunk and free the VRAM before returning.
///         println!("pausing (fence {}): {}", order.fence, order.reason);
///     })
///     .on_resume(|order| async move {
///         // Load the model again on `order.gpu`.
///         println!("resuming on {} under fence {}", order.gpu, order.fence);
///     });
/// let lease = worker.request(RequestOptions::new(2).vram_mb(4_000)).await?;
/// while lease.active().await.is_ok() {
///     // One unit of work at a time; `active` waits while the lease is paused.
/// #   break;
/// }
/// lease.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Worker {
    client: Client,
    handlers: Handlers,
}

impl Worker {
    /// A worker without handlers yet, requesting through `client`.
    pub fn new(client: &Client) -> Worker {
        Worker {
            client: client.clone(),
            handlers: Handlers::default(),
        }
    }

    /// Runs `handler` on every `pause` order; the pause is acknowledged when its future completes, so
    /// it must not return before the VRAM is free.
    pub fn on_pause<F, Fut>(mut self, handler: F) -> Worker
    where
        F: Fn(PauseOrder) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.on_pause = Some(Arc::new(move |order| Box::pin(handler(order))));
        self
    }

    /// Runs `handler` on every `resume` order; the resume is acknowledged when its future completes.
    pub fn on_resume<F, Fut>(mut self, handler: F) -> Worker
    where
        F: Fn(ResumeOrder) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.handlers.on_resume = Some(Arc::new(move |order| Box::pin(handler(order))));
        self
    }

    /// [`Client::request`], with a lease that runs this worker's handlers.
    pub async fn request(&self, options: RequestOptions) -> Result<Lease, ClientError> {
        self.client
            .request_with(options, self.handlers.clone())
            .await
    }

    /// The client this worker requests through.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("client", &self.client)
            .field("on_pause", &self.handlers.on_pause.is_some())
            .field("on_resume", &self.handlers.on_resume.is_some())
            .finish()
    }
}
