//! Configuration: one typed struct, from defaults, then a TOML file (`--config`), then environment
//! variables `GPU_COORDINATOR_*` (nesting with `__`, e.g. `GPU_COORDINATOR_NATS__URL`). Passed explicitly,
//! never global.
//!
//! [`Config::load`] merges the three layers and then validates the result, so that a mistake is reported
//! at start, naming the key (and the file or variable it came from), rather than surfacing later as a
//! confusing failure. This module reads no sockets and decides nothing about scheduling.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod backends;
mod describe;
mod gpus;
mod http;
mod nodes;
mod scheduling;
mod servers;
mod services;
mod validate;

pub use backends::{
    BackendsConfig, BusBackend, EmbeddedConfig, JournalBackend, LeaderConfig, LeasesBackend,
};
pub use gpus::{GpuConfig, NvmlConfig};
pub use http::HttpConfig;
pub use nodes::{AgentConfig, NodesConfig};
pub use scheduling::{LeaseConfig, PreemptionConfig, QueueConfig, RequestConfig};
pub use servers::{DatabaseConfig, NatsConfig, RedisConfig, DEFAULT_STREAM_BYTES, MAX_REPLICAS};
pub use services::{ServiceConfig, ServicesConfig};

/// The prefix of the environment variables that override the file, e.g. `GPU_COORDINATOR_NATS__URL`.
pub const ENV_PREFIX: &str = "GPU_COORDINATOR_";

/// The separator of nested keys in environment variables: `GPU_COORDINATOR_LEASE__DEFAULT_MS` is
/// `lease.default_ms`. Two underscores, because key names themselves contain one.
pub const ENV_SPLIT: &str = "__";

/// The `[http.tokens]` value of an operator's token.
pub const OPERATOR: &str = "*";

/// The whole configuration. Every section's `Default` holds the documented defaults. Its `Debug` hides
/// the secrets (URL passwords, `[http.tokens]`), so that it can be logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub database: DatabaseConfig,
    pub lease: LeaseConfig,
    pub preemption: PreemptionConfig,
    pub request: RequestConfig,
    pub queue: QueueConfig,
    pub http: HttpConfig,
    pub nvml: NvmlConfig,
    pub leader: LeaderConfig,
    pub backends: BackendsConfig,
    pub embedded: EmbeddedConfig,
    /// The GPUs to manage. Empty: ask NVML; when it finds none, one GPU `0` of 24576 MB.
    pub gpus: Vec<GpuConfig>,
    /// The inference engines whose sidecars run in this process (`serve`, `engines`).
    pub engines: Vec<crate::engines::EngineConfig>,
    /// How `gpu-coordinator engines` reaches the coordinator.
    pub sidecar: crate::engines::SidecarConfig,
    /// `[services]`: what each service may ask for. Read at start.
    pub services: ServicesConfig,
    /// `[nodes]`: whether node agents report the GPUs (a fleet of hosts).
    pub nodes: NodesConfig,
    /// `[agent]`: what `gpu-coordinator agent` says of its host.
    pub agent: AgentConfig,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist or is not a regular file.
    #[error("cannot read config file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A layer could not be read or does not fit the struct: bad TOML, an unknown key, a wrong type. The
    /// message names each key and the file or environment variable it came from.
    #[error("{0}")]
    Parse(String),
    /// The values were read but break a rule (one message per broken rule, each naming its key).
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Loads the configuration: the defaults, then the TOML file at `path` (which must exist when given),
    /// then the `GPU_COORDINATOR_*` environment variables; then validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, ENV_PREFIX)
    }

    /// [`Config::load`] with another environment prefix, so that tests need not touch the real one.
    fn load_with_env(path: Option<&Path>, env_prefix: &str) -> Result<Config, ConfigError> {
        let config = Self::read_with_env(path, env_prefix)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration of `gpu-coordinator agent`, read as [`Config::load`] reads the
    /// coordinator's, and checked for what an agent uses ([`Config::validate_agent`]).
    pub fn load_agent(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::read_with_env(path, ENV_PREFIX)?;
        config.validate_agent()?;
        Ok(config)
    }

    /// The defaults, the file and the environment variables under `env_prefix`, not yet validated.
    fn read_with_env(path: Option<&Path>, env_prefix: &str) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            // `Toml::file` silently skips a missing file; a path given explicitly must be there.
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(ConfigError::File {
                        path: path.to_owned(),
                        source: std::io::Error::other("not a regular file"),
                    })
                }
                Err(source) => {
                    return Err(ConfigError::File {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // `GPU_COORDINATOR_TOKEN` is the `status --http` command's bearer token, not a configuration key.
        figment = figment.merge(
            Env::prefixed(env_prefix)
                .ignore(&["TOKEN"])
                .split(ENV_SPLIT),
        );
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(describe::describe(e, env_prefix)))?;
        // `redis.url` has a default, so only the layers tell whether it was set: the defaults' layer
        // has its source in the code.
        let url_given = figment
            .find_metadata("redis.url")
            .is_some_and(|layer| !matches!(layer.source, Some(figment::Source::Code(_))));
        if url_given && !config.redis.sentinels.is_empty() {
            return Err(ConfigError::Invalid(vec![
                "redis.url and redis.sentinels are both set: give redis.url for one Redis, or \
                 redis.sentinels with redis.master for a master that Sentinel fails over, not both"
                    .to_owned(),
            ]));
        }
        config.engines_take_service_defaults();
        Ok(config)
    }

    /// What an `[[engines]]` entry leaves out (`priority`, `vram_mb`, `lease_ms`), its service's
    /// section gives (`default_priority`, `default_vram_mb`, `default_lease_ms`, or
    /// `[services.default]`'s).
    pub fn engines_take_service_defaults(&mut self) {
        let policies = self.services.policies();
        for engine in &mut self.engines {
            let Some(policy) = policies.get(&engine.service) else {
                continue;
            };
            engine.priority = engine.priority.or(policy.default_priority);
            engine.vram_mb = engine.vram_mb.or(policy.default_vram_mb);
            engine.lease_ms = engine.lease_ms.or(policy.default_lease_ms);
        }
    }

    /// The scheduler's options, from the `lease`, `preemption`, `request` and `queue` keys.
    pub fn sched_config(&self) -> gpu_coordinator_core::SchedConfig {
        gpu_coordinator_core::SchedConfig {
            host_ttl_ms: self.nodes.agents.then_some(self.nodes.ttl_ms),
            lease_default_ms: self.lease.default_ms,
            lease_max_ms: self.lease.max_ms,
            ack_deadline_ms: self.preemption.ack_deadline_ms,
            min_hold_ms: self.preemption.min_hold_ms,
            default_timeout_ms: self.request.default_timeout_ms,
            aging_ms: self.queue.aging_ms,
            retain_ended: self.queue.retain_ended,
            max_per_service: self.queue.max_per_service,
            // Set by the driver from `nvml.settle_ms` once it knows NVML is there.
            settle_ms: 0,
            services: self.services.policies(),
        }
    }
}

#[cfg(test)]
mod tests;
