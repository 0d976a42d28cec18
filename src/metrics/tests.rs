//! The counters and histograms from the events, and the gauges from the status document.

use super::*;
use gpu_coordinator_core::{Action, EventOut, Millis, ReplyOut};
use gpu_coordinator_wire::time::rfc3339;
use gpu_coordinator_wire::{
    Encoding, EventKind, GpuStatus, HolderState, HolderStatus, Outcome, QueueCount, StatusDoc,
    VramSource,
};

fn event_waited(kind: EventKind, id: &str, at: Millis, waited_ms: Option<u64>) -> Action {
    Action::Event {
        encoding: Encoding::Json,
        event: EventOut {
            capacity_mb: None,
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

/// `bg` granted, then paused for `chat` and resumed; `chat` granted, then rejected on a repeated
/// request; `late` timed out. Starting at `t`.
fn a_preemption_a_rejection_and_a_timeout(t: Millis) -> Vec<Action> {
    vec![
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
    ]
}

#[test]
fn counters_and_waits_follow_the_events() {
    let metrics = Metrics::new();
    let mut rec = Recorder::new(metrics.clone());
    let t = 1_800_000_000_000;
    for action in a_preemption_a_rejection_and_a_timeout(t) {
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

/// A GPU with an active and a pausing holder, a queue counted by priority and GPU (with no page of
/// it), and two services, one with a guarantee and a cap.
fn a_status_document() -> StatusDoc {
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
    StatusDoc {
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
    }
}

#[test]
fn gauges_come_from_the_status_document() {
    let metrics = Metrics::new();
    let doc = a_status_document();
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
