//! Prometheus metrics (`GET /metrics`, OpenMetrics text).
//!
//! Two sources feed them, and nothing here decides anything:
//!
//! - the driver hands every action the scheduler emits to a [`Recorder`] (counters and histograms from
//!   the core's typed events, so the figures are the audit trail's: instants and waits are numbers,
//!   never text read back);
//! - the gauges (queue, holders, VRAM) are set from the status document when the metrics are read, so
//!   they are never stale.
//!
//! The histograms of waits follow requests through their events (requested or paused, then granted,
//! resumed or ended; preempting, then paused). A request that was already waiting when the coordinator
//! started is counted from its next state change on, not before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gpu_coordinator_core::{Action, Millis};
use gpu_coordinator_wire::{EventKind, HolderState, StatusDoc, VramSource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ports::gpu::DeviceSample;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const MB: i64 = 1024 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    priority: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HolderLabels {
    gpu: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// A step of a batch of inputs on its way to the answers, timed in
/// `gpu_coordinator_batch_stage_seconds{stage}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The journal write of a batch of effects (a Postgres commit, or a PubAck of the journal stream).
    Journal,
    /// The lease store's write of the same batch (Redis), alongside the journal.
    Leases,
    /// Both, as the batch waits for them: from the round's effects ready to both written.
    Durable,
    /// The messages of a batch, from handed to the publishing stage to stored by the bus.
    Publish,
    /// A batch of inputs in the loop: from its first input taken to its messages handed over.
    Batch,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Journal => "journal",
            Stage::Leases => "leases",
            Stage::Durable => "durable",
            Stage::Publish => "publish",
            Stage::Batch => "batch",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    gpu: String,
    pid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Waits from milliseconds to about ten minutes, in seconds.
fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.5, 14))
}

/// Steps of the grant path, from 50 µs to about 1.6 s, in seconds.
fn stage_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every metric, registered once. Shared (`Arc`) between the driver and the HTTP server; each metric is
/// atomic, so reading never waits for the driver.
pub struct Metrics {
    registry: Registry,
    grants: Counter,
    preemptions: Counter,
    reclaims: Family<ServiceLabel, Counter>,
    revocations: Counter,
    timeouts: Counter,
    rejections: Counter,
    events: Family<KindLabel, Counter>,
    grant_latency: Histogram,
    queue_wait: HistogramFamily<OutcomeLabel>,
    pause_ack: Histogram,
    batch_stage: HistogramFamily<StageLabel>,
    queue_length: Family<PriorityLabel, Gauge>,
    paused: Family<PriorityLabel, Gauge>,
    holders: Family<HolderLabels, Gauge>,
    vram_total: Family<GpuLabel, Gauge>,
    vram_used: Family<GpuLabel, Gauge>,
    vram_free: Family<GpuLabel, Gauge>,
    vram_external: Family<GpuLabel, Gauge>,
    vram_from_nvml: Gauge,
    process_vram: Family<ProcessLabels, Gauge>,
    service_used: Family<ServiceLabel, Gauge>,
    service_borrowed: Family<ServiceLabel, Gauge>,
    service_guaranteed: Family<ServiceLabel, Gauge>,
    service_max: Family<ServiceLabel, Gauge>,
    storage_full: Gauge,
    host_up: Family<HostLabel, Gauge>,
    host_sample_age: Family<HostLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    host_gpus: Family<HostLabel, Gauge>,
    node_samples_refused: Counter,
    /// Refreshing the gauges and encoding them is one step, so two scrapes do not interleave.
    render: Mutex<()>,
}

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

    /// Sets the gauges from a status document.
    pub fn refresh(&self, doc: &StatusDoc) {
        self.queue_length.clear();
        self.paused.clear();
        self.holders.clear();
        for family in [
            &self.vram_total,
            &self.vram_used,
            &self.vram_free,
            &self.vram_external,
        ] {
            family.clear();
        }
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
        self.vram_from_nvml
            .set(i64::from(doc.vram_source == VramSource::Nvml));
        self.refresh_hosts(doc);
    }

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

fn bytes(mb: u64) -> i64 {
    i64::try_from(mb)
        .unwrap_or(i64::MAX / MB)
        .saturating_mul(MB)
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Turns the driver's actions into counters and histograms. Owned by the driver (one writer); keeps the
/// instants at which live requests started waiting.
pub struct Recorder {
    metrics: Arc<Metrics>,
    /// Request id -> when it entered the queue (requested, or paused).
    waiting_since: HashMap<String, Millis>,
    /// Request id -> when it was asked to pause.
    pausing_since: HashMap<String, Millis>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator_core::{EventOut, ReplyOut};
    use gpu_coordinator_wire::time::rfc3339;
    use gpu_coordinator_wire::{Encoding, GpuStatus, HolderStatus, Outcome, QueueCount};

    fn event_waited(kind: EventKind, id: &str, at: Millis, waited_ms: Option<u64>) -> Action {
        Action::Event {
            encoding: Encoding::Json,
            event: EventOut {
                at,
                kind,
                request_id: Some(id.into()),
                service_id: "svc".into(),
                priority: Some(1),
                gpu: None,
                fence: None,
                detail: None,
                waited_ms,
                reclaim_for: None,
                code: None,
            },
        }
    }

    fn event(kind: EventKind, id: &str, at: Millis) -> Action {
        event_waited(kind, id, at, None)
    }

    /// A `granted` reply: it counts for nothing, whether a first grant's or a repeated request's.
    fn granted(id: &str, waited: u64) -> Action {
        let mut reply = ReplyOut::new(id, Outcome::Granted);
        reply.waited_ms = Some(waited);
        Action::Reply {
            service: "svc".into(),
            encoding: Encoding::Json,
            reply,
        }
    }

    fn line<'a>(text: &'a str, start: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting with {start} in\n{text}"))
    }

    #[test]
    fn counters_and_waits_follow_the_events() {
        let metrics = Metrics::new();
        let mut rec = Recorder::new(metrics.clone());
        let t = 1_800_000_000_000;
        for action in [
            event(EventKind::Requested, "bg", t),
            granted("bg", 0),
            event_waited(EventKind::Granted, "bg", t, Some(0)),
            event(EventKind::Requested, "chat", t + 100),
            event(EventKind::Preempting, "bg", t + 100),
            event(EventKind::Paused, "bg", t + 350),
            granted("chat", 250),
            event_waited(EventKind::Granted, "chat", t + 350, Some(250)),
            event(EventKind::Resumed, "bg", t + 1_350),
            // A repeated request is answered `granted` again without an event: not a second grant.
            granted("chat", 250),
            event(EventKind::Rejected, "chat", t + 1_400),
            event(EventKind::Requested, "late", t + 2_000),
            event(EventKind::TimedOut, "late", t + 2_500),
        ] {
            rec.observe(&action);
        }
        let text = metrics.render(None);
        assert_eq!(
            line(&text, "gpu_coordinator_grants_total"),
            "gpu_coordinator_grants_total 2"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_preemptions_total"),
            "gpu_coordinator_preemptions_total 1"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_timeouts_total"),
            "gpu_coordinator_timeouts_total 1"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_rejections_total"),
            "gpu_coordinator_rejections_total 1"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_revocations_total"),
            "gpu_coordinator_revocations_total 0"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_grant_latency_seconds_count"),
            "gpu_coordinator_grant_latency_seconds_count 2"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_grant_latency_seconds_sum"),
            "gpu_coordinator_grant_latency_seconds_sum 0.25"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_pause_ack_seconds_sum"),
            "gpu_coordinator_pause_ack_seconds_sum 0.25"
        );
        assert_eq!(
            line(
                &text,
                "gpu_coordinator_queue_wait_seconds_sum{outcome=\"resumed\"}"
            ),
            "gpu_coordinator_queue_wait_seconds_sum{outcome=\"resumed\"} 1.0"
        );
        assert_eq!(
            line(
                &text,
                "gpu_coordinator_queue_wait_seconds_count{outcome=\"granted\"}"
            ),
            "gpu_coordinator_queue_wait_seconds_count{outcome=\"granted\"} 2"
        );
        assert_eq!(
            line(
                &text,
                "gpu_coordinator_queue_wait_seconds_sum{outcome=\"timed_out\"}"
            ),
            "gpu_coordinator_queue_wait_seconds_sum{outcome=\"timed_out\"} 0.5"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_events_total{kind=\"granted\"}"),
            "gpu_coordinator_events_total{kind=\"granted\"} 2"
        );
        assert!(
            rec.waiting_since.is_empty() && rec.pausing_since.is_empty(),
            "nothing leaks"
        );
    }

    #[test]
    fn reclaims_are_counted_by_the_service_they_are_for() {
        let metrics = Metrics::new();
        let mut rec = Recorder::new(metrics.clone());
        let mut reclaim = event(EventKind::Preempting, "chat-1", 1_000);
        if let Action::Event { event, .. } = &mut reclaim {
            event.reclaim_for = Some("asr".into());
        }
        rec.observe(&reclaim);
        rec.observe(&event(EventKind::Preempting, "bg-1", 1_000));
        let text = metrics.render(None);
        assert_eq!(
            line(&text, "gpu_coordinator_reclaims_total{"),
            "gpu_coordinator_reclaims_total{service=\"asr\"} 1"
        );
        assert_eq!(
            line(&text, "gpu_coordinator_preemptions_total"),
            "gpu_coordinator_preemptions_total 2"
        );
    }

    #[test]
    fn gauges_come_from_the_status_document() {
        let metrics = Metrics::new();
        let holder = |id: &str, state| HolderStatus {
            request_id: id.into(),
            service_id: "s".into(),
            priority: 2,
            fence: 1,
            vram_mb: 1_000,
            granted_at: rfc3339(0),
            expires_at: rfc3339(0),
            state,
            preemptible: true,
            pause_ms: None,
        };
        let count = |priority, gpu: Option<&str>, queued, paused| QueueCount {
            priority,
            gpu: gpu.map(str::to_owned),
            queued,
            paused,
        };
        let doc = StatusDoc {
            hosts: Vec::new(),
            leader: None,
            storage_full: None,
            at: rfc3339(0),
            vram_source: VramSource::Nvml,
            gpus: vec![GpuStatus {
                host: None,
                reachable: None,
                uuid: None,
                id: "0".into(),
                total_mb: 24_576,
                used_mb: 3_000,
                free_mb: 21_576,
                external_mb: 1_000,
                vram_source: VramSource::Nvml,
                holders: vec![
                    holder("a", HolderState::Active),
                    holder("b", HolderState::Pausing),
                ],
            }],
            paused: vec![],
            // A page of the queue is not what is counted: the counts of the whole queue are.
            queue: vec![],
            queue_total: 3,
            queue_offset: 0,
            queue_counts: vec![
                count(0, None, 1, 0),
                count(0, Some("0"), 1, 0),
                count(2, Some("0"), 0, 1),
            ],
            services: vec![
                gpu_coordinator_wire::ServiceStatus {
                    service_id: "chat".into(),
                    used_mb: 2_000,
                    borrowed_mb: 1_000,
                    guaranteed_vram_mb: Some(1_000),
                    max_vram_mb: Some(4_000),
                },
                gpu_coordinator_wire::ServiceStatus {
                    service_id: "asr".into(),
                    used_mb: 1_000,
                    borrowed_mb: 1_000,
                    guaranteed_vram_mb: None,
                    max_vram_mb: None,
                },
            ],
        };
        let text = metrics.render(Some(&doc));
        for (series, mb) in [
            ("service_vram_used_bytes{service=\"chat\"}", 2_000),
            ("service_vram_borrowed_bytes{service=\"chat\"}", 1_000),
            ("service_vram_guaranteed_bytes{service=\"chat\"}", 1_000),
            ("service_vram_max_bytes{service=\"chat\"}", 4_000),
            ("service_vram_used_bytes{service=\"asr\"}", 1_000),
        ] {
            let line = format!("gpu_coordinator_{series} {}", mb * MB);
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            !text.contains("service_vram_max_bytes{service=\"asr\"}"),
            "no cap, no series: {text}"
        );
        assert!(
            text.contains("gpu_coordinator_queue_length{priority=\"0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gpu_coordinator_paused_requests{priority=\"2\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gpu_coordinator_holders{gpu=\"0\",state=\"pausing\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gpu_coordinator_vram_free_bytes{gpu=\"0\"} 22624075776"),
            "{text}"
        );
        assert!(
            text.contains("gpu_coordinator_vram_external_bytes{gpu=\"0\"} 1048576000"),
            "{text}"
        );
        assert!(text.contains("gpu_coordinator_vram_from_nvml 1"), "{text}");
        // The next document replaces the gauges: an empty queue leaves no stale series.
        let empty = StatusDoc {
            leader: None,
            storage_full: None,
            queue_total: 0,
            queue_counts: vec![],
            services: vec![],
            ..doc
        };
        let text = metrics.render(Some(&empty));
        assert!(!text.contains("gpu_coordinator_queue_length{"), "{text}");
        assert!(
            !text.contains("gpu_coordinator_service_vram_used_bytes{"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
