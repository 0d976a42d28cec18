//! `[nodes]` (the coordinator: where its GPUs come from) and `[agent]` (a node agent: the host it
//! speaks for).

use serde::{Deserialize, Serialize};

/// `[nodes]`: whether node agents report the GPUs, one per host, rather than this coordinator's own
/// NVML and `[[gpus]]` (one box, the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// `nodes.agents`, default false: the GPUs are those that `gpu-coordinator agent` processes
    /// report on `<prefix>.node.<host>`, named `<host>/<id>`.
    pub agents: bool,
    /// `nodes.ttl_ms`, default 5000: a host whose agent is silent this long takes no new grants
    /// (its holders keep their leases until they end). At least three of the agents' samples.
    pub ttl_ms: u64,
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            agents: false,
            ttl_ms: 5_000,
        }
    }
}

/// `[agent]`: what `gpu-coordinator agent` says of its host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// `agent.host`: the host's name on the bus and in GPU ids (`<host>/<id>`); default: the
    /// machine's hostname up to its first dot. 1 to 64 characters of `[A-Za-z0-9_-]`.
    pub host: Option<String>,
}

impl AgentConfig {
    /// The host's name: `agent.host`, else the machine's hostname up to its first dot, with any
    /// character a host name may not hold made `-`.
    pub fn host_name(&self) -> String {
        if let Some(host) = &self.host {
            return host.clone();
        }
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let short = raw.trim().split('.').next().unwrap_or_default();
        let name: String = short
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if name.is_empty() {
            "localhost".to_owned()
        } else {
            name
        }
    }

    /// What is wrong with `agent.host`, if anything.
    pub fn problems(&self) -> Vec<String> {
        match &self.host {
            Some(host) if !gpu_coordinator_wire::valid_host(host) => vec![format!(
                "agent.host {host:?} must be 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-` (it is \
                 a NATS subject token and the first part of GPU ids `<host>/<id>`)"
            )],
            _ => Vec::new(),
        }
    }
}

impl NodesConfig {
    /// What is wrong with `[nodes]` beside the rest of the configuration.
    pub fn problems(&self, bus_is_nats: bool, gpus_listed: bool) -> Vec<String> {
        let mut problems = Vec::new();
        if self.ttl_ms < 100 {
            problems.push(format!(
                "nodes.ttl_ms ({}) must be >= 100: agents sample at most every few hundred \
                 milliseconds",
                self.ttl_ms
            ));
        }
        if !self.agents {
            return problems;
        }
        if !bus_is_nats {
            problems.push(
                "nodes.agents = true needs backends.bus = \"nats\": the agents of the other hosts \
                 publish their samples on NATS"
                    .to_owned(),
            );
        }
        if gpus_listed {
            problems.push(
                "[[gpus]] lists this coordinator's own GPUs, but nodes.agents = true takes the GPUs \
                 from the agents: move [[gpus]] to an agent's file (it simulates GPUs there), or set \
                 nodes.agents = false"
                    .to_owned(),
            );
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BackendsConfig, Config, ConfigError, GpuConfig};

    fn problems(config: &Config) -> Vec<String> {
        match config.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(problems)) => problems,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn agents_take_the_gpus_over_nats_and_map_to_the_core() {
        let mut config = Config::default();
        config.nodes.agents = true;
        assert_eq!(problems(&config), Vec::<String>::new());
        assert_eq!(config.sched_config().host_ttl_ms, Some(5_000));
        config.nodes.agents = false;
        assert_eq!(
            config.sched_config().host_ttl_ms,
            None,
            "one box: fixed GPUs"
        );
    }

    #[test]
    fn agents_without_nats_or_beside_gpus_of_its_own_are_refused_naming_the_keys() {
        let mut config = Config::default();
        config.nodes.agents = true;
        config.backends = BackendsConfig::embedded();
        config.gpus = vec![GpuConfig {
            id: "0".into(),
            vram_mb: 1,
        }];
        config.nodes.ttl_ms = 10;
        let all = problems(&config).join("\n");
        assert!(
            all.contains("nodes.agents = true needs backends.bus = \"nats\""),
            "{all}"
        );
        assert!(all.contains("move [[gpus]] to an agent's file"), "{all}");
        assert!(all.contains("nodes.ttl_ms (10) must be >= 100"), "{all}");
    }

    #[test]
    fn an_agent_checks_its_host_and_simulated_gpus() {
        let mut config = Config::default();
        config.agent.host = Some("gpu-box.lan".into());
        config.gpus = vec![GpuConfig {
            id: "a/b".into(),
            vram_mb: 0,
        }];
        let Err(ConfigError::Invalid(problems)) = config.validate_agent() else {
            panic!("refused");
        };
        let all = problems.join("\n");
        assert!(all.contains("agent.host \"gpu-box.lan\""), "{all}");
        assert!(all.contains("gpus[0].id \"a/b\""), "{all}");
        assert!(all.contains("gpus[0].vram_mb must be > 0"), "{all}");
        config.agent.host = Some("box-1".into());
        config.gpus[0] = GpuConfig {
            id: "0".into(),
            vram_mb: 24_000,
        };
        assert!(config.validate_agent().is_ok());
        assert_eq!(config.agent.host_name(), "box-1");
    }

    #[test]
    fn the_default_host_is_the_short_hostname_as_a_subject_token() {
        let name = super::AgentConfig::default().host_name();
        assert!(gpu_coordinator_wire::valid_host(&name), "{name}");
        assert!(!name.contains('.'), "{name}");
    }
}
