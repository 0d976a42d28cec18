//! Fake inference engines on a fake GPU, for the engine sidecars' tests.
//!
//! A [`FakeGpu`] is a memory ledger with a capacity: every fake engine allocates from it, and an
//! allocation beyond the capacity is refused and recorded, as a CUDA out-of-memory is. It also serves a
//! small HTTP API, so that a fake engine in another process (`fake_process_engine.py`) uses the same
//! ledger; an entry whose process is gone counts as freed, as the driver frees a dead process's memory.
//!
//! A [`FakeEngine`] serves the HTTP API of one real engine ([`Kind`]) on a free port of loopback: its
//! inference endpoints (streamed chunk by chunk, each chunk flushed) and its own switches to free and
//! take back GPU memory, with the quirks the sidecars must cope with. The APIs follow the engines' own
//! code and docs, checked as cited on each kind below; where a fake departs from the real engine, the
//! departure is said where it is made.
//!
//! What every kind shares:
//! - A call that frees memory answers before the memory is freed where the real engine does (vLLM,
//!   SGLang, Ollama, llama.cpp's router, Triton all do): the ledger drops [`FakeEngineOptions::sleep_time`]
//!   later. Only the ledger says when the memory is back, as only NVML does on a real GPU.
//! - Taking memory back allocates it at the start of the wake, and a wake into a GPU without room fails
//!   the way the engine fails on a CUDA out-of-memory (and is recorded in [`FakeGpu::ooms`]); a wake
//!   that succeeds serves [`FakeEngineOptions::wake_time`] later.
//! - An inference request that comes while the engine is not awake is answered at once with the
//!   engine's error and counted in [`FakeEngine::refused_asleep`] (a sidecar bug), except where the real
//!   engine loads the model itself (Ollama always, llama.cpp's router with autoload), which the fake does
//!   too and counts in [`FakeEngine::implicit_loads`].
//! - [`FakeEngineOptions::never_frees`]: the call that frees memory answers as usual and the engine says
//!   it is asleep, but the ledger never drops (Triton's unload that keeps VRAM, a stuck engine).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const MB: u64 = 1024 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `cond` every 5 ms until it holds; panics, naming `what`, if it does not within `timeout`.
/// For tests: wait for a condition rather than sleep for a while.
pub async fn poll_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The path of `fake_process_engine.py`: an engine started and stopped as a whole process (python3,
/// standard library only). Arguments: `--port P --gpu URL --name N --vram-mb M [--startup-ms S]
/// [--chunks C] [--chunk-ms D]`. It allocates `M` MB from the [`FakeGpu`] at `URL` under its own pid
/// (exit 1 if refused), serves `GET /health` and `POST /v1/completions` (and `/v1/chat/completions`,
/// streamed with `"stream": true`) on `127.0.0.1:P` after `S` ms, and on SIGTERM (or SIGINT) frees its
/// memory and exits 0. Killed, its memory counts as freed once the process is gone (a zombie counts as
/// gone: it has exited).
pub fn fake_process_engine_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fake_process_engine.py")
}

/// An HTTP server on a free port of loopback; shut down when stopped or dropped.
struct Server {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start(router: Router) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port on loopback");
        let addr = listener.local_addr().expect("the bound address");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Server {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, closes idle connections, and gives open ones a second to end.
    async fn stop(&mut self) {
        self.shutdown.take();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.take();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU
// ---------------------------------------------------------------------------------------------

/// One change of the ledger.
#[derive(Clone, Debug)]
pub struct GpuEvent {
    pub at: Instant,
    /// The engine whose holding changed.
    pub engine: String,
    /// What the engine holds after the change.
    pub engine_mb: u64,
    /// What the GPU holds after the change.
    pub total_mb: u64,
}

struct Holding {
    mb: u64,
    pid: Option<u32>,
}

#[derive(Default)]
struct LedgerState {
    held: BTreeMap<String, Holding>,
    peak_mb: u64,
    ooms: Vec<String>,
    log: Vec<GpuEvent>,
}

impl LedgerState {
    fn total(&self) -> u64 {
        self.held.values().map(|h| h.mb).sum()
    }

    fn record(&mut self, engine: &str) {
        let engine_mb = self.held.get(engine).map_or(0, |h| h.mb);
        let total_mb = self.total();
        self.peak_mb = self.peak_mb.max(total_mb);
        self.log.push(GpuEvent {
            at: Instant::now(),
            engine: engine.to_string(),
            engine_mb,
            total_mb,
        });
    }

    /// Frees what dead processes held, as the driver does when a process exits.
    fn reap(&mut self) {
        let dead: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.pid.is_some_and(|pid| !pid_alive(pid)))
            .map(|(engine, _)| engine.clone())
            .collect();
        for engine in dead {
            self.held.remove(&engine);
            self.record(&engine);
        }
    }

    fn holders(&self) -> String {
        if self.held.is_empty() {
            return "nobody".to_string();
        }
        self.held
            .iter()
            .map(|(engine, h)| format!("{engine}: {} MB", h.mb))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether process `pid` still runs. A zombie does not: it has exited and the driver has freed its
/// memory, though its parent has not reaped it yet.
fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
    if unsafe { libc::kill(raw, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

struct Ledger {
    capacity_mb: u64,
    state: Mutex<LedgerState>,
}

impl Ledger {
    fn alloc(&self, engine: &str, mb: u64, pid: Option<u32>) -> Result<u64, String> {
        let mut st = lock(&self.state);
        st.reap();
        let used = st.total();
        if used + mb > self.capacity_mb {
            let line = format!(
                "CUDA out of memory: engine `{engine}` asked for {mb} MB with {used} of {} MB in use ({})",
                self.capacity_mb,
                st.holders()
            );
            st.ooms.push(line.clone());
            return Err(line);
        }
        let h = st
            .held
            .entry(engine.to_string())
            .or_insert(Holding { mb: 0, pid: None });
        h.mb += mb;
        let pid = pid.filter(|&p| p > 0);
        if pid.is_some() {
            h.pid = pid;
        }
        let holding = h.mb;
        st.record(engine);
        Ok(holding)
    }

    /// Frees `mb` of what `engine` holds, all of it if `None`; returns what was freed.
    fn free(&self, engine: &str, mb: Option<u64>) -> u64 {
        let mut st = lock(&self.state);
        st.reap();
        let Some(h) = st.held.get_mut(engine) else {
            return 0;
        };
        let freed = mb.map_or(h.mb, |mb| mb.min(h.mb));
        h.mb -= freed;
        if h.mb == 0 {
            st.held.remove(engine);
        }
        if freed > 0 {
            st.record(engine);
        }
        freed
    }

    fn used(&self) -> u64 {
        let mut st = lock(&self.state);
        st.reap();
        st.total()
    }

    fn holding(&self, engine: &str) -> u64 {
        let mut st = lock(&self.state);
        st.reap();
        st.held.get(engine).map_or(0, |h| h.mb)
    }
}

/// A simulated GPU: a memory ledger every fake engine allocates from; an allocation beyond capacity
/// fails (an OOM, recorded).
///
/// Its HTTP API at [`FakeGpu::url`], for engines in other processes:
/// - `POST /alloc {"engine": E, "mb": M, "pid": P}`: adds `M` MB to what `E` holds, under process `P`
///   (optional): 200 `{"engine", "holding_mb", "total_mb"}`, or 507 `{"error": line}` when it does not fit.
/// - `POST /free {"engine": E}` (optionally `"mb"`): 200 `{"engine", "freed_mb", "total_mb"}`.
/// - `GET /state`: `{"capacity_mb", "used_mb", "peak_mb", "held": {E: MB}, "ooms": [line]}`.
#[derive(Clone)]
pub struct FakeGpu {
    ledger: Arc<Ledger>,
    server: Arc<Server>,
}

impl FakeGpu {
    /// A GPU of `capacity_mb`, its HTTP API on a free port of loopback.
    pub async fn start(capacity_mb: u64) -> FakeGpu {
        let ledger = Arc::new(Ledger {
            capacity_mb,
            state: Mutex::new(LedgerState::default()),
        });
        let router = Router::new()
            .route("/alloc", post(gpu_alloc))
            .route("/free", post(gpu_free))
            .route("/state", get(gpu_state))
            .with_state(ledger.clone());
        let server = Arc::new(Server::start(router).await);
        FakeGpu { ledger, server }
    }

    /// The base URL of its HTTP API, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn capacity_mb(&self) -> u64 {
        self.ledger.capacity_mb
    }

    /// What is held now; an entry whose process is gone counts as freed.
    pub fn used_mb(&self) -> u64 {
        self.ledger.used()
    }

    /// The highest total ever held.
    pub fn peak_mb(&self) -> u64 {
        lock(&self.ledger.state).peak_mb
    }

    /// One line per refused allocation: which engine, how much, who held what.
    pub fn ooms(&self) -> Vec<String> {
        lock(&self.ledger.state).ooms.clone()
    }

    /// Every change, in order.
    pub fn log(&self) -> Vec<GpuEvent> {
        let mut st = lock(&self.ledger.state);
        st.reap();
        st.log.clone()
    }

    /// What `engine` holds now.
    pub fn holding(&self, engine: &str) -> u64 {
        self.ledger.holding(engine)
    }

    /// Allocates `mb` for `engine` (under process `pid`, if given), as a test's other GPU user would;
    /// `Err` is the OOM line, also recorded in [`FakeGpu::ooms`].
    pub fn alloc(&self, engine: &str, mb: u64, pid: Option<u32>) -> Result<(), String> {
        self.ledger.alloc(engine, mb, pid).map(|_| ())
    }

    /// Frees all that `engine` holds.
    pub fn free(&self, engine: &str) {
        self.ledger.free(engine, None);
    }
}

fn parse_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn gpu_alloc(State(ledger): State<Arc<Ledger>>, body: Bytes) -> Response {
    let body = parse_body(&body);
    let (Some(engine), Some(mb)) = (body["engine"].as_str(), body["mb"].as_u64()) else {
        return error400(
            json!({"error": "expected {\"engine\": string, \"mb\": integer, \"pid\": integer}"}),
        );
    };
    let pid = body["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    match ledger.alloc(engine, mb, pid) {
        Ok(holding) => {
            Json(json!({"engine": engine, "holding_mb": holding, "total_mb": ledger.used()}))
                .into_response()
        }
        Err(line) => (
            StatusCode::INSUFFICIENT_STORAGE,
            Json(json!({"error": line})),
        )
            .into_response(),
    }
}

async fn gpu_free(State(ledger): State<Arc<Ledger>>, body: Bytes) -> Response {
    let body = parse_body(&body);
    let Some(engine) = body["engine"].as_str() else {
        return error400(json!({"error": "expected {\"engine\": string}"}));
    };
    let freed = ledger.free(engine, body["mb"].as_u64());
    Json(json!({"engine": engine, "freed_mb": freed, "total_mb": ledger.used()})).into_response()
}

async fn gpu_state(State(ledger): State<Arc<Ledger>>) -> Response {
    let mut st = lock(&ledger.state);
    st.reap();
    let held: serde_json::Map<String, Value> = st
        .held
        .iter()
        .map(|(e, h)| (e.clone(), json!(h.mb)))
        .collect();
    Json(json!({
        "capacity_mb": ledger.capacity_mb,
        "used_mb": st.total(),
        "peak_mb": st.peak_mb,
        "held": held,
        "ooms": st.ooms,
    }))
    .into_response()
}

fn error400(body: Value) -> Response {
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// The engines
// ---------------------------------------------------------------------------------------------

/// Which real engine a [`FakeEngine`] plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// vLLM's OpenAI server with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1`.
    ///
    /// Checked against vllm-project/vllm `vllm/entrypoints/serve/dev/sleep/api_router.py` (at e7a47b8):
    /// `POST /sleep?level=L&mode=M` (level default 1, mode default `abort`) and `POST /wake_up`
    /// (`?tags=weights`, `?tags=kv_cache`, repeatable; none wakes all) answer 200 with an empty body;
    /// `GET /is_sleeping` answers `{"is_sleeping": bool}`. `vllm/v1/engine/core.py` (at 00080ee):
    /// `sleep` first pauses the scheduler (`abort` aborts in-flight requests, `wait` lets them finish
    /// first, `keep` holds them), level 0 only pauses, level 1 offloads the weights and drops the KV
    /// cache, level 2 drops both; `is_sleeping() = is_scheduler_paused() or
    /// model_executor.is_sleeping`, so `/is_sleeping` says `true` from the moment the sleep call
    /// starts, before the memory is freed, and until a wake has woken every tag: it never proves the
    /// memory is back (only NVML, here the ledger, does). `wake_up` resumes the scheduler once every
    /// tag is resident ("partial wakes intentionally keep the remaining allocations asleep").
    /// `vllm/entrypoints/serve/dev/rpc/api_router.py`: `POST /collective_rpc {"method":
    /// "reload_weights"}` answers `{"results": [null]}`: after a level-2 sleep the woken weights are
    /// garbage until then (the fake answers but counts [`FakeEngine::served_stale`]). Errors
    /// (`exception_handling/error_response.py`): `{"error": {"message", "type", "param", "code"}}`, an
    /// unexpected exception such as a CUDA OOM in `wake_up` being 500 `InternalServerError`. `GET
    /// /health` is 200 while the process lives, asleep or not. The `/sleep` 200 before the memory is
    /// freed is vllm issues #47654 and #32714; a wake before the GPU is free running out of memory,
    /// #34600.
    ///
    /// Departure: real vLLM queues a request that comes while its scheduler is paused ("all pause modes
    /// queue new adds") until the wake; the fake answers 503 at once and counts it in
    /// [`FakeEngine::refused_asleep`], so that a test sees the sidecar's mistake rather than a hang.
    Vllm,
    /// SGLang with `--enable-memory-saver`.
    ///
    /// Checked against sgl-project/sglang `python/sglang/srt/entrypoints/http_server.py` (at 0025436):
    /// `POST /release_memory_occupation` and `POST /resume_memory_occupation` take an optional
    /// `{"tags": [...]}` (`weights`, `kv_cache`; none means all) and answer 200 with the body `null`,
    /// or 400 `{"error": {"message"}}` when the call raises; `POST /pause_generation {"mode"}` (`abort`
    /// default, `retract`, `in_place`; `io_struct.py`) answers `{"message": "Generation paused
    /// successfully.", "status": "ok"}`, `POST /continue_generation` `{"message": "Generation continued
    /// successfully.", "status": "ok"}`. `GET /health` generates one token, so it fails (503) while
    /// generation is paused or the memory released. Release answers before the memory is freed
    /// (THUDM/slime PR #579 works around it) and needs an idle engine (pause first); a resume into a
    /// GPU another process filled fails on a CUDA OOM (sglang #14092).
    ///
    /// Departures: a release with requests running answers 400 (real SGLang trips an assertion and the
    /// engine dies); a resume that runs out of memory answers 400 at once (in #14092 the request hangs:
    /// set [`FakeEngineOptions::wake_oom_hangs`]); `/health` answers 503 at once rather than after its
    /// 20 s timeout; a request that comes while paused or released is answered 503 and counted in
    /// [`FakeEngine::refused_asleep`] (real SGLang queues it).
    Sglang,
    /// Ollama.
    ///
    /// Checked against ollama/ollama `docs/api.md` (at 01e52d2) and `server/routes.go`
    /// (`GenerateHandler`, `ChatHandler`): `POST /api/generate {"model": M, "keep_alive": 0}` with no
    /// prompt expires the runner and answers at once `{"model", "created_at", "response": "", "done":
    /// true, "done_reason": "unload"}` (the memory goes once the runner's requests end); with no prompt
    /// and any other `keep_alive` (e.g. -1) it loads the model and answers `{..., "done": true,
    /// "done_reason": "load"}` once loaded; `POST /api/chat` does the same with an empty `messages`.
    /// Any generate or chat with a prompt loads the model if it is not loaded (the fake counts
    /// [`FakeEngine::implicit_loads`]): why a sidecar must own the port. Streams are NDJSON, `stream`
    /// defaulting to true. `GET /api/ps`: `{"models": [{"name", "model", "size", "digest", "details",
    /// "expires_at", "size_vram"}]}` for loaded models. `GET /` answers `Ollama is running`. Errors are
    /// `{"error": string}`: an unknown model 404, a failed load 500.
    Ollama,
    /// llama.cpp's `llama-server` in router mode (no `-m`), one model.
    ///
    /// Checked against ggml-org/llama.cpp `tools/server/README.md` (router mode) and
    /// `tools/server/server-models.cpp` (at 4010338): `POST /models/load {"model"}` spawns the instance
    /// and answers `{"success": true}` at once (400 `model is already loaded` if loaded, 404 if
    /// unknown); `POST /models/unload {"model"}` answers `{"success": true}` (400 `model is not loaded`
    /// if it is not loaded) and the instance exits afterwards; `GET /models` answers `{"data": [{"id",
    /// "object", "owned_by", "created", "in_cache", "path", "status": {"value": "unloaded" | "loading"
    /// | "loaded", "args", ...}}], "object": "list"}`, a failed load being `{"value": "unloaded",
    /// "failed": true, "exit_code": 1}`; the status stays `loaded` until the instance has exited.
    /// Requests name their model in `"model"`; with `--no-models-autoload` (the fake's default, see
    /// [`FakeEngineOptions::autoload`]) or `?autoload=false`, a request for a model not loaded is 400
    /// `{"error": {"code": 400, "message": "model is not loaded", "type": "invalid_request_error"}}`;
    /// with autoload the router loads it first. `GET /health` answers `{"status": "ok"}`.
    ///
    /// Departure: an unload while the model is still loading answers 400 `model is not loaded` (the
    /// real router stops the loading instance).
    Llamacpp,
    /// Triton with `--model-control-mode=explicit`, one model.
    ///
    /// Checked against triton-inference-server/server `docs/protocol/extension_model_repository.md` (at
    /// 2267596): `POST /v2/repository/index` (body optional, `{"ready": true}` to list only ready
    /// models) answers `[{"name", "version", "state", "reason"}]`; `POST /v2/repository/models/M/load`
    /// answers 200 once loaded, or 400 `{"error": string}`; `POST /v2/repository/models/M/unload`
    /// answers 200 and "does not wait for the requested model to be fully unloaded" (tritonserver.h),
    /// the state going `UNLOADING` then `UNAVAILABLE` (reason `unloaded`). Inference is `POST
    /// /v2/models/M/infer`, health `GET /v2/health/ready`. An unload that does not free VRAM (triton
    /// #3320, #6836, #7020) is [`FakeEngineOptions::never_frees`]: the state says `UNAVAILABLE`, the
    /// ledger still holds.
    Triton,
}

impl Kind {
    /// The path a sidecar polls for the engine's health.
    pub fn health_path(self) -> &'static str {
        match self {
            Kind::Vllm | Kind::Sglang | Kind::Llamacpp => "/health",
            Kind::Ollama => "/",
            Kind::Triton => "/v2/health/ready",
        }
    }
}

/// How a [`FakeEngine`] behaves.
#[derive(Clone, Debug)]
pub struct FakeEngineOptions {
    /// Its name in the GPU's ledger.
    pub name: String,
    pub kind: Kind,
    /// What it holds awake.
    pub vram_mb: u64,
    /// The model it serves (Ollama, llama.cpp and Triton reject others; vLLM rejects another name).
    pub model: String,
    /// From the call that frees memory to the ledger dropping.
    pub sleep_time: Duration,
    /// From the allocation at the start of a wake to serving.
    pub wake_time: Duration,
    /// Allocates at start (fails the start if the GPU has no room); otherwise starts asleep (vLLM),
    /// released (SGLang), unloaded (Ollama, llama.cpp) or never loaded (Triton).
    pub awake_at_start: bool,
    /// A completion is `chunks` tokens, each sent `chunk_delay` after the one before (streamed, each
    /// flushed; non-streamed, the whole answer after all of them).
    pub chunks: usize,
    pub chunk_delay: Duration,
    /// The call that frees memory answers OK and the engine says it is asleep, but the memory is never
    /// freed (a stuck engine, Triton's unload that keeps VRAM).
    pub never_frees: bool,
    /// The level of a vLLM `/sleep` that names none (vLLM's own default is 1).
    pub vllm_level: u8,
    /// The part of `vram_mb` that is weights, the rest being KV cache: what vLLM's `wake_up?tags=` and
    /// SGLang's `{"tags": [...]}` take back or release separately. Default half.
    pub weights_mb: u64,
    /// llama.cpp's router loads a model for a request that names it (its default, unless started with
    /// `--no-models-autoload`; a request's `?autoload=` overrides). Default false: a sidecar starts the
    /// router with `--no-models-autoload`.
    pub autoload: bool,
    /// A wake that runs out of memory never answers (the request hangs, as in sglang #14092) instead of
    /// answering the engine's error. The OOM is recorded either way.
    pub wake_oom_hangs: bool,
}

impl FakeEngineOptions {
    /// Sleep and wake in 50 ms, 3 chunks 10 ms apart, awake at start, model `m`.
    pub fn new(name: &str, kind: Kind, vram_mb: u64) -> Self {
        FakeEngineOptions {
            name: name.to_string(),
            kind,
            vram_mb,
            model: "m".to_string(),
            sleep_time: Duration::from_millis(50),
            wake_time: Duration::from_millis(50),
            awake_at_start: true,
            chunks: 3,
            chunk_delay: Duration::from_millis(10),
            never_frees: false,
            vllm_level: 1,
            weights_mb: vram_mb / 2,
            autoload: false,
            wake_oom_hangs: false,
        }
    }

    fn weights(&self) -> u64 {
        self.weights_mb.min(self.vram_mb)
    }

    fn kv(&self) -> u64 {
        self.vram_mb - self.weights()
    }
}

/// Which parts of an engine's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Parts {
    weights: bool,
    kv: bool,
}

impl Parts {
    const ALL: Parts = Parts {
        weights: true,
        kv: true,
    };

    /// From tag names (vLLM's and SGLang's); none, or none known, means all.
    fn from_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> Parts {
        let mut p = Parts {
            weights: false,
            kv: false,
        };
        for t in tags {
            match t {
                "weights" => p.weights = true,
                "kv_cache" => p.kv = true,
                _ => {}
            }
        }
        if p.weights || p.kv {
            p
        } else {
            Parts::ALL
        }
    }
}

#[derive(Default)]
struct St {
    /// Resident parts, as the engine believes.
    weights: bool,
    kv: bool,
    /// The memory is being freed (after any drain): in-flight requests cannot go on.
    releasing: bool,
    /// A release was started (answered, or about to be) and has not ended, drain included.
    release_pending: bool,
    /// A wake or load is under way.
    acquiring: bool,
    /// New requests are not admitted (vLLM's paused scheduler, SGLang's paused generation, an unload
    /// under way).
    paused: bool,
    /// In-flight requests are held (vLLM `keep`, SGLang `retract`/`in_place`).
    hold: bool,
    /// vLLM after a level-2 sleep: the weights are garbage until `reload_weights`.
    stale: bool,
    /// Why the last load failed (llama.cpp's `failed`, Triton's reason).
    failed: Option<String>,
    ever_loaded: bool,
    in_flight: usize,
    /// Bumped to abort in-flight requests.
    abort_epoch: u64,
    last_level: Option<u8>,
    intervals: Vec<(Instant, Option<Instant>)>,
}

impl St {
    fn resident(&self) -> bool {
        self.weights && self.kv
    }

    fn serving(&self) -> bool {
        self.resident() && !self.releasing && !self.acquiring && !self.paused
    }

    fn progressing(&self) -> bool {
        self.resident() && !self.releasing && !self.acquiring && !self.hold
    }
}

struct Engine {
    opts: FakeEngineOptions,
    gpu: FakeGpu,
    st: Mutex<St>,
    changed: watch::Sender<u64>,
    /// Serialises the operations on memory, as the engines' cores do: a wake waits for a release
    /// under way to have freed the memory.
    op: Arc<tokio::sync::Mutex<()>>,
    stopped: AtomicBool,
    served: AtomicU64,
    served_stale: AtomicU64,
    refused_asleep: AtomicU64,
    implicit_loads: AtomicU64,
    sleeps: AtomicU64,
    wakes: AtomicU64,
}

type Shared = Arc<Engine>;

impl Engine {
    /// Changes the state, keeps the awake intervals and wakes whoever waits on a change.
    fn update<R>(&self, f: impl FnOnce(&mut St) -> R) -> R {
        let r = {
            let mut st = lock(&self.st);
            let r = f(&mut st);
            let serving = st.serving() && !self.stopped.load(Ordering::SeqCst);
            let open = st.intervals.last().is_some_and(|(_, end)| end.is_none());
            if serving && !open {
                st.intervals.push((Instant::now(), None));
            } else if !serving && open {
                if let Some(last) = st.intervals.last_mut() {
                    last.1 = Some(Instant::now());
                }
            }
            r
        };
        self.changed.send_modify(|v| *v += 1);
        r
    }

    fn read<R>(&self, f: impl FnOnce(&St) -> R) -> R {
        f(&lock(&self.st))
    }

    fn mb(&self, p: Parts) -> u64 {
        (if p.weights { self.opts.weights() } else { 0 }) + (if p.kv { self.opts.kv() } else { 0 })
    }

    /// Waits until `cond` holds on the state.
    async fn wait_for(&self, cond: impl Fn(&St) -> bool) {
        loop {
            let mut rx = self.changed.subscribe();
            if self.read(&cond) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until an in-flight request admitted at `epoch` may send its next token: false if it was
    /// aborted (or the engine stopped).
    async fn wait_progress(&self, epoch: u64) -> bool {
        loop {
            let mut rx = self.changed.subscribe();
            let verdict = self.read(|st| {
                if st.abort_epoch != epoch || self.stopped.load(Ordering::SeqCst) {
                    Some(false)
                } else if st.progressing() {
                    Some(true)
                } else {
                    None
                }
            });
            if let Some(v) = verdict {
                return v;
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Admits an inference request if the engine serves: its abort epoch, and whether the weights are
    /// garbage.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        self.update(|st| {
            st.serving().then(|| {
                st.in_flight += 1;
                (st.abort_epoch, st.stale)
            })
        })
        .map(|(epoch, stale)| Admitted {
            eng: self.clone(),
            epoch,
            stale,
        })
    }

    /// Starts freeing `parts`: the caller holds the operation lock and has answered or is about to; the
    /// memory goes `sleep_time` later (after in-flight requests end, if `drain`), and the lock with it.
    fn spawn_release(
        self: &Arc<Self>,
        guard: tokio::sync::OwnedMutexGuard<()>,
        parts: Parts,
        drain: bool,
    ) {
        let eng = self.clone();
        self.sleeps.fetch_add(1, Ordering::SeqCst);
        self.update(|st| {
            st.release_pending = true;
            st.releasing = !drain;
        });
        tokio::spawn(async move {
            if drain {
                eng.wait_for(|st| st.in_flight == 0).await;
                eng.update(|st| st.releasing = true);
            }
            tokio::time::sleep(eng.opts.sleep_time).await;
            if !eng.opts.never_frees {
                eng.gpu.ledger.free(&eng.opts.name, Some(eng.mb(parts)));
            }
            eng.update(|st| {
                if parts.weights {
                    st.weights = false;
                }
                if parts.kv {
                    st.kv = false;
                }
                st.releasing = false;
                st.release_pending = false;
            });
            drop(guard);
        });
    }

    /// Takes `parts` back: waits for any release under way, allocates what is missing (an OOM fails
    /// it), and `wake_time` later marks them resident and ends the wake as the kind does. Ok(true) if it
    /// loaded anything. Runs in its own task, so that a client going away does not cut it half-way.
    async fn acquire(self: &Arc<Self>, parts: Parts) -> Result<bool, String> {
        let eng = self.clone();
        let task = tokio::spawn(async move {
            let _guard = eng.op.clone().lock_owned().await;
            let (want, has) = eng.read(|st| {
                (
                    Parts {
                        weights: st.weights || parts.weights,
                        kv: st.kv || parts.kv,
                    },
                    Parts {
                        weights: st.weights,
                        kv: st.kv,
                    },
                )
            });
            if want == has {
                eng.update(|st| eng.end_wake(st));
                return Ok(false);
            }
            eng.update(|st| st.acquiring = true);
            let need = eng.mb(want).saturating_sub(eng.gpu.holding(&eng.opts.name));
            if need > 0 {
                if let Err(line) = eng.gpu.ledger.alloc(&eng.opts.name, need, None) {
                    eng.update(|st| {
                        st.acquiring = false;
                        st.failed = Some(line.clone());
                    });
                    return Err(line);
                }
            }
            tokio::time::sleep(eng.opts.wake_time).await;
            eng.update(|st| {
                st.weights = want.weights;
                st.kv = want.kv;
                st.acquiring = false;
                if st.resident() {
                    eng.wakes.fetch_add(1, Ordering::SeqCst);
                }
                eng.end_wake(st);
            });
            Ok(true)
        });
        let result = task
            .await
            .unwrap_or_else(|e| Err(format!("the wake failed: {e}")));
        if result.is_err() && self.opts.wake_oom_hangs {
            std::future::pending::<()>().await;
        }
        result
    }

    /// What the end of a wake does besides the memory.
    fn end_wake(&self, st: &mut St) {
        if !st.resident() {
            return;
        }
        st.ever_loaded = true;
        st.failed = None;
        match self.opts.kind {
            // vLLM's wake_up resumes the scheduler; SGLang waits for continue_generation.
            Kind::Sglang => {}
            Kind::Vllm | Kind::Ollama | Kind::Llamacpp | Kind::Triton => {
                st.paused = false;
                st.hold = false;
            }
        }
    }

    /// The operation lock, taken in a task of its own by the caller.
    async fn op_lock(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.op.clone().lock_owned().await
    }
}

/// An admitted inference request: counts as in flight until dropped.
struct Admitted {
    eng: Shared,
    epoch: u64,
    stale: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.eng.update(|st| st.in_flight -= 1);
    }
}

impl Admitted {
    fn served(&self) {
        self.eng.served.fetch_add(1, Ordering::SeqCst);
        if self.stale {
            self.eng.served_stale.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A fake inference engine on a free port of loopback, allocating from a [`FakeGpu`].
pub struct FakeEngine {
    eng: Shared,
    server: Server,
}

impl FakeEngine {
    /// Starts it; panics if it is to be awake at start and the GPU has no room.
    pub async fn start(gpu: &FakeGpu, options: FakeEngineOptions) -> FakeEngine {
        match Self::try_start(gpu, options).await {
            Ok(engine) => engine,
            Err(line) => panic!("the fake engine could not start: {line}"),
        }
    }

    /// Starts it; `Err` is the OOM line if it is to be awake at start and the GPU has no room.
    pub async fn try_start(
        gpu: &FakeGpu,
        options: FakeEngineOptions,
    ) -> Result<FakeEngine, String> {
        let mut st = St::default();
        if options.awake_at_start {
            gpu.ledger.alloc(&options.name, options.vram_mb, None)?;
            st.weights = true;
            st.kv = true;
            st.ever_loaded = true;
        } else if options.kind == Kind::Vllm {
            // Asleep: the scheduler is paused and the executor sleeps.
            st.paused = true;
        }
        let (changed, _) = watch::channel(0);
        let kind = options.kind;
        let eng = Arc::new(Engine {
            opts: options,
            gpu: gpu.clone(),
            st: Mutex::new(st),
            changed,
            op: Arc::new(tokio::sync::Mutex::new(())),
            stopped: AtomicBool::new(false),
            served: AtomicU64::new(0),
            served_stale: AtomicU64::new(0),
            refused_asleep: AtomicU64::new(0),
            implicit_loads: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
        });
        eng.update(|_| ());
        let router = match kind {
            Kind::Vllm => vllm_router(),
            Kind::Sglang => sglang_router(),
            Kind::Ollama => ollama_router(),
            Kind::Llamacpp => llamacpp_router(),
            Kind::Triton => triton_router(),
        };
        let server = Server::start(router.with_state(eng.clone())).await;
        Ok(FakeEngine { eng, server })
    }

    /// Its base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn name(&self) -> &str {
        &self.eng.opts.name
    }

    pub fn kind(&self) -> Kind {
        self.eng.opts.kind
    }

    pub fn options(&self) -> &FakeEngineOptions {
        &self.eng.opts
    }

    /// Holds its memory and serves new requests.
    pub fn awake(&self) -> bool {
        !self.eng.stopped.load(Ordering::SeqCst) && self.eng.read(St::serving)
    }

    /// Inference requests answered OK (including those answered with stale weights).
    pub fn served(&self) -> u64 {
        self.eng.served.load(Ordering::SeqCst)
    }

    /// Inference requests answered after a vLLM level-2 sleep and wake without `reload_weights`: real
    /// vLLM answers them with garbage.
    pub fn served_stale(&self) -> u64 {
        self.eng.served_stale.load(Ordering::SeqCst)
    }

    /// Inference requests that came while it was not awake (a sidecar bug for the kinds that do not
    /// load on request).
    pub fn refused_asleep(&self) -> u64 {
        self.eng.refused_asleep.load(Ordering::SeqCst)
    }

    /// Loads caused by an inference request rather than by a load call (Ollama; llama.cpp's router with
    /// autoload).
    pub fn implicit_loads(&self) -> u64 {
        self.eng.implicit_loads.load(Ordering::SeqCst)
    }

    /// Calls that started freeing memory.
    pub fn sleeps(&self) -> u64 {
        self.eng.sleeps.load(Ordering::SeqCst)
    }

    /// Wakes and loads that made it resident again (explicit or implicit).
    pub fn wakes(&self) -> u64 {
        self.eng.wakes.load(Ordering::SeqCst)
    }

    /// A call that frees memory was answered and the engine has not yet done what it does about it
    /// (drain, then free, or, with [`FakeEngineOptions::never_frees`], pretend to).
    pub fn releasing(&self) -> bool {
        self.eng.read(|st| st.release_pending)
    }

    /// Inference requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.eng.read(|st| st.in_flight)
    }

    /// The level of the last vLLM `/sleep`.
    pub fn last_sleep_level(&self) -> Option<u8> {
        self.eng.read(|st| st.last_level)
    }

    /// When it was awake: from the end of a wake (or the start) to the call that stopped it serving;
    /// the last is open while it is awake.
    pub fn awake_intervals(&self) -> Vec<(Instant, Option<Instant>)> {
        self.eng.read(|st| st.intervals.clone())
    }

    /// Stops serving (in-flight requests end), and frees its memory, as its process exiting would.
    pub async fn stop(mut self) {
        self.mark_stopped();
        self.server.stop().await;
    }

    fn mark_stopped(&self) {
        self.eng.stopped.store(true, Ordering::SeqCst);
        self.eng.update(|st| st.abort_epoch += 1);
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.mark_stopped();
        self.eng.gpu.ledger.free(&self.eng.opts.name, None);
    }
}

// ---------------------------------------------------------------------------------------------
// Inference
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
    OllamaGenerate,
    OllamaChat,
}

/// Renders one request's answers.
struct Fmt {
    api: Api,
    id: String,
    model: String,
    created: i64,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn token(i: usize) -> String {
    format!("tok{i} ")
}

impl Fmt {
    fn new(api: Api, model: &str) -> Fmt {
        let n = REQUESTS.fetch_add(1, Ordering::Relaxed);
        let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
        Fmt {
            api,
            id: format!("{prefix}-fake{n}"),
            model: model.to_string(),
            created: now_unix(),
        }
    }

    fn line(&self, v: Value) -> Bytes {
        match self.api {
            Api::Completions | Api::Chat => Bytes::from(format!("data: {v}\n\n")),
            Api::OllamaGenerate | Api::OllamaChat => Bytes::from(format!("{v}\n")),
        }
    }

    fn content_type(&self) -> &'static str {
        match self.api {
            Api::Completions | Api::Chat => "text/event-stream",
            Api::OllamaGenerate | Api::OllamaChat => "application/x-ndjson",
        }
    }

    fn openai_chunk(&self, choice: Value) -> Value {
        let object = if self.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice],
        })
    }

    fn ollama_stats(&self, v: &mut Value, done_reason: &str, n: usize) {
        v["done"] = json!(true);
        v["done_reason"] = json!(done_reason);
        v["total_duration"] = json!(1_000_000u64);
        v["load_duration"] = json!(1_000u64);
        v["prompt_eval_count"] = json!(1);
        v["prompt_eval_duration"] = json!(1_000u64);
        v["eval_count"] = json!(n);
        v["eval_duration"] = json!(1_000_000u64);
    }

    /// Token `i`, streamed.
    fn chunk(&self, i: usize) -> Bytes {
        let t = token(i);
        let v = match self.api {
            Api::Completions => self.openai_chunk(
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null}),
            ),
            Api::Chat => {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": t})
                } else {
                    json!({"content": t})
                };
                self.openai_chunk(
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}),
                )
            }
            Api::OllamaGenerate => {
                json!({"model": self.model, "created_at": now_rfc3339(), "response": t, "done": false})
            }
            Api::OllamaChat => json!({
                "model": self.model, "created_at": now_rfc3339(),
                "message": {"role": "assistant", "content": t}, "done": false,
            }),
        };
        self.line(v)
    }

    /// The end of a stream of `n` tokens, `finish` being `stop` or `abort`.
    fn end(&self, finish: &str, n: usize) -> Bytes {
        match self.api {
            Api::Completions | Api::Chat => {
                let choice = if self.api == Api::Chat {
                    json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})
                };
                let mut out = format!("data: {}\n\n", self.openai_chunk(choice));
                out.push_str("data: [DONE]\n\n");
                Bytes::from(out)
            }
            Api::OllamaGenerate | Api::OllamaChat if finish != "stop" => {
                self.line(json!({"error": "the request was aborted: the model was unloaded"}))
            }
            Api::OllamaGenerate | Api::OllamaChat => {
                let mut v = if self.api == Api::OllamaChat {
                    json!({
                        "model": self.model, "created_at": now_rfc3339(),
                        "message": {"role": "assistant", "content": ""},
                    })
                } else {
                    json!({"model": self.model, "created_at": now_rfc3339(), "response": ""})
                };
                self.ollama_stats(&mut v, "stop", n);
                self.line(v)
            }
        }
    }

    /// A whole, non-streamed answer of `n` tokens.
    fn whole(&self, finish: &str, n: usize) -> Value {
        let text: String = (0..n).map(token).collect();
        let usage = json!({"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1});
        match self.api {
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": null, "finish_reason": finish,
                }],
                "usage": usage,
            }),
            Api::OllamaGenerate | Api::OllamaChat => {
                let mut v = if self.api == Api::OllamaChat {
                    json!({
                        "model": self.model, "created_at": now_rfc3339(),
                        "message": {"role": "assistant", "content": text},
                    })
                } else {
                    json!({"model": self.model, "created_at": now_rfc3339(), "response": text})
                };
                self.ollama_stats(&mut v, finish, n);
                v
            }
        }
    }
}

struct StreamState {
    adm: Admitted,
    fmt: Fmt,
    idx: usize,
    done: bool,
}

/// Streams the answer, each token `chunk_delay` after the one before, each sent as it is made.
fn stream_response(adm: Admitted, fmt: Fmt) -> Response {
    let content_type = fmt.content_type();
    let chunks = adm.eng.opts.chunks;
    let delay = adm.eng.opts.chunk_delay;
    let state = StreamState {
        adm,
        fmt,
        idx: 0,
        done: false,
    };
    let stream = futures::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let bytes = if s.idx < chunks {
            tokio::time::sleep(delay).await;
            if s.adm.eng.wait_progress(s.adm.epoch).await {
                s.idx += 1;
                s.fmt.chunk(s.idx - 1)
            } else {
                s.done = true;
                s.fmt.end("abort", s.idx)
            }
        } else {
            s.done = true;
            s.adm.served();
            s.fmt.end("stop", s.idx)
        };
        Some((Ok::<Bytes, Infallible>(bytes), s))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("a streamed response")
}

/// Makes the `chunks` tokens; false if aborted first. Returns how many were made.
async fn generate(adm: &Admitted) -> (bool, usize) {
    for n in 0..adm.eng.opts.chunks {
        tokio::time::sleep(adm.eng.opts.chunk_delay).await;
        if !adm.eng.wait_progress(adm.epoch).await {
            return (false, n);
        }
    }
    (true, adm.eng.opts.chunks)
}

async fn whole_response(adm: Admitted, fmt: Fmt) -> Response {
    let (ok, n) = generate(&adm).await;
    if ok {
        adm.served();
    }
    Json(fmt.whole(if ok { "stop" } else { "abort" }, n)).into_response()
}

fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.replace('+', " "))
        })
        .collect()
}

fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Engine {
    /// The model this Ollama serves as Ollama names it (`m` is `m:latest`).
    fn ollama_tag(&self) -> String {
        if self.opts.model.contains(':') {
            self.opts.model.clone()
        } else {
            format!("{}:latest", self.opts.model)
        }
    }

    /// Rejects a request for another model, as the kind does.
    fn check_model(&self, body: &Value) -> Option<Response> {
        let asked = body["model"].as_str();
        let m = &self.opts.model;
        match self.opts.kind {
            Kind::Vllm => asked.filter(|a| a != m).map(|a| {
                let message = format!("The model `{a}` does not exist.");
                openai_error(
                    StatusCode::NOT_FOUND,
                    &message,
                    "NotFoundError",
                    Some("model"),
                )
            }),
            Kind::Sglang | Kind::Triton => None,
            Kind::Ollama => match asked {
                None | Some("") => Some(error400(json!({"error": "model is required"}))),
                Some(a) if a == m || a == self.ollama_tag() => None,
                Some(a) => {
                    let body = json!({"error": format!("model '{a}' not found")});
                    Some((StatusCode::NOT_FOUND, Json(body)).into_response())
                }
            },
            Kind::Llamacpp => match asked {
                None | Some("") => {
                    let message = "model name is missing from the request";
                    Some(llama_error(400, message, "invalid_request_error"))
                }
                Some(a) if a == m => None,
                Some(a) => {
                    let message = format!("model '{a}' not found");
                    Some(llama_error(400, &message, "invalid_request_error"))
                }
            },
        }
    }

    /// The answer to an inference request that came while it is not awake.
    fn refusal(&self) -> Response {
        self.refused_asleep.fetch_add(1, Ordering::SeqCst);
        match self.opts.kind {
            Kind::Vllm => openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The engine is sleeping: wake it up first",
                "ServiceUnavailableError",
                None,
            ),
            Kind::Sglang => {
                let body = json!({
                    "object": "error", "message": "Generation is paused or the GPU memory released",
                    "type": "ServiceUnavailable", "param": null, "code": 503,
                });
                (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
            }
            Kind::Llamacpp => llama_error(400, "model is not loaded", "invalid_request_error"),
            Kind::Triton => {
                let m = &self.opts.model;
                let message = format!("Request for unknown model: '{m}' has no available versions");
                error400(json!({"error": message}))
            }
            Kind::Ollama => {
                let body = json!({"error": "the model is being unloaded"});
                (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
            }
        }
    }

    /// The answer to a request whose load failed.
    fn load_failed(&self, line: &str) -> Response {
        match self.opts.kind {
            Kind::Llamacpp => llama_error(500, line, "server_error"),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": line})),
            )
                .into_response(),
        }
    }
}

fn llama_error(code: u16, message: &str, kind: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "type": kind}})),
    )
        .into_response()
}

/// An inference request: admitted if awake; otherwise, where the kind loads on request, loaded first;
/// otherwise refused.
async fn infer(eng: Shared, api: Api, query: Option<String>, body: Bytes) -> Response {
    let body = parse_body(&body);
    if let Some(rejected) = eng.check_model(&body) {
        return rejected;
    }
    let loads_on_request = match eng.opts.kind {
        Kind::Ollama => true,
        Kind::Llamacpp => query_get(&query_pairs(&query), "autoload")
            .map_or(eng.opts.autoload, |v| v == "true" || v == "1"),
        Kind::Vllm | Kind::Sglang | Kind::Triton => false,
    };
    let adm = match eng.admit() {
        Some(adm) => adm,
        None if loads_on_request && !eng.stopped.load(Ordering::SeqCst) => {
            match eng.acquire(Parts::ALL).await {
                Ok(true) => {
                    eng.implicit_loads.fetch_add(1, Ordering::SeqCst);
                }
                Ok(false) => {}
                Err(line) => return eng.load_failed(&line),
            }
            match eng.admit() {
                Some(adm) => adm,
                None => return eng.refusal(),
            }
        }
        None => return eng.refusal(),
    };
    let ollama = matches!(api, Api::OllamaGenerate | Api::OllamaChat);
    let stream = body["stream"].as_bool().unwrap_or(ollama);
    let model = body["model"]
        .as_str()
        .unwrap_or(&eng.opts.model)
        .to_string();
    let fmt = Fmt::new(api, &model);
    if stream {
        stream_response(adm, fmt)
    } else {
        whole_response(adm, fmt).await
    }
}

async fn completions(State(eng): State<Shared>, RawQuery(q): RawQuery, body: Bytes) -> Response {
    infer(eng, Api::Completions, q, body).await
}

async fn chat_completions(
    State(eng): State<Shared>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    infer(eng, Api::Chat, q, body).await
}

async fn openai_models(State(eng): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": eng.opts.model, "object": "model", "created": now_unix(), "owned_by": "fake",
        "root": eng.opts.model, "parent": null, "max_model_len": 4096,
    }]}))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// vLLM
// ---------------------------------------------------------------------------------------------

fn vllm_router() -> Router<Shared> {
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/v1/models", get(openai_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/sleep", post(vllm_sleep))
        .route("/wake_up", post(vllm_wake_up))
        .route("/is_sleeping", get(vllm_is_sleeping))
        .route("/collective_rpc", post(vllm_collective_rpc))
        .route("/reset_prefix_cache", post(|| async { StatusCode::OK }))
}

/// vLLM's error body (OpenAI's): `{"error": {"message", "type", "param", "code"}}`.
fn openai_error(status: StatusCode, message: &str, kind: &str, param: Option<&str>) -> Response {
    let code = status.as_u16();
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

fn vllm_error(status: StatusCode, message: &str, kind: &str) -> Response {
    openai_error(status, message, kind, None)
}

/// `POST /sleep?level=L&mode=M`: pauses the scheduler (aborting, waiting for or holding in-flight
/// requests), then frees the memory; answers once the release has started, before the memory is freed.
async fn vllm_sleep(State(eng): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let pairs = query_pairs(&q);
    let level = match query_get(&pairs, "level") {
        None => eng.opts.vllm_level,
        Some(l) => match l.parse::<u8>() {
            Ok(l) => l,
            Err(_) => {
                return vllm_error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid level {l:?}"),
                    "BadRequestError",
                )
            }
        },
    };
    let mode = query_get(&pairs, "mode").unwrap_or("abort").to_string();
    if !matches!(mode.as_str(), "abort" | "wait" | "keep") {
        return vllm_error(
            StatusCode::BAD_REQUEST,
            &format!("invalid mode {mode:?}"),
            "BadRequestError",
        );
    }
    let task = tokio::spawn(async move {
        let guard = eng.op_lock().await;
        eng.update(|st| {
            st.paused = true;
            st.last_level = Some(level);
            match mode.as_str() {
                "abort" => st.abort_epoch += 1,
                "keep" => st.hold = true,
                _ => {}
            }
        });
        if level == 0 {
            return;
        }
        if mode == "wait" {
            eng.wait_for(|st| st.in_flight == 0).await;
        }
        if !eng.read(|st| st.weights || st.kv) {
            // "Executor is already sleeping."
            return;
        }
        if level >= 2 {
            eng.update(|st| st.stale = true);
        }
        eng.spawn_release(guard, Parts::ALL, false);
    });
    let _ = task.await;
    StatusCode::OK.into_response()
}

/// `POST /wake_up[?tags=weights][&tags=kv_cache]`: takes the memory back (500 on an OOM) and, once
/// every tag is resident, resumes the scheduler; answers when done.
async fn vllm_wake_up(State(eng): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let pairs = query_pairs(&q);
    let parts = Parts::from_tags(
        pairs
            .iter()
            .filter(|(k, _)| k == "tags")
            .map(|(_, v)| v.as_str()),
    );
    match eng.acquire(parts).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(line) => vllm_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &line,
            "InternalServerError",
        ),
    }
}

/// `GET /is_sleeping`: the scheduler is paused or a tag is asleep; says nothing of the GPU's memory.
async fn vllm_is_sleeping(State(eng): State<Shared>) -> Response {
    let sleeping = eng.read(|st| st.paused || !st.resident());
    Json(json!({"is_sleeping": sleeping})).into_response()
}

/// `POST /collective_rpc {"method": M}`: `reload_weights` makes the woken weights valid again.
async fn vllm_collective_rpc(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    let Some(method) = body["method"].as_str() else {
        return vllm_error(
            StatusCode::BAD_REQUEST,
            "Missing 'method' in request body",
            "Bad Request",
        );
    };
    if method == "reload_weights" {
        if !eng.read(|st| st.weights) {
            return vllm_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reload_weights: the weights are asleep; wake_up?tags=weights first",
                "InternalServerError",
            );
        }
        eng.update(|st| st.stale = false);
    }
    Json(json!({"results": [null]})).into_response()
}

// ---------------------------------------------------------------------------------------------
// SGLang
// ---------------------------------------------------------------------------------------------

fn sglang_router() -> Router<Shared> {
    Router::new()
        .route("/health", get(sglang_health))
        .route("/health_generate", get(sglang_health))
        .route("/v1/models", get(openai_models))
        .route("/get_model_info", get(sglang_model_info))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/pause_generation", post(sglang_pause))
        .route("/continue_generation", post(sglang_continue))
        .route(
            "/release_memory_occupation",
            get(sglang_release).post(sglang_release),
        )
        .route(
            "/resume_memory_occupation",
            get(sglang_resume).post(sglang_resume),
        )
}

fn sglang_error(message: &str) -> Response {
    error400(json!({"error": {"message": message}}))
}

/// `GET /health`: generates a token, so it only succeeds while generation runs.
async fn sglang_health(State(eng): State<Shared>) -> StatusCode {
    if eng.read(St::serving) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn sglang_model_info(State(eng): State<Shared>) -> Response {
    Json(json!({"model_path": eng.opts.model, "tokenizer_path": eng.opts.model, "is_generation": true}))
        .into_response()
}

fn sglang_parts(body: &Value) -> Parts {
    match body["tags"].as_array() {
        Some(tags) => Parts::from_tags(tags.iter().filter_map(Value::as_str)),
        None => Parts::ALL,
    }
}

/// `POST /pause_generation {"mode": "abort" | "retract" | "in_place"}`.
async fn sglang_pause(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    let mode = body["mode"].as_str().unwrap_or("abort");
    match mode {
        "abort" => eng.update(|st| {
            st.paused = true;
            st.abort_epoch += 1;
        }),
        "retract" | "in_place" => eng.update(|st| {
            st.paused = true;
            st.hold = true;
        }),
        other => {
            return sglang_error(&format!(
                "Invalid mode: {other:?}. Expected one of ['abort', 'retract', 'in_place']."
            ))
        }
    }
    Json(json!({"message": "Generation paused successfully.", "status": "ok"})).into_response()
}

/// `POST /continue_generation`.
async fn sglang_continue(State(eng): State<Shared>) -> Response {
    eng.update(|st| {
        st.paused = false;
        st.hold = false;
    });
    Json(json!({"message": "Generation continued successfully.", "status": "ok"})).into_response()
}

/// `POST /release_memory_occupation {"tags": [...]}`: answers `null` once the release has started,
/// before the memory is freed; refuses while requests run unpaused.
async fn sglang_release(State(eng): State<Shared>, body: Bytes) -> Response {
    let wanted = sglang_parts(&parse_body(&body));
    let task = tokio::spawn(async move {
        let guard = eng.op_lock().await;
        let (busy, parts) = eng.read(|st| {
            (
                st.in_flight > 0 && !st.hold,
                Parts {
                    weights: wanted.weights && st.weights,
                    kv: wanted.kv && st.kv,
                },
            )
        });
        if busy {
            return Err(
                "release_memory_occupation needs an idle engine: pause generation first"
                    .to_string(),
            );
        }
        if parts.weights || parts.kv {
            eng.spawn_release(guard, parts, false);
        }
        Ok(())
    });
    match task.await {
        Ok(Ok(())) => Json(Value::Null).into_response(),
        Ok(Err(message)) => sglang_error(&message),
        Err(e) => sglang_error(&e.to_string()),
    }
}

/// `POST /resume_memory_occupation {"tags": [...]}`: takes the memory back; answers `null` when done,
/// 400 on an OOM. Generation stays paused if it was.
async fn sglang_resume(State(eng): State<Shared>, body: Bytes) -> Response {
    let parts = sglang_parts(&parse_body(&body));
    match eng.acquire(parts).await {
        Ok(_) => Json(Value::Null).into_response(),
        Err(line) => sglang_error(&line),
    }
}

// ---------------------------------------------------------------------------------------------
// Ollama
// ---------------------------------------------------------------------------------------------

fn ollama_router() -> Router<Shared> {
    Router::new()
        .route(
            "/",
            get(|| async { "Ollama is running" }).head(|| async { StatusCode::OK }),
        )
        .route(
            "/api/version",
            get(|| async { Json(json!({"version": "0.0.0-fake"})) }),
        )
        .route("/api/ps", get(ollama_ps))
        .route("/api/tags", get(ollama_tags))
        .route("/api/generate", post(ollama_generate))
        .route("/api/chat", post(ollama_chat))
}

/// Whether a `keep_alive` (seconds as a number, or a duration string like `"0"`, `"0s"`, `"5m"`) is zero.
fn keep_alive_is_zero(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => {
            let digits = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
            digits.parse::<f64>().is_ok_and(|x| x == 0.0)
        }
        _ => false,
    }
}

fn ollama_model_entry(eng: &Engine) -> Value {
    let tag = eng.ollama_tag();
    json!({
        "name": tag, "model": tag, "size": eng.opts.vram_mb * MB,
        "digest": "0000000000000000000000000000000000000000000000000000000000000000",
        "details": {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                    "parameter_size": "1B", "quantization_level": "Q4_0"},
    })
}

/// `GET /api/ps`: the model while loaded (until its unload has freed it), with `size_vram`.
async fn ollama_ps(State(eng): State<Shared>) -> Response {
    let models = if eng.read(St::resident) {
        let mut m = ollama_model_entry(&eng);
        m["expires_at"] = json!("2318-01-01T00:00:00Z");
        m["size_vram"] = json!(eng.opts.vram_mb * MB);
        m["context_length"] = json!(4096);
        vec![m]
    } else {
        vec![]
    };
    Json(json!({"models": models})).into_response()
}

async fn ollama_tags(State(eng): State<Shared>) -> Response {
    let mut m = ollama_model_entry(&eng);
    m["modified_at"] = json!("2024-01-01T00:00:00Z");
    Json(json!({"models": [m]})).into_response()
}

async fn ollama_generate(State(eng): State<Shared>, body: Bytes) -> Response {
    let v = parse_body(&body);
    let empty = match &v["prompt"] {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        _ => false,
    };
    if empty {
        ollama_load_or_unload(eng, &v, Api::OllamaGenerate).await
    } else {
        infer(eng, Api::OllamaGenerate, None, body).await
    }
}

async fn ollama_chat(State(eng): State<Shared>, body: Bytes) -> Response {
    let v = parse_body(&body);
    let empty = match &v["messages"] {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if empty {
        ollama_load_or_unload(eng, &v, Api::OllamaChat).await
    } else {
        infer(eng, Api::OllamaChat, None, body).await
    }
}

/// A request with no prompt: `keep_alive` 0 unloads (answered at once; the memory goes once in-flight
/// requests end, `sleep_time` later); anything else loads (answered once loaded, 500 on an OOM).
async fn ollama_load_or_unload(eng: Shared, v: &Value, api: Api) -> Response {
    if let Some(rejected) = eng.check_model(v) {
        return rejected;
    }
    let model = v["model"].as_str().unwrap_or_default().to_string();
    let mut answer = if api == Api::OllamaChat {
        json!({
            "model": model, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": ""}, "done": true,
        })
    } else {
        json!({"model": model, "created_at": now_rfc3339(), "response": "", "done": true})
    };
    if keep_alive_is_zero(&v["keep_alive"]) {
        let task = tokio::spawn(async move {
            let guard = eng.op_lock().await;
            if eng.read(|st| st.weights || st.kv) {
                eng.update(|st| st.paused = true);
                eng.spawn_release(guard, Parts::ALL, true);
            }
        });
        let _ = task.await;
        answer["done_reason"] = json!("unload");
        return Json(answer).into_response();
    }
    match eng.acquire(Parts::ALL).await {
        Ok(_) => {
            answer["done_reason"] = json!("load");
            Json(answer).into_response()
        }
        Err(line) => eng.load_failed(&line),
    }
}

// ---------------------------------------------------------------------------------------------
// llama.cpp (router mode)
// ---------------------------------------------------------------------------------------------

fn llamacpp_router() -> Router<Shared> {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/models", get(llamacpp_models))
        .route("/v1/models", get(llamacpp_models))
        .route("/models/load", post(llamacpp_load))
        .route("/models/unload", post(llamacpp_unload))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
}

/// `GET /models`: the model with its status; `loaded` until the instance has exited.
async fn llamacpp_models(State(eng): State<Shared>) -> Response {
    let status = eng.read(|st| {
        let args = json!(["llama-server", "--host", "127.0.0.1"]);
        if st.acquiring {
            json!({"value": "loading", "args": args})
        } else if st.resident() {
            json!({"value": "loaded", "args": args})
        } else if st.failed.is_some() {
            json!({"value": "unloaded", "args": args, "failed": true, "exit_code": 1})
        } else {
            json!({"value": "unloaded", "args": args})
        }
    });
    Json(json!({"object": "list", "data": [{
        "id": eng.opts.model, "object": "model", "owned_by": "llamacpp", "created": now_unix(),
        "in_cache": true, "path": format!("/models/{}.gguf", eng.opts.model), "status": status,
    }]}))
    .into_response()
}

/// `POST /models/load {"model"}`: starts loading and answers at once; a load that runs out of memory
/// shows in `GET /models` as `unloaded`, `failed`, `exit_code` 1.
async fn llamacpp_load(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    if body["model"].as_str() != Some(eng.opts.model.as_str()) {
        return llama_error(404, "model is not found", "not_found_error");
    }
    let start = eng.update(|st| {
        if st.resident() {
            Err(())
        } else if st.acquiring {
            Ok(false)
        } else {
            st.acquiring = true;
            st.failed = None;
            Ok(true)
        }
    });
    match start {
        Err(()) => llama_error(400, "model is already loaded", "invalid_request_error"),
        Ok(start) => {
            if start {
                let eng = eng.clone();
                tokio::spawn(async move {
                    let _ = eng.acquire(Parts::ALL).await;
                });
            }
            Json(json!({"success": true})).into_response()
        }
    }
}

/// `POST /models/unload {"model"}`: stops the instance (in-flight requests end) and answers at once;
/// the memory goes when the instance has exited, `sleep_time` later.
async fn llamacpp_unload(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    if body["model"].as_str() != Some(eng.opts.model.as_str()) {
        return llama_error(400, "model is not found", "invalid_request_error");
    }
    if eng.read(|st| st.release_pending) {
        return Json(json!({"success": true})).into_response();
    }
    if !eng.read(|st| st.resident() && !st.acquiring) {
        return llama_error(400, "model is not loaded", "invalid_request_error");
    }
    let task = tokio::spawn(async move {
        let guard = eng.op_lock().await;
        if eng.read(|st| st.weights || st.kv) {
            eng.update(|st| {
                st.paused = true;
                st.abort_epoch += 1;
            });
            eng.spawn_release(guard, Parts::ALL, false);
        }
    });
    let _ = task.await;
    Json(json!({"success": true})).into_response()
}

// ---------------------------------------------------------------------------------------------
// Triton (explicit model control)
// ---------------------------------------------------------------------------------------------

fn triton_router() -> Router<Shared> {
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2", get(triton_server_metadata))
        .route("/v2/models/{m}/ready", get(triton_model_ready))
        .route("/v2/models/{m}/infer", post(triton_infer))
        .route("/v2/repository/index", post(triton_index))
        .route("/v2/repository/models/{m}/load", post(triton_load))
        .route("/v2/repository/models/{m}/unload", post(triton_unload))
}

fn triton_error(message: String) -> Response {
    error400(json!({"error": message}))
}

async fn triton_server_metadata() -> Response {
    Json(json!({"name": "triton", "version": "2.0.0-fake", "extensions": ["model_repository"]}))
        .into_response()
}

async fn triton_model_ready(State(eng): State<Shared>, Path(m): Path<String>) -> StatusCode {
    if m == eng.opts.model && eng.read(St::serving) {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// `POST /v2/repository/index {"ready": bool}`: the model with its state.
async fn triton_index(State(eng): State<Shared>, body: Bytes) -> Response {
    let only_ready = parse_body(&body)["ready"].as_bool().unwrap_or(false);
    let m = &eng.opts.model;
    let entry = eng.read(|st| {
        let (state, reason) = if st.acquiring {
            ("LOADING", String::new())
        } else if st.resident() && !st.paused && !st.releasing {
            ("READY", String::new())
        } else if st.resident() {
            ("UNLOADING", String::new())
        } else if let Some(failed) = &st.failed {
            ("UNAVAILABLE", failed.clone())
        } else if st.ever_loaded {
            ("UNAVAILABLE", "unloaded".to_string())
        } else {
            return json!({"name": m});
        };
        json!({"name": m, "version": "1", "state": state, "reason": reason})
    });
    let ready = entry["state"] == "READY";
    let index = if only_ready && !ready {
        vec![]
    } else {
        vec![entry]
    };
    Json(Value::Array(index)).into_response()
}

/// `POST /v2/repository/models/M/load`: answers once loaded, 400 on an OOM.
async fn triton_load(State(eng): State<Shared>, Path(m): Path<String>) -> Response {
    if m != eng.opts.model {
        return triton_error(format!(
            "failed to load '{m}', failed to poll from model repository"
        ));
    }
    match eng.acquire(Parts::ALL).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(line) => triton_error(format!("failed to load '{m}', {line}")),
    }
}

/// `POST /v2/repository/models/M/unload`: answers at once, "does not wait for the requested model to
/// be fully unloaded": the memory goes once in-flight requests end, `sleep_time` later.
async fn triton_unload(State(eng): State<Shared>, Path(m): Path<String>) -> Response {
    if m == eng.opts.model {
        let task = tokio::spawn(async move {
            let guard = eng.op_lock().await;
            if eng.read(|st| st.weights || st.kv) {
                eng.update(|st| st.paused = true);
                eng.spawn_release(guard, Parts::ALL, true);
            }
        });
        let _ = task.await;
    }
    StatusCode::OK.into_response()
}

/// `POST /v2/models/M/infer`: answers after the `chunks` tokens, the text in a BYTES output.
async fn triton_infer(State(eng): State<Shared>, Path(m): Path<String>) -> Response {
    if m != eng.opts.model {
        return triton_error(format!("Request for unknown model: '{m}' is not found"));
    }
    let Some(adm) = eng.admit() else {
        return eng.refusal();
    };
    let (ok, n) = generate(&adm).await;
    if !ok {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "the request was cancelled: the model was unloaded"})),
        )
            .into_response();
    }
    adm.served();
    let text: String = (0..n).map(token).collect();
    Json(json!({
        "model_name": m, "model_version": "1",
        "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [1], "data": [text]}],
    }))
    .into_response()
}
