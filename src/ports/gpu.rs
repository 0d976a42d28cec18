//! The GPU probe: what the driver needs to know of the GPUs' memory (devices sampled on a tick, and
//! the memory used per managed GPU). The real probe is NVML ([`crate::adapters::nvml::NvmlProbe`]); a
//! fake one stands in for a device in tests.

use std::collections::BTreeMap;

/// What can go wrong asking NVML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// `nvml.enabled` is false.
    #[error("NVML is disabled (nvml.enabled = false)")]
    Disabled,
    /// The NVML library could not be loaded or initialised (no NVIDIA driver on this machine).
    #[error("NVML could not be initialised: {0}")]
    Init(String),
    /// A query of a device failed.
    #[error("NVML query `{what}` failed on device {index}: {detail}")]
    Query {
        what: &'static str,
        index: u32,
        detail: String,
    },
}

/// The memory a process uses on one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUsage {
    pub pid: u32,
    pub used_mb: u64,
}

/// One device at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSample {
    /// NVML's index, `0..count`.
    pub index: u32,
    /// `GPU-...`, stable across reboots.
    pub uuid: String,
    /// The product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    pub total_mb: u64,
    pub used_mb: u64,
    /// The processes using memory on it (compute and graphics), where the driver reports it.
    pub processes: Vec<ProcessUsage>,
    /// Whether MIG is on, where the driver says.
    pub mig: Option<bool>,
}

/// A source of device samples. Calls block (NVML is a C library): run them off the async threads.
pub trait GpuProbe: Send + Sync + 'static {
    /// Every device, in index order.
    fn devices(&self) -> Result<Vec<DeviceSample>, ProbeError>;
}

/// For each managed GPU that NVML sampled: the memory used on it, by anyone. What part of it is outside
/// the coordinator's leases is the core's to work out (`Input::GpuUsed`).
pub fn used_by_gpu(
    devices: &BTreeMap<String, u32>,
    samples: &[DeviceSample],
) -> Vec<(String, u64)> {
    devices
        .iter()
        .filter_map(|(gpu, index)| {
            let sample = samples.iter().find(|s| s.index == *index)?;
            Some((gpu.clone(), sample.used_mb))
        })
        .collect()
}
