//! The [`Recorder`]: the driver's actions turned into counters and histograms, following each request
//! through its events.

use std::collections::HashMap;
use std::sync::Arc;

use gpu_coordinator_core::{Action, Millis};
use gpu_coordinator_wire::EventKind;

use super::labels::{KindLabel, OutcomeLabel, ServiceLabel};
use super::{seconds, Metrics};

/// Turns the driver's actions into counters and histograms. Owned by the driver (one writer); keeps the
/// instants at which live requests started waiting.
pub struct Recorder {
    metrics: Arc<Metrics>,
    /// Request id -> when it entered the queue (requested, or paused).
    pub(super) waiting_since: HashMap<String, Millis>,
    /// Request id -> when it was asked to pause.
    pub(super) pausing_since: HashMap<String, Millis>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Recorder {
        Recorder {
            metrics,
            waiting_since: HashMap::new(),
            pausing_since: HashMap::new(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records one action. Only events count: each carries its instant, and a first grant its wait (a
    /// repeated request's answer is a reply alone, and does not count again).
    pub fn observe(&mut self, action: &Action) {
        let Action::Event { event, .. } = action else {
            return;
        };
        let m = &self.metrics;
        m.events
            .get_or_create(&KindLabel {
                kind: event.kind.as_str().to_owned(),
            })
            .inc();
        let at = event.at;
        let id = event
            .request_id
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        match event.kind {
            EventKind::Requested => {
                self.waiting_since.insert(id, at);
            }
            EventKind::Granted => {
                m.grants.inc();
                if let Some(waited) = event.waited_ms {
                    m.grant_latency.observe(seconds(waited));
                }
                self.waited(&id, at, "granted");
            }
            EventKind::Preempting => {
                m.preemptions.inc();
                if let Some(service) = &event.reclaim_for {
                    m.reclaims
                        .get_or_create(&ServiceLabel {
                            service: service.to_string(),
                        })
                        .inc();
                }
                self.pausing_since.insert(id, at);
            }
            EventKind::Paused => {
                if let Some(since) = self.pausing_since.remove(&id) {
                    m.pause_ack.observe(seconds(at.saturating_sub(since)));
                }
                self.waiting_since.insert(id, at);
            }
            EventKind::Resumed => self.waited(&id, at, "resumed"),
            EventKind::TimedOut => {
                m.timeouts.inc();
                self.waited(&id, at, "timed_out");
            }
            EventKind::Cancelled => self.waited(&id, at, "cancelled"),
            EventKind::Released => {
                self.pausing_since.remove(&id);
                self.waited(&id, at, "released");
            }
            EventKind::Revoked => {
                m.revocations.inc();
                self.pausing_since.remove(&id);
                self.waiting_since.remove(&id);
            }
            EventKind::Rejected => {
                m.rejections.inc();
                // A rejected request never waited; a rejected input about a live one changes nothing.
                if let Some(since) = self.waiting_since.get(&id) {
                    if *since == at {
                        self.waiting_since.remove(&id);
                    }
                }
            }
            EventKind::Queued | EventKind::Renewed | EventKind::Expired => {}
        }
    }

    fn waited(&mut self, id: &str, at: Millis, outcome: &str) {
        if let Some(since) = self.waiting_since.remove(id) {
            self.metrics
                .queue_wait
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.to_owned(),
                })
                .observe(seconds(at.saturating_sub(since)));
        }
    }
}
