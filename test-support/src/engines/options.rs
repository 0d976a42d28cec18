//! Which real engine a fake plays ([`Kind`], with what was checked of each engine's API) and how it
//! behaves ([`FakeEngineOptions`]).

use std::time::Duration;

#[cfg(doc)]
use super::FakeEngine;

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

    pub(super) fn weights(&self) -> u64 {
        self.weights_mb.min(self.vram_mb)
    }

    pub(super) fn kv(&self) -> u64 {
        self.vram_mb - self.weights()
    }
}
