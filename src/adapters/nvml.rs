//! VRAM as the NVIDIA driver sees it (NVML): the GPU inventory at start, and samples of the memory used
//! per GPU (and per process) on a tick.
//!
//! The driver asks a [`GpuProbe`]; [`NvmlProbe`] is the real one, [`FakeProbe`] stands in for a device in
//! tests. A sample becomes the memory used per managed GPU ([`used_by_gpu`]); which part of it is
//! outside the coordinator's leases, and what to grant with it, is the core's business, not this
//! module's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpu_coordinator_core::GpuSpec;
use gpu_coordinator_wire::VramSource;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MB: u64 = 1024 * 1024;

pub use crate::ports::gpu::{used_by_gpu, DeviceSample, GpuProbe, ProbeError, ProcessUsage};

/// The real probe: the NVIDIA Management Library, loaded at run time.
pub struct NvmlProbe {
    nvml: nvml_wrapper::Nvml,
}

impl NvmlProbe {
    /// Loads and initialises NVML; fails where there is no NVIDIA driver.
    pub fn init() -> Result<NvmlProbe, ProbeError> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| NvmlProbe { nvml })
            .map_err(|e| ProbeError::Init(e.to_string()))
    }
}

impl GpuProbe for NvmlProbe {
    fn devices(&self) -> Result<Vec<DeviceSample>, ProbeError> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let count = self.nvml.device_count().map_err(|e| ProbeError::Query {
            what: "device_count",
            index: 0,
            detail: e.to_string(),
        })?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let fail = |what: &'static str| {
                move |e: nvml_wrapper::error::NvmlError| ProbeError::Query {
                    what,
                    index,
                    detail: e.to_string(),
                }
            };
            let device = self
                .nvml
                .device_by_index(index)
                .map_err(fail("device_by_index"))?;
            let memory = device.memory_info().map_err(fail("memory_info"))?;
            // Process lists are best effort: some drivers (and containers without the PID namespace)
            // refuse them, and the memory figures are what admission needs.
            let mut processes: BTreeMap<u32, u64> = BTreeMap::new();
            for list in [
                device.running_compute_processes(),
                device.running_graphics_processes(),
            ] {
                for p in list.unwrap_or_default() {
                    if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                        *processes.entry(p.pid).or_default() += bytes / MB;
                    }
                }
            }
            out.push(DeviceSample {
                index,
                uuid: device.uuid().unwrap_or_default(),
                name: device.name().unwrap_or_default(),
                total_mb: memory.total / MB,
                used_mb: memory.used / MB,
                processes: processes
                    .into_iter()
                    .map(|(pid, used_mb)| ProcessUsage { pid, used_mb })
                    .collect(),
                mig: device.mig_mode().ok().map(|mode| mode.current == 1),
            });
        }
        Ok(out)
    }
}

impl NvmlProbe {
    /// The NVIDIA driver's version.
    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }
}

/// Watches for critical XID errors (a GPU that fell off the bus, a double-bit ECC error, ...) on a
/// thread of its own, handing `(device UUID, XID)` to `sink` as they come, until `sink`'s receiver
/// is gone. Returns at once, with why, where NVML or its events cannot be had (no driver, a GPU
/// without events).
pub fn watch_xid(
    sink: std::sync::mpsc::Sender<(String, u64)>,
) -> Result<std::thread::JoinHandle<()>, ProbeError> {
    let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), ProbeError>>();
    let thread = std::thread::spawn(move || {
        use nvml_wrapper::bitmasks::event::EventTypes;
        use nvml_wrapper::enums::event::XidError;
        use nvml_wrapper::error::NvmlError;
        let fail = |what: &'static str| {
            move |e: NvmlError| ProbeError::Query {
                what,
                index: 0,
                detail: e.to_string(),
            }
        };
        let setup = (|| {
            let nvml = nvml_wrapper::Nvml::init().map_err(|e| ProbeError::Init(e.to_string()))?;
            Ok::<_, ProbeError>(nvml)
        })();
        let nvml = match setup {
            Ok(nvml) => nvml,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let registered = (|| {
            let mut set = nvml.create_event_set().map_err(fail("create_event_set"))?;
            for index in 0..nvml.device_count().map_err(fail("device_count"))? {
                let device = nvml
                    .device_by_index(index)
                    .map_err(fail("device_by_index"))?;
                set = device
                    .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                    .map_err(|e| fail("register_events")(e.error))?;
            }
            Ok::<_, ProbeError>(set)
        })();
        let set = match registered {
            Ok(set) => {
                let _ = ready_tx.send(Ok(()));
                set
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        loop {
            match set.wait(500) {
                Ok(event) => {
                    let xid = match event.event_data {
                        Some(XidError::Value(xid)) => xid,
                        _ => 0,
                    };
                    let uuid = event.device.uuid().unwrap_or_default();
                    if sink.send((uuid, xid)).is_err() {
                        return;
                    }
                }
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    tracing::warn!("waiting for NVML's XID events: {e}; no longer watching");
                    return;
                }
            }
        }
    });
    match ready.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Init(
            "the XID watcher's thread ended".to_owned(),
        )),
    }
}

/// A device for tests: returns whatever was last [`FakeProbe::set`].
#[derive(Clone)]
pub struct FakeProbe {
    devices: Arc<Mutex<Result<Vec<DeviceSample>, ProbeError>>>,
}

impl FakeProbe {
    /// A fake with these devices.
    pub fn new(devices: Vec<DeviceSample>) -> FakeProbe {
        FakeProbe {
            devices: Arc::new(Mutex::new(Ok(devices))),
        }
    }

    /// What the next samples return.
    pub fn set(&self, devices: Result<Vec<DeviceSample>, ProbeError>) {
        *self.devices.lock().unwrap_or_else(|p| p.into_inner()) = devices;
    }

    /// Changes the used memory of device `index` (and nothing else).
    pub fn set_used(&self, index: u32, used_mb: u64) {
        let mut guard = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(devices) = guard.as_mut() {
            for d in devices.iter_mut().filter(|d| d.index == index) {
                d.used_mb = used_mb;
            }
        }
    }
}

impl GpuProbe for FakeProbe {
    fn devices(&self) -> Result<Vec<DeviceSample>, ProbeError> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The GPUs to manage and which NVML device each one is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub gpus: Vec<GpuSpec>,
    /// `Nvml` when at least one managed GPU is an NVML device.
    pub source: VramSource,
    /// Managed GPU id -> NVML device index, for the GPUs NVML sees.
    pub devices: BTreeMap<String, u32>,
}

/// Decides the inventory. With GPUs `configured` (the caller's `[[gpus]]`), those GPUs and capacities are
/// managed, and a GPU whose id is an NVML index (`"0"`) or UUID (`"GPU-..."`) is sampled through NVML.
/// With none configured, every NVML device is managed as `"0"`, `"1"`, ... with its full memory. `probed`
/// is `None` when NVML is not there; with neither, the result is empty (the caller picks its default).
pub fn inventory(configured: &[GpuSpec], probed: Option<&[DeviceSample]>) -> Inventory {
    let probed = probed.unwrap_or_default();
    let (gpus, devices): (Vec<GpuSpec>, BTreeMap<String, u32>) = if configured.is_empty() {
        (
            probed
                .iter()
                .map(|d| GpuSpec {
                    id: d.index.to_string().into(),
                    total_mb: d.total_mb,
                })
                .collect(),
            probed
                .iter()
                .map(|d| (d.index.to_string(), d.index))
                .collect(),
        )
    } else {
        let devices = configured
            .iter()
            .filter_map(|g| {
                probed
                    .iter()
                    .find(|d| d.index.to_string() == g.id || (!d.uuid.is_empty() && d.uuid == g.id))
                    .map(|d| (g.id.as_str().to_owned(), d.index))
            })
            .collect();
        (configured.to_vec(), devices)
    };
    let source = if devices.is_empty() {
        VramSource::Config
    } else {
        VramSource::Nvml
    };
    Inventory {
        gpus,
        source,
        devices,
    }
}

/// Samples `probe` every `every` on a blocking thread and hands each sample to `sink` (the driver), until
/// `shutdown` or until the driver is gone. A failed sample is logged once per run of failures; the last
/// good figures stay in force. The caller spawns it (under its task tracker).
pub async fn sample(
    probe: Arc<dyn GpuProbe>,
    every: Duration,
    now: Arc<tokio::sync::Notify>,
    sink: mpsc::Sender<Vec<DeviceSample>>,
    shutdown: CancellationToken,
) {
    {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                () = now.notified() => tick.reset(),
            }
            let probe = probe.clone();
            match tokio::task::spawn_blocking(move || probe.devices()).await {
                Ok(Ok(samples)) => {
                    if failing {
                        tracing::info!("NVML sampling works again");
                        failing = false;
                    }
                    if sink.send(samples).await.is_err() {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!("sampling VRAM through NVML: {e}; keeping the last figures");
                        failing = true;
                    }
                }
                Err(e) => tracing::error!("the NVML sampling thread failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(index: u32, total_mb: u64, used_mb: u64) -> DeviceSample {
        DeviceSample {
            mig: None,
            index,
            uuid: format!("GPU-fake-{index}"),
            name: "Fake GPU".into(),
            total_mb,
            used_mb,
            processes: vec![ProcessUsage { pid: 42, used_mb }],
        }
    }

    fn gpu(id: &str, vram_mb: u64) -> GpuSpec {
        GpuSpec {
            id: id.into(),
            total_mb: vram_mb,
        }
    }

    #[test]
    fn without_configured_gpus_nvml_devices_are_managed_by_index() {
        let probe = FakeProbe::new(vec![device(0, 81_559, 500), device(1, 24_576, 0)]);
        let samples = probe.devices().expect("the fake answers");
        let inv = inventory(&[], Some(&samples));
        assert_eq!(
            inv.gpus,
            vec![
                GpuSpec {
                    id: "0".into(),
                    total_mb: 81_559
                },
                GpuSpec {
                    id: "1".into(),
                    total_mb: 24_576
                },
            ]
        );
        assert_eq!(inv.source, VramSource::Nvml);
        assert_eq!(inv.devices.get("1"), Some(&1));
    }

    #[test]
    fn configured_gpus_keep_their_capacity_and_match_by_index_or_uuid() {
        let samples = vec![device(0, 81_559, 0), device(1, 81_559, 0)];
        let inv = inventory(
            &[
                gpu("0", 40_000),
                gpu("GPU-fake-1", 80_000),
                gpu("other", 1_000),
            ],
            Some(&samples),
        );
        assert_eq!(inv.gpus.len(), 3);
        assert_eq!(
            inv.gpus[0].total_mb, 40_000,
            "the configured capacity is kept"
        );
        assert_eq!(inv.source, VramSource::Nvml);
        assert_eq!(
            inv.devices.into_iter().collect::<Vec<_>>(),
            vec![("0".to_string(), 0), ("GPU-fake-1".to_string(), 1)]
        );
    }

    #[test]
    fn without_nvml_the_configuration_rules() {
        let inv = inventory(&[gpu("0", 24_576)], None);
        assert_eq!(inv.source, VramSource::Config);
        assert!(inv.devices.is_empty());
        assert_eq!(
            inv.gpus,
            vec![GpuSpec {
                id: "0".into(),
                total_mb: 24_576
            }]
        );
        let none = inventory(&[], None);
        assert!(none.gpus.is_empty(), "the caller picks the default GPU");
        assert_eq!(none.source, VramSource::Config);
        // NVML there but no configured GPU is one of its devices: still the configuration.
        let inv = inventory(&[gpu("a", 1_000)], Some(&[device(0, 2_000, 0)]));
        assert_eq!(inv.source, VramSource::Config);
    }

    #[test]
    fn each_sampled_gpu_reports_what_nvml_sees_used() {
        let probe = FakeProbe::new(vec![device(0, 24_576, 10_000), device(1, 24_576, 3_000)]);
        let inv = inventory(&[], Some(&probe.devices().expect("sample")));
        let used = used_by_gpu(&inv.devices, &probe.devices().expect("sample"));
        assert_eq!(used, vec![("0".into(), 10_000), ("1".into(), 3_000)]);
        probe.set_used(1, 9_000);
        let used = used_by_gpu(&inv.devices, &probe.devices().expect("sample"));
        assert_eq!(used[1], ("1".into(), 9_000));
    }

    #[test]
    fn a_device_missing_from_a_sample_is_skipped() {
        let inv = inventory(&[], Some(&[device(0, 1_000, 0), device(1, 1_000, 0)]));
        let used = used_by_gpu(&inv.devices, &[device(1, 1_000, 700)]);
        assert_eq!(used, vec![("1".into(), 700)]);
    }

    #[test]
    fn fake_probe_errors_pass_through() {
        let probe = FakeProbe::new(vec![]);
        probe.set(Err(ProbeError::Init("no driver".into())));
        assert_eq!(probe.devices(), Err(ProbeError::Init("no driver".into())));
    }

    #[tokio::test]
    async fn the_sampler_samples_at_once_when_asked() {
        let probe = FakeProbe::new(vec![device(0, 1_000, 100)]);
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let now = Arc::new(tokio::sync::Notify::new());
        // A tick an hour apart: only the ask can bring a second sample.
        let task = tokio::spawn(sample(
            Arc::new(probe.clone()),
            Duration::from_secs(3_600),
            Arc::clone(&now),
            tx,
            shutdown.clone(),
        ));
        assert_eq!(rx.recv().await.expect("the first sample")[0].used_mb, 100);
        probe.set_used(0, 600);
        now.notify_one();
        assert_eq!(
            rx.recv().await.expect("a sample when asked")[0].used_mb,
            600
        );
        shutdown.cancel();
        task.await.expect("the sampler ends");
    }

    #[tokio::test]
    async fn the_sampler_hands_samples_to_the_driver_until_shutdown() {
        let probe = FakeProbe::new(vec![device(0, 1_000, 100)]);
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sample(
            Arc::new(probe.clone()),
            Duration::from_millis(5),
            Arc::default(),
            tx,
            shutdown.clone(),
        ));
        let first = rx.recv().await.expect("a sample");
        assert_eq!(first[0].used_mb, 100);
        probe.set_used(0, 600);
        let changed = loop {
            let s = rx.recv().await.expect("a sample");
            if s[0].used_mb == 600 {
                break s;
            }
        };
        assert_eq!(
            changed[0].processes,
            vec![ProcessUsage {
                pid: 42,
                used_mb: 100
            }]
        );
        shutdown.cancel();
        task.await.expect("the sampler stops cleanly");
    }

    /// Where a driver is installed this reads the real devices; elsewhere NVML refuses to start, which is
    /// the path the coordinator takes on machines without a GPU.
    #[test]
    fn real_nvml_either_samples_or_says_why_not() {
        match NvmlProbe::init() {
            Ok(probe) => {
                let devices = probe
                    .devices()
                    .expect("NVML initialised, so it can list devices");
                for d in &devices {
                    assert!(d.total_mb > 0 && d.used_mb <= d.total_mb, "{d:?}");
                }
            }
            Err(e) => assert!(matches!(e, ProbeError::Init(_)), "{e}"),
        }
    }
}
