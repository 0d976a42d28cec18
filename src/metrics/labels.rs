//! The label sets of the metric families, the stages of a batch, and the histograms' buckets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HostLabel {
    pub(super) host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct KindLabel {
    pub(super) kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PriorityLabel {
    pub(super) priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct GpuLabel {
    pub(super) gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HolderLabels {
    pub(super) gpu: String,
    pub(super) state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ServiceLabel {
    pub(super) service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StageLabel {
    pub(super) stage: &'static str,
}

/// A step of a batch of inputs on its way to the answers, timed in
/// `gpu_coordinator_batch_stage_seconds{stage}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The journal write of a batch of effects (a Postgres commit, or a PubAck of the journal stream).
    Journal,
    /// The lease store's write of the same batch (Redis), alongside the journal.
    Leases,
    /// Both, as the batch waits for them: from the round's effects ready to both written.
    Durable,
    /// The messages of a batch, from handed to the publishing stage to stored by the bus.
    Publish,
    /// A batch of inputs in the loop: from its first input taken to its messages handed over.
    Batch,
}

impl Stage {
    pub(super) fn label(self) -> &'static str {
        match self {
            Stage::Journal => "journal",
            Stage::Leases => "leases",
            Stage::Durable => "durable",
            Stage::Publish => "publish",
            Stage::Batch => "batch",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ProcessLabels {
    pub(super) gpu: String,
    pub(super) pid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct OutcomeLabel {
    pub(super) outcome: String,
}

pub(super) type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Waits from milliseconds to about ten minutes, in seconds.
pub(super) fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.5, 14))
}

/// Steps of the grant path, from 50 µs to about 1.6 s, in seconds.
pub(super) fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}
