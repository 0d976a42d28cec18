//! The configuration's tests, by topic; the helpers that load a TOML text under an environment
//! prefix of its own are here.

use super::*;
use std::io::Write as _;

mod load;
mod rules;
mod servers;
mod services;

/// Each test reads the environment under a prefix of its own, so tests run in parallel and the real
/// `GPU_COORDINATOR_*` variables of the machine running them do not leak in.
fn prefix(test: &str) -> String {
    format!("GPU_COORDINATOR_TEST_{}_", test.to_ascii_uppercase())
}

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("a temporary file can be created");
    file.write_all(text.as_bytes())
        .expect("a temporary file can be written");
    file
}

fn load_str(text: &str, test: &str) -> Result<Config, ConfigError> {
    let file = toml_file(text);
    Config::load_with_env(Some(file.path()), &prefix(test))
}

fn invalid(text: &str, test: &str) -> String {
    match load_str(text, test) {
        Err(e @ ConfigError::Invalid(_)) => e.to_string(),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

fn parse_error(text: &str, test: &str) -> String {
    match load_str(text, test) {
        Err(e @ ConfigError::Parse(_)) => e.to_string(),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn defaults_without_file_or_env() {
    let config = Config::load_with_env(None, &prefix("defaults")).expect("defaults are valid");
    assert_eq!(config, Config::default());
    assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(config.nats.prefix, "gpu");
    assert_eq!(config.nats.max_age_ms, 604_800_000);
    assert_eq!(config.redis.url, "redis://127.0.0.1:6379");
    assert_eq!(config.redis.key_prefix, "gpu");
    assert_eq!(
        config.database.url,
        "postgres://postgres@127.0.0.1:5432/gpu_coordinator"
    );
    assert_eq!(config.http.listen, "127.0.0.1:8080");
    assert!(config.http.tokens.is_empty());
    assert_eq!(config.http.header_read_timeout_ms, 10_000);
    assert_eq!(config.http.max_connections, 1024);
    assert!(config.nvml.enabled);
    assert_eq!((config.nvml.sample_ms, config.nvml.settle_ms), (1000, 2000));
    assert!(config.gpus.is_empty());
}

#[test]
fn sched_config_maps_the_keys() {
    assert_eq!(
        Config::default().sched_config(),
        gpu_coordinator_core::SchedConfig::default()
    );
    let config = load_str(
        "[lease]\ndefault_ms = 1\nmax_ms = 2\n[preemption]\nack_deadline_ms = 3\nmin_hold_ms = 4\n\
         [request]\ndefault_timeout_ms = 5\n[queue]\naging_ms = 6\nretain_ended = 7\nmax_per_service = 8\n",
        "sched",
    )
    .expect("valid");
    assert_eq!(
        config.sched_config(),
        gpu_coordinator_core::SchedConfig {
            host_ttl_ms: None,
            lease_default_ms: 1,
            lease_max_ms: 2,
            ack_deadline_ms: 3,
            min_hold_ms: 4,
            default_timeout_ms: 5,
            aging_ms: 6,
            retain_ended: 7,
            settle_ms: 0,
            max_per_service: 8,
            services: Default::default(),
        }
    );
}

#[test]
fn example_file_equals_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let config = Config::load_with_env(Some(&path), &prefix("example")).expect("the example loads");
    assert_eq!(config, Config::default());
}

#[test]
fn example_file_gpus_parse_when_uncommented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let text = std::fs::read_to_string(path).expect("the example is readable");
    let uncommented: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with("[[gpus]]")
                    || rest.starts_with("id =")
                    || rest.starts_with("vram_mb =") =>
            {
                rest
            }
            _ => line,
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let config = load_str(&uncommented, "examplegpus").expect("the uncommented example loads");
    assert_eq!(config.gpus.len(), 2);
}
