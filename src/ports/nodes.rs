//! The node agents' samples as the driver takes them (with node agents, `[nodes] agents = true`).

use std::collections::BTreeMap;
use std::sync::Arc;

use gpu_coordinator_wire::{NodeSample, VramSource};
use tokio::sync::mpsc;

/// A sample heard from a host's agent: the host of its subject, when this process heard it (its
/// clock, in ms since the epoch), and the sample, checked against its host.
#[derive(Debug, Clone)]
pub struct NodeHeard {
    pub host: String,
    pub heard_at: u64,
    pub sample: NodeSample,
}

impl NodeHeard {
    /// The scheduler's input for it.
    pub fn input(&self) -> gpu_coordinator_core::Input {
        let source = if self.sample.source == "nvml" {
            VramSource::Nvml
        } else {
            VramSource::Config
        };
        gpu_coordinator_core::Input::HostSample {
            host: self.host.clone(),
            heard_at: self.heard_at,
            gpus: self
                .sample
                .gpus
                .iter()
                .map(|g| gpu_coordinator_core::HostGpu {
                    id: g.id.clone(),
                    uuid: g.uuid.clone(),
                    total_mb: g.total_mb,
                    used_mb: g.used_mb,
                    source,
                })
                .collect(),
        }
    }
}

/// The samples as they come, shared by the drivers of successive terms (the listener runs for the
/// process's life, leading or not), and the latest of each host not yet handed to the scheduler.
#[derive(Clone)]
pub struct NodeFeed {
    samples: Arc<tokio::sync::Mutex<mpsc::Receiver<NodeHeard>>>,
    pending: BTreeMap<String, NodeHeard>,
}

impl NodeFeed {
    pub fn new(samples: mpsc::Receiver<NodeHeard>) -> NodeFeed {
        NodeFeed {
            samples: Arc::new(tokio::sync::Mutex::new(samples)),
            pending: BTreeMap::new(),
        }
    }

    /// The next sample heard.
    pub async fn next(&self) -> Option<NodeHeard> {
        self.samples.lock().await.recv().await
    }

    /// Drops what waited while no driver read (a standby's samples): a new leader hears the hosts
    /// anew.
    pub async fn drop_stale(&mut self) {
        let mut samples = self.samples.lock().await;
        while samples.try_recv().is_ok() {}
        self.pending.clear();
    }

    /// Keeps `heard` as its host's latest, to hand over at the next [`NodeFeed::take`].
    pub fn keep(&mut self, heard: NodeHeard) {
        match self.pending.get(&heard.host) {
            Some(kept) if kept.heard_at > heard.heard_at => {}
            _ => {
                self.pending.insert(heard.host.clone(), heard);
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The latest sample of each host heard since the last call.
    pub fn take(&mut self) -> Vec<NodeHeard> {
        std::mem::take(&mut self.pending).into_values().collect()
    }
}
