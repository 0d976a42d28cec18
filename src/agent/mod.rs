//! `gpu-coordinator agent`: one per GPU host. It samples the host's GPUs (NVML, else the `[[gpus]]`
//! of its configuration, simulated) every `nvml.sample_ms` and publishes each sample on
//! `<prefix>.node.<host>` for the coordinator ([`NodeSample`]); each sample is also its heartbeat.
//!
//! Core NATS, not JetStream: a sample is the host's state now, and the next one replaces it within a
//! second; storing them would only make the stream and the disk work, and a leader that starts needs
//! the samples to come, not those of the past (it grants nothing on a host before it has heard it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gpu_coordinator_wire::{GpuProcess, NodeGpu, NodeSample, Subjects};
use tokio_util::sync::CancellationToken;

use crate::adapters::nats::NatsSettings;
use crate::adapters::nvml::{self, GpuProbe, NvmlProbe};
use crate::clock::now_ms;
use crate::config::{Config, GpuConfig};
use crate::ports::gpu::DeviceSample;
use crate::retry::with_retry;

/// Where an agent's figures come from.
pub enum Source {
    /// NVML's devices, with the driver's version and the XID errors seen per device UUID.
    Nvml {
        probe: Arc<dyn GpuProbe>,
        driver_version: Option<String>,
        xid: Option<std::sync::mpsc::Receiver<(String, u64)>>,
    },
    /// The configuration's `[[gpus]]`, nothing used on them (a host without NVML: tests, a laptop).
    Simulated(Vec<GpuConfig>),
}

/// What the agent keeps between samples: the XID errors counted per device UUID.
#[derive(Default)]
struct Health {
    xid: HashMap<String, u64>,
}

/// Runs the agent until `shutdown`: connects to NATS (waiting for it with backoff), then publishes a
/// sample of the host's GPUs every `nvml.sample_ms`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let host = config.agent.host_name();
    let subjects = Subjects::new(&config.nats.prefix).map_err(anyhow::Error::msg)?;
    let source = source(&config).await?;
    let nats = NatsSettings::from(&config.nats);
    let servers = crate::adapters::nats::servers(&nats)?;
    let client = with_retry("connecting to NATS", &shutdown, || async {
        crate::adapters::nats::options(&nats)
            .await?
            .name(format!("gpu-coordinator-agent-{host}"))
            .connection_timeout(Duration::from_secs(5))
            .connect(servers.clone())
            .await
            .map_err(|source| crate::adapters::nats::NatsError::Connect {
                url: gpu_coordinator_client::redact(&config.nats.url),
                source,
            })
    })
    .await?;
    let subject = subjects.node(&host);
    let every = Duration::from_millis(config.nvml.sample_ms.max(1));
    tracing::info!("agent of host `{host}`: publishing its GPUs on {subject} every {every:?}");
    publish_loop(client, subject, host, every, source, shutdown).await;
    Ok(())
}

/// Samples and publishes every `every` until `shutdown`. A failed sample or publish is logged once
/// per run of failures; the client reconnects by itself.
async fn publish_loop(
    client: async_nats::Client,
    subject: String,
    host: String,
    every: Duration,
    mut source: Source,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health = Health::default();
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let sample = match take_sample(&host, every, &mut source, &mut health).await {
            Ok(sample) => sample,
            Err(e) => {
                if !failing {
                    tracing::warn!("sampling the GPUs: {e}; trying again at the next tick");
                }
                failing = true;
                continue;
            }
        };
        let payload = serde_json::to_vec(&sample).expect("a sample serializes");
        match client.publish(subject.clone(), payload.into()).await {
            Ok(()) if failing => {
                tracing::info!("publishing samples works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "publishing a sample on {subject}: {e}; retrying at the next tick"
                    );
                }
                failing = true;
            }
        }
    }
    let _ = client.flush().await;
}

/// The GPUs' figures now, from `source`.
async fn take_sample(
    host: &str,
    every: Duration,
    source: &mut Source,
    health: &mut Health,
) -> anyhow::Result<NodeSample> {
    let at = now_ms();
    let interval_ms = every.as_millis() as u64;
    match source {
        Source::Simulated(gpus) => Ok(NodeSample {
            host: host.to_owned(),
            at,
            interval_ms,
            source: "config".to_owned(),
            driver_version: None,
            gpus: gpus.iter().map(simulated).collect(),
        }),
        Source::Nvml {
            probe,
            driver_version,
            xid,
        } => {
            if let Some(events) = xid {
                for (uuid, code) in events.try_iter() {
                    tracing::warn!("GPU {uuid}: XID error {code}");
                    *health.xid.entry(uuid).or_default() += 1;
                }
            }
            let probe = probe.clone();
            let devices = tokio::task::spawn_blocking(move || probe.devices()).await??;
            Ok(NodeSample {
                host: host.to_owned(),
                at,
                interval_ms,
                source: "nvml".to_owned(),
                driver_version: driver_version.clone(),
                gpus: devices.iter().map(|d| sampled(d, health)).collect(),
            })
        }
    }
}

/// A `[[gpus]]` entry as a sampled GPU: nothing used on it.
fn simulated(gpu: &GpuConfig) -> NodeGpu {
    NodeGpu {
        id: gpu.id.clone(),
        uuid: None,
        name: None,
        total_mb: gpu.vram_mb,
        used_mb: 0,
        processes: Vec::new(),
        healthy: true,
        xid_errors: 0,
        mig: None,
    }
}

/// An NVML device as a sampled GPU: its id is its index; unhealthy once it had an XID error.
fn sampled(device: &DeviceSample, health: &Health) -> NodeGpu {
    let xid_errors = health.xid.get(&device.uuid).copied().unwrap_or(0);
    NodeGpu {
        id: device.index.to_string(),
        uuid: Some(device.uuid.clone()).filter(|u| !u.is_empty()),
        name: Some(device.name.clone()).filter(|n| !n.is_empty()),
        total_mb: device.total_mb,
        used_mb: device.used_mb,
        processes: device
            .processes
            .iter()
            .map(|p| GpuProcess {
                pid: p.pid,
                used_mb: p.used_mb,
            })
            .collect(),
        healthy: xid_errors == 0,
        xid_errors,
        mig: device.mig,
    }
}

/// NVML when it is enabled and sees devices (then `[[gpus]]` is not used), else the `[[gpus]]`
/// simulated; neither is an error that says what to do.
async fn source(config: &Config) -> anyhow::Result<Source> {
    if config.nvml.enabled {
        match tokio::task::spawn_blocking(NvmlProbe::init).await? {
            Ok(probe) => {
                let driver_version = probe.driver_version();
                let probe: Arc<dyn GpuProbe> = Arc::new(probe);
                let query = probe.clone();
                let devices = tokio::task::spawn_blocking(move || query.devices()).await?;
                match devices {
                    Ok(devices) if !devices.is_empty() => {
                        for d in &devices {
                            tracing::info!(
                                "NVML device {}: {} ({}), {} MB",
                                d.index,
                                d.name,
                                d.uuid,
                                d.total_mb
                            );
                        }
                        if !config.gpus.is_empty() {
                            tracing::warn!("NVML sees GPUs: the configured [[gpus]] are not used");
                        }
                        let (tx, rx) = std::sync::mpsc::channel();
                        // The watcher lives as long as the agent reads its events.
                        let xid = match nvml::watch_xid(tx) {
                            Ok(_) => Some(rx),
                            Err(e) => {
                                tracing::warn!("XID errors are not watched: {e}");
                                None
                            }
                        };
                        return Ok(Source::Nvml {
                            probe,
                            driver_version,
                            xid,
                        });
                    }
                    Ok(_) => tracing::info!("NVML sees no GPU"),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            Err(e) => tracing::info!("{e}"),
        }
    }
    anyhow::ensure!(
        !config.gpus.is_empty(),
        "no GPU to report: NVML sees none (or nvml.enabled is false) and the configuration lists no \
         [[gpus]] to simulate"
    );
    tracing::info!(
        "reporting {} simulated GPU(s) from [[gpus]]",
        config.gpus.len()
    );
    Ok(Source::Simulated(config.gpus.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_simulated_gpu_is_reported_with_its_capacity_and_nothing_used() {
        let mut source = Source::Simulated(vec![GpuConfig {
            id: "0".into(),
            vram_mb: 24_000,
        }]);
        let sample = take_sample(
            "h1",
            Duration::from_millis(500),
            &mut source,
            &mut Health::default(),
        )
        .await
        .unwrap();
        assert_eq!(sample.host, "h1");
        assert_eq!(sample.source, "config");
        assert_eq!(sample.interval_ms, 500);
        assert_eq!(sample.gpus.len(), 1);
        assert_eq!(
            (sample.gpus[0].total_mb, sample.gpus[0].used_mb),
            (24_000, 0)
        );
        assert!(sample.problem("h1").is_none());
        assert!(sample.problem("h2").unwrap().contains("its own host"));
    }

    #[test]
    fn an_nvml_device_with_an_xid_error_is_reported_unhealthy() {
        let device = DeviceSample {
            index: 1,
            uuid: "GPU-1".into(),
            name: "NVIDIA L4".into(),
            total_mb: 23_034,
            used_mb: 1_000,
            processes: vec![crate::ports::gpu::ProcessUsage {
                pid: 42,
                used_mb: 900,
            }],
            mig: Some(false),
        };
        let mut health = Health::default();
        let gpu = sampled(&device, &health);
        assert!(gpu.healthy);
        assert_eq!(gpu.id, "1");
        assert_eq!(
            gpu.processes,
            vec![GpuProcess {
                pid: 42,
                used_mb: 900
            }]
        );
        health.xid.insert("GPU-1".into(), 2);
        let gpu = sampled(&device, &health);
        assert!(!gpu.healthy);
        assert_eq!(gpu.xid_errors, 2);
    }
}
