//! The GPUs to manage, decided once at start: NVML's devices (or the given probe's), else the configured
//! `[[gpus]]`, else one default GPU; and the scheduler configured for them.

use std::sync::Arc;
use std::time::Duration;

use gpu_coordinator_core::{GpuSpec, Input, SchedConfig, Scheduler};
use gpu_coordinator_wire::{StatusDoc, VramSource};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::adapters::nvml::{self, DeviceSample, GpuProbe, NvmlProbe};
use crate::clock::now_ms;
use crate::config::Config;
use crate::driver::NvmlFeed;
use crate::ports::nodes::NodeFeed;

/// The GPU assumed when neither the configuration nor NVML names one.
pub const DEFAULT_GPU_MB: u64 = 24_576;

/// How many NVML samples may wait for the driver.
const SAMPLES: usize = 4;

/// The configured `[[gpus]]`, as the NVML adapter is given them.
pub fn configured(config: &Config) -> Vec<GpuSpec> {
    config
        .gpus
        .iter()
        .map(|g| GpuSpec {
            id: g.id.clone().into(),
            total_mb: g.vram_mb,
        })
        .collect()
}

/// The configured GPUs, else one default GPU (said clearly).
pub fn inventory(config: &Config) -> Vec<GpuSpec> {
    if !config.gpus.is_empty() {
        return configured(config);
    }
    tracing::warn!(
        "no [[gpus]] configured and no GPU found through NVML: managing one GPU `0` of {DEFAULT_GPU_MB} MB"
    );
    vec![GpuSpec {
        id: "0".into(),
        total_mb: DEFAULT_GPU_MB,
    }]
}

/// What the coordinator would see at start on this machine, without any server: the GPUs it would
/// manage (NVML's, else the configured ones, else the default) and the status document it would start
/// from, with the VRAM that processes use outside any lease; and NVML's samples, when NVML is there.
pub fn local_status(config: &Config) -> (StatusDoc, Vec<DeviceSample>) {
    let samples = if config.nvml.enabled {
        NvmlProbe::init()
            .ok()
            .and_then(|probe| probe.devices().ok())
    } else {
        None
    };
    let found = nvml::inventory(&configured(config), samples.as_deref());
    let gpus = if found.gpus.is_empty() {
        inventory(config)
    } else {
        found.gpus.clone()
    };
    let mut sched = Scheduler::new(config.sched_config(), gpus);
    sched.set_vram_source(found.source);
    let now = now_ms();
    if let Some(samples) = &samples {
        // No lease is held yet: everything NVML sees in use is outside the coordinator.
        for (gpu, used_mb) in nvml::used_by_gpu(&found.devices, samples) {
            sched.handle_input(
                Input::GpuUsed {
                    gpu: gpu.into(),
                    used_mb,
                },
                now,
            );
        }
    }
    (
        crate::render::status(&sched.status(now)),
        samples.unwrap_or_default(),
    )
}

/// The GPUs this coordinator manages, found once at start, and NVML's feed when NVML samples them.
pub struct Gpus {
    specs: Vec<GpuSpec>,
    source: VramSource,
    sched_config: SchedConfig,
    /// Shared by the drivers of successive terms.
    pub feed: Option<NvmlFeed>,
    /// The probe that samples them (NVML, or a test's), for the engine sidecars' freed-VRAM check.
    pub probe: Option<Arc<dyn GpuProbe>>,
    /// The node agents' samples, with `[nodes] agents = true` (then there are no GPUs at start).
    pub nodes: Option<NodeFeed>,
}

impl Gpus {
    /// A new scheduler for these GPUs, for a driver to restore its state into.
    pub fn scheduler(&self) -> Scheduler {
        let mut sched = Scheduler::new(self.sched_config.clone(), self.specs.clone());
        sched.set_vram_source(self.source);
        sched
    }
}

/// Finds the GPUs (NVML's, else the configured ones, else the default) and starts NVML's sampler under
/// `tracker` until `shutdown` when NVML samples them.
pub async fn probe(
    config: &Config,
    probe: Option<Arc<dyn GpuProbe>>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Gpus {
    if config.nodes.agents {
        return reported_by_agents(config);
    }
    let probed = probe_devices(config, probe).await;
    let found = nvml::inventory(
        &configured(config),
        probed.as_ref().map(|(_, d)| d.as_slice()),
    );
    if probed.is_some() && !config.gpus.is_empty() && found.source == VramSource::Config {
        tracing::warn!(
            "NVML sees the GPUs but none of the configured [[gpus]] ids is an NVML index or UUID: VRAM \
             figures come from the configuration"
        );
    }
    let specs = if found.gpus.is_empty() {
        inventory(config)
    } else {
        found.gpus.clone()
    };
    say_managed(&specs, &found);
    warn_of_guarantees_beyond(config, &specs);
    let mut sched_config = config.sched_config();
    if found.source == VramSource::Nvml {
        // Only NVML can see a paused holder's VRAM really freed.
        sched_config.settle_ms = config.nvml.settle_ms;
    }
    let (feed, probe) = match probed {
        Some((probe, _)) if !found.devices.is_empty() => {
            let (tx, samples) = mpsc::channel(SAMPLES);
            let every = Duration::from_millis(config.nvml.sample_ms.max(1));
            let now = Arc::new(tokio::sync::Notify::new());
            tracker.spawn(nvml::sample(
                probe.clone(),
                every,
                Arc::clone(&now),
                tx,
                shutdown.clone(),
            ));
            (
                Some(NvmlFeed::new(found.devices, samples, now)),
                Some(probe),
            )
        }
        _ => (None, None),
    };
    Gpus {
        specs,
        source: found.source,
        sched_config,
        feed,
        probe,
        nodes: None,
    }
}

/// With `[nodes] agents = true`: no GPUs at start, those the node agents report once heard.
fn reported_by_agents(config: &Config) -> Gpus {
    tracing::info!(
        "nodes.agents is true: the GPUs are those the node agents report (none until one is heard)"
    );
    let mut sched_config = config.sched_config();
    // Only GPUs that an agent samples through NVML wait to see paused VRAM freed.
    sched_config.settle_ms = config.nvml.settle_ms;
    Gpus {
        specs: Vec::new(),
        source: VramSource::Config,
        sched_config,
        feed: None,
        probe: None,
        nodes: None,
    }
}

/// Says in the log each GPU managed, its VRAM and where that figure comes from.
fn say_managed(specs: &[GpuSpec], found: &nvml::Inventory) {
    for g in specs {
        let source = if found.devices.contains_key(g.id.as_str()) {
            "NVML"
        } else {
            "configuration"
        };
        tracing::info!(
            "managing GPU {} with {} MB (VRAM from the {source})",
            g.id,
            g.total_mb
        );
    }
}

/// Warns when the services' guarantees add up to more than the GPUs managed have.
fn warn_of_guarantees_beyond(config: &Config, specs: &[GpuSpec]) {
    // The configuration checks the guarantees against [[gpus]]; NVML's inventory is known only now.
    let guaranteed: u64 = config
        .services
        .named
        .values()
        .filter_map(|s| s.guaranteed_vram_mb)
        .sum();
    let total: u64 = specs.iter().map(|g| g.total_mb).sum();
    if guaranteed > total {
        tracing::warn!(
            "services.*.guaranteed_vram_mb add up to {guaranteed} MB, more than the {total} MB of the \
             GPUs managed: not every guarantee can be given back at once"
        );
    }
}

/// Asks the probe (the given one, else NVML when enabled) for the devices, saying once in the log where
/// the VRAM figures will come from.
async fn probe_devices(
    config: &Config,
    probe: Option<Arc<dyn GpuProbe>>,
) -> Option<(Arc<dyn GpuProbe>, Vec<DeviceSample>)> {
    let probe: Arc<dyn GpuProbe> = match probe {
        Some(p) => p,
        None if !config.nvml.enabled => {
            tracing::info!("nvml.enabled is false: VRAM figures come from the configuration");
            return None;
        }
        None => match tokio::task::spawn_blocking(NvmlProbe::init).await {
            Ok(Ok(p)) => Arc::new(p),
            Ok(Err(e)) => {
                tracing::warn!(
                    "{e}: running on the configured GPU capacities (vram_source \"config\")"
                );
                return None;
            }
            Err(e) => {
                tracing::warn!("NVML start failed ({e}): running on the configured GPU capacities");
                return None;
            }
        },
    };
    let query = probe.clone();
    match tokio::task::spawn_blocking(move || query.devices()).await {
        Ok(Ok(devices)) => {
            for d in &devices {
                tracing::info!(
                    "NVML device {}: {} ({}), {} MB, {} MB used",
                    d.index,
                    d.name,
                    d.uuid,
                    d.total_mb,
                    d.used_mb
                );
            }
            Some((probe, devices))
        }
        Ok(Err(e)) => {
            tracing::warn!(
                "{e}: running on the configured GPU capacities (vram_source \"config\")"
            );
            None
        }
        Err(e) => {
            tracing::warn!("NVML query failed ({e}): running on the configured GPU capacities");
            None
        }
    }
}
