//! `[services]`: what each service may ask for, read key by key, resolved over `[services.default]`
//! and checked.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::GpuConfig;

/// `[services]`: `allow_unknown`, `[services.default]` and one `[services.<id>]` section per service.
/// Read at start: a change takes effect at the coordinator's next start (or takeover), for the
/// requests that come after it; requests already granted keep what they were granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicesConfig {
    /// `services.allow_unknown`, default true: a service without a section is served, under
    /// `[services.default]`. `false`: its requests are rejected.
    pub allow_unknown: bool,
    /// `[services.default]`: what a service without a section gets, and the keys a section leaves
    /// out.
    pub default: ServiceConfig,
    /// `[services.<id>]`, by service id.
    #[serde(flatten)]
    pub named: BTreeMap<String, ServiceConfig>,
}

/// Read key by key rather than with `#[serde(flatten)]`, so that a mistake inside a section is
/// reported with its whole key (`services.chat.max_prio`), as everywhere else.
impl<'de> Deserialize<'de> for ServicesConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Sections;
        impl<'de> serde::de::Visitor<'de> for Sections {
            type Value = ServicesConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("allow_unknown, [services.default] and [services.<id>] sections")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ServicesConfig, A::Error> {
                let mut services = ServicesConfig::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "allow_unknown" => services.allow_unknown = map.next_value()?,
                        "default" => services.default = map.next_value()?,
                        _ => {
                            let section = map.next_value()?;
                            services.named.insert(key, section);
                        }
                    }
                }
                Ok(services)
            }
        }
        deserializer.deserialize_map(Sections)
    }
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            allow_unknown: true,
            default: ServiceConfig::default(),
            named: BTreeMap::new(),
        }
    }
}

/// One `[services.<id>]` (or `[services.default]`) section. Every key is optional: a section's unset
/// key is `[services.default]`'s, and unset there, today's behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The most urgent priority (lowest number) the service may give; a request more urgent is
    /// rejected, naming this key, unless `clamp_priority`.
    pub max_priority: Option<u8>,
    /// Default false: a request more urgent than `max_priority` is rejected. `true`: it is taken at
    /// `max_priority`, and its `requested` event says so.
    pub clamp_priority: Option<bool>,
    /// The priority of a request that gives none: over HTTP only, where `priority` may be left out
    /// of the body (NATS inputs must give one, as the wire contract says).
    pub default_priority: Option<u8>,
    /// The VRAM of a request that gives none, in MB (instead of the whole GPU).
    pub default_vram_mb: Option<u64>,
    /// The lease of a request that gives none, in ms (instead of `lease.default_ms`).
    pub default_lease_ms: Option<u64>,
    /// The most VRAM the service's live leases may hold together, over every GPU, in MB (a whole-GPU
    /// lease counts its GPU's capacity). A request beyond it waits; one beyond it alone is rejected.
    pub max_vram_mb: Option<u64>,
    /// VRAM, in MB, that the service can always take back from services over their own guarantee,
    /// whatever their priority. Per named service only.
    pub guaranteed_vram_mb: Option<u64>,
    /// Its holders are not paused before they held this long (instead of `preemption.min_hold_ms`).
    pub min_hold_ms: Option<u64>,
    /// Default true. `false`: its holders are never paused, whatever its requests say (pinned
    /// models); a lease then ends by release, expiry or revoke only.
    pub preemptible: Option<bool>,
}

impl ServiceConfig {
    /// This section over `default`: each key it leaves out is `default`'s.
    fn over(&self, default: &ServiceConfig) -> ServiceConfig {
        ServiceConfig {
            max_priority: self.max_priority.or(default.max_priority),
            clamp_priority: self.clamp_priority.or(default.clamp_priority),
            default_priority: self.default_priority.or(default.default_priority),
            default_vram_mb: self.default_vram_mb.or(default.default_vram_mb),
            default_lease_ms: self.default_lease_ms.or(default.default_lease_ms),
            max_vram_mb: self.max_vram_mb.or(default.max_vram_mb),
            guaranteed_vram_mb: self.guaranteed_vram_mb.or(default.guaranteed_vram_mb),
            min_hold_ms: self.min_hold_ms.or(default.min_hold_ms),
            preemptible: self.preemptible.or(default.preemptible),
        }
    }

    /// The scheduler's policy of a resolved section.
    fn policy(&self) -> gpu_coordinator_core::ServicePolicy {
        gpu_coordinator_core::ServicePolicy {
            max_priority: self.max_priority,
            clamp_priority: self.clamp_priority.unwrap_or(false),
            default_priority: self.default_priority,
            default_vram_mb: self.default_vram_mb,
            default_lease_ms: self.default_lease_ms,
            max_vram_mb: self.max_vram_mb,
            guaranteed_vram_mb: self.guaranteed_vram_mb.unwrap_or(0),
            min_hold_ms: self.min_hold_ms,
            preemptible: self.preemptible.unwrap_or(true),
        }
    }

    /// The problems of this resolved section, `[services.<id>]`, each naming its key.
    fn problems(&self, id: &str, lease_max_ms: u64) -> Vec<String> {
        let mut problems = Vec::new();
        let key = |name: &str| format!("services.{id}.{name}");
        if id != "default" && !gpu_coordinator_wire::subjects::valid_service_id(id) {
            problems.push(format!(
                "[services.{id}]: {id:?} is not a service id (1-64 characters of [A-Za-z0-9_-])"
            ));
        }
        for (name, value) in [
            ("default_vram_mb", self.default_vram_mb),
            ("default_lease_ms", self.default_lease_ms),
            ("max_vram_mb", self.max_vram_mb),
        ] {
            if value == Some(0) {
                problems.push(format!("{} must be > 0", key(name)));
            }
        }
        if let (Some(default), Some(max)) = (self.default_priority, self.max_priority) {
            if default < max {
                problems.push(format!(
                    "{} ({default}) is more urgent than {} ({max})",
                    key("default_priority"),
                    key("max_priority")
                ));
            }
        }
        if self.clamp_priority.is_some() && self.max_priority.is_none() {
            problems.push(format!(
                "{} is set but {} is not: there is nothing to clamp to",
                key("clamp_priority"),
                key("max_priority")
            ));
        }
        if let Some(lease) = self.default_lease_ms.filter(|&ms| ms > lease_max_ms) {
            problems.push(format!(
                "{} ({lease}) is above lease.max_ms ({lease_max_ms})",
                key("default_lease_ms")
            ));
        }
        if let Some(max) = self.max_vram_mb {
            for (name, value) in [
                ("default_vram_mb", self.default_vram_mb),
                ("guaranteed_vram_mb", self.guaranteed_vram_mb),
            ] {
                if let Some(v) = value.filter(|&v| v > max) {
                    problems.push(format!(
                        "{} ({v}) is above {} ({max})",
                        key(name),
                        key("max_vram_mb")
                    ));
                }
            }
        }
        problems
    }
}

impl ServicesConfig {
    /// The scheduler's policies: each section over `[services.default]`, and `[services.default]`
    /// for the other services unless `allow_unknown` is false.
    pub fn policies(&self) -> gpu_coordinator_core::ServicePolicies {
        gpu_coordinator_core::ServicePolicies {
            named: self
                .named
                .iter()
                .map(|(id, section)| (id.clone(), section.over(&self.default).policy()))
                .collect(),
            others: self.allow_unknown.then(|| self.default.policy()),
        }
    }

    /// The problems of `[services]`, each naming its key.
    pub(super) fn check(&self, lease_max_ms: u64, gpus: &[GpuConfig]) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.allow_unknown && self.named.is_empty() {
            problems.push(
                "services.allow_unknown is false but no [services.<id>] section names a service: \
                 every request would be rejected"
                    .to_owned(),
            );
        }
        if self.default.guaranteed_vram_mb.is_some() {
            problems.push(
                "services.default.guaranteed_vram_mb: a guarantee is given per named service \
                 ([services.<id>]), so that the guarantees can be checked against the GPUs"
                    .to_owned(),
            );
        }
        let sections = std::iter::once(("default", self.default.clone())).chain(
            self.named
                .iter()
                .map(|(id, section)| (id.as_str(), section.over(&self.default))),
        );
        for (id, section) in sections {
            problems.extend(section.problems(id, lease_max_ms));
        }
        let guaranteed: u64 = self
            .named
            .values()
            .filter_map(|s| s.guaranteed_vram_mb)
            .sum();
        let total: u64 = gpus.iter().map(|g| g.vram_mb).sum();
        if !gpus.is_empty() && guaranteed > total {
            problems.push(format!(
                "services.*.guaranteed_vram_mb: the guarantees add up to {guaranteed} MB, more than \
                 the [[gpus]] have ({total} MB): they could not all be given back"
            ));
        }
        problems
    }
}
