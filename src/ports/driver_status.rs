//! The driver as the HTTP API sees it: the status document of the driver this process runs, if one
//! runs. Filled by [`DriverHandle`](crate::driver::DriverHandle), which sends the driver a command.

use async_trait::async_trait;
use gpu_coordinator_wire::{StatusDoc, StatusPage};

/// Where the status document comes from: the driver of this process, whichever term it runs.
#[async_trait]
pub trait DriverStatus: Send + Sync + 'static {
    /// The status document, or `None` when no driver of this process runs (standby, stopping).
    async fn status(&self, page: StatusPage) -> Option<StatusDoc>;
}
