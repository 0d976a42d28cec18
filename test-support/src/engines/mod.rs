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
//! code and docs, checked as cited on each [`Kind`]; where a fake departs from the real engine, the
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
//!
//! Where each part lies: the GPU ([`FakeGpu`], in `gpu`), the options (`options`), the engine's state and its operations on memory (`state`), the handle a test holds
//! ([`FakeEngine`], in `engine`), the inference requests (`infer`, their answers rendered in
//! `format`), and here the HTTP server each runs on; each kind's own API is in a file of its own
//! (`vllm`, `sglang`, `ollama`, `llamacpp`, `triton`).

mod engine;
mod format;
mod gpu;
mod infer;
mod llamacpp;
mod ollama;
mod options;
mod sglang;
mod state;
mod triton;
mod vllm;

pub use engine::FakeEngine;
pub use gpu::{FakeGpu, GpuEvent};
pub use options::{FakeEngineOptions, Kind};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;
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

fn parse_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

fn error400(body: Value) -> Response {
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}
