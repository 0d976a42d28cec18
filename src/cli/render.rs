//! The status document as text: tables of the GPUs, the engine sidecars, the services, the holders
//! and the queue.

use gpu_coordinator::engines::EngineView;
use gpu_coordinator_wire::{HolderState, HostState, StatusDoc, VramSource};

/// The status document as tables: GPUs, the engine sidecars (when there are any), holders, queue.
pub fn render_status(doc: &StatusDoc, engines: &[EngineView]) -> String {
    let mut out = header(doc);
    hosts(&mut out, doc);
    gpus(&mut out, doc);
    if !engines.is_empty() {
        out.push_str("\nEngines\n");
        out.push_str(&render_engines(engines));
    }
    services(&mut out, doc);
    holders(&mut out, doc);
    queue(&mut out, doc);
    out
}

/// When, where the VRAM figures come from, who leads, and a full store.
fn header(doc: &StatusDoc) -> String {
    let mut out = format!(
        "Status at {} (VRAM figures from {})\n",
        doc.at,
        match doc.vram_source {
            VramSource::Nvml => "NVML",
            VramSource::Config => "the configuration",
        }
    );
    if let Some(leader) = &doc.leader {
        let standbys = if leader.standbys.is_empty() {
            "none".to_owned()
        } else {
            leader.standbys.join(", ")
        };
        out.push_str(&format!(
            "Leader {} (term {}); standbys: {standbys}\n",
            leader.holder, leader.term
        ));
    }
    if let Some(full) = &doc.storage_full {
        out.push_str(&format!("Storage full: {full}\n"));
    }
    out
}

/// With node agents: each host, whether it is heard, and its last sample's age.
fn hosts(out: &mut String, doc: &StatusDoc) {
    if doc.hosts.is_empty() {
        return;
    }
    out.push_str("\nHosts\n");
    out.push_str(&table(
        &["HOST", "STATE", "LAST SAMPLE", "GPUS"],
        doc.hosts
            .iter()
            .map(|h| {
                vec![
                    h.host.clone(),
                    match h.state {
                        HostState::Up => "up".to_owned(),
                        HostState::Unreachable => "unreachable".to_owned(),
                    },
                    format!("{:.1} s ago", h.last_sample_age_ms as f64 / 1000.0),
                    h.gpus.to_string(),
                ]
            })
            .collect(),
    ));
}

/// Each GPU's VRAM and its number of holders (grouped by host, with node agents: their ids sort so;
/// a GPU that takes no new grants is marked).
fn gpus(out: &mut String, doc: &StatusDoc) {
    let source = |s: VramSource| match s {
        VramSource::Nvml => "nvml",
        VramSource::Config => "config",
    };
    out.push_str("\nGPUs\n");
    out.push_str(&table(
        &[
            "GPU",
            "TOTAL MB",
            "USED MB",
            "FREE MB",
            "EXTERNAL MB",
            "SOURCE",
            "HOLDERS",
        ],
        doc.gpus
            .iter()
            .map(|g| {
                let id = match g.reachable {
                    Some(false) => format!("{} (unreachable)", g.id),
                    _ => g.id.clone(),
                };
                vec![
                    id,
                    g.total_mb.to_string(),
                    g.used_mb.to_string(),
                    g.free_mb.to_string(),
                    g.external_mb.to_string(),
                    source(g.vram_source).to_owned(),
                    g.holders.len().to_string(),
                ]
            })
            .collect(),
    ));
}

/// Each service's VRAM against its limits, when any service has them.
fn services(out: &mut String, doc: &StatusDoc) {
    if !doc.services.is_empty() {
        let mb = |mb: Option<u64>| mb.map_or_else(|| "-".to_owned(), |mb| mb.to_string());
        out.push_str("\nServices (VRAM)\n");
        out.push_str(&table(
            &[
                "SERVICE",
                "USED MB",
                "GUARANTEED MB",
                "BORROWED MB",
                "MAX MB",
            ],
            doc.services
                .iter()
                .map(|s| {
                    vec![
                        s.service_id.clone(),
                        s.used_mb.to_string(),
                        mb(s.guaranteed_vram_mb),
                        s.borrowed_mb.to_string(),
                        mb(s.max_vram_mb),
                    ]
                })
                .collect(),
        ));
    }
}

/// Every holder, GPU by GPU.
fn holders(out: &mut String, doc: &StatusDoc) {
    out.push_str("\nHolders\n");
    out.push_str(&table(
        &[
            "GPU", "REQUEST", "SERVICE", "PRIO", "VRAM MB", "FENCE", "STATE", "GRANTED", "EXPIRES",
        ],
        doc.gpus
            .iter()
            .flat_map(|g| g.holders.iter().map(move |h| (g, h)))
            .map(|(g, h)| {
                let state = match h.state {
                    HolderState::Active => "active",
                    HolderState::Pausing => "pausing",
                };
                let state = if h.preemptible {
                    state.to_owned()
                } else {
                    format!("{state}, not preemptible")
                };
                vec![
                    g.id.clone(),
                    h.request_id.clone(),
                    h.service_id.clone(),
                    h.priority.to_string(),
                    h.vram_mb.to_string(),
                    h.fence.to_string(),
                    state,
                    h.granted_at.clone(),
                    h.expires_at.clone(),
                ]
            })
            .collect(),
    ));
}

/// A page of the queue in grant order, and the counts of the rest.
fn queue(out: &mut String, doc: &StatusDoc) {
    out.push_str("\nQueue (grant order)\n");
    out.push_str(&table(
        &[
            "POS",
            "REQUEST",
            "SERVICE",
            "PRIO",
            "VRAM MB",
            "GPU",
            "STATE",
            "SINCE",
            "EST. WAIT",
        ],
        doc.queue
            .iter()
            .map(|q| {
                let paused_on = doc
                    .paused
                    .iter()
                    .find(|p| p.request_id == q.request_id)
                    .map(|p| format!("paused (GPU {})", p.gpu));
                vec![
                    q.position.to_string(),
                    q.request_id.clone(),
                    q.service_id.clone(),
                    q.priority.to_string(),
                    q.vram_mb
                        .map_or_else(|| "whole GPU".to_owned(), |mb| mb.to_string()),
                    q.gpu.clone().unwrap_or_else(|| "any".to_owned()),
                    match (q.paused, paused_on) {
                        (true, Some(on)) => on,
                        (true, None) => "paused".to_owned(),
                        (false, _) => "queued".to_owned(),
                    },
                    q.requested_at.clone(),
                    q.estimated_wait_ms.map_or_else(|| "-".to_owned(), human_ms),
                ]
            })
            .collect(),
    ));
    let listed = doc.queue.len() as u64;
    if doc.queue_total > listed {
        out.push_str(&format!(
            "  ({listed} of {} listed, from position {}; by priority: {})\n",
            doc.queue_total,
            doc.queue_offset + 1,
            doc.queue_counts
                .iter()
                .map(|c| format!(
                    "{} -> {} queued, {} paused{}",
                    c.priority,
                    c.queued,
                    c.paused,
                    c.gpu
                        .as_ref()
                        .map(|g| format!(" (GPU {g})"))
                        .unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
}

/// The engine sidecars as a table: what each engine is doing, the requests waiting for the GPU in
/// its sidecar and in flight, and its last sleep and wake times.
fn render_engines(engines: &[EngineView]) -> String {
    let ms = |d: Option<u64>| d.map_or_else(|| "-".to_owned(), |ms| ms.to_string());
    table(
        &[
            "SERVICE",
            "KIND",
            "STATE",
            "WAITING",
            "IN FLIGHT",
            "LAST SLEEP MS",
            "LAST WAKE MS",
        ],
        engines
            .iter()
            .map(|e| {
                vec![
                    e.service.clone(),
                    e.kind.clone(),
                    e.state.as_str().to_owned(),
                    e.waiting.to_string(),
                    e.in_flight.to_string(),
                    ms(e.last_sleep_ms),
                    ms(e.last_wake_ms),
                ]
            })
            .collect(),
    )
}

/// Left-aligned columns two spaces apart; `(none)` for no rows.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    if rows.is_empty() {
        return "  (none)\n".to_owned();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .into_iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// `850 ms`, `12.3 s`, `4 min 05 s`.
fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator::engines::EngineState;
    use gpu_coordinator_wire::{GpuStatus, HolderStatus, PausedStatus, QueueEntry};

    #[test]
    fn with_node_agents_the_hosts_are_listed_and_an_unreachable_gpu_is_marked() {
        let doc: StatusDoc = serde_json::from_value(serde_json::json!({
            "at": "2026-12-06T10:00:00.000Z",
            "vram_source": "config",
            "gpus": [
                {"id": "h1/0", "host": "h1", "reachable": true, "total_mb": 24000, "used_mb": 0,
                 "free_mb": 24000, "external_mb": 0, "vram_source": "config", "holders": []},
                {"id": "h2/0", "host": "h2", "reachable": false, "total_mb": 24000, "used_mb": 0,
                 "free_mb": 24000, "external_mb": 0, "vram_source": "nvml", "holders": []}
            ],
            "paused": [],
            "queue": [],
            "hosts": [
                {"host": "h1", "state": "up", "last_sample_age_ms": 400, "gpus": 1},
                {"host": "h2", "state": "unreachable", "last_sample_age_ms": 7250, "gpus": 1}
            ]
        }))
        .expect("a status document");
        let text = render_status(&doc, &[]);
        assert!(text.contains("Hosts"), "{text}");
        assert!(text.contains("h1    up           0.4 s ago"), "{text}");
        assert!(text.contains("h2    unreachable  7.2 s ago"), "{text}");
        assert!(text.contains("h2/0 (unreachable)"), "{text}");
        assert!(!text.contains("h1/0 (unreachable)"), "{text}");
    }

    #[test]
    fn the_status_table_shows_gpus_holders_and_queue() {
        let doc = a_busy_status();
        let text = render_status(&doc, &[]);
        assert!(
            text.contains("VRAM figures from the configuration"),
            "{text}"
        );
        assert!(
            text.contains("  0    24576     20000    4576     0            config  1"),
            "{text}"
        );
        assert!(
            text.contains("chat-1   chat     0     20000    7      active"),
            "{text}"
        );
        assert!(
            text.contains("1    tts-1    tts      1     whole GPU  any  queued"),
            "{text}"
        );
        assert!(text.contains("paused (GPU 0)"), "{text}");
        assert!(
            text.contains("Services (VRAM)")
                && text.contains("chat     20000    16000          4000         -"),
            "{text}"
        );
        assert!(
            text.contains("20.0 s") && text.contains("2 min 05 s"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_status_says_none() {
        let empty = render_status(
            &StatusDoc {
                leader: None,
                storage_full: None,
                gpus: vec![],
                paused: vec![],
                queue: vec![],
                services: vec![],
                ..a_busy_status()
            },
            &[],
        );
        assert_eq!(empty.matches("(none)").count(), 3, "{empty}");
        assert!(!empty.contains("Services"), "{empty}");
    }

    #[test]
    fn a_long_queue_says_how_much_of_it_is_listed() {
        // A long queue says how much of it is listed.
        let long = render_status(
            &StatusDoc {
                queue_total: 100_000,
                queue_counts: vec![gpu_coordinator_wire::QueueCount {
                    priority: 1,
                    gpu: None,
                    queued: 100_000,
                    paused: 0,
                }],
                ..empty_doc_with_one_entry()
            },
            &[],
        );
        assert!(
            long.contains(
                "(1 of 100000 listed, from position 1; by priority: 1 -> 100000 queued, 0 paused)"
            ),
            "{long}"
        );
    }

    /// A status with a holder, a paused request, a queue of two and a service over its guarantee.
    fn a_busy_status() -> StatusDoc {
        StatusDoc {
            hosts: Vec::new(),
            leader: None,
            storage_full: None,
            queue_total: 2,
            queue_offset: 0,
            queue_counts: vec![],
            services: vec![gpu_coordinator_wire::ServiceStatus {
                service_id: "chat".into(),
                used_mb: 20_000,
                borrowed_mb: 4_000,
                guaranteed_vram_mb: Some(16_000),
                max_vram_mb: None,
            }],
            at: "2026-11-26T14:00:00.000Z".into(),
            vram_source: VramSource::Config,
            gpus: vec![a_busy_gpu()],
            paused: vec![PausedStatus {
                request_id: "asr-1".into(),
                service_id: "asr".into(),
                priority: 2,
                gpu: "0".into(),
                vram_mb: 16_000,
                paused_at: "2026-11-26T13:59:50.000Z".into(),
            }],
            queue: a_queue_of_two(),
        }
    }

    /// GPU 0, nearly full, held by `chat-1`.
    fn a_busy_gpu() -> GpuStatus {
        GpuStatus {
            host: None,
            reachable: None,
            uuid: None,
            id: "0".into(),
            total_mb: 24_576,
            used_mb: 20_000,
            free_mb: 4_576,
            external_mb: 0,
            vram_source: VramSource::Config,
            holders: vec![HolderStatus {
                request_id: "chat-1".into(),
                service_id: "chat".into(),
                priority: 0,
                fence: 7,
                vram_mb: 20_000,
                granted_at: "2026-11-26T13:59:50.000Z".into(),
                expires_at: "2026-11-26T14:00:20.000Z".into(),
                state: HolderState::Active,
                preemptible: true,
                pause_ms: None,
            }],
        }
    }

    /// Two waiting: `tts-1` queued, `asr-1` paused.
    fn a_queue_of_two() -> Vec<QueueEntry> {
        vec![
            QueueEntry {
                position: 1,
                request_id: "tts-1".into(),
                service_id: "tts".into(),
                priority: 1,
                vram_mb: None,
                gpu: None,
                requested_at: "2026-11-26T13:59:55.000Z".into(),
                paused: false,
                timeout_at: None,
                estimated_wait_ms: Some(20_000),
            },
            QueueEntry {
                position: 2,
                request_id: "asr-1".into(),
                service_id: "asr".into(),
                priority: 2,
                vram_mb: Some(16_000),
                gpu: None,
                requested_at: "2026-11-26T13:59:00.000Z".into(),
                paused: true,
                timeout_at: None,
                estimated_wait_ms: Some(125_000),
            },
        ]
    }

    #[test]
    fn the_engines_table_follows_the_gpus_and_only_when_there_are_engines() {
        let engine = |service: &str, state, wake: Option<u64>| EngineView {
            service: service.into(),
            kind: "vllm".into(),
            listen: "127.0.0.1:8000".into(),
            state,
            in_flight: 2,
            waiting: 3,
            sleeps: 1,
            wakes: u64::from(wake.is_some()),
            last_sleep_ms: Some(850),
            last_wake_ms: wake,
        };
        let engines = [
            engine("chat", EngineState::Awake, Some(1_234)),
            engine("asr", EngineState::GoingToSleep, None),
        ];
        let text = render_status(&empty_doc_with_one_entry(), &engines);
        let (gpus, engines_at, holders) = (
            text.find("\nGPUs\n").expect(&text),
            text.find("\nEngines\n").expect(&text),
            text.find("\nHolders\n").expect(&text),
        );
        assert!(gpus < engines_at && engines_at < holders, "{text}");
        assert!(
            text.contains(
                "  SERVICE  KIND  STATE           WAITING  IN FLIGHT  LAST SLEEP MS  LAST WAKE MS\n\
                 \x20 chat     vllm  awake           3        2          850            1234\n\
                 \x20 asr      vllm  going_to_sleep  3        2          850            -\n"
            ),
            "{text}"
        );
        let without = render_status(&empty_doc_with_one_entry(), &[]);
        assert!(!without.contains("Engines"), "{without}");
    }

    fn empty_doc_with_one_entry() -> StatusDoc {
        StatusDoc {
            hosts: Vec::new(),
            leader: None,
            storage_full: None,
            at: "2026-11-26T14:00:00.000Z".into(),
            vram_source: VramSource::Config,
            gpus: vec![],
            paused: vec![],
            queue: vec![QueueEntry {
                position: 1,
                request_id: "q-1".into(),
                service_id: "q".into(),
                priority: 1,
                vram_mb: None,
                gpu: None,
                requested_at: "2026-11-26T13:59:55.000Z".into(),
                paused: false,
                timeout_at: None,
                estimated_wait_ms: None,
            }],
            queue_total: 1,
            queue_offset: 0,
            queue_counts: vec![],
            services: vec![],
        }
    }
}
