//! What each adapter is given, built from the configuration: the adapters read no configuration, the
//! composition root (and the commands beside it: `agent`, `audit`, `status`, the sidecars) hands each
//! the few settings it needs.
//!
//! - NATS: [`NatsSettings`] from `[nats]`;
//! - NVML: the configured `[[gpus]]` ([`super::gpus::configured`]).

use std::time::Duration;

use crate::adapters::nats::{NatsSettings, StreamLimits};
use crate::config::NatsConfig;

/// `nats.url`, `nats.creds_file`, and the streams' bounds: `nats.max_age_ms`, `nats.max_bytes`,
/// `nats.max_msgs`, `nats.max_msg_size` and `nats.replicas`.
impl From<&NatsConfig> for NatsSettings {
    fn from(nats: &NatsConfig) -> Self {
        NatsSettings {
            url: nats.url.clone(),
            creds_file: nats.creds_file.clone(),
            streams: StreamLimits {
                max_age: Duration::from_millis(nats.max_age_ms),
                max_bytes: nats.max_bytes,
                max_messages: nats.max_msgs,
                max_message_size: nats.max_msg_size,
                replicas: nats.replicas,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn nats_is_given_its_keys() {
        let mut config = Config::default();
        config.nats.url = "nats://user:secret@n1:4222,nats://n2:4222".into();
        config.nats.creds_file = Some("/etc/nats/coordinator.creds".into());
        config.nats.max_age_ms = 60_000;
        config.nats.max_bytes = -1;
        config.nats.max_msgs = 500;
        config.nats.max_msg_size = 1_024;
        config.nats.replicas = 3;
        let settings = NatsSettings::from(&config.nats);
        assert_eq!(settings.url, config.nats.url);
        assert_eq!(settings.creds_file, config.nats.creds_file);
        assert_eq!(
            settings.streams,
            StreamLimits {
                max_age: Duration::from_secs(60),
                max_bytes: -1,
                max_messages: 500,
                max_message_size: 1_024,
                replicas: 3,
            }
        );
        let shown = format!("{settings:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
