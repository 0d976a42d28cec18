//! The fleet: GPUs that node agents report, host by host (`SchedConfig::host_ttl_ms`). A host joins
//! with its first sample; its GPUs are named `<host>/<id>`. A host silent past the TTL takes no new
//! grants (its holders keep their leases until they end) until it is heard again. A request may be
//! pinned to a host: its `gpu_pin` is then `<host>/*`.

use super::*;

/// What the core knows of one host.
pub(super) struct Host {
    /// When its last sample came in (the driver's clock).
    pub(super) heard_at: Millis,
    /// Whether its last sample is younger than the TTL.
    pub(super) up: bool,
    /// How many GPUs its last sample listed.
    pub(super) gpus: usize,
}

/// The host a pin names, when it names a host (`<host>/*`) rather than a GPU.
pub(super) fn host_pin(pin: &str) -> Option<&str> {
    pin.strip_suffix("/*")
}

/// The pin of a request for any GPU of `host`.
pub(super) fn pin_host(host: &str) -> GpuId {
    GpuId::from(format!("{host}/*"))
}

/// The host of a GPU id `<host>/<id>`.
pub(super) fn host_of(gpu: &str) -> Option<&str> {
    gpu.split_once('/').map(|(host, _)| host)
}

impl Scheduler {
    /// Whether node agents report the GPUs (the inventory changes at run time).
    pub(super) fn fleet(&self) -> bool {
        self.config.host_ttl_ms.is_some()
    }

    /// A host's sample, heard at `heard_at`: its GPUs join or change size, those it no longer lists
    /// take no new grants, and the host is up again if it was not (unless the sample is already
    /// older than the TTL: one that waited in a queue while this coordinator stood by).
    pub(super) fn on_host_sample(
        &mut self,
        host: String,
        heard_at: Millis,
        gpus: Vec<HostGpu>,
        now: Millis,
    ) {
        let Some(ttl) = self.config.host_ttl_ms else {
            return;
        };
        let fresh = heard_at.saturating_add(ttl) > now;
        let entry = self.hosts.entry(host.clone()).or_insert(Host {
            heard_at,
            up: false,
            gpus: 0,
        });
        if heard_at < entry.heard_at {
            return;
        }
        entry.heard_at = heard_at;
        entry.up = fresh;
        entry.gpus = gpus.len();
        let mut listed: HashSet<GpuId> = HashSet::with_capacity(gpus.len());
        for sample in gpus {
            let id = GpuId::from(format!("{host}/{}", sample.id));
            listed.insert(id.clone());
            let g = self.ensure_gpu(&id, sample.total_mb);
            let gpu = &mut self.gpus[g];
            gpu.up = fresh;
            gpu.uuid = sample.uuid;
            gpu.source = sample.source;
            if gpu.spec.total_mb != sample.total_mb {
                gpu.spec.total_mb = sample.total_mb;
                self.refill_gpu_queue(g);
            }
            self.gpu_used(&id, sample.used_mb);
        }
        // A GPU its agent no longer lists (fallen off the bus, or the agent's configuration changed):
        // no new grants there.
        for gpu in &mut self.gpus {
            if gpu.host.as_deref() == Some(host.as_str()) && !listed.contains(&gpu.spec.id) {
                gpu.up = false;
            }
        }
    }

    /// Marks unreachable the hosts silent past the TTL at `now`.
    pub(super) fn hosts_due(&mut self, now: Millis) {
        let Some(ttl) = self.config.host_ttl_ms else {
            return;
        };
        let silent: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.up && h.heard_at.saturating_add(ttl) <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in silent {
            if let Some(host) = self.hosts.get_mut(&name) {
                host.up = false;
            }
            for gpu in &mut self.gpus {
                if gpu.host.as_deref() == Some(name.as_str()) {
                    gpu.up = false;
                }
            }
        }
    }

    /// When the next up host falls silent, if none is heard before.
    pub(super) fn next_host_deadline(&self) -> Option<Millis> {
        let ttl = self.config.host_ttl_ms?;
        self.hosts
            .values()
            .filter(|h| h.up)
            .map(|h| h.heard_at.saturating_add(ttl))
            .min()
    }

    /// The index of GPU `id`, added (down until its host is heard, with `total_mb`) if it is new.
    pub(super) fn ensure_gpu(&mut self, id: &GpuId, total_mb: u64) -> usize {
        if let Some(&g) = self.gpu_index.get(id) {
            return g;
        }
        let spec = GpuSpec {
            id: id.clone(),
            total_mb,
        };
        let at = self.gpus.partition_point(|g| g.spec.id < *id);
        self.gpus.insert(at, Gpu::new(spec, false));
        self.gpu_index = self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| (g.spec.id.clone(), i))
            .collect();
        self.refill_gpu_queue(at);
        at
    }

    /// Puts into GPU `g`'s queue every waiting request that may use it (not parked by its service's
    /// cap), after the GPU joined or its size changed.
    pub(super) fn refill_gpu_queue(&mut self, g: usize) {
        let keys: Vec<(u8, u64)> = self
            .queue
            .iter()
            .copied()
            .filter(|&(eff, seq)| {
                let rec = self.live_rec(seq);
                let parked = self
                    .services
                    .get(&rec.service_id)
                    .is_some_and(|svc| svc.parked.contains(&(eff, seq)));
                !parked && self.allowed(rec).any(|a| a == g)
            })
            .collect();
        self.gpus[g].queue = keys.into_iter().collect();
    }

    /// GPUs for the holders and paused requests of a restored fleet whose hosts are not heard yet:
    /// down until their host's first sample, as large as the lease store's leases on them say (else
    /// as what they hold).
    pub(super) fn restore_fleet_gpus(&mut self, records: &[RequestRecord], leases: &[Lease]) {
        if !self.fleet() {
            return;
        }
        let mut held: BTreeMap<GpuId, u64> = BTreeMap::new();
        for rec in records.iter().filter(|r| r.phase != Phase::Ended) {
            if let Some(gpu) = rec
                .gpu
                .as_ref()
                .filter(|g| !self.gpu_index.contains_key(*g))
            {
                let holding = matches!(rec.phase, Phase::Active | Phase::Pausing);
                *held.entry(gpu.clone()).or_default() +=
                    if holding { rec.held_mb.unwrap_or(0) } else { 0 };
            }
        }
        for (gpu, mb) in held {
            let stored = leases
                .iter()
                .filter(|l| l.gpu == gpu)
                .map(|l| l.capacity_mb)
                .max();
            self.ensure_gpu(&gpu, stored.unwrap_or(mb).max(1));
        }
    }

    /// The hosts heard since this scheduler started, by name.
    pub(super) fn host_views(&self, now: Millis) -> Vec<HostView> {
        self.hosts
            .iter()
            .map(|(name, h)| HostView {
                host: name.clone(),
                up: h.up,
                last_sample_age_ms: now.saturating_sub(h.heard_at),
                gpus: h.gpus as u64,
            })
            .collect()
    }
}
