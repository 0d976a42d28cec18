//! The node agents' samples on `<prefix>.node.*` (core NATS), checked and handed to the driver.

use futures::StreamExt;
use gpu_coordinator_wire::{NodeSample, Subjects};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::ports::nodes::NodeHeard;
use crate::retry::with_retry;

/// How many samples may wait for the driver (a standby's wait unread, the oldest kept: the driver
/// drops them when it starts).
pub const WAITING: usize = 4_096;

/// Listens to every agent's samples until `shutdown`, handing each valid one to `sink` dated by this
/// process's clock. A sample that cannot be read, or that speaks for another host than its subject's,
/// is refused with a warning (once per host until it sends a good one). Subscribes again, with
/// backoff, when the subscription ends.
pub async fn listen(
    client: async_nats::Client,
    subjects: Subjects,
    sink: mpsc::Sender<NodeHeard>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    ttl_ms: u64,
    shutdown: CancellationToken,
) {
    let mut warned = std::collections::HashSet::new();
    let mut too_slow = std::collections::HashSet::new();
    while !shutdown.is_cancelled() {
        let subscribe = || async {
            let subscriber = client.subscribe(subjects.nodes()).await?;
            client.flush().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(subscriber)
        };
        let subscribe = || async { subscribe().await.map_err(Failed) };
        let Ok(mut subscriber) = with_retry(
            "subscribing to the node agents' samples",
            &shutdown,
            subscribe,
        )
        .await
        else {
            return;
        };
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                message = subscriber.next() => message,
            };
            let Some(message) = message else { break };
            match read(&subjects, &message.subject, &message.payload) {
                Ok(heard) => {
                    warned.remove(&heard.host);
                    if let Some(why) = slow_for(&heard.sample, ttl_ms) {
                        if too_slow.insert(heard.host.clone()) {
                            tracing::warn!("host `{}`: {why}", heard.host);
                        }
                    }
                    // Full: no driver reads (standing by); the leader hears the next one.
                    let _ = sink.try_send(heard);
                }
                Err((host, why)) => {
                    metrics.node_sample_refused();
                    if warned.insert(host.clone()) {
                        tracing::warn!("refused a sample on {}: {why}", message.subject);
                    }
                }
            }
        }
        tracing::warn!("the node agents' subscription ended; subscribing again");
    }
}

/// A sample as the driver takes it, or the subject's host and why it is refused.
pub fn read(
    subjects: &Subjects,
    subject: &str,
    payload: &[u8],
) -> Result<NodeHeard, (String, String)> {
    let Some(host) = subjects.parse_node(subject) else {
        return Err((subject.to_owned(), "not a host's subject".to_owned()));
    };
    let sample: NodeSample = serde_json::from_slice(payload)
        .map_err(|e| (host.clone(), format!("not a node sample: {e}")))?;
    if let Some(why) = sample.problem(&host) {
        return Err((host, why));
    }
    Ok(NodeHeard {
        host,
        heard_at: now_ms(),
        sample,
    })
}

/// Why an agent that samples this seldom may be taken for silent between two samples: fewer than
/// three of its intervals fit in `nodes.ttl_ms`.
pub fn slow_for(sample: &NodeSample, ttl_ms: u64) -> Option<String> {
    (sample.interval_ms.saturating_mul(3) > ttl_ms).then(|| {
        format!(
            "its agent samples every {} ms, and nodes.ttl_ms ({ttl_ms} ms) holds fewer than three of \
             its intervals: one late sample makes the host unreachable; raise nodes.ttl_ms or lower \
             the agent's nvml.sample_ms",
            sample.interval_ms
        )
    })
}

/// A subscription that failed, as an error [`with_retry`] can log.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(Box<dyn std::error::Error + Send + Sync>);

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects() -> Subjects {
        Subjects::new("gpu").unwrap()
    }

    #[test]
    fn a_sample_is_read_as_its_subjects_host() {
        let body = br#"{"host":"h1","at":1,"interval_ms":1000,"source":"config",
            "gpus":[{"id":"0","total_mb":24000,"used_mb":0,"healthy":true}]}"#;
        let heard = read(&subjects(), "gpu.node.h1", body).unwrap();
        assert_eq!(heard.host, "h1");
        assert_eq!(heard.sample.gpus[0].total_mb, 24_000);
    }

    #[test]
    fn an_agent_sampling_too_seldom_for_the_ttl_is_named() {
        let body = br#"{"host":"h1","at":1,"interval_ms":2000,"source":"config","gpus":[]}"#;
        let heard = read(&subjects(), "gpu.node.h1", body).unwrap();
        let why = slow_for(&heard.sample, 5_000).expect("2 s samples in a 5 s TTL");
        assert!(why.contains("every 2000 ms"), "{why}");
        assert!(slow_for(&heard.sample, 6_000).is_none());
    }

    #[test]
    fn a_sample_for_another_host_or_unreadable_is_refused_naming_why() {
        let body = br#"{"host":"h2","at":1,"interval_ms":1000,"source":"config","gpus":[]}"#;
        let (host, why) = read(&subjects(), "gpu.node.h1", body).unwrap_err();
        assert_eq!(host, "h1");
        assert!(why.contains("its own host"), "{why}");
        let (_, why) = read(&subjects(), "gpu.node.h1", b"{").unwrap_err();
        assert!(why.contains("not a node sample"), "{why}");
        let body = br#"{"host":"h1","at":1,"interval_ms":1000,"source":"config",
            "gpus":[{"id":"a/b","total_mb":1,"used_mb":0,"healthy":true}]}"#;
        let (_, why) = read(&subjects(), "gpu.node.h1", body).unwrap_err();
        assert!(why.contains("gpus[0].id"), "{why}");
    }
}
