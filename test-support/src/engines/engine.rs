//! [`FakeEngine`]: a fake engine started on a free port of loopback, and what a test reads of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::state::{Engine, Shared, St};
use super::{llamacpp, ollama, sglang, triton, vllm};
use super::{FakeEngineOptions, FakeGpu, Kind, Server};

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
            Kind::Vllm => vllm::vllm_router(),
            Kind::Sglang => sglang::sglang_router(),
            Kind::Ollama => ollama::ollama_router(),
            Kind::Llamacpp => llamacpp::llamacpp_router(),
            Kind::Triton => triton::triton_router(),
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
