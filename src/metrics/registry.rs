//! The registration of every metric under `gpu_coordinator_`, the figures set from outside the
//! driver (stages, storage, processes, refused samples), and the OpenMetrics text.

use std::sync::{Arc, Mutex};

use gpu_coordinator_wire::StatusDoc;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::labels::{stage_histogram, wait_histogram, ProcessLabels, Stage, StageLabel};
use super::{bytes, Metrics};
use crate::ports::gpu::DeviceSample;

impl Metrics {
    /// Every metric, under the prefix `gpu_coordinator_`.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("gpu_coordinator");
        let m = Metrics {
            grants: Counter::default(),
            preemptions: Counter::default(),
            reclaims: Family::default(),
            revocations: Counter::default(),
            timeouts: Counter::default(),
            rejections: Counter::default(),
            events: Family::default(),
            grant_latency: wait_histogram(),
            queue_wait: Family::new_with_constructor(wait_histogram),
            pause_ack: wait_histogram(),
            batch_stage: Family::new_with_constructor(stage_histogram),
            queue_length: Family::default(),
            paused: Family::default(),
            holders: Family::default(),
            vram_total: Family::default(),
            vram_used: Family::default(),
            vram_free: Family::default(),
            vram_external: Family::default(),
            vram_from_nvml: Gauge::default(),
            process_vram: Family::default(),
            service_used: Family::default(),
            service_borrowed: Family::default(),
            service_guaranteed: Family::default(),
            service_max: Family::default(),
            storage_full: Gauge::default(),
            host_up: Family::default(),
            host_sample_age: Family::default(),
            host_gpus: Family::default(),
            node_samples_refused: Counter::default(),
            render: Mutex::new(()),
            registry: Registry::default(),
        };
        m.register_counters(&mut registry);
        m.register_waits(&mut registry);
        m.register_queue(&mut registry);
        m.register_vram(&mut registry);
        m.register_hosts(&mut registry);
        Arc::new(Metrics { registry, ..m })
    }

    /// The counters: grants, preemptions, reclaims, revocations, timeouts, rejections, events.
    fn register_counters(&self, registry: &mut Registry) {
        registry.register(
            "grants",
            "Requests granted a GPU (first grants; resumes are not counted)",
            self.grants.clone(),
        );
        registry.register(
            "preemptions",
            "Holders asked to pause for a more urgent request",
            self.preemptions.clone(),
        );
        registry.register(
            "reclaims",
            "Holders asked to pause to give VRAM back to a service within its guarantee \
             (services.<id>.guaranteed_vram_mb), by that service; also counted in preemptions",
            self.reclaims.clone(),
        );
        registry.register(
            "revocations",
            "Leases revoked (expired, or no pause ACK in time)",
            self.revocations.clone(),
        );
        registry.register(
            "timeouts",
            "Requests that timed out waiting for a grant",
            self.timeouts.clone(),
        );
        registry.register(
            "rejections",
            "Inputs rejected (invalid, unknown request, stale fence, ...)",
            self.rejections.clone(),
        );
        registry.register(
            "events",
            "Audit events published, by kind",
            self.events.clone(),
        );
    }

    /// The histograms of waits: to a grant, in the queue, to a pause ACK, and of a batch's stages.
    fn register_waits(&self, registry: &mut Registry) {
        registry.register(
            "grant_latency_seconds",
            "From request to first grant (the waited_ms of granted replies)",
            self.grant_latency.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time spent in the queue (queued, or paused waiting to resume), by how the wait ended",
            self.queue_wait.clone(),
        );
        registry.register(
            "pause_ack_seconds",
            "From a pause order (preempting) to the holder's pause ACK (paused)",
            self.pause_ack.clone(),
        );
        registry.register(
            "batch_stage_seconds",
            "Where a batch of inputs spends its time on the way to its answers, by stage: journal, \
             leases (alongside the journal), durable (both), publish (the messages stored by the bus), \
             batch (first input taken to messages handed over)",
            self.batch_stage.clone(),
        );
    }

    /// The queue and the holders.
    fn register_queue(&self, registry: &mut Registry) {
        registry.register(
            "queue_length",
            "Requests waiting for a first grant, by priority",
            self.queue_length.clone(),
        );
        registry.register(
            "paused_requests",
            "Paused requests waiting to resume, by priority",
            self.paused.clone(),
        );
        registry.register(
            "holders",
            "Leases held, by GPU and state (active, pausing)",
            self.holders.clone(),
        );
    }

    /// VRAM by GPU, process and service, and whether a store is full.
    fn register_vram(&self, registry: &mut Registry) {
        registry.register(
            "vram_total_bytes",
            "GPU memory capacity",
            self.vram_total.clone(),
        );
        registry.register(
            "vram_used_bytes",
            "GPU memory held by leases plus used outside them",
            self.vram_used.clone(),
        );
        registry.register(
            "vram_free_bytes",
            "GPU memory free for new leases",
            self.vram_free.clone(),
        );
        registry.register(
            "vram_external_bytes",
            "GPU memory used by processes outside the coordinator's leases (NVML)",
            self.vram_external.clone(),
        );
        registry.register(
            "vram_from_nvml",
            "1 when the VRAM figures come from NVML, 0 when from the configuration",
            self.vram_from_nvml.clone(),
        );
        registry.register(
            "process_vram_bytes",
            "GPU memory used per process, as NVML last reported it",
            self.process_vram.clone(),
        );
        registry.register(
            "service_vram_used_bytes",
            "GPU memory a service's leases hold (active and pausing; a whole-GPU lease counts its \
             GPU), for the services with a [services.<id>] section and those holding any",
            self.service_used.clone(),
        );
        registry.register(
            "service_vram_borrowed_bytes",
            "GPU memory a service's active leases hold beyond its guarantee",
            self.service_borrowed.clone(),
        );
        registry.register(
            "service_vram_guaranteed_bytes",
            "A service's guaranteed GPU memory (services.<id>.guaranteed_vram_mb)",
            self.service_guaranteed.clone(),
        );
        registry.register(
            "service_vram_max_bytes",
            "The most GPU memory a service's leases may hold (services.<id>.max_vram_mb)",
            self.service_max.clone(),
        );
        registry.register(
            "storage_full",
            "1 while a store refuses writes for lack of space (its name and reason are in /readyz), \
             else 0",
            self.storage_full.clone(),
        );
    }

    /// The hosts of the fleet (node agents): whether each is heard, how old its last sample is, and
    /// how many GPUs it reported; and the samples refused.
    fn register_hosts(&self, registry: &mut Registry) {
        registry.register(
            "host_up",
            "1 while a host's node agent is heard within nodes.ttl_ms (its GPUs take grants), 0 once \
             it is silent past it",
            self.host_up.clone(),
        );
        registry.register(
            "host_sample_age_seconds",
            "How long ago a host's node agent's last sample came in",
            self.host_sample_age.clone(),
        );
        registry.register(
            "host_gpus",
            "How many GPUs a host's node agent last reported",
            self.host_gpus.clone(),
        );
        registry.register(
            "node_samples_refused",
            "Node agents' samples refused: unreadable, or naming another host than their subject's",
            self.node_samples_refused.clone(),
        );
    }

    /// Counts a node agent's sample refused.
    pub fn node_sample_refused(&self) {
        self.node_samples_refused.inc();
    }

    /// Notes whether a store is full, for `storage_full`: read by the HTTP server from the stores
    /// themselves, so that it is right while the driver, retrying a refused write, answers nothing.
    pub fn set_storage_full(&self, full: bool) {
        self.storage_full.set(i64::from(full));
    }

    /// Records how long a stage of a batch took.
    pub fn observe_stage(&self, stage: Stage, took: std::time::Duration) {
        self.batch_stage
            .get_or_create(&StageLabel {
                stage: stage.label(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records the per-process memory of an NVML sample (`gpu id -> device` as the inventory maps them).
    pub fn set_processes<'a>(
        &self,
        samples: impl IntoIterator<Item = (&'a str, &'a DeviceSample)>,
    ) {
        self.process_vram.clear();
        for (gpu, sample) in samples {
            for p in &sample.processes {
                self.process_vram
                    .get_or_create(&ProcessLabels {
                        gpu: gpu.to_owned(),
                        pid: p.pid.to_string(),
                    })
                    .set(bytes(p.used_mb));
            }
        }
    }

    /// The OpenMetrics text, with the gauges refreshed from `doc` when there is one.
    pub fn render(&self, doc: Option<&StatusDoc>) -> String {
        let _one_at_a_time = self.render.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(doc) = doc {
            self.refresh(doc);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String cannot fail");
        text
    }
}
