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
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

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
