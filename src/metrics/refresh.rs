//! The gauges, set from the status document when the metrics are read, so that they are never stale.

use gpu_coordinator_wire::{HolderState, StatusDoc, VramSource};

use super::labels::{GpuLabel, HolderLabels, HostLabel, PriorityLabel, ServiceLabel};
use super::{bytes, Metrics};

impl Metrics {
    /// Sets the gauges from a status document.
    pub fn refresh(&self, doc: &StatusDoc) {
        self.refresh_services(doc);
        self.refresh_queue(doc);
        self.refresh_gpus(doc);
        self.vram_from_nvml
            .set(i64::from(doc.vram_source == VramSource::Nvml));
        self.refresh_hosts(doc);
    }

    /// Each service's VRAM: used, borrowed, and its guarantee and cap where it has them.
    fn refresh_services(&self, doc: &StatusDoc) {
        for family in [
            &self.service_used,
            &self.service_borrowed,
            &self.service_guaranteed,
            &self.service_max,
        ] {
            family.clear();
        }
        for service in &doc.services {
            let label = ServiceLabel {
                service: service.service_id.clone(),
            };
            let figures = [
                (&self.service_used, Some(service.used_mb)),
                (&self.service_borrowed, Some(service.borrowed_mb)),
                (&self.service_guaranteed, service.guaranteed_vram_mb),
                (&self.service_max, service.max_vram_mb),
            ];
            for (family, mb) in figures {
                if let Some(mb) = mb {
                    family.get_or_create(&label).set(bytes(mb));
                }
            }
        }
    }

    /// The queued and paused requests by priority.
    fn refresh_queue(&self, doc: &StatusDoc) {
        self.queue_length.clear();
        self.paused.clear();
        // From the counts of the whole queue: the document lists only a page of it.
        for count in &doc.queue_counts {
            let label = PriorityLabel {
                priority: count.priority.to_string(),
            };
            for (family, n) in [
                (&self.queue_length, count.queued),
                (&self.paused, count.paused),
            ] {
                if n > 0 {
                    family.get_or_create(&label).inc_by(n as i64);
                }
            }
        }
    }

    /// Each GPU's VRAM and its holders by state.
    fn refresh_gpus(&self, doc: &StatusDoc) {
        self.holders.clear();
        for family in [
            &self.vram_total,
            &self.vram_used,
            &self.vram_free,
            &self.vram_external,
        ] {
            family.clear();
        }
        for gpu in &doc.gpus {
            let label = GpuLabel {
                gpu: gpu.id.clone(),
            };
            for (family, mb) in [
                (&self.vram_total, gpu.total_mb),
                (&self.vram_used, gpu.used_mb),
                (&self.vram_free, gpu.free_mb),
                (&self.vram_external, gpu.external_mb),
            ] {
                family.get_or_create(&label).set(bytes(mb));
            }
            for state in ["active", "pausing"] {
                self.holders
                    .get_or_create(&HolderLabels {
                        gpu: gpu.id.clone(),
                        state: state.into(),
                    })
                    .set(0);
            }
            for h in &gpu.holders {
                let state = match h.state {
                    HolderState::Active => "active",
                    HolderState::Pausing => "pausing",
                };
                self.holders
                    .get_or_create(&HolderLabels {
                        gpu: gpu.id.clone(),
                        state: state.into(),
                    })
                    .inc();
            }
        }
    }

    /// The fleet's hosts: up, the age of their last sample, their GPUs.
    fn refresh_hosts(&self, doc: &StatusDoc) {
        self.host_up.clear();
        self.host_sample_age.clear();
        self.host_gpus.clear();
        for host in &doc.hosts {
            let label = HostLabel {
                host: host.host.clone(),
            };
            self.host_up
                .get_or_create(&label)
                .set(i64::from(host.state == gpu_coordinator_wire::HostState::Up));
            self.host_sample_age
                .get_or_create(&label)
                .set(host.last_sample_age_ms as f64 / 1000.0);
            self.host_gpus.get_or_create(&label).set(host.gpus as i64);
        }
    }
}
