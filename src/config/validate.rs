//! The rules that the types alone do not enforce, each broken one reported naming its key.

use std::collections::HashSet;
use std::net::SocketAddr;

use super::{BusBackend, Config, ConfigError, JournalBackend, MAX_REPLICAS, OPERATOR};

impl Config {
    /// Checks the rules that the types alone do not enforce.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.check_servers(&mut problems);
        self.check_bounds(&mut problems);
        self.check_http(&mut problems);
        self.check_backends(&mut problems);
        self.check_gpus_and_engines(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The servers' addresses: present, and parsed here, once (a URL that cannot be parsed would
    /// otherwise be retried for ever as a server that does not answer).
    fn check_servers(&self, problems: &mut Vec<String>) {
        let mut non_empty = |key: &str, value: &str| {
            if value.trim().is_empty() {
                problems.push(format!("{key} must not be empty"));
            }
        };
        non_empty("nats.url", &self.nats.url);
        non_empty("redis.url", &self.redis.url);
        non_empty("redis.key_prefix", &self.redis.key_prefix);
        non_empty("database.url", &self.database.url);
        problems.extend(self.redis.sentinel_problems());

        if !self.nats.url.trim().is_empty() {
            // Parsed here, once: a URL that cannot be parsed would otherwise be retried for ever as
            // a server that does not answer.
            if let Err(why) = gpu_coordinator_client::server_addrs(&self.nats.url) {
                problems.push(format!(
                    "nats.url: {why} (expected e.g. \"nats://127.0.0.1:4222\", or several servers \
                     separated by commas: \"nats://n1:4222,nats://n2:4222\")"
                ));
            }
        }
        if !self.database.url.trim().is_empty() {
            // Parsed here, once, as for `nats.url`.
            if let Err(why) = crate::urls::postgres_hosts(&self.database.url) {
                problems.push(format!(
                    "database.url: {why} (expected e.g. \"postgres://user@host:5432/database\", or a \
                     primary and its standbys separated by commas: \
                     \"postgres://user@h1:5432,h2:5432/database\")"
                ));
            }
        }
        if !(1..=MAX_REPLICAS).contains(&self.nats.replicas) {
            problems.push(format!(
                "nats.replicas ({}) must be 1 to {MAX_REPLICAS} (JetStream keeps at most \
                 {MAX_REPLICAS} copies of a stream)",
                self.nats.replicas
            ));
        }
    }

    /// The bounds of the streams, leases, queue and requests.
    fn check_bounds(&self, problems: &mut Vec<String>) {
        if let Err(why) = gpu_coordinator_wire::Subjects::new(&self.nats.prefix) {
            problems.push(format!("nats.prefix {:?}: {why}", self.nats.prefix));
        }
        if self.nats.max_age_ms == 0 {
            problems.push("nats.max_age_ms must be > 0".to_owned());
        }
        if self.nats.max_bytes != -1 && self.nats.max_bytes < 1 << 20 {
            problems.push(
                "nats.max_bytes must be -1 (no limit) or at least 1048576 (1 MiB)".to_owned(),
            );
        }
        if self.embedded.max_bytes < 1 << 20 {
            problems.push("embedded.max_bytes must be at least 1048576 (1 MiB)".to_owned());
        }
        if self.nats.max_msgs < 1000 {
            problems.push("nats.max_msgs must be at least 1000".to_owned());
        }
        if self.nats.max_msg_size < 4096 {
            problems.push("nats.max_msg_size must be at least 4096 bytes".to_owned());
        }
        if self.lease.default_ms == 0 {
            problems.push("lease.default_ms must be > 0".to_owned());
        }
        if self.lease.max_ms < self.lease.default_ms {
            problems.push(format!(
                "lease.max_ms ({}) must be >= lease.default_ms ({})",
                self.lease.max_ms, self.lease.default_ms
            ));
        }
        if self.preemption.ack_deadline_ms == 0 {
            problems.push("preemption.ack_deadline_ms must be > 0".to_owned());
        }
        if self.http.max_wait_ms == 0 {
            problems.push("http.max_wait_ms must be > 0".to_owned());
        }
        if self.http.max_streams_per_service == 0 || self.http.max_streams == 0 {
            problems
                .push("http.max_streams and http.max_streams_per_service must be > 0".to_owned());
        }
        if self.http.max_body_bytes < 1024 {
            problems.push("http.max_body_bytes must be at least 1024".to_owned());
        }
        if self.http.header_read_timeout_ms == 0 {
            problems.push("http.header_read_timeout_ms must be > 0".to_owned());
        }
        if self.http.max_connections == 0 {
            problems.push("http.max_connections must be > 0".to_owned());
        }
        if self.queue.status_limit > 1_000 {
            problems.push("queue.status_limit must be at most 1000".to_owned());
        }
        if self.queue.max_per_service == 0 {
            problems.push("queue.max_per_service must be > 0".to_owned());
        }
        if self.request.default_timeout_ms == 0 {
            problems.push("request.default_timeout_ms must be > 0".to_owned());
        }
    }

    /// The HTTP API: its address and its tokens.
    fn check_http(&self, problems: &mut Vec<String>) {
        if self.http.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen {:?} is not a socket address (expected e.g. \"127.0.0.1:8080\")",
                self.http.listen
            ));
        }
        for (token, service) in &self.http.tokens {
            if token.is_empty() {
                problems.push("http.tokens has an empty token".to_owned());
            }
            if service != OPERATOR && !gpu_coordinator_wire::subjects::valid_service_id(service) {
                problems.push(format!(
                    "http.tokens: the service id {service:?} must be 1-64 characters of [A-Za-z0-9_-], \
                     or \"*\" for an operator (reads everything, acts for no service)"
                ));
            }
        }
    }

    /// Leadership, the backends and the mixes of them that hold on one box only, and NVML.
    fn check_backends(&self, problems: &mut Vec<String>) {
        if self.leader.ttl_ms < 100 {
            problems.push(format!(
                "leader.ttl_ms ({}) must be >= 100: the leader renews every third of it",
                self.leader.ttl_ms
            ));
        }
        if self.database.write_behind
            && (self.backends.journal != JournalBackend::Postgres
                || self.backends.bus != BusBackend::Nats)
        {
            problems.push(
                "database.write_behind needs backends.journal = \"postgres\" and backends.bus = \"nats\" \
                 (the batches wait in a JetStream stream until Postgres has them)"
                    .to_owned(),
            );
        }
        let shared = self.backends.one_box_only();
        if !shared.is_empty() && !self.backends.one_box {
            problems.push(format!(
                "backends.journal = \"sqlite\" with {} is for one box only: the SQLite journal's \
                 leadership is the lock on a local data directory, so a coordinator on a second box \
                 would lead as well and grant the same GPUs twice. Set backends.one_box = true if one \
                 box runs this deployment, or use backends.journal = \"postgres\" for several",
                shared.join(" and ")
            ));
        }
        if self.leader.poll_ms == 0 {
            problems.push("leader.poll_ms must be > 0".to_owned());
        }
        if self.nvml.enabled && self.nvml.sample_ms == 0 {
            problems.push("nvml.sample_ms must be > 0 when nvml.enabled is true".to_owned());
        }
        problems.extend(
            self.nodes
                .problems(self.backends.bus == BusBackend::Nats, !self.gpus.is_empty()),
        );
    }

    /// Checks what `gpu-coordinator agent` reads: `[nats]`, `[nvml]`, `[[gpus]]` and `[agent]`.
    pub fn validate_agent(&self) -> Result<(), ConfigError> {
        let mut problems = self.agent.problems();
        if self.nvml.sample_ms == 0 {
            problems
                .push("nvml.sample_ms must be > 0: it is how often the agent reports".to_owned());
        }
        for (i, gpu) in self.gpus.iter().enumerate() {
            if !gpu_coordinator_wire::node::valid_node_gpu_id(&gpu.id) {
                problems.push(format!(
                    "gpus[{i}].id {:?} must be 1 to 32 characters of A-Z, a-z, 0-9, `_`, `-`, `:` \
                     and `.` (the GPU is named `<host>/<id>`)",
                    gpu.id
                ));
            }
            if gpu.vram_mb == 0 {
                problems.push(format!("gpus[{i}].vram_mb must be > 0"));
            }
        }
        if self.nats.url.trim().is_empty() {
            problems.push("nats.url must not be empty".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The GPUs, the engines, the services' sections, and engines whose service would reject them.
    fn check_gpus_and_engines(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        for (i, gpu) in self.gpus.iter().enumerate() {
            if gpu.id.trim().is_empty() {
                problems.push(format!("gpus[{i}].id must not be empty"));
            } else if !seen.insert(gpu.id.as_str()) {
                problems.push(format!("gpus[{i}].id {:?} is used twice", gpu.id));
            }
            if gpu.vram_mb == 0 {
                problems.push(format!("gpus[{i}].vram_mb must be > 0"));
            }
        }
        problems.extend(crate::engines::config::check(
            &self.engines,
            self.preemption.ack_deadline_ms,
        ));
        problems.extend(self.services.check(self.lease.max_ms, &self.gpus));
        // An engine's requests must pass its service's limits, or its sidecar could never serve.
        let policies = self.services.policies();
        for (i, engine) in self.engines.iter().enumerate() {
            let Some(policy) = policies.get(&engine.service) else {
                problems.push(format!(
                    "engines[{i}].service {:?} has no [services.{}] section and \
                     services.allow_unknown is false: its requests would be rejected",
                    engine.service, engine.service
                ));
                continue;
            };
            if let (Some(priority), Some(max)) = (engine.priority, policy.max_priority) {
                if priority < max && !policy.clamp_priority {
                    let section = if self.services.named.contains_key(&engine.service) {
                        engine.service.as_str()
                    } else {
                        "default"
                    };
                    problems.push(format!(
                        "engines[{i}].priority ({priority}) is more urgent than \
                         services.{section}.max_priority ({max}): its requests would be rejected"
                    ));
                }
            }
        }
        if let Some(listen) = &self.sidecar.listen {
            if listen.parse::<SocketAddr>().is_err() {
                problems.push(format!(
                    "sidecar.listen {listen:?} must be an address and port, like \"127.0.0.1:9090\""
                ));
            }
        }
    }
}
