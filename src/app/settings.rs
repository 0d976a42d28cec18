//! What each adapter is given, built from the configuration: the adapters read no configuration, the
//! composition root (and the commands beside it: `agent`, `audit`, `status`, the sidecars) hands each
//! the few settings it needs.
//!
//! - the HTTP API: [`HttpSettings`] from `[http]`, `request.default_timeout_ms` and `[services]`, and the
//!   connection [`Limits`] from `[http]` (the sidecars serve with the same);
//! - NATS: [`NatsSettings`] from `[nats]`;
//! - NVML: the configured `[[gpus]]` ([`super::gpus::configured`]).

use std::time::Duration;

use crate::adapters::http::{HttpSettings, Limits, TokenHolder};
use crate::adapters::nats::{NatsSettings, StreamLimits};
use crate::config::{Config, HttpConfig, NatsConfig, OPERATOR};

/// `[http]`'s tokens (`"*"`: an operator's), `request.default_timeout_ms`, `[services]`' policies, and
/// `[http]`'s bounds.
impl From<&Config> for HttpSettings {
    fn from(config: &Config) -> Self {
        let http = &config.http;
        HttpSettings {
            tokens: http
                .tokens
                .iter()
                .map(|(token, service)| {
                    let holder = match service.as_str() {
                        OPERATOR => TokenHolder::Operator,
                        service => TokenHolder::Service(service.to_owned()),
                    };
                    (token.clone(), holder)
                })
                .collect(),
            default_timeout_ms: config.request.default_timeout_ms,
            services: config.services.policies(),
            max_wait: Duration::from_millis(http.max_wait_ms),
            max_body_bytes: http.max_body_bytes,
            max_streams_per_service: http.max_streams_per_service,
            max_streams: http.max_streams,
            limits: Limits::from(http),
        }
    }
}

/// `http.header_read_timeout_ms` and `http.max_connections`.
impl From<&HttpConfig> for Limits {
    fn from(http: &HttpConfig) -> Self {
        Limits {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            max_connections: http.max_connections,
        }
    }
}

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
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::ServiceConfig;

    #[test]
    fn the_http_api_is_given_its_keys() {
        let mut config = Config::default();
        config.http.tokens = BTreeMap::from([
            ("t-op".to_owned(), OPERATOR.to_owned()),
            ("t-chat".to_owned(), "chat".to_owned()),
        ]);
        config.http.max_wait_ms = 1_500;
        config.http.max_body_bytes = 100;
        config.http.max_streams_per_service = 3;
        config.http.max_streams = 7;
        config.http.header_read_timeout_ms = 250;
        config.http.max_connections = 9;
        config.request.default_timeout_ms = 4_000;
        config.services.named.insert(
            "asr".into(),
            ServiceConfig {
                default_priority: Some(2),
                ..Default::default()
            },
        );
        let settings = HttpSettings::from(&config);
        assert_eq!(
            settings.tokens,
            BTreeMap::from([
                ("t-op".to_owned(), TokenHolder::Operator),
                ("t-chat".to_owned(), TokenHolder::Service("chat".into())),
            ])
        );
        assert_eq!(settings.default_timeout_ms, 4_000);
        assert_eq!(settings.services, config.services.policies());
        assert_eq!(settings.max_wait, Duration::from_millis(1_500));
        assert_eq!(settings.max_body_bytes, 100);
        assert_eq!(settings.max_streams_per_service, 3);
        assert_eq!(settings.max_streams, 7);
        assert_eq!(
            settings.limits,
            Limits {
                header_read_timeout: Duration::from_millis(250),
                max_connections: 9,
            }
        );
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("t-chat") && !shown.contains("t-op"),
            "{shown}"
        );
    }

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
