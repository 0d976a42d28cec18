//! The fake GPU: a memory ledger with a capacity that every fake engine allocates from, and its HTTP
//! API for engines in other processes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use super::{error400, lock, parse_body, Server};

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

pub(super) struct Ledger {
    capacity_mb: u64,
    state: Mutex<LedgerState>,
}

impl Ledger {
    pub(super) fn alloc(&self, engine: &str, mb: u64, pid: Option<u32>) -> Result<u64, String> {
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
    pub(super) fn free(&self, engine: &str, mb: Option<u64>) -> u64 {
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

    pub(super) fn holding(&self, engine: &str) -> u64 {
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
    pub(super) ledger: Arc<Ledger>,
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
