//! Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! Two sources feed them, and nothing here decides anything:
//!
//! - the driver hands every action the scheduler emits to a [`Recorder`] (counters and histograms from
//!   the core's typed events, so the figures are the audit trail's: instants and waits are numbers,
//!   never text read back);
//! - the gauges (queue, holders, VRAM) are set from the status document when the metrics are read, so
//!   they are never stale.
//!
//! The histograms of waits follow requests through their events (requested or paused, then granted,
//! resumed or ended; preempting, then paused). A request that was already waiting when the coordinator
//! started is counted from its next state change on, not before.

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod labels;
mod recorder;
mod refresh;
mod registry;

pub use labels::Stage;
use labels::{
    GpuLabel, HistogramFamily, HolderLabels, HostLabel, KindLabel, OutcomeLabel, PriorityLabel,
    ProcessLabels, ServiceLabel, StageLabel,
};
pub use recorder::Recorder;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const MB: i64 = 1024 * 1024;

/// Every metric, registered once. Shared (`Arc`) between the driver and the HTTP server; each metric is
/// atomic, so reading never waits for the driver.
pub struct Metrics {
    registry: Registry,
    grants: Counter,
    preemptions: Counter,
    reclaims: Family<ServiceLabel, Counter>,
    revocations: Counter,
    timeouts: Counter,
    rejections: Counter,
    events: Family<KindLabel, Counter>,
    grant_latency: Histogram,
    queue_wait: HistogramFamily<OutcomeLabel>,
    pause_ack: Histogram,
    batch_stage: HistogramFamily<StageLabel>,
    queue_length: Family<PriorityLabel, Gauge>,
    paused: Family<PriorityLabel, Gauge>,
    holders: Family<HolderLabels, Gauge>,
    vram_total: Family<GpuLabel, Gauge>,
    vram_used: Family<GpuLabel, Gauge>,
    vram_free: Family<GpuLabel, Gauge>,
    vram_external: Family<GpuLabel, Gauge>,
    vram_from_nvml: Gauge,
    process_vram: Family<ProcessLabels, Gauge>,
    service_used: Family<ServiceLabel, Gauge>,
    service_borrowed: Family<ServiceLabel, Gauge>,
    service_guaranteed: Family<ServiceLabel, Gauge>,
    service_max: Family<ServiceLabel, Gauge>,
    storage_full: Gauge,
    host_up: Family<HostLabel, Gauge>,
    host_sample_age: Family<HostLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    host_gpus: Family<HostLabel, Gauge>,
    node_samples_refused: Counter,
    /// Refreshing the gauges and encoding them is one step, so two scrapes do not interleave.
    render: Mutex<()>,
}
fn bytes(mb: u64) -> i64 {
    i64::try_from(mb)
        .unwrap_or(i64::MAX / MB)
        .saturating_mul(MB)
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

#[cfg(test)]
mod tests;
