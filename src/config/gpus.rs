//! `[nvml]` and `[[gpus]]`: where the GPUs and their VRAM come from on this box.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    /// `nvml.enabled`, default true: sample VRAM through NVML when a driver is there.
    pub enabled: bool,
    /// `nvml.sample_ms`, default 1000.
    pub sample_ms: u64,
    /// `nvml.settle_ms`: after a pause ACK, how long to wait for NVML to see the VRAM freed, default 2000.
    pub settle_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// The GPU id used on the wire (`gpu` fields), e.g. `0`.
    pub id: String,
    /// Capacity in MB.
    pub vram_mb: u64,
}
impl Default for NvmlConfig {
    fn default() -> Self {
        NvmlConfig {
            enabled: true,
            sample_ms: 1000,
            settle_ms: 2000,
        }
    }
}
