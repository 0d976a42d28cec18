//! What a node agent publishes on `<prefix>.node.<host>`: its host's GPUs, sampled.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The body of `<prefix>.node.<host>` (JSON, core NATS): one sample of a host's GPUs. Each sample is
/// also the agent's heartbeat: a host whose last sample is older than the coordinator's
/// `nodes.ttl_ms` takes no new grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeSample {
    /// The host, as in the subject; a sample whose `host` differs from its subject's is refused.
    pub host: String,
    /// When the agent took the sample, in milliseconds since the Unix epoch (for display: the
    /// coordinator dates a sample by its own clock, when it arrives).
    pub at: u64,
    /// How often the agent samples, in milliseconds.
    pub interval_ms: u64,
    /// Where the figures come from: `nvml`, or `config` for GPUs simulated by `[[gpus]]`.
    pub source: String,
    /// The NVIDIA driver's version, when NVML gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// The host's GPUs, in NVML's order.
    pub gpus: Vec<NodeGpu>,
}

/// One GPU of a [`NodeSample`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeGpu {
    /// The GPU's id on its host (NVML's index, or `[[gpus]].id`): the coordinator names it
    /// `<host>/<id>`.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Capacity in MB.
    pub total_mb: u64,
    /// VRAM used, whoever uses it, in MB.
    pub used_mb: u64,
    /// The processes using it and what each uses, in MB, when NVML says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<GpuProcess>,
    /// `false` after an XID error or when NVML cannot read it.
    pub healthy: bool,
    /// XID errors seen since the agent started.
    #[serde(default)]
    pub xid_errors: u64,
    /// Whether MIG is on, when NVML says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<bool>,
}

/// A process on a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_mb: u64,
}

/// The longest id of a GPU on its host.
pub const MAX_NODE_GPU_ID_LEN: usize = 32;

/// Whether `id` may name a GPU on its host (a sample's `gpus[].id`, an agent's `[[gpus]].id`): 1 to
/// 32 characters of `[A-Za-z0-9_:.-]`, no `/` (the coordinator names it `<host>/<id>`).
pub fn valid_node_gpu_id(id: &str) -> bool {
    (1..=MAX_NODE_GPU_ID_LEN).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
}

impl NodeSample {
    /// Why the sample cannot be used as `host`'s (the host of its subject), if it cannot.
    pub fn problem(&self, host: &str) -> Option<String> {
        if self.host != host {
            return Some(format!(
                "field `host` is {:?} but the sample came on host {host:?}'s subject: an agent \
                 speaks only for its own host",
                self.host
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, gpu) in self.gpus.iter().enumerate() {
            if !valid_node_gpu_id(&gpu.id) {
                return Some(format!(
                    "gpus[{i}].id {:?} must be 1 to 32 characters of A-Z, a-z, 0-9, `_`, `-`, `:` \
                     and `.`",
                    gpu.id
                ));
            }
            if !seen.insert(gpu.id.as_str()) {
                return Some(format!("gpus[{i}].id {:?} is listed twice", gpu.id));
            }
            if gpu.total_mb == 0 {
                return Some(format!("gpus[{i}].total_mb must be > 0"));
            }
        }
        None
    }
}
