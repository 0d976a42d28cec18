//! Engine sidecars in front of fake inference engines (test-support's `engines`, which speak each
//! kind's API, free their memory only once a sleep really finished, and allocate from one simulated
//! GPU that refuses what does not fit, as CUDA would).
//!
//! The story of the seed's box: a chat engine (priority 0, on request) and a background engine
//! (priority 2, always) on one 24 GB GPU that cannot hold both. A chat request through its sidecar
//! pauses the background engine, whose sleep is confirmed before the chat engine is woken; the answer
//! streams through; the background engine is woken again once the chat engine went idle. The fake GPU's
//! ledger shows that at no instant were the engines awake beyond its capacity, and `audit` passes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpu_coordinator::adapters::nvml::{DeviceSample, GpuProbe, ProbeError};
use gpu_coordinator::app::Extras;
use gpu_coordinator::audit::{self, Since};
use gpu_coordinator::config::Config;
use gpu_coordinator::engines::{EngineConfig, EngineKind, Want};
use gpu_coordinator_test_support::engines::{FakeEngine, FakeEngineOptions, FakeGpu, Kind};
use gpu_coordinator_test_support::free_port;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::{embedded_config, eventually, test_config, Coordinator};

const GPU_MB: u64 = 24_000;

/// NVML as the coordinator and the sidecars see it, read from the fake GPU's ledger: the freed-VRAM
/// checks (the coordinator's settle, the sidecar's confirmation) see what the fake engines really hold.
struct LedgerProbe {
    gpu: FakeGpu,
    /// What the device says it has (the ledger's capacity, unless a test gives it more room).
    total_mb: u64,
}

impl GpuProbe for LedgerProbe {
    fn devices(&self) -> Result<Vec<DeviceSample>, ProbeError> {
        Ok(vec![DeviceSample {
            mig: None,
            index: 0,
            uuid: "GPU-fake-ledger".into(),
            name: "fake GPU".into(),
            total_mb: self.total_mb,
            used_mb: self.gpu.used_mb(),
            processes: Vec::new(),
        }])
    }
}

/// The coordinator's extras: the fake GPU as its NVML.
fn with_ledger(gpu: &FakeGpu) -> Extras {
    with_ledger_of(gpu, gpu.capacity_mb())
}

/// [`with_ledger`], the device saying it has `total_mb`.
fn with_ledger_of(gpu: &FakeGpu, total_mb: u64) -> Extras {
    Extras {
        probe: Some(Arc::new(LedgerProbe {
            gpu: gpu.clone(),
            total_mb,
        })),
    }
}

/// A sidecar's configuration in front of `upstream`, on a free port.
fn engine(
    service: &str,
    kind: EngineKind,
    upstream: &str,
    priority: u8,
    vram_mb: u64,
) -> EngineConfig {
    EngineConfig {
        priority: Some(priority),
        vram_mb: Some(vram_mb),
        lease_ms: Some(3_000),
        idle_ms: 300,
        max_wait_ms: 20_000,
        drain_ms: 500,
        ..EngineConfig::new(
            service,
            kind,
            &format!("127.0.0.1:{}", free_port()),
            upstream,
        )
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}

/// A streamed completion through `listen`: the chunks' arrival instants and the text.
async fn stream_completion(listen: &str) -> (StatusCode, Vec<Instant>, String) {
    let response = http()
        .post(format!("http://{listen}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "hello", "stream": true, "max_tokens": 8}))
        .send()
        .await
        .expect("the sidecar answers");
    let status = response.status();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("the stream is not cut");
        arrivals.push(Instant::now());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (status, arrivals, text)
}

async fn completion(listen: &str) -> reqwest::Response {
    http()
        .post(format!("http://{listen}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "hello", "max_tokens": 8}))
        .send()
        .await
        .expect("the sidecar answers")
}

/// `Some` once a completion through `listen` is answered 200 (`None` while the sidecar is not up).
async fn served_ok(listen: &str) -> Option<()> {
    let answer = http()
        .post(format!("http://{listen}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "hi"}))
        .send()
        .await
        .ok()?;
    (answer.status() == StatusCode::OK).then_some(())
}

/// `gpu-coordinator engines --config file`, as a sidecar on its own host runs.
fn spawn_sidecars(file: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["engines", "--config"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start `gpu-coordinator engines`")
}

/// The fake GPU never held more than it has, and never refused an allocation.
fn assert_within_capacity(gpu: &FakeGpu) {
    assert!(
        gpu.ooms().is_empty(),
        "engines ran out of memory: {:?}",
        gpu.ooms()
    );
    assert!(
        gpu.peak_mb() <= gpu.capacity_mb(),
        "the engines held {} MB of {} MB at once",
        gpu.peak_mb(),
        gpu.capacity_mb()
    );
}

async fn the_box_story(mut config: Config) {
    let gpu = FakeGpu::start(GPU_MB).await;
    let mut chat_options = FakeEngineOptions::new("chat", Kind::Vllm, 16_000);
    chat_options.awake_at_start = false;
    chat_options.chunks = 5;
    chat_options.chunk_delay = Duration::from_millis(60);
    let chat_engine = FakeEngine::start(&gpu, chat_options).await;
    let mut asr_options = FakeEngineOptions::new("asr", Kind::Vllm, 12_000);
    // Awake at the start without a lease: its sidecar must put it to sleep first.
    asr_options.awake_at_start = true;
    asr_options.sleep_time = Duration::from_millis(150);
    let asr_engine = FakeEngine::start(&gpu, asr_options).await;

    let chat = engine("chat", EngineKind::Vllm, &chat_engine.url(), 0, 16_000);
    let mut asr = engine("asr", EngineKind::Vllm, &asr_engine.url(), 2, 12_000);
    asr.want = Want::Always;
    let (chat_listen, asr_listen) = (chat.listen.clone(), asr.listen.clone());
    config.engines = vec![chat, asr];
    let coordinator = Coordinator::start_with(config.clone(), with_ledger(&gpu)).await;

    // The background engine holds the GPU and serves.
    eventually("the background engine is awake under its lease", || async {
        asr_engine.awake().then_some(())
    })
    .await;
    let answer = completion(&asr_listen).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(asr_engine.served(), 1);

    // A chat request: the background engine is paused and sleeps before the chat engine wakes.
    let asked = Instant::now();
    let (status, arrivals, text) = stream_completion(&chat_listen).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(
        text.contains("[DONE]"),
        "the whole stream came through: {text}"
    );
    assert!(arrivals.len() >= 5, "{} chunks: {text}", arrivals.len());
    let first = arrivals[0];
    let last = *arrivals.last().expect("chunks");
    assert!(
        last - first >= Duration::from_millis(150),
        "the chunks came as the engine wrote them, not buffered: first at {:?}, last at {:?}",
        first - asked,
        last - asked
    );
    assert_eq!(chat_engine.served(), 1);
    let asr_awake = asr_engine.awake_intervals();
    let chat_awake = chat_engine.awake_intervals();
    let asr_slept = asr_awake
        .iter()
        .filter_map(|(_, end)| *end)
        .max()
        .expect("the background engine slept");
    let chat_woke = chat_awake.first().expect("the chat engine woke").0;
    assert!(
        asr_slept <= chat_woke,
        "the chat engine woke before the background engine's sleep finished"
    );

    // A background request while it is paused waits in its sidecar, and is served after the resume
    // (the chat engine goes idle after 300 ms).
    let held = completion(&asr_listen).await;
    assert_eq!(held.status(), StatusCode::OK);
    assert_eq!(asr_engine.served(), 2);
    assert!(
        asr_engine.wakes() >= 2,
        "woken at the start and after the pause"
    );
    eventually("the chat engine sleeps again", || async {
        (!chat_engine.awake()).then_some(())
    })
    .await;
    assert_eq!(
        chat_engine.refused_asleep(),
        0,
        "nothing reached an engine asleep"
    );
    assert_eq!(
        asr_engine.refused_asleep(),
        0,
        "nothing reached an engine asleep"
    );
    assert_within_capacity(&gpu);

    // The sidecars' state is shown.
    let engines: Value = http()
        .get(coordinator.url("/gpu/engines"))
        .send()
        .await
        .expect("GET /gpu/engines")
        .json()
        .await
        .expect("JSON");
    let states: Vec<(String, String)> = engines
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["service"].as_str().unwrap_or("").to_owned(),
                e["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&("asr".into(), "awake".into())),
        "{states:?}"
    );

    // A stop puts the engines to sleep and gives their leases back before the coordinator goes.
    coordinator.stop().await.expect("a clean stop");
    assert!(
        !asr_engine.awake() && !chat_engine.awake(),
        "the engines sleep after the stop"
    );
    let summary = audited(&config).await;
    assert!(summary.preemptions >= 1, "{summary}");
    assert_eq!(
        summary.live, 0,
        "every lease was released at the stop: {summary}"
    );
}

/// Stops the coordinator and checks its history with `audit`.
async fn stop_audited(coordinator: Coordinator) -> audit::Summary {
    let config = coordinator.config.clone();
    coordinator.stop().await.expect("a clean stop");
    audited(&config).await
}

/// `audit` over the whole history: every rule kept.
async fn audited(config: &Config) -> audit::Summary {
    gpu_coordinator::app::audit::run(config, Since::Start)
        .await
        .expect("the history can be read")
        .unwrap_or_else(|v| panic!("the history breaks a rule:\n{v}"))
}

#[tokio::test]
async fn the_box_story_embedded() {
    the_box_story(embedded_config("engines", &[("0", GPU_MB)])).await;
}

#[tokio::test]
async fn the_box_story_distributed() {
    the_box_story(test_config("engines", &[("0", GPU_MB)])).await;
}

/// A request that waits past `max_wait_ms` gets 503 with `Retry-After`, and reaches nothing.
#[tokio::test]
async fn a_request_held_past_max_wait_gets_503_with_retry_after() {
    let gpu = FakeGpu::start(GPU_MB).await;
    let mut options = FakeEngineOptions::new("asr", Kind::Vllm, 12_000);
    options.awake_at_start = false;
    let asr_engine = FakeEngine::start(&gpu, options).await;
    let mut asr = engine("asr", EngineKind::Vllm, &asr_engine.url(), 2, 12_000);
    asr.max_wait_ms = 400;
    let listen = asr.listen.clone();
    let mut config = embedded_config("engines_wait", &[("0", GPU_MB)]);
    config.engines = vec![asr];
    let coordinator = Coordinator::start_with(config, with_ledger(&gpu)).await;

    // The whole GPU is held, not preemptibly, by a service of its own.
    let holder = gpu_coordinator_client::Client::connect_http(&coordinator.url(""), "holder", None)
        .await
        .expect("connect over HTTP");
    let lease = holder
        .request(gpu_coordinator_client::RequestOptions::new(0).preemptible(false))
        .await
        .expect("granted");

    let answer = completion(&listen).await;
    assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "{:?}",
        answer.headers()
    );
    let doc: Value = answer.json().await.expect("a JSON error");
    assert!(
        doc["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_wait_ms")),
        "{doc}"
    );
    assert_eq!(asr_engine.served(), 0);
    assert!(
        !asr_engine.awake(),
        "the engine was not woken without the GPU"
    );

    // Once the GPU is free, the next request goes through.
    lease.release().await.expect("released");
    let answer = completion(&listen).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(asr_engine.served(), 1);
    assert_within_capacity(&gpu);
    stop_audited(coordinator).await;
}

/// An engine that never confirms its sleep is never acknowledged: its lease is revoked at the ACK
/// deadline, and its sidecar forwards nothing more.
#[tokio::test]
async fn an_engine_that_never_confirms_its_sleep_is_revoked_and_gets_nothing_more() {
    // The simulated GPU has room for the stuck engine's memory too, so that the chat engine can wake.
    let gpu = FakeGpu::start(2 * GPU_MB).await;
    let mut stuck_options = FakeEngineOptions::new("asr", Kind::Vllm, 12_000);
    stuck_options.never_frees = true;
    stuck_options.awake_at_start = false;
    let stuck = FakeEngine::start(&gpu, stuck_options).await;
    let mut chat_options = FakeEngineOptions::new("chat", Kind::Vllm, 16_000);
    chat_options.awake_at_start = false;
    let chat_engine = FakeEngine::start(&gpu, chat_options).await;

    let mut asr = engine("asr", EngineKind::Vllm, &stuck.url(), 2, 12_000);
    asr.want = Want::Always;
    asr.max_wait_ms = 1_000;
    let mut chat = engine("chat", EngineKind::Vllm, &chat_engine.url(), 0, 16_000);
    // The chat keeps the GPU for the rest of the test.
    chat.idle_ms = 60_000;
    let (asr_listen, chat_listen) = (asr.listen.clone(), chat.listen.clone());
    let mut config = embedded_config("engines_stuck", &[("0", GPU_MB)]);
    config.preemption.ack_deadline_ms = 1_000;
    config.engines = vec![asr, chat];
    let coordinator = Coordinator::start_with(config, with_ledger_of(&gpu, GPU_MB)).await;
    eventually("the background engine is awake", || async {
        stuck.awake().then_some(())
    })
    .await;

    let answer = completion(&chat_listen).await;
    assert_eq!(
        answer.status(),
        StatusCode::OK,
        "the chat got the GPU after the revoke"
    );
    let status = crate::support::wait_ready_http(&coordinator.url("")).await;
    assert!(
        status
            .gpus
            .iter()
            .all(|g| g.holders.iter().all(|h| h.service_id != "asr")),
        "the stuck engine's lease was revoked: {status:?}"
    );
    assert!(
        status.paused.iter().all(|p| p.service_id != "asr"),
        "the stuck engine's pause was never acknowledged (it was revoked, not paused): {status:?}"
    );
    let served = stuck.served();
    let answer = completion(&asr_listen).await;
    assert_eq!(
        answer.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "nothing passes without a lease"
    );
    assert_eq!(
        stuck.served(),
        served,
        "nothing reached the engine without a lease"
    );
    stop_audited(coordinator).await;
}

/// Each kind's switch, the whole cycle: asleep at the start, woken by a request once granted,
/// served, put to sleep when idle (the memory given back).
#[tokio::test]
async fn every_kind_sleeps_and_wakes_through_its_own_api() {
    let gpu = FakeGpu::start(GPU_MB).await;
    let mut fakes = Vec::new();
    let mut engines = Vec::new();
    for (i, (kind, engine_kind)) in [
        (Kind::Vllm, EngineKind::Vllm),
        (Kind::Sglang, EngineKind::Sglang),
        (Kind::Ollama, EngineKind::Ollama),
        (Kind::Llamacpp, EngineKind::Llamacpp),
        (Kind::Triton, EngineKind::Triton),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("e{i}");
        let mut options = FakeEngineOptions::new(&name, kind, 4_000);
        options.model = "m".into();
        // Awake at the start: the sidecar puts it to sleep before anything passes.
        options.awake_at_start = true;
        let fake = FakeEngine::start(&gpu, options).await;
        let mut config = engine(&name, engine_kind, &fake.url(), 1, 4_000);
        if matches!(
            engine_kind,
            EngineKind::Ollama | EngineKind::Llamacpp | EngineKind::Triton
        ) {
            config.model = Some("m".into());
        }
        engines.push(config);
        fakes.push((kind, fake));
    }
    let mut config = embedded_config("engines_kinds", &[("0", GPU_MB)]);
    config.engines = engines.clone();
    let coordinator = Coordinator::start_with(config, with_ledger(&gpu)).await;
    for (engine, (kind, fake)) in engines.iter().zip(&fakes) {
        eventually(
            &format!("{kind:?} is put to sleep at the start"),
            || async { (!fake.awake()).then_some(()) },
        )
        .await;
        let path = match kind {
            Kind::Ollama => "/api/generate",
            Kind::Triton => "/v2/models/m/infer",
            _ => "/v1/completions",
        };
        let body = match kind {
            Kind::Ollama => json!({"model": "m", "prompt": "hi", "stream": false}),
            Kind::Triton => json!({"inputs": []}),
            _ => json!({"model": "m", "prompt": "hi"}),
        };
        let answer = http()
            .post(format!("http://{}{path}", engine.listen))
            .json(&body)
            .send()
            .await
            .expect("the sidecar answers");
        assert_eq!(
            answer.status(),
            StatusCode::OK,
            "{kind:?}: {:?}",
            answer.text().await
        );
        assert_eq!(fake.served(), 1, "{kind:?}");
        assert_eq!(
            fake.refused_asleep(),
            0,
            "{kind:?} was woken before the request passed"
        );
        eventually(&format!("{kind:?} sleeps when idle"), || async {
            (!fake.awake() && gpu.holding(&engine.service) == 0).then_some(())
        })
        .await;
    }
    assert_within_capacity(&gpu);
    stop_audited(coordinator).await;
}

/// The `process` kind: the engine is a process the sidecar starts once granted and stops when idle.
#[tokio::test]
async fn a_process_engine_is_started_on_a_grant_and_stopped_when_idle() {
    let gpu = FakeGpu::start(GPU_MB).await;
    let port = free_port();
    let mut proc_engine = engine(
        "diar",
        EngineKind::Process,
        &format!("http://127.0.0.1:{port}"),
        1,
        8_000,
    );
    proc_engine.argv = Some(vec![
        "python3".into(),
        gpu_coordinator_test_support::engines::fake_process_engine_script()
            .display()
            .to_string(),
        "--port".into(),
        port.to_string(),
        "--gpu".into(),
        gpu.url(),
        "--name".into(),
        "diar".into(),
        "--vram-mb".into(),
        "8000".into(),
    ]);
    proc_engine.ready_path = Some("/health".into());
    let listen = proc_engine.listen.clone();
    let mut config = embedded_config("engines_process", &[("0", GPU_MB)]);
    config.engines = vec![proc_engine];
    let coordinator = Coordinator::start_with(config, with_ledger(&gpu)).await;
    assert_eq!(gpu.holding("diar"), 0, "nothing runs before a request");
    let answer = completion(&listen).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        gpu.holding("diar"),
        8_000,
        "the process runs under the lease"
    );
    eventually("the process is stopped when idle", || async {
        (gpu.holding("diar") == 0).then_some(())
    })
    .await;
    assert_within_capacity(&gpu);
    stop_audited(coordinator).await;
}

/// A sidecar killed with -9: its lease runs out, and the next request through a new sidecar (which
/// finds the engine awake without a lease and puts it to sleep first) works.
#[tokio::test]
async fn a_sidecar_killed_with_9_loses_its_lease_and_a_new_one_takes_over() {
    let gpu = FakeGpu::start(GPU_MB).await;
    let mut options = FakeEngineOptions::new("chat", Kind::Vllm, 16_000);
    options.awake_at_start = false;
    let fake = FakeEngine::start(&gpu, options).await;
    let mut coordinator_config = test_config("engines_kill", &[("0", GPU_MB)]);
    coordinator_config.lease.default_ms = 1_500;
    let coordinator = Coordinator::start_with(coordinator_config.clone(), with_ledger(&gpu)).await;

    let listen = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("engines.toml");
    // Over NATS, as a sidecar on another host would.
    let toml = format!(
        r#"
[nats]
url = "{nats}"
prefix = "{prefix}"

[sidecar]
coordinator = "{nats}"

[[engines]]
service = "chat"
kind = "vllm"
listen = "{listen}"
upstream = "{upstream}"
priority = 0
vram_mb = 16000
lease_ms = 1500
idle_ms = 60000
"#,
        nats = coordinator_config.nats.url,
        prefix = coordinator_config.nats.prefix,
        upstream = fake.url(),
    );
    std::fs::write(&file, toml).expect("write the sidecar's configuration");

    let mut first = spawn_sidecars(&file);
    eventually("the first sidecar serves", || served_ok(&listen)).await;
    assert!(fake.awake());
    first.kill().expect("kill -9");
    first.wait().expect("reaped");

    // The lease runs out by itself.
    eventually("the dead sidecar's lease expires", || async {
        let status = crate::support::wait_ready(&coordinator.config).await;
        status
            .gpus
            .iter()
            .all(|g| g.holders.is_empty())
            .then_some(())
    })
    .await;

    let mut second = spawn_sidecars(&file);
    eventually("the new sidecar serves", || served_ok(&listen)).await;
    assert!(
        fake.sleeps() >= 1,
        "the new sidecar put the engine found awake to sleep first"
    );
    let _ = second.kill();
    let _ = second.wait();
    assert_within_capacity(&gpu);
    stop_audited(coordinator).await;
}

/// The README's `examples/box.toml` is a configuration the coordinator takes.
#[test]
fn the_example_box_configuration_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/box.toml");
    let config = Config::load(Some(&path)).unwrap_or_else(|e| panic!("examples/box.toml: {e}"));
    let services: Vec<_> = config.engines.iter().map(|e| e.service.as_str()).collect();
    assert_eq!(services, ["chat", "diar", "asr"]);
    let (chat, asr) = (&config.engines[0], &config.engines[2]);
    assert!(
        chat.vram_mb.unwrap_or(0) + asr.vram_mb.unwrap_or(0) > config.gpus[0].vram_mb,
        "the chat and the background worker must not fit together, or nothing is ever paused"
    );
}

/// A wrong key stops the start with a message naming it.
#[test]
fn a_wrong_engine_key_is_named() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
[[engines]]
service = "chat"
kind = "ollama"
listen = "127.0.0.1:8000"
upstream = "http://127.0.0.1:8001"
priority = 0
sleep_level = 1
drain_ms = 20000
"#,
    )
    .expect("write");
    let error = Config::load(Some(&file)).expect_err("refused").to_string();
    for key in [
        "engines[0].sleep_level",
        "engines[0].model",
        "engines[0].drain_ms",
    ] {
        assert!(error.contains(key), "{key} is not named in: {error}");
    }
}

/// What the README promises: `serve --embedded --config examples/box.toml` preempts the background
/// engine for the chat. The example file itself, run by the binary, with its engines' addresses
/// pointed at fake engines (whose memory is freed as their sleep call returns, since there is no
/// NVML here to see it freed later).
#[tokio::test]
async fn the_example_box_preempts_the_background_engine_for_the_chat() {
    let gpu = FakeGpu::start(24_576).await;
    let fake = |name: &str, mb: u64| {
        let mut options = FakeEngineOptions::new(name, Kind::Vllm, mb);
        options.awake_at_start = false;
        options.sleep_time = Duration::ZERO;
        options
    };
    let chat_engine = FakeEngine::start(&gpu, fake("chat", 18_000)).await;
    let asr_engine = FakeEngine::start(&gpu, fake("asr", 8_000)).await;
    let (chat_listen, asr_listen) = (free_port(), free_port());
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/box.toml"),
    )
    .expect("examples/box.toml");
    let text = text
        .replace("http://127.0.0.1:8001", &chat_engine.url())
        .replace("http://127.0.0.1:8011", &asr_engine.url())
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{chat_listen}"))
        .replace("127.0.0.1:8010", &format!("127.0.0.1:{asr_listen}"))
        .replace("127.0.0.1:8020", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", free_port()))
        .replace("idle_ms = 600000", "idle_ms = 300");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("box.toml");
    std::fs::write(&file, text).expect("write the configuration");
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["serve", "--embedded", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start `serve`");
    eventually(
        "the background worker holds the GPU and its engine is awake",
        || async { asr_engine.awake().then_some(()) },
    )
    .await;
    let (status, _, text) = eventually("the chat answers through its sidecar", || async {
        let (status, arrivals, text) = stream_completion(&format!("127.0.0.1:{chat_listen}")).await;
        (status == StatusCode::OK).then_some((status, arrivals, text))
    })
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("[DONE]"), "{text}");
    assert!(
        asr_engine.sleeps() >= 1,
        "the background engine was put to sleep for the chat"
    );
    eventually(
        "the background engine is woken once the chat is idle",
        || async { (asr_engine.awake() && !chat_engine.awake()).then_some(()) },
    )
    .await;
    let answer = completion(&format!("127.0.0.1:{asr_listen}")).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_within_capacity(&gpu);
    let _ = serve.kill();
    let _ = serve.wait();
}

/// An engine takes what its entry leaves out from its service's section in `[services]`.
#[test]
fn an_engine_takes_its_services_defaults() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("services.toml");
    std::fs::write(
        &file,
        r#"
[services.asr]
default_priority = 2
default_vram_mb = 8000
max_priority = 1

[[engines]]
service = "asr"
kind = "vllm"
listen = "127.0.0.1:8010"
upstream = "http://127.0.0.1:8011"
"#,
    )
    .expect("write");
    let config = Config::load(Some(&file)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.engines[0].priority, Some(2));
    assert_eq!(config.engines[0].vram_mb, Some(8_000));
}

/// A sidecar on its own (`gpu-coordinator engines`, over HTTP) outlives a restart of the embedded
/// coordinator: it waits for it with backoff, and its engine serves again under a lease afterwards.
#[tokio::test]
async fn a_sidecar_waits_out_a_restart_of_the_coordinator() {
    let gpu = FakeGpu::start(GPU_MB).await;
    let mut options = FakeEngineOptions::new("chat", Kind::Vllm, 16_000);
    options.awake_at_start = false;
    let fake = FakeEngine::start(&gpu, options).await;
    let config = embedded_config("engines_restart", &[("0", GPU_MB)]);
    let port = free_port();
    let coordinator = Coordinator::start_at(config.clone(), Extras::default(), port).await;

    let listen = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("engines.toml");
    let toml = format!(
        r#"
[sidecar]
coordinator = "http://127.0.0.1:{port}"

[[engines]]
service = "chat"
kind = "vllm"
listen = "{listen}"
upstream = "{upstream}"
priority = 0
vram_mb = 16000
lease_ms = 3000
idle_ms = 60000
"#,
        upstream = fake.url(),
    );
    std::fs::write(&file, toml).expect("write the sidecar's configuration");
    let mut sidecar = spawn_sidecars(&file);
    eventually("the sidecar serves", || served_ok(&listen)).await;
    let served = fake.served();

    coordinator.stop().await.expect("a clean stop");
    let coordinator = Coordinator::start_at(config.clone(), Extras::default(), port).await;
    // The lease lives on in the restarted coordinator, renewed by the sidecar (not served on the
    // strength of a lease the sidecar only remembers).
    let expiry = |status: gpu_coordinator_wire::StatusDoc| {
        status
            .gpus
            .iter()
            .flat_map(|g| g.holders.iter())
            .find(|h| h.service_id == "chat")
            .map(|h| h.expires_at.clone())
    };
    let first = expiry(crate::support::wait_ready_http(&coordinator.url("")).await)
        .expect("the chat's lease is held after the restart");
    eventually("a renewal reaches the restarted coordinator", || async {
        let now = expiry(crate::support::wait_ready_http(&coordinator.url("")).await)?;
        (now != first).then_some(())
    })
    .await;
    eventually("the sidecar serves after the restart", || {
        served_ok(&listen)
    })
    .await;
    assert!(fake.served() > served);
    assert_within_capacity(&gpu);
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    stop_audited(coordinator).await;
}
