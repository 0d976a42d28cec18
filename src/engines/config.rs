//! `[[engines]]` and `[sidecar]`: which inference servers the sidecars stand in front of, and how each
//! is put to sleep and woken. Checked at start with the rest of the configuration ([`check`]), so that
//! a wrong key stops the start with a message naming it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The inference server behind a sidecar, and so the switch that puts it to sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// vLLM started with `--enable-sleep-mode` (and `VLLM_SERVER_DEV_MODE=1`): `/sleep`, `/wake_up`.
    Vllm,
    /// SGLang started with `--enable-memory-saver`: `/release_memory_occupation`, `/resume_…`.
    Sglang,
    /// Ollama: one model unloaded (`keep_alive: 0`) and loaded (`keep_alive: -1`).
    Ollama,
    /// llama.cpp's `llama-server` in router mode: `/models/unload`, `/models/load`.
    Llamacpp,
    /// Triton with `--model-control-mode=explicit`: the repository's `unload` and `load`.
    Triton,
    /// Any engine with a command that puts it to sleep and one that wakes it.
    Command,
    /// Any process: started on a grant, stopped (SIGTERM, then SIGKILL) to free the GPU.
    Process,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Ollama => "ollama",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Triton => "triton",
            EngineKind::Command => "command",
            EngineKind::Process => "process",
        }
    }
}

/// When the sidecar wants the GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Want {
    /// When a request comes; the engine sleeps and the lease is released after `idle_ms` without one.
    #[default]
    OnRequest,
    /// Always: asked for at start and held whenever granted (a background worker).
    Always,
}

/// One `[[engines]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// The service id the sidecar asks as.
    pub service: String,
    pub kind: EngineKind,
    /// The address the engine's clients call now (`host:port`): the sidecar listens there.
    pub listen: String,
    /// The engine's own base URL (`http://127.0.0.1:8001`), where the sidecar forwards to.
    pub upstream: String,
    /// The priority of its requests (0 most urgent). Required.
    pub priority: Option<u8>,
    /// The VRAM it needs, in MB; absent: the whole GPU.
    pub vram_mb: Option<u64>,
    /// The GPU id to ask for; absent: any that fits.
    pub gpu: Option<String>,
    /// The lease length; absent: the coordinator's `lease.default_ms`.
    pub lease_ms: Option<u64>,
    #[serde(default)]
    pub want: Want,
    /// How long without a request before the engine is put to sleep and the lease released.
    #[serde(default = "defaults::idle_ms")]
    pub idle_ms: u64,
    /// How long a request waits in the sidecar for the GPU before it gets 503 with `Retry-After`.
    #[serde(default = "defaults::max_wait_ms")]
    pub max_wait_ms: u64,
    /// After a pause order, how long requests in flight may take before they are cut (503). Must be
    /// below `preemption.ack_deadline_ms`.
    #[serde(default = "defaults::drain_ms")]
    pub drain_ms: u64,
    /// vllm: 1 (weights to CPU RAM) or 2 (weights dropped, reloaded on wake). Default 1.
    pub sleep_level: Option<u8>,
    /// ollama, llamacpp, triton: the model to unload and load.
    pub model: Option<String>,
    /// command: the argv that puts the engine to sleep (exit 0 once the memory is free).
    pub sleep: Option<Vec<String>>,
    /// command: the argv that wakes it (exit 0 once it can serve).
    pub wake: Option<Vec<String>>,
    /// process: the engine's command line, started on a grant and stopped on a pause.
    pub argv: Option<Vec<String>>,
    /// process: environment variables added to the engine's.
    pub env: Option<BTreeMap<String, String>>,
    /// process (and command): the path under `upstream` that answers 200 once the engine serves.
    pub ready_path: Option<String>,
    /// The bearer token of `service` for the coordinator's HTTP API; absent: the one `[http.tokens]`
    /// gives the service, if any.
    pub token: Option<String>,
    /// Not a key: the host its requests name, in a fleet (`[sidecar] host`, see
    /// [`SidecarConfig::host`]), set when its sidecar starts.
    #[serde(skip)]
    pub host: Option<String>,
}

/// `[sidecar]`: how `gpu-coordinator engines` reaches the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarConfig {
    /// The coordinator: `http://host:8080` (its HTTP API) or `nats://host:4222` (its bus, under
    /// `nats.prefix`). Absent: `nats.url`. Under `serve`, sidecars use the coordinator's own HTTP API.
    pub coordinator: Option<String>,
    /// Where `engines` serves `/gpu/engines` and `/metrics` (`host:port`); absent: nowhere.
    pub listen: Option<String>,
    /// With a coordinator whose GPUs node agents report: the host the engines run on, named in
    /// their requests (an engine with `gpu` set names its GPU instead). Absent: with
    /// `nodes.agents = true` in this file, `agent.host` (else the hostname); otherwise none.
    pub host: Option<String>,
}

mod defaults {
    pub fn idle_ms() -> u64 {
        300_000
    }
    pub fn max_wait_ms() -> u64 {
        60_000
    }
    pub fn drain_ms() -> u64 {
        2_000
    }
}

impl EngineConfig {
    /// An entry with every optional key left out and the defaults a TOML entry gets (`want =
    /// "on_request"`, `idle_ms`, `max_wait_ms`, `drain_ms`); `priority` still to be set.
    pub fn new(service: &str, kind: EngineKind, listen: &str, upstream: &str) -> EngineConfig {
        EngineConfig {
            host: None,
            service: service.to_owned(),
            kind,
            listen: listen.to_owned(),
            upstream: upstream.to_owned(),
            priority: None,
            vram_mb: None,
            gpu: None,
            lease_ms: None,
            want: Want::OnRequest,
            idle_ms: defaults::idle_ms(),
            max_wait_ms: defaults::max_wait_ms(),
            drain_ms: defaults::drain_ms(),
            sleep_level: None,
            model: None,
            sleep: None,
            wake: None,
            argv: None,
            env: None,
            ready_path: None,
            token: None,
        }
    }

    /// The argv lists and model a kind needs, the keys it does not take, and the bounds of the rest.
    /// `ack_deadline_ms` is the coordinator's (`preemption.ack_deadline_ms`).
    pub fn problems(&self, at: &str, ack_deadline_ms: u64) -> Vec<String> {
        let mut problems = Vec::new();
        self.address_problems(at, &mut problems);
        self.bound_problems(at, ack_deadline_ms, &mut problems);
        self.kind_key_problems(at, &mut problems);
        self.value_problems(at, &mut problems);
        problems
    }

    /// The service's name, the address the sidecar listens on and the engine's URL.
    fn address_problems(&self, at: &str, problems: &mut Vec<String>) {
        if !gpu_coordinator_wire::valid_service_id(&self.service) {
            problems.push(format!(
                "{at}.service {:?} must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`",
                self.service
            ));
        }
        if self.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "{at}.listen {:?} must be an address and port, like \"127.0.0.1:8000\"",
                self.listen
            ));
        }
        match reqwest::Url::parse(&self.upstream) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => problems.push(format!(
                "{at}.upstream {:?} must be the engine's base URL, like \"http://127.0.0.1:8001\"",
                self.upstream
            )),
        }
    }

    /// The priority, and the bounds of the sizes and durations.
    fn bound_problems(&self, at: &str, ack_deadline_ms: u64, problems: &mut Vec<String>) {
        if self.priority.is_none() {
            problems.push(format!(
                "{at}.priority is required (or the service's default_priority in [services]): 0 (most \
                 urgent) to 255"
            ));
        }
        if self.vram_mb == Some(0) {
            problems.push(format!("{at}.vram_mb must be > 0 (absent: the whole GPU)"));
        }
        if self.lease_ms == Some(0) {
            problems.push(format!("{at}.lease_ms must be > 0"));
        }
        if self.idle_ms == 0 {
            problems.push(format!("{at}.idle_ms must be > 0"));
        }
        if self.max_wait_ms == 0 {
            problems.push(format!("{at}.max_wait_ms must be > 0"));
        }
        if self.drain_ms >= ack_deadline_ms {
            problems.push(format!(
                "{at}.drain_ms ({}) must be below preemption.ack_deadline_ms ({ack_deadline_ms}): \
                 the drain and the engine's sleep must both fit before the coordinator revokes the lease",
                self.drain_ms
            ));
        }
    }

    /// The keys this kind of engine does not take, and those it needs.
    fn kind_key_problems(&self, at: &str, problems: &mut Vec<String>) {
        let kind = self.kind.as_str();
        let mut only = |key: &str, set: bool, kinds: &[EngineKind]| {
            if set && !kinds.contains(&self.kind) {
                let names: Vec<_> = kinds.iter().map(|k| format!("{:?}", k.as_str())).collect();
                problems.push(format!(
                    "{at}.{key} does not apply to kind = {kind:?} (only to {})",
                    names.join(", ")
                ));
            }
        };
        use EngineKind::*;
        only("sleep_level", self.sleep_level.is_some(), &[Vllm]);
        only("model", self.model.is_some(), &[Ollama, Llamacpp, Triton]);
        only("sleep", self.sleep.is_some(), &[Command]);
        only("wake", self.wake.is_some(), &[Command]);
        only("argv", self.argv.is_some(), &[Process]);
        only("env", self.env.is_some(), &[Process]);
        only("ready_path", self.ready_path.is_some(), &[Process, Command]);
        let mut required = |key: &str, set: bool| {
            if !set {
                problems.push(format!("{at}.{key} is required for kind = {kind:?}"));
            }
        };
        match self.kind {
            Ollama | Llamacpp | Triton => required(
                "model",
                self.model.as_deref().is_some_and(|m| !m.trim().is_empty()),
            ),
            Command => {
                required("sleep", self.sleep.as_ref().is_some_and(|a| !a.is_empty()));
                required("wake", self.wake.as_ref().is_some_and(|a| !a.is_empty()));
            }
            Process => {
                required("argv", self.argv.as_ref().is_some_and(|a| !a.is_empty()));
                required("ready_path", self.ready_path.is_some());
            }
            Vllm | Sglang => {}
        }
    }

    /// The values of `sleep_level` and `ready_path`.
    fn value_problems(&self, at: &str, problems: &mut Vec<String>) {
        if let Some(level) = self.sleep_level {
            if !matches!(level, 1 | 2) {
                problems.push(format!("{at}.sleep_level must be 1 or 2, got {level}"));
            }
        }
        if let Some(path) = &self.ready_path {
            if !path.starts_with('/') {
                problems.push(format!("{at}.ready_path {path:?} must start with `/`"));
            }
        }
    }
}

/// Every problem of `[[engines]]`: each entry's, and listen addresses or services used twice.
pub fn check(engines: &[EngineConfig], ack_deadline_ms: u64) -> Vec<String> {
    let mut problems = Vec::new();
    let mut listens = std::collections::HashSet::new();
    let mut services = std::collections::HashSet::new();
    for (i, engine) in engines.iter().enumerate() {
        let at = format!("engines[{i}]");
        problems.extend(engine.problems(&at, ack_deadline_ms));
        if !listens.insert(engine.listen.as_str()) {
            problems.push(format!("{at}.listen {:?} is used twice", engine.listen));
        }
        if !services.insert(engine.service.as_str()) {
            problems.push(format!(
                "{at}.service {:?} is used twice: one sidecar per service (its leases are the \
                 engine's)",
                engine.service
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(kind: EngineKind) -> EngineConfig {
        EngineConfig {
            priority: Some(0),
            vram_mb: Some(16_000),
            ..EngineConfig::new("chat", kind, "127.0.0.1:8000", "http://127.0.0.1:8001")
        }
    }

    #[test]
    fn a_vllm_engine_needs_nothing_more() {
        assert_eq!(
            check(&[engine(EngineKind::Vllm)], 10_000),
            Vec::<String>::new()
        );
    }

    #[test]
    fn keys_of_another_kind_and_missing_ones_are_named() {
        let mut ollama = engine(EngineKind::Ollama);
        ollama.sleep_level = Some(1);
        let problems = check(&[ollama], 10_000);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("engines[0].sleep_level does not apply")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("engines[0].model is required")),
            "{problems:?}"
        );
    }

    #[test]
    fn the_drain_must_fit_in_the_ack_deadline() {
        let mut vllm = engine(EngineKind::Vllm);
        vllm.drain_ms = 10_000;
        let problems = check(&[vllm], 10_000);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("engines[0].drain_ms (10000) must be below")),
            "{problems:?}"
        );
    }

    #[test]
    fn two_sidecars_for_one_service_are_refused() {
        let mut second = engine(EngineKind::Vllm);
        second.listen = "127.0.0.1:8002".into();
        let problems = check(&[engine(EngineKind::Vllm), second], 10_000);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("engines[1].service \"chat\" is used twice")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_process_needs_its_argv_and_ready_path() {
        let problems = check(&[engine(EngineKind::Process)], 10_000);
        assert!(problems
            .iter()
            .any(|p| p.contains("engines[0].argv is required")));
        assert!(problems
            .iter()
            .any(|p| p.contains("engines[0].ready_path is required")));
    }
}
