//! What the parts run on: a coordinator with sidecars in this process ([`Running`]), NVML read from
//! the fake GPU's ledger, and the fake vLLMs the sidecars front.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_coordinator::adapters::nvml::{DeviceSample, GpuProbe, ProbeError};
use gpu_coordinator::app::Extras;
use gpu_coordinator::config::{BackendsConfig, Config, GpuConfig};
use gpu_coordinator::engines::{EngineConfig, EngineKind};
use gpu_coordinator_test_support::engines::{FakeEngine, FakeEngineOptions, FakeGpu, Kind};
use gpu_coordinator_test_support::free_port;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{common, Mode, GPU_MB, SLEEP_TIME, WAKE_TIME};

/// NVML as the coordinator and the sidecars see it, read from the fake GPU's ledger (as the tests'
/// `LedgerProbe`): the coordinator's settle and the sidecars' freed-memory check see the fakes' memory.
struct LedgerProbe {
    gpu: FakeGpu,
}

impl GpuProbe for LedgerProbe {
    fn devices(&self) -> Result<Vec<DeviceSample>, ProbeError> {
        Ok(vec![DeviceSample {
            mig: None,
            index: 0,
            uuid: "GPU-fake-ledger".into(),
            name: "fake GPU".into(),
            total_mb: self.gpu.capacity_mb(),
            used_mb: self.gpu.used_mb(),
            processes: Vec::new(),
        }])
    }
}

/// A sidecar in front of `upstream`, on a free port of loopback.
pub(super) fn engine(service: &str, upstream: &str, priority: u8, vram_mb: u64) -> EngineConfig {
    EngineConfig {
        priority: Some(priority),
        vram_mb: Some(vram_mb),
        // Long enough that a loaded machine's late renewal does not end a lease mid-measurement.
        lease_ms: Some(30_000),
        idle_ms: 3_600_000,
        max_wait_ms: 20_000,
        drain_ms: 500,
        ..EngineConfig::new(
            service,
            EngineKind::Vllm,
            &format!("127.0.0.1:{}", free_port()),
            upstream,
        )
    }
}

/// A coordinator with sidecars, in this process.
pub(super) struct Running {
    pub(super) http: String,
    config: Config,
    mode: Mode,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Starts `engines` under a coordinator of their own (`tag`: its prefix, key prefix, database or
    /// data directory), NVML being `gpu`'s ledger sampled every `sample_ms`; waits for its status.
    pub(super) async fn start(
        tag: &str,
        mode: Mode,
        engines: Vec<EngineConfig>,
        gpu: &FakeGpu,
        sample_ms: u64,
    ) -> anyhow::Result<Running> {
        let mut config = Config::default();
        config.nats.prefix = tag.to_owned();
        config.redis.key_prefix = tag.to_owned();
        config.database.url = format!("postgres://postgres@127.0.0.1:5432/gpu_{tag}");
        // JetStream sets each stream's max_bytes aside in its store up front.
        config.nats.max_bytes = 16 << 20;
        if mode == Mode::Embedded {
            config.backends = BackendsConfig::embedded();
            config.embedded.data_dir = std::env::temp_dir()
                .join(format!("gpu-bench-{tag}"))
                .display()
                .to_string();
        }
        config.gpus = vec![GpuConfig {
            id: "0".into(),
            vram_mb: GPU_MB,
        }];
        config.nvml.sample_ms = sample_ms;
        config.engines = engines;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let http = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let extras = Extras {
            probe: Some(Arc::new(LedgerProbe { gpu: gpu.clone() })),
        };
        let task = tokio::spawn(gpu_coordinator::app::run_with(
            config.clone(),
            listener,
            stop.clone(),
            extras,
        ));
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(res) = client.get(format!("{http}/gpu/status")).send().await {
                if res.status().is_success() {
                    break;
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60) && !task.is_finished(),
                "the coordinator `{tag}` did not answer GET /gpu/status"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Running {
            http,
            config,
            mode,
            stop,
            task,
        })
    }

    /// Each sidecar's row of `GET /gpu/engines`, by service.
    pub(super) async fn engines(&self, client: &reqwest::Client) -> anyhow::Result<Vec<Value>> {
        let doc: Value = client
            .get(format!("{}/gpu/engines", self.http))
            .send()
            .await?
            .json()
            .await?;
        Ok(doc.as_array().cloned().unwrap_or_default())
    }

    pub(super) async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        let ended = self.task.await?;
        match self.mode {
            Mode::Embedded => {
                let _ = std::fs::remove_dir_all(&self.config.embedded.data_dir);
            }
            Mode::Distributed => {
                if let Ok(client) = async_nats::connect(&self.config.nats.url).await {
                    common::forget(&client, &self.config.nats.prefix).await;
                }
            }
        }
        ended
    }
}

/// A fake vLLM of `mb` on `gpu`, asleep at the start.
pub(super) async fn fake(
    gpu: &FakeGpu,
    name: &str,
    mb: u64,
    chunks: usize,
    chunk_delay: Duration,
) -> FakeEngine {
    let mut options = FakeEngineOptions::new(name, Kind::Vllm, mb);
    options.awake_at_start = false;
    options.sleep_time = SLEEP_TIME;
    options.wake_time = WAKE_TIME;
    options.chunks = chunks;
    options.chunk_delay = chunk_delay;
    FakeEngine::start(gpu, options).await
}
