//! `gpu-coordinator audit`'s backends: the bus `[backends]` names, opened for reading (JetStream's
//! streams, or the embedded bus's tables), and the configured GPUs' sizes, handed to
//! [`crate::audit::check_history`], which knows no adapter.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use gpu_coordinator_wire::Subjects;

use crate::adapters::nats::NatsSettings;
use crate::adapters::nats_gateway::NatsGateway;
use crate::adapters::sqlite::{SqliteBus, SqliteJournal};
use crate::audit::{Since, Summary, Violation};
use crate::config::{BusBackend, Config};
use crate::ports::Gateway;

/// The GPU capacities the audit checks against: the configured `[[gpus]]`, else the default GPU.
fn capacities(config: &Config) -> HashMap<String, u64> {
    super::gpus::inventory(config)
        .into_iter()
        .map(|g| (g.id.into_string(), g.total_mb))
        .collect()
}

/// Replays the deployment's history and checks it: `Ok(Ok(summary))` when every rule held,
/// `Ok(Err(violation))` at the first one broken, `Err` when the history cannot be read. The history is
/// read from the bus `[backends]` names: JetStream's streams, or the embedded bus's tables.
pub async fn run(config: &Config, since: Since) -> anyhow::Result<Result<Summary, Violation>> {
    let subjects = Subjects::new(&config.nats.prefix)
        .map_err(anyhow::Error::msg)
        .context("nats.prefix")?;
    let gateway: Arc<dyn Gateway> = match config.backends.bus {
        BusBackend::Nats => {
            let nats = NatsSettings::from(&config.nats);
            let client = crate::adapters::nats::options(&nats)
                .await?
                .name("gpu-coordinator audit")
                .connect(crate::adapters::nats::servers(&nats)?)
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to NATS at {}",
                        gpu_coordinator_client::redact(&config.nats.url)
                    )
                })?;
            Arc::new(NatsGateway::reader(client, &subjects))
        }
        BusBackend::Embedded => {
            let dir = config.embedded.dir();
            let store = SqliteJournal::open(&dir)
                .await
                .with_context(|| format!("cannot open the embedded store in {}", dir.display()))?;
            Arc::new(
                SqliteBus::open(
                    &store,
                    &subjects,
                    config.embedded.keep_ms,
                    config.embedded.max_bytes,
                )
                .await?,
            )
        }
    };
    let policies = config.services.policies();
    crate::audit::check_history(
        gateway.as_ref(),
        &subjects,
        capacities(config),
        &policies,
        since,
    )
    .await
}
