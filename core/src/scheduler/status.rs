//! The status view: the GPUs with their holders, the paused requests, a page of the queue, the
//! services against their limits.

use super::*;

impl Scheduler {
    /// What it holds now: each GPU with its VRAM and holders, the paused requests, and the queue in
    /// grant order with positions and rough wait estimates.
    pub fn status(&self, now: Millis) -> StatusView {
        self.status_page(now, QueuePage::ALL)
    }

    /// The status with one page of the queue, its total and its counts by priority and GPU: the
    /// document stays small however long the queue is. O(page's end + paused) in time (the counts are
    /// kept as the queue changes), O(page) in size.
    pub fn status_page(&self, now: Millis, page: QueuePage) -> StatusView {
        let gpus = self
            .gpus
            .iter()
            .map(|g| GpuView {
                id: g.spec.id.clone(),
                host: g.host.clone(),
                uuid: g.uuid.clone(),
                reachable: self.fleet().then_some(g.up),
                total_mb: g.spec.total_mb,
                used_mb: (g.held_mb + g.external_mb).min(g.spec.total_mb),
                free_mb: g.free_mb(),
                external_mb: g.external_mb,
                vram_source: g.source,
                holders: g.holders.iter().map(|&seq| self.holder_view(seq)).collect(),
            })
            .collect();
        let paused = self
            .paused
            .iter()
            .map(|&(_, seq)| {
                let rec = self.live_rec(seq);
                PausedView {
                    request_id: rec.request_id.clone(),
                    service_id: rec.service_id.clone(),
                    priority: rec.priority,
                    gpu: rec.gpu.clone().unwrap_or_default(),
                    vram_mb: rec.held_mb.unwrap_or(0),
                    paused_at: rec.paused_at.unwrap_or(0),
                }
            })
            .collect();
        StatusView {
            at: now,
            vram_source: self.vram_source,
            gpus,
            paused,
            services: self.service_views(),
            hosts: self.host_views(now),
            queue: self.queue_page(now, page),
            queue_total: self.queue.len() as u64,
            queue_offset: page.offset,
            queue_counts: self
                .queue_counts
                .iter()
                .map(|((priority, gpu), &(queued, paused))| QueueCountView {
                    priority: *priority,
                    gpu: gpu.clone(),
                    queued,
                    paused,
                })
                .collect(),
        }
    }

    /// A holder as the status shows it.
    fn holder_view(&self, seq: u64) -> HolderView {
        let rec = self.live_rec(seq);
        HolderView {
            request_id: rec.request_id.clone(),
            service_id: rec.service_id.clone(),
            priority: rec.priority,
            fence: rec.fence.map(|f| f.0).unwrap_or(0),
            vram_mb: rec.held_mb.unwrap_or(0),
            granted_at: rec.granted_at.unwrap_or(0),
            expires_at: rec.expires_at.unwrap_or(0),
            state: if rec.phase == Phase::Pausing {
                HolderState::Pausing
            } else {
                HolderState::Active
            },
            preemptible: rec.preemptible,
            pause_ms: rec.pause_ms,
        }
    }

    /// One page of the queue in grant order, each entry with its position and a rough wait: until
    /// the soonest lease on a GPU it may use ends, plus the leases queued ahead of it. Walks the
    /// entries up to the page's end only (those before it for the wait ahead).
    fn queue_page(&self, now: Millis, page: QueuePage) -> Vec<QueueView> {
        let soonest_end = |rec: &RequestRecord| {
            self.gpus
                .iter()
                .filter(|g| rec.gpu_pin.as_ref().is_none_or(|p| *p == g.spec.id))
                .flat_map(|g| g.holders.iter())
                .filter_map(|h| self.live_rec(*h).expires_at)
                .min()
                .map(|at| at.saturating_sub(now))
                .unwrap_or(0)
        };
        let n_gpus = self.gpus.len().max(1) as u64;
        let page_end = page.offset.saturating_add(page.limit);
        let mut ahead_ms = 0u64;
        let mut queue = Vec::new();
        for (i, &(_, seq)) in self.queue.iter().enumerate() {
            let i = i as u64;
            if i >= page_end {
                break;
            }
            let rec = self.live_rec(seq);
            if i >= page.offset {
                let is_paused = rec.phase == Phase::Paused;
                queue.push(QueueView {
                    position: i + 1,
                    request_id: rec.request_id.clone(),
                    service_id: rec.service_id.clone(),
                    priority: rec.priority,
                    vram_mb: rec.vram_mb,
                    gpu: rec.gpu_pin.clone(),
                    requested_at: rec.requested_at,
                    paused: is_paused,
                    timeout_at: (!is_paused).then_some(rec.timeout_at),
                    estimated_wait_ms: Some(soonest_end(rec) + ahead_ms / n_gpus),
                });
            }
            ahead_ms = ahead_ms.saturating_add(rec.lease_ms);
        }
        queue
    }

    /// Each service with a section, and each other service holding VRAM, with what it holds against
    /// its limits, by id. O(services with live requests + sections).
    fn service_views(&self) -> Vec<ServiceView> {
        let mut views: BTreeMap<&str, ServiceView> = BTreeMap::new();
        let policies = &self.config.services;
        let view = |id: &str, svc: Option<&Svc>| {
            let policy = policies.get(id);
            let guarantee = policy.map_or(0, |p| p.guaranteed_vram_mb);
            let (used, pausing) = svc.map_or((0, 0), |s| (s.used_mb, s.pausing_mb));
            ServiceView {
                service_id: id.into(),
                used_mb: used,
                borrowed_mb: used.saturating_sub(pausing).saturating_sub(guarantee),
                guaranteed_mb: (guarantee > 0).then_some(guarantee),
                max_vram_mb: policy.and_then(|p| p.max_vram_mb),
            }
        };
        for id in policies.named.keys() {
            views.insert(id, view(id, self.services.get(id.as_str())));
        }
        for (id, svc) in self.services.iter().filter(|(_, svc)| svc.used_mb > 0) {
            views
                .entry(id.as_str())
                .or_insert_with(|| view(id, Some(svc)));
        }
        views.into_values().collect()
    }
}
