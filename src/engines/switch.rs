//! Each kind of engine's switch: how it is put to sleep, how that is confirmed, how it is woken and
//! how the sidecar knows it serves again. The engines' own APIs, as their docs and code give them
//! (`shared/engines.md` lists them with their quirks):
//!
//! | kind | sleep | confirmed by | wake | serving when |
//! |---|---|---|---|---|
//! | vllm | `POST /sleep?level=L` | `GET /is_sleeping` is `true` | `POST /wake_up` (level 2: `?tags=weights`, `POST /collective_rpc {"method":"reload_weights"}`, `?tags=kv_cache`, `POST /reset_prefix_cache`) | `/is_sleeping` is `false` |
//! | sglang | `POST /release_memory_occupation` | the call's answer (NVML's settle check, when on) | `POST /resume_memory_occupation` | `GET /health` |
//! | ollama | `POST /api/generate {"model":M,"keep_alive":0}` | `GET /api/ps` lists no `M` | `POST /api/generate {"model":M,"keep_alive":-1}` | `/api/ps` lists `M` |
//! | llamacpp | `POST /models/unload {"model":M}` | `GET /models`: `M` is not `loaded` | `POST /models/load {"model":M}` | `M` is `loaded` |
//! | triton | `POST /v2/repository/models/M/unload` | `POST /v2/repository/index`: `M` is not `READY` | `.../M/load` | `M` is `READY` |
//! | command | the `sleep` argv exits 0 | its exit | the `wake` argv exits 0 | `ready_path` answers 200 (if set) |
//! | process | SIGTERM, SIGKILL after a grace | the process is gone | the `argv` is started | `ready_path` answers 200 |
//!
//! Every one of these answers before the memory is really free (vLLM's `/is_sleeping` is `true` from
//! the moment the sleep starts; SGLang's release, Ollama's unload and Triton's unload answer first):
//! the sidecar also waits, where it has NVML, for the GPU's used memory to show the engine's share
//! freed before it acknowledges a pause (`sidecar`).

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::config::{EngineConfig, EngineKind};

/// How long one call to an engine's control API may take (a level-1 sleep of a big model copies
/// its weights to host RAM: tens of seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What went wrong when talking to an engine, for the log.
pub type SwitchError = String;

/// The switch of one engine.
pub struct Switch {
    kind: EngineKind,
    http: reqwest::Client,
    upstream: String,
    level: u8,
    model: String,
    sleep_argv: Vec<String>,
    wake_argv: Vec<String>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    ready_path: Option<String>,
    /// The `process` kind's running engine.
    child: Mutex<Option<Child>>,
}

impl Switch {
    pub fn new(engine: &EngineConfig) -> Switch {
        Switch {
            kind: engine.kind,
            http: reqwest::Client::builder()
                .timeout(CALL_TIMEOUT)
                .build()
                .expect("an HTTP client without TLS always builds"),
            upstream: engine.upstream.trim_end_matches('/').to_owned(),
            level: engine.sleep_level.unwrap_or(1),
            model: engine.model.clone().unwrap_or_default(),
            sleep_argv: engine.sleep.clone().unwrap_or_default(),
            wake_argv: engine.wake.clone().unwrap_or_default(),
            argv: engine.argv.clone().unwrap_or_default(),
            env: engine.env.clone().unwrap_or_default().into_iter().collect(),
            ready_path: engine.ready_path.clone(),
            child: Mutex::new(None),
        }
    }

    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Whether the engine holds its memory now (`Ok(false)`: asleep, unloaded or stopped).
    pub async fn holds_memory(&self) -> Result<bool, SwitchError> {
        match self.kind {
            EngineKind::Vllm => Ok(!self.vllm_sleeping().await?),
            EngineKind::Ollama => self.ollama_loaded().await,
            EngineKind::Llamacpp => Ok(self.llamacpp_state().await? != "unloaded"),
            EngineKind::Triton => Ok(self.triton_state().await? != "UNAVAILABLE"),
            // No API says: an engine that answers is taken to hold its memory.
            EngineKind::Sglang => Ok(self.get_ok("/health").await),
            EngineKind::Command => Ok(match &self.ready_path {
                Some(path) => self.get_ok(path).await,
                None => true,
            }),
            EngineKind::Process => Ok(self.process_running().await),
        }
    }

    /// Starts putting the engine to sleep. Returns once the engine took the order; the memory may
    /// still be in use (see [`Switch::asleep`]).
    pub async fn sleep(&self) -> Result<(), SwitchError> {
        match self.kind {
            EngineKind::Vllm => {
                self.post(&format!("/sleep?level={}", self.level), None)
                    .await
            }
            EngineKind::Sglang => {
                // In-flight generations are retracted first: a release needs an idle engine. An
                // older SGLang without the call answers 404, which is no obstacle.
                let _ = self
                    .post("/pause_generation", Some(json!({"mode": "retract"})))
                    .await;
                self.post("/release_memory_occupation", Some(json!({})))
                    .await
            }
            EngineKind::Ollama => {
                self.post(
                    "/api/generate",
                    Some(json!({"model": self.model, "keep_alive": 0})),
                )
                .await
            }
            EngineKind::Llamacpp => {
                self.post("/models/unload", Some(json!({"model": self.model})))
                    .await
            }
            EngineKind::Triton => {
                self.post(
                    &format!("/v2/repository/models/{}/unload", self.model),
                    Some(json!({})),
                )
                .await
            }
            EngineKind::Command => run(&self.sleep_argv).await,
            EngineKind::Process => self.stop_process().await,
        }
    }

    /// Whether the sleep really finished: the memory is free by the engine's own account.
    pub async fn asleep(&self) -> Result<bool, SwitchError> {
        match self.kind {
            // The release call's answer is all SGLang says; a command's exit is its confirmation.
            EngineKind::Sglang | EngineKind::Command => Ok(true),
            _ => Ok(!self.holds_memory().await?),
        }
    }

    /// Wakes the engine: call it only once the GPU is granted (a wake before runs out of memory).
    pub async fn wake(&self) -> Result<(), SwitchError> {
        match self.kind {
            EngineKind::Vllm if self.level == 2 => {
                self.post("/wake_up?tags=weights", None).await?;
                self.post("/collective_rpc", Some(json!({"method": "reload_weights"})))
                    .await?;
                self.post("/wake_up?tags=kv_cache", None).await?;
                self.post("/reset_prefix_cache", None).await
            }
            EngineKind::Vllm => self.post("/wake_up", None).await,
            EngineKind::Sglang => {
                self.post("/resume_memory_occupation", Some(json!({})))
                    .await?;
                let _ = self.post("/continue_generation", Some(json!({}))).await;
                Ok(())
            }
            EngineKind::Ollama => {
                self.post(
                    "/api/generate",
                    Some(json!({"model": self.model, "keep_alive": -1})),
                )
                .await
            }
            EngineKind::Llamacpp => {
                self.post("/models/load", Some(json!({"model": self.model})))
                    .await
            }
            EngineKind::Triton => {
                self.post(
                    &format!("/v2/repository/models/{}/load", self.model),
                    Some(json!({})),
                )
                .await
            }
            EngineKind::Command => run(&self.wake_argv).await,
            EngineKind::Process => self.start_process().await,
        }
    }

    /// Whether the engine serves again after a wake.
    pub async fn serving(&self) -> Result<bool, SwitchError> {
        match self.kind {
            EngineKind::Vllm => Ok(!self.vllm_sleeping().await?),
            EngineKind::Ollama => self.ollama_loaded().await,
            EngineKind::Llamacpp => Ok(self.llamacpp_state().await? == "loaded"),
            EngineKind::Triton => Ok(self.triton_state().await? == "READY"),
            EngineKind::Sglang => Ok(self.get_ok("/health").await),
            EngineKind::Command | EngineKind::Process => Ok(match &self.ready_path {
                Some(path) => self.get_ok(path).await,
                None => true,
            }),
        }
    }

    async fn post(&self, path: &str, body: Option<Value>) -> Result<(), SwitchError> {
        let url = format!("{}{path}", self.upstream);
        let request = self.http.post(&url);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = response.status();
        if status.is_success() {
            // The body is read to its end, so that the call is really over (Ollama answers an unload
            // with a JSON document once the model is gone from its list).
            let _ = response.bytes().await;
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(format!(
            "POST {url}: HTTP {status}: {}",
            text.chars().take(300).collect::<String>()
        ))
    }

    async fn get_json(&self, path: &str, post: bool) -> Result<Value, SwitchError> {
        let url = format!("{}{path}", self.upstream);
        let request = if post {
            self.http.post(&url).json(&json!({}))
        } else {
            self.http.get(&url)
        };
        let response = request.send().await.map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("{url}: HTTP {status}"));
        }
        response
            .json()
            .await
            .map_err(|e| format!("{url}: not JSON: {e}"))
    }

    async fn get_ok(&self, path: &str) -> bool {
        let url = format!("{}{path}", self.upstream);
        matches!(self.http.get(&url).timeout(Duration::from_secs(5)).send().await,
            Ok(response) if response.status().is_success())
    }

    async fn vllm_sleeping(&self) -> Result<bool, SwitchError> {
        let doc = self.get_json("/is_sleeping", false).await?;
        doc.get("is_sleeping")
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("/is_sleeping answered {doc} (no boolean `is_sleeping`)"))
    }

    async fn ollama_loaded(&self) -> Result<bool, SwitchError> {
        let doc = self.get_json("/api/ps", false).await?;
        let models = doc.get("models").and_then(Value::as_array);
        Ok(models.is_some_and(|models| {
            models.iter().any(|m| {
                ["name", "model"].iter().any(|key| {
                    m.get(*key)
                        .and_then(Value::as_str)
                        .is_some_and(|name| same_ollama_model(name, &self.model))
                })
            })
        }))
    }

    /// The model's `status` in `GET /models` (`loaded`, `loading`, `unloaded`, ...); a model
    /// missing from the list is `unloaded`.
    async fn llamacpp_state(&self) -> Result<String, SwitchError> {
        let doc = self.get_json("/models", false).await?;
        let list = doc
            .get("data")
            .or_else(|| doc.get("models"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for entry in list {
            let id = ["id", "name", "model"]
                .iter()
                .find_map(|k| entry.get(*k).and_then(Value::as_str));
            if id == Some(self.model.as_str()) {
                let status = entry.get("status");
                let value = status
                    .and_then(|s| s.get("value"))
                    .or(status)
                    .and_then(Value::as_str)
                    .unwrap_or("unloaded");
                return Ok(value.to_owned());
            }
        }
        Ok("unloaded".to_owned())
    }

    /// The model's `state` in Triton's repository index (`READY`, `LOADING`, `UNLOADING`,
    /// `UNAVAILABLE`); a model missing from the index is `UNAVAILABLE`.
    async fn triton_state(&self) -> Result<String, SwitchError> {
        let doc = self.get_json("/v2/repository/index", true).await?;
        let states: Vec<&str> = doc
            .as_array()
            .map(|list| {
                list.iter()
                    .filter(|m| m.get("name").and_then(Value::as_str) == Some(&self.model))
                    .filter_map(|m| m.get("state").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        // Several versions: the model holds memory while any of them is not unavailable.
        Ok(states
            .iter()
            .find(|s| **s != "UNAVAILABLE")
            .copied()
            .unwrap_or("UNAVAILABLE")
            .to_owned())
    }

    async fn process_running(&self) -> bool {
        let mut child = self.child.lock().await;
        match child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    *child = None;
                    false
                }
            },
            None => false,
        }
    }

    async fn start_process(&self) -> Result<(), SwitchError> {
        let mut child = self.child.lock().await;
        if let Some(running) = child.as_mut() {
            if matches!(running.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| "argv is empty".to_owned())?;
        let spawned = Command::new(program)
            .args(args)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start {program:?}: {e}"))?;
        tracing::info!(pid = spawned.id(), "engine process started: {program}");
        *child = Some(spawned);
        Ok(())
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; returns once the process is gone.
    async fn stop_process(&self) -> Result<(), SwitchError> {
        let mut child = self.child.lock().await;
        let Some(mut running) = child.take() else {
            return Ok(());
        };
        if let Some(pid) = running.id() {
            // SAFETY: a plain syscall on the pid of a child this process started and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        match tokio::time::timeout(STOP_GRACE, running.wait()).await {
            Ok(status) => {
                tracing::info!("engine process stopped: {:?}", status.ok());
            }
            Err(_) => {
                tracing::warn!(
                    "engine process still running {STOP_GRACE:?} after SIGTERM; killing it"
                );
                let _ = running.kill().await;
            }
        }
        Ok(())
    }

    /// Kills the `process` engine at once (a revoke: the GPU is not this service's any more).
    pub async fn kill(&self) {
        if let Some(mut running) = self.child.lock().await.take() {
            let _ = running.kill().await;
        }
    }
}

/// Ollama names a model `llama3` or `llama3:latest`; both name the same one.
fn same_ollama_model(listed: &str, wanted: &str) -> bool {
    let tagged = |name: &str| {
        if name.contains(':') {
            name.to_owned()
        } else {
            format!("{name}:latest")
        }
    };
    tagged(listed) == tagged(wanted)
}

/// Runs a command line to its end; `Ok` when it exits 0.
async fn run(argv: &[String]) -> Result<(), SwitchError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "the command is empty".to_owned())?;
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("run {program:?}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program:?} exited with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
            .chars()
            .take(300)
            .collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_model_names_with_and_without_tag_match() {
        assert!(same_ollama_model("llama3:latest", "llama3"));
        assert!(same_ollama_model("llama3", "llama3:latest"));
        assert!(!same_ollama_model("llama3:8b", "llama3"));
    }
}
