//! Configuration: one typed struct, from defaults, then a TOML file (`--config`), then environment
//! variables `GPU_COORDINATOR_*` (nesting with `__`, e.g. `GPU_COORDINATOR_NATS__URL`). Passed explicitly,
//! never global.
//!
//! [`Config::load`] merges the three layers and then validates the result, so that a mistake is reported
//! at start, naming the key (and the file or variable it came from), rather than surfacing later as a
//! confusing failure. This module reads no sockets and decides nothing about scheduling.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Source};
use serde::{Deserialize, Serialize};

mod nodes;
pub use nodes::{AgentConfig, NodesConfig};

/// The prefix of the environment variables that override the file, e.g. `GPU_COORDINATOR_NATS__URL`.
pub const ENV_PREFIX: &str = "GPU_COORDINATOR_";

/// The separator of nested keys in environment variables: `GPU_COORDINATOR_LEASE__DEFAULT_MS` is
/// `lease.default_ms`. Two underscores, because key names themselves contain one.
pub const ENV_SPLIT: &str = "__";

/// The `[http.tokens]` value of an operator's token.
pub const OPERATOR: &str = "*";

/// The whole configuration. Every section's `Default` holds the documented defaults. Its `Debug` hides
/// the secrets (URL passwords, `[http.tokens]`), so that it can be logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub database: DatabaseConfig,
    pub lease: LeaseConfig,
    pub preemption: PreemptionConfig,
    pub request: RequestConfig,
    pub queue: QueueConfig,
    pub http: HttpConfig,
    pub nvml: NvmlConfig,
    pub leader: LeaderConfig,
    pub backends: BackendsConfig,
    pub embedded: EmbeddedConfig,
    /// The GPUs to manage. Empty: ask NVML; when it finds none, one GPU `0` of 24576 MB.
    pub gpus: Vec<GpuConfig>,
    /// The inference engines whose sidecars run in this process (`serve`, `engines`).
    pub engines: Vec<crate::engines::EngineConfig>,
    /// How `gpu-coordinator engines` reaches the coordinator.
    pub sidecar: crate::engines::SidecarConfig,
    /// `[services]`: what each service may ask for. Read at start.
    pub services: ServicesConfig,
    /// `[nodes]`: whether node agents report the GPUs (a fleet of hosts).
    pub nodes: NodesConfig,
    /// `[agent]`: what `gpu-coordinator agent` says of its host.
    pub agent: AgentConfig,
}

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
    fn check(&self, lease_max_ms: u64, gpus: &[GpuConfig]) -> Vec<String> {
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
        for (id, s) in sections {
            let key = |name: &str| format!("services.{id}.{name}");
            if id != "default" && !gpu_coordinator_wire::subjects::valid_service_id(id) {
                problems.push(format!(
                    "[services.{id}]: {id:?} is not a service id (1-64 characters of [A-Za-z0-9_-])"
                ));
            }
            for (name, value) in [
                ("default_vram_mb", s.default_vram_mb),
                ("default_lease_ms", s.default_lease_ms),
                ("max_vram_mb", s.max_vram_mb),
            ] {
                if value == Some(0) {
                    problems.push(format!("{} must be > 0", key(name)));
                }
            }
            if let (Some(default), Some(max)) = (s.default_priority, s.max_priority) {
                if default < max {
                    problems.push(format!(
                        "{} ({default}) is more urgent than {} ({max})",
                        key("default_priority"),
                        key("max_priority")
                    ));
                }
            }
            if s.clamp_priority.is_some() && s.max_priority.is_none() {
                problems.push(format!(
                    "{} is set but {} is not: there is nothing to clamp to",
                    key("clamp_priority"),
                    key("max_priority")
                ));
            }
            if let Some(lease) = s.default_lease_ms.filter(|&ms| ms > lease_max_ms) {
                problems.push(format!(
                    "{} ({lease}) is above lease.max_ms ({lease_max_ms})",
                    key("default_lease_ms")
                ));
            }
            if let Some(max) = s.max_vram_mb {
                for (name, value) in [
                    ("default_vram_mb", s.default_vram_mb),
                    ("guaranteed_vram_mb", s.guaranteed_vram_mb),
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

/// The most replicas a JetStream stream may have (`nats.replicas`).
pub const MAX_REPLICAS: usize = 5;

/// The default of `nats.max_bytes` (per stream) and `embedded.max_bytes`: 1 GiB.
pub const DEFAULT_STREAM_BYTES: i64 = 1 << 30;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `nats.url`, default `nats://127.0.0.1:4222`. Several servers of a NATS cluster are separated by
    /// commas (`nats://n1:4222,nats://n2:4222,nats://n3:4222`, as the `nats` CLI's `--server`): the
    /// coordinator connects to one of them and, when it goes away, to another. An entry that is not
    /// a NATS URL stops the start.
    pub url: String,
    /// `nats.replicas`, default 1: the replicas of every stream the coordinator makes (input,
    /// output, and the journal stream of `database.write_behind`), 1 to 5. With 3 on a cluster of 3
    /// or more servers, an input acknowledged to its publisher is on a majority of them, and survives
    /// the loss of any one. The start refuses more replicas than the cluster has servers; a stream
    /// that exists with other replicas is updated to these.
    pub replicas: usize,
    /// `nats.prefix`, default `gpu`: the first token of every subject.
    pub prefix: String,
    /// `nats.max_age_ms`: how long the streams keep messages, default 7 days.
    pub max_age_ms: u64,
    /// `nats.max_bytes`: the most bytes each stream keeps, default 1 GiB (`DEFAULT_STREAM_BYTES`).
    /// JetStream sets a stream's `max_bytes` aside in its store up front and refuses a stream that does
    /// not fit ("insufficient storage resources"): the two streams need a JetStream store
    /// (`max_file_store`, by default 75% of the disk free when nats-server starts) of 2 GiB. -1: no
    /// limit of its own, only the server's store bounds it. A full input stream refuses new inputs at
    /// publish (the publisher gets the error), and the coordinator removes the inputs it handled once
    /// it is 80% full; a full output stream drops its oldest.
    pub max_bytes: i64,
    /// `nats.max_msgs`: the most messages each stream keeps, default 10,000,000 (same policy).
    pub max_msgs: i64,
    /// `nats.max_msg_size`: the largest message the streams accept, default 65,536 bytes.
    pub max_msg_size: i32,
    /// `nats.creds_file`: a NATS credentials file (`.creds`) to connect with, as an alternative to
    /// the user and password in `nats.url`.
    pub creds_file: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis.url`, default `redis://127.0.0.1:6379`.
    pub url: String,
    /// `redis.key_prefix`, default `gpu`.
    pub key_prefix: String,
    /// `redis.sentinels`, default none: the Sentinels (`host:port` or `redis://` URLs) to ask for the
    /// master named `redis.master`, in place of `redis.url`.
    pub sentinels: Vec<String>,
    /// `redis.master`: the name the Sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub master: String,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `database.url`, default `postgres://postgres@127.0.0.1:5432/gpu_coordinator`. A primary and its
    /// standbys are named together, libpq's way: `postgres://user@h1:5432,h2:5432/database`; the
    /// coordinator uses the host that takes writes and moves to a promoted standby when the primary
    /// goes. An acknowledged batch survives that move only with synchronous replication
    /// (`synchronous_standby_names` on the primary); the start warns without it.
    pub url: String,
    /// `database.write_behind`, default false: a batch of effects is durable once JetStream stored it
    /// (stream `<P>_JOURNAL`), and Postgres is written behind, off the grant path. Faster where a
    /// Postgres commit is slow (it waits for the disk); a power loss of the NATS host can lose what
    /// nats-server had not yet synced to disk, grants included. Needs `backends.journal = "postgres"`
    /// and `backends.bus = "nats"`.
    pub write_behind: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// `lease.default_ms`, default 30000.
    pub default_ms: u64,
    /// `lease.max_ms`, default 3600000 (one hour).
    pub max_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreemptionConfig {
    /// `preemption.ack_deadline_ms`, default 10000.
    pub ack_deadline_ms: u64,
    /// `preemption.min_hold_ms`, default 0 (off).
    pub min_hold_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestConfig {
    /// `request.default_timeout_ms`, default 60000.
    pub default_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `queue.aging_ms`, default 0 (off).
    pub aging_ms: u64,
    /// `queue.retain_ended`: ended requests remembered to answer a repeated id, default 100000.
    pub retain_ended: usize,
    /// `queue.max_per_service`: live requests one service may have at once, default 10000; one more
    /// is rejected with an error that says so.
    pub max_per_service: usize,
    /// `queue.status_limit`: queue entries a status document lists unless asked for another page,
    /// default 100 (at most 1000); the document also gives the total and counts per priority and GPU.
    pub status_limit: u64,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `http.listen`, default `127.0.0.1:8080`.
    pub listen: String,
    /// `[http.tokens]`: bearer token -> service id, or `"*"` for an operator, who may read everything
    /// (status, events, metrics, any service's control stream) but acts for no service. A service's
    /// token reads only its own service's entries of the status and the events, and not the metrics.
    /// Empty: no authentication.
    pub tokens: std::collections::BTreeMap<String, String>,
    /// `http.max_wait_ms`: the longest a `POST /gpu/request` long poll waits, default 300000 (5 min);
    /// a request still queued then is answered 202 `queued` and stays queued (ask again by its id).
    pub max_wait_ms: u64,
    /// `http.max_streams_per_service`: long-lived streams (control streams, event streams, SSE or JSON
    /// lines) each service's token may hold open, default 16; the operator (an operator token, or
    /// anyone when no tokens are configured) has as many of its own for its streams.
    pub max_streams_per_service: usize,
    /// `http.max_streams`: the services' long-lived streams in all, default 1024 (the operator's are
    /// apart, so that services that fill theirs cannot lock its page out).
    pub max_streams: usize,
    /// `http.max_body_bytes`: the largest request body, default 65536.
    pub max_body_bytes: usize,
    /// `http.header_read_timeout_ms`: how long a connection may take to send a request's headers, and
    /// how long a kept-alive connection may stay idle between requests, default 10000; then it is
    /// closed. A client that trickles its headers would otherwise hold its connection for ever.
    pub header_read_timeout_ms: u64,
    /// `http.max_connections`: the most connections served at once, default 1024. Beyond it the
    /// coordinator stops accepting (new ones wait in the kernel's backlog) until one closes, so that
    /// clients cannot take every file descriptor and starve its own connections to NATS, Redis and
    /// Postgres. Each open stream and long poll holds one.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderConfig {
    /// `leader.ttl_ms`, default 1000: how long the leader's lease in Postgres lasts after each renewal
    /// (it renews every third of it). A standby takes over at most this long after the leader died.
    pub ttl_ms: u64,
    /// `leader.poll_ms`, default 100: how often a standby tries to take an expired lease.
    pub poll_ms: u64,
    /// `leader.max_clock_skew_ms`, default 500: a coordinator whose clock is further than this from
    /// Postgres's (the clock the leader row is kept on) does not lead. Leases, pause deadlines and
    /// revokes are counted on the leader's clock: one ahead would revoke leases early while their
    /// holders still work, one behind would hand a GPU on late. 0 turns the check off.
    pub max_clock_skew_ms: u64,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            ttl_ms: 1000,
            poll_ms: 100,
            max_clock_skew_ms: 500,
        }
    }
}

/// `[backends]`: which adapter fills each port, chosen independently (`serve --embedded` sets all
/// three to the embedded ones). The defaults are the distributed mode's servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendsConfig {
    /// `backends.journal`: `postgres` (default, `database.url`) or `sqlite` (in `embedded.data_dir`).
    pub journal: JournalBackend,
    /// `backends.leases`: `redis` (default, `redis.url`) or `memory` (held in the process, the journal
    /// being the source of truth: a restart writes the live leases back).
    pub leases: LeasesBackend,
    /// `backends.bus`: `nats` (default, `nats.url`) or `embedded` (two tables of the SQLite database
    /// in `embedded.data_dir`; services use the HTTP API).
    pub bus: BusBackend,
    /// `backends.one_box`, default false: confirms that one box runs this deployment, which the SQLite
    /// journal beside a server (`bus = "nats"` or `leases = "redis"`) needs. The SQLite journal's
    /// leadership is the lock on a local data directory: a coordinator on a second box, with a data
    /// directory of its own, would lead too, on the same subjects and keys.
    pub one_box: bool,
}

impl Default for BackendsConfig {
    fn default() -> Self {
        BackendsConfig {
            journal: JournalBackend::Postgres,
            leases: LeasesBackend::Redis,
            bus: BusBackend::Nats,
            one_box: false,
        }
    }
}

impl BackendsConfig {
    /// Every backend embedded: one process, no server.
    pub fn embedded() -> BackendsConfig {
        BackendsConfig {
            journal: JournalBackend::Sqlite,
            leases: LeasesBackend::Memory,
            bus: BusBackend::Embedded,
            one_box: false,
        }
    }

    /// The servers that a SQLite journal shares with whatever else uses them (`bus = "nats"`,
    /// `leases = "redis"`): a mix for one box only. Empty when the journal is Postgres, or nothing is
    /// shared.
    pub fn one_box_only(&self) -> Vec<&'static str> {
        if self.journal != JournalBackend::Sqlite {
            return Vec::new();
        }
        let mut shared = Vec::new();
        if self.bus == BusBackend::Nats {
            shared.push("backends.bus = \"nats\" (the same nats.prefix)");
        }
        if self.leases == LeasesBackend::Redis {
            shared.push("backends.leases = \"redis\" (the same redis.key_prefix)");
        }
        shared
    }

    /// Whether anything lives in the data directory.
    pub fn uses_data_dir(&self) -> bool {
        self.journal == JournalBackend::Sqlite || self.bus == BusBackend::Embedded
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalBackend {
    Postgres,
    Sqlite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeasesBackend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusBackend {
    Nats,
    Embedded,
}

/// `[embedded]`: where the embedded backends keep their data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// `embedded.data_dir`: the directory of the SQLite database and its lock. Empty (default): the
    /// user's data directory, `$XDG_DATA_HOME/gpu-coordinator` (`~/.local/share/gpu-coordinator`).
    pub data_dir: String,
    /// `embedded.keep_ms`: how long the embedded bus keeps events and handled inputs, default 7 days.
    pub keep_ms: u64,
    /// `embedded.max_bytes`: the most bytes the embedded bus's two tables keep (payloads and subjects,
    /// and a row's overhead), default 1 GiB. Beyond it the oldest outputs and handled inputs are
    /// removed first; when only inputs the coordinator has not handled are left, a new input is
    /// refused (HTTP 507) until it handled some.
    pub max_bytes: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            data_dir: String::new(),
            keep_ms: 7 * 24 * 60 * 60 * 1000,
            max_bytes: DEFAULT_STREAM_BYTES as u64,
        }
    }
}

impl EmbeddedConfig {
    /// The data directory: `data_dir`, else the user's data directory.
    pub fn dir(&self) -> PathBuf {
        if !self.data_dir.is_empty() {
            return PathBuf::from(&self.data_dir);
        }
        dirs::data_dir()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("gpu-coordinator")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    /// `nvml.enabled`, default true: sample VRAM through NVML when a driver is there.
    pub enabled: bool,
    /// `nvml.sample_ms`, default 1000.
    pub sample_ms: u64,
    /// `nvml.settle_ms`: after a pause ACK, how long to wait for NVML to see the VRAM freed, default 2000.
    pub settle_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// The GPU id used on the wire (`gpu` fields), e.g. `0`.
    pub id: String,
    /// Capacity in MB.
    pub vram_mb: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            replicas: 1,
            prefix: "gpu".to_owned(),
            max_age_ms: 7 * 24 * 60 * 60 * 1000,
            max_bytes: DEFAULT_STREAM_BYTES,
            max_msgs: 10_000_000,
            max_msg_size: 65_536,
            creds_file: None,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "gpu".to_owned(),
            sentinels: Vec::new(),
            master: String::new(),
        }
    }
}

impl RedisConfig {
    /// What is wrong with `redis.sentinels` and `redis.master`, each naming its key.
    fn sentinel_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let master = self.master.trim();
        if self.sentinels.is_empty() {
            if !master.is_empty() {
                problems.push(format!(
                    "redis.master ({master:?}) is set without redis.sentinels: list the Sentinels \
                     that monitor it (e.g. [\"s1:26379\", \"s2:26379\", \"s3:26379\"])"
                ));
            }
            return problems;
        }
        if master.is_empty() {
            problems.push(
                "redis.master must name the master the Sentinels monitor (the name in their \
                 `sentinel monitor <name> ...` line) when redis.sentinels is set"
                    .to_owned(),
            );
        }
        for (i, entry) in self.sentinels.iter().enumerate() {
            if let Err(why) = crate::urls::sentinel_url(entry) {
                problems.push(format!(
                    "redis.sentinels[{i}]: {why} (expected e.g. \"10.0.0.1:26379\" or \
                     \"redis://10.0.0.1:26379\")"
                ));
            }
        }
        problems
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/gpu_coordinator".to_owned(),
            write_behind: false,
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            default_ms: 30_000,
            max_ms: 3_600_000,
        }
    }
}

impl Default for PreemptionConfig {
    fn default() -> Self {
        PreemptionConfig {
            ack_deadline_ms: 10_000,
            min_hold_ms: 0,
        }
    }
}

impl Default for RequestConfig {
    fn default() -> Self {
        RequestConfig {
            default_timeout_ms: 60_000,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            aging_ms: 0,
            retain_ended: 100_000,
            max_per_service: 10_000,
            status_limit: 100,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_owned(),
            tokens: BTreeMap::new(),
            max_wait_ms: 300_000,
            max_streams_per_service: 16,
            max_streams: 1024,
            max_body_bytes: 65_536,
            header_read_timeout_ms: 10_000,
            max_connections: 1024,
        }
    }
}

impl Default for NvmlConfig {
    fn default() -> Self {
        NvmlConfig {
            enabled: true,
            sample_ms: 1000,
            settle_ms: 2000,
        }
    }
}

/// The sections that hold secrets show them as `***` when printed with `Debug` (the configuration is
/// logged at `debug`): the passwords (and tokens) of the URLs, and the `[http.tokens]` tokens.
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            // A URL with a user alone carries a token: the client's redaction hides that too.
            .field("url", &gpu_coordinator_client::redact(&self.url))
            .field("replicas", &self.replicas)
            .field("prefix", &self.prefix)
            .field("max_age_ms", &self.max_age_ms)
            .field("max_bytes", &self.max_bytes)
            .field("max_msgs", &self.max_msgs)
            .field("max_msg_size", &self.max_msg_size)
            // A path: its contents are read by the NATS library, never kept here.
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| crate::telemetry::redact_url(s))
            .collect();
        f.debug_struct("RedisConfig")
            .field("url", &crate::telemetry::redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("sentinels", &sentinels)
            .field("master", &self.master)
            .finish()
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::telemetry::redact_url(&self.url))
            .field("write_behind", &self.write_behind)
            .finish()
    }
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        /// The services the tokens act for, each token written `***`.
        struct Tokens<'a>(&'a BTreeMap<String, String>);
        impl std::fmt::Debug for Tokens<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_map()
                    .entries(self.0.values().map(|service| ("***", service)))
                    .finish()
            }
        }
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("tokens", &Tokens(&self.tokens))
            .field("max_wait_ms", &self.max_wait_ms)
            .field("max_streams_per_service", &self.max_streams_per_service)
            .field("max_streams", &self.max_streams)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist or is not a regular file.
    #[error("cannot read config file {}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A layer could not be read or does not fit the struct: bad TOML, an unknown key, a wrong type. The
    /// message names each key and the file or environment variable it came from.
    #[error("{0}")]
    Parse(String),
    /// The values were read but break a rule (one message per broken rule, each naming its key).
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl Config {
    /// Loads the configuration: the defaults, then the TOML file at `path` (which must exist when given),
    /// then the `GPU_COORDINATOR_*` environment variables; then validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, ENV_PREFIX)
    }

    /// [`Config::load`] with another environment prefix, so that tests need not touch the real one.
    fn load_with_env(path: Option<&Path>, env_prefix: &str) -> Result<Config, ConfigError> {
        let config = Self::read_with_env(path, env_prefix)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration of `gpu-coordinator agent`, read as [`Config::load`] reads the
    /// coordinator's, and checked for what an agent uses ([`Config::validate_agent`]).
    pub fn load_agent(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::read_with_env(path, ENV_PREFIX)?;
        config.validate_agent()?;
        Ok(config)
    }

    /// The defaults, the file and the environment variables under `env_prefix`, not yet validated.
    fn read_with_env(path: Option<&Path>, env_prefix: &str) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            // `Toml::file` silently skips a missing file; a path given explicitly must be there.
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(ConfigError::File {
                        path: path.to_owned(),
                        source: std::io::Error::other("not a regular file"),
                    })
                }
                Err(source) => {
                    return Err(ConfigError::File {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // `GPU_COORDINATOR_TOKEN` is the `status --http` command's bearer token, not a configuration key.
        figment = figment.merge(
            Env::prefixed(env_prefix)
                .ignore(&["TOKEN"])
                .split(ENV_SPLIT),
        );
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(describe(e, env_prefix)))?;
        // `redis.url` has a default, so only the layers tell whether it was set: the defaults' layer
        // has its source in the code.
        let url_given = figment
            .find_metadata("redis.url")
            .is_some_and(|layer| !matches!(layer.source, Some(figment::Source::Code(_))));
        if url_given && !config.redis.sentinels.is_empty() {
            return Err(ConfigError::Invalid(vec![
                "redis.url and redis.sentinels are both set: give redis.url for one Redis, or \
                 redis.sentinels with redis.master for a master that Sentinel fails over, not both"
                    .to_owned(),
            ]));
        }
        config.engines_take_service_defaults();
        Ok(config)
    }

    /// What an `[[engines]]` entry leaves out (`priority`, `vram_mb`, `lease_ms`), its service's
    /// section gives (`default_priority`, `default_vram_mb`, `default_lease_ms`, or
    /// `[services.default]`'s).
    pub fn engines_take_service_defaults(&mut self) {
        let policies = self.services.policies();
        for engine in &mut self.engines {
            let Some(policy) = policies.get(&engine.service) else {
                continue;
            };
            engine.priority = engine.priority.or(policy.default_priority);
            engine.vram_mb = engine.vram_mb.or(policy.default_vram_mb);
            engine.lease_ms = engine.lease_ms.or(policy.default_lease_ms);
        }
    }

    /// Checks the rules that the types alone do not enforce.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.check_servers(&mut problems);
        self.check_bounds(&mut problems);
        self.check_http(&mut problems);
        self.check_backends(&mut problems);
        self.check_gpus_and_engines(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The servers' addresses: present, and parsed here, once (a URL that cannot be parsed would
    /// otherwise be retried for ever as a server that does not answer).
    fn check_servers(&self, problems: &mut Vec<String>) {
        let mut non_empty = |key: &str, value: &str| {
            if value.trim().is_empty() {
                problems.push(format!("{key} must not be empty"));
            }
        };
        non_empty("nats.url", &self.nats.url);
        non_empty("redis.url", &self.redis.url);
        non_empty("redis.key_prefix", &self.redis.key_prefix);
        non_empty("database.url", &self.database.url);
        problems.extend(self.redis.sentinel_problems());

        if !self.nats.url.trim().is_empty() {
            // Parsed here, once: a URL that cannot be parsed would otherwise be retried for ever as
            // a server that does not answer.
            if let Err(why) = gpu_coordinator_client::server_addrs(&self.nats.url) {
                problems.push(format!(
                    "nats.url: {why} (expected e.g. \"nats://127.0.0.1:4222\", or several servers \
                     separated by commas: \"nats://n1:4222,nats://n2:4222\")"
                ));
            }
        }
        if !self.database.url.trim().is_empty() {
            // Parsed here, once, as for `nats.url`.
            if let Err(why) = crate::urls::postgres_hosts(&self.database.url) {
                problems.push(format!(
                    "database.url: {why} (expected e.g. \"postgres://user@host:5432/database\", or a \
                     primary and its standbys separated by commas: \
                     \"postgres://user@h1:5432,h2:5432/database\")"
                ));
            }
        }
        if !(1..=MAX_REPLICAS).contains(&self.nats.replicas) {
            problems.push(format!(
                "nats.replicas ({}) must be 1 to {MAX_REPLICAS} (JetStream keeps at most \
                 {MAX_REPLICAS} copies of a stream)",
                self.nats.replicas
            ));
        }
    }

    /// The bounds of the streams, leases, queue and requests.
    fn check_bounds(&self, problems: &mut Vec<String>) {
        if let Err(why) = gpu_coordinator_wire::Subjects::new(&self.nats.prefix) {
            problems.push(format!("nats.prefix {:?}: {why}", self.nats.prefix));
        }
        if self.nats.max_age_ms == 0 {
            problems.push("nats.max_age_ms must be > 0".to_owned());
        }
        if self.nats.max_bytes != -1 && self.nats.max_bytes < 1 << 20 {
            problems.push(
                "nats.max_bytes must be -1 (no limit) or at least 1048576 (1 MiB)".to_owned(),
            );
        }
        if self.embedded.max_bytes < 1 << 20 {
            problems.push("embedded.max_bytes must be at least 1048576 (1 MiB)".to_owned());
        }
        if self.nats.max_msgs < 1000 {
            problems.push("nats.max_msgs must be at least 1000".to_owned());
        }
        if self.nats.max_msg_size < 4096 {
            problems.push("nats.max_msg_size must be at least 4096 bytes".to_owned());
        }
        if self.lease.default_ms == 0 {
            problems.push("lease.default_ms must be > 0".to_owned());
        }
        if self.lease.max_ms < self.lease.default_ms {
            problems.push(format!(
                "lease.max_ms ({}) must be >= lease.default_ms ({})",
                self.lease.max_ms, self.lease.default_ms
            ));
        }
        if self.preemption.ack_deadline_ms == 0 {
            problems.push("preemption.ack_deadline_ms must be > 0".to_owned());
        }
        if self.http.max_wait_ms == 0 {
            problems.push("http.max_wait_ms must be > 0".to_owned());
        }
        if self.http.max_streams_per_service == 0 || self.http.max_streams == 0 {
            problems
                .push("http.max_streams and http.max_streams_per_service must be > 0".to_owned());
        }
        if self.http.max_body_bytes < 1024 {
            problems.push("http.max_body_bytes must be at least 1024".to_owned());
        }
        if self.http.header_read_timeout_ms == 0 {
            problems.push("http.header_read_timeout_ms must be > 0".to_owned());
        }
        if self.http.max_connections == 0 {
            problems.push("http.max_connections must be > 0".to_owned());
        }
        if self.queue.status_limit > 1_000 {
            problems.push("queue.status_limit must be at most 1000".to_owned());
        }
        if self.queue.max_per_service == 0 {
            problems.push("queue.max_per_service must be > 0".to_owned());
        }
        if self.request.default_timeout_ms == 0 {
            problems.push("request.default_timeout_ms must be > 0".to_owned());
        }
    }

    /// The HTTP API: its address and its tokens.
    fn check_http(&self, problems: &mut Vec<String>) {
        if self.http.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen {:?} is not a socket address (expected e.g. \"127.0.0.1:8080\")",
                self.http.listen
            ));
        }
        for (token, service) in &self.http.tokens {
            if token.is_empty() {
                problems.push("http.tokens has an empty token".to_owned());
            }
            if service != OPERATOR && !gpu_coordinator_wire::subjects::valid_service_id(service) {
                problems.push(format!(
                    "http.tokens: the service id {service:?} must be 1-64 characters of [A-Za-z0-9_-], \
                     or \"*\" for an operator (reads everything, acts for no service)"
                ));
            }
        }
    }

    /// Leadership, the backends and the mixes of them that hold on one box only, and NVML.
    fn check_backends(&self, problems: &mut Vec<String>) {
        if self.leader.ttl_ms < 100 {
            problems.push(format!(
                "leader.ttl_ms ({}) must be >= 100: the leader renews every third of it",
                self.leader.ttl_ms
            ));
        }
        if self.database.write_behind
            && (self.backends.journal != JournalBackend::Postgres
                || self.backends.bus != BusBackend::Nats)
        {
            problems.push(
                "database.write_behind needs backends.journal = \"postgres\" and backends.bus = \"nats\" \
                 (the batches wait in a JetStream stream until Postgres has them)"
                    .to_owned(),
            );
        }
        let shared = self.backends.one_box_only();
        if !shared.is_empty() && !self.backends.one_box {
            problems.push(format!(
                "backends.journal = \"sqlite\" with {} is for one box only: the SQLite journal's \
                 leadership is the lock on a local data directory, so a coordinator on a second box \
                 would lead as well and grant the same GPUs twice. Set backends.one_box = true if one \
                 box runs this deployment, or use backends.journal = \"postgres\" for several",
                shared.join(" and ")
            ));
        }
        if self.leader.poll_ms == 0 {
            problems.push("leader.poll_ms must be > 0".to_owned());
        }
        if self.nvml.enabled && self.nvml.sample_ms == 0 {
            problems.push("nvml.sample_ms must be > 0 when nvml.enabled is true".to_owned());
        }
        problems.extend(
            self.nodes
                .problems(self.backends.bus == BusBackend::Nats, !self.gpus.is_empty()),
        );
    }

    /// Checks what `gpu-coordinator agent` reads: `[nats]`, `[nvml]`, `[[gpus]]` and `[agent]`.
    pub fn validate_agent(&self) -> Result<(), ConfigError> {
        let mut problems = self.agent.problems();
        if self.nvml.sample_ms == 0 {
            problems
                .push("nvml.sample_ms must be > 0: it is how often the agent reports".to_owned());
        }
        for (i, gpu) in self.gpus.iter().enumerate() {
            let ok = !gpu.id.is_empty()
                && gpu.id.len() <= 32
                && gpu
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'));
            if !ok {
                problems.push(format!(
                    "gpus[{i}].id {:?} must be 1 to 32 characters of A-Z, a-z, 0-9, `_`, `-`, `:` \
                     and `.` (the GPU is named `<host>/<id>`)",
                    gpu.id
                ));
            }
            if gpu.vram_mb == 0 {
                problems.push(format!("gpus[{i}].vram_mb must be > 0"));
            }
        }
        if self.nats.url.trim().is_empty() {
            problems.push("nats.url must not be empty".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The GPUs, the engines, the services' sections, and engines whose service would reject them.
    fn check_gpus_and_engines(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        for (i, gpu) in self.gpus.iter().enumerate() {
            if gpu.id.trim().is_empty() {
                problems.push(format!("gpus[{i}].id must not be empty"));
            } else if !seen.insert(gpu.id.as_str()) {
                problems.push(format!("gpus[{i}].id {:?} is used twice", gpu.id));
            }
            if gpu.vram_mb == 0 {
                problems.push(format!("gpus[{i}].vram_mb must be > 0"));
            }
        }
        problems.extend(crate::engines::config::check(
            &self.engines,
            self.preemption.ack_deadline_ms,
        ));
        problems.extend(self.services.check(self.lease.max_ms, &self.gpus));
        // An engine's requests must pass its service's limits, or its sidecar could never serve.
        let policies = self.services.policies();
        for (i, engine) in self.engines.iter().enumerate() {
            let Some(policy) = policies.get(&engine.service) else {
                problems.push(format!(
                    "engines[{i}].service {:?} has no [services.{}] section and \
                     services.allow_unknown is false: its requests would be rejected",
                    engine.service, engine.service
                ));
                continue;
            };
            if let (Some(priority), Some(max)) = (engine.priority, policy.max_priority) {
                if priority < max && !policy.clamp_priority {
                    let section = if self.services.named.contains_key(&engine.service) {
                        engine.service.as_str()
                    } else {
                        "default"
                    };
                    problems.push(format!(
                        "engines[{i}].priority ({priority}) is more urgent than \
                         services.{section}.max_priority ({max}): its requests would be rejected"
                    ));
                }
            }
        }
        if let Some(listen) = &self.sidecar.listen {
            if listen.parse::<SocketAddr>().is_err() {
                problems.push(format!(
                    "sidecar.listen {listen:?} must be an address and port, like \"127.0.0.1:9090\""
                ));
            }
        }
    }

    /// The scheduler's options, from the `lease`, `preemption`, `request` and `queue` keys.
    pub fn sched_config(&self) -> gpu_coordinator_core::SchedConfig {
        gpu_coordinator_core::SchedConfig {
            host_ttl_ms: self.nodes.agents.then_some(self.nodes.ttl_ms),
            lease_default_ms: self.lease.default_ms,
            lease_max_ms: self.lease.max_ms,
            ack_deadline_ms: self.preemption.ack_deadline_ms,
            min_hold_ms: self.preemption.min_hold_ms,
            default_timeout_ms: self.request.default_timeout_ms,
            aging_ms: self.queue.aging_ms,
            retain_ended: self.queue.retain_ended,
            max_per_service: self.queue.max_per_service,
            // Set by the driver from `nvml.settle_ms` once it knows NVML is there.
            settle_ms: 0,
            services: self.services.policies(),
        }
    }
}

/// One line per figment error, naming the key as the user wrote it and where it came from (the file, or
/// the environment variable).
fn describe(error: figment::Error, env_prefix: &str) -> String {
    use figment::error::Kind;

    let mut lines = Vec::new();
    for e in error {
        let mut path = e.path.clone();
        let what = match &e.kind {
            Kind::UnknownField(_, expected) => {
                let parent = display_key(&path[..path.len().saturating_sub(1)]);
                let known = if parent.is_empty() {
                    "known sections".to_owned()
                } else {
                    format!("known keys of `{parent}`")
                };
                format!("unknown key ({known}: {})", expected.join(", "))
            }
            Kind::MissingField(field) => {
                if path.last().map(String::as_str) != Some(field.as_ref()) {
                    path.push(field.to_string());
                }
                "missing key".to_owned()
            }
            kind => kind.to_string(),
        };
        let mut line = match e.metadata.as_ref().map(|md| (&md.source, md.name.as_ref())) {
            Some((Some(Source::File(file)), _)) => format!("{}: ", file.display()),
            Some((_, name)) if name.contains("environment") && !e.path.is_empty() => {
                let var = e
                    .path
                    .iter()
                    .map(|k| k.to_ascii_uppercase())
                    .collect::<Vec<_>>()
                    .join(ENV_SPLIT);
                format!("environment variable {env_prefix}{var}: ")
            }
            Some((_, name)) => format!("{name}: "),
            None => String::new(),
        };
        let key = display_key(&path);
        if !key.is_empty() {
            let _ = write!(line, "`{key}`: ");
        }
        line.push_str(what.trim_end());
        lines.push(line);
    }
    lines.join("\n")
}

/// `gpus.0.vram_mb` as `gpus[0].vram_mb`, as the validation messages write it.
fn display_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if part.bytes().all(|b| b.is_ascii_digit()) && !key.is_empty() {
            let _ = write!(key, "[{part}]");
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Each test reads the environment under a prefix of its own, so tests run in parallel and the real
    /// `GPU_COORDINATOR_*` variables of the machine running them do not leak in.
    fn prefix(test: &str) -> String {
        format!("GPU_COORDINATOR_TEST_{}_", test.to_ascii_uppercase())
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("a temporary file can be created");
        file.write_all(text.as_bytes())
            .expect("a temporary file can be written");
        file
    }

    fn load_str(text: &str, test: &str) -> Result<Config, ConfigError> {
        let file = toml_file(text);
        Config::load_with_env(Some(file.path()), &prefix(test))
    }

    fn invalid(text: &str, test: &str) -> String {
        match load_str(text, test) {
            Err(e @ ConfigError::Invalid(_)) => e.to_string(),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    fn parse_error(text: &str, test: &str) -> String {
        match load_str(text, test) {
            Err(e @ ConfigError::Parse(_)) => e.to_string(),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_without_file_or_env() {
        let config = Config::load_with_env(None, &prefix("defaults")).expect("defaults are valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(config.nats.prefix, "gpu");
        assert_eq!(config.nats.max_age_ms, 604_800_000);
        assert_eq!(config.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(config.redis.key_prefix, "gpu");
        assert_eq!(
            config.database.url,
            "postgres://postgres@127.0.0.1:5432/gpu_coordinator"
        );
        assert_eq!(config.http.listen, "127.0.0.1:8080");
        assert!(config.http.tokens.is_empty());
        assert_eq!(config.http.header_read_timeout_ms, 10_000);
        assert_eq!(config.http.max_connections, 1024);
        assert!(config.nvml.enabled);
        assert_eq!((config.nvml.sample_ms, config.nvml.settle_ms), (1000, 2000));
        assert!(config.gpus.is_empty());
    }

    #[test]
    fn sched_config_maps_the_keys() {
        assert_eq!(
            Config::default().sched_config(),
            gpu_coordinator_core::SchedConfig::default()
        );
        let config = load_str(
            "[lease]\ndefault_ms = 1\nmax_ms = 2\n[preemption]\nack_deadline_ms = 3\nmin_hold_ms = 4\n\
             [request]\ndefault_timeout_ms = 5\n[queue]\naging_ms = 6\nretain_ended = 7\nmax_per_service = 8\n",
            "sched",
        )
        .expect("valid");
        assert_eq!(
            config.sched_config(),
            gpu_coordinator_core::SchedConfig {
                host_ttl_ms: None,
                lease_default_ms: 1,
                lease_max_ms: 2,
                ack_deadline_ms: 3,
                min_hold_ms: 4,
                default_timeout_ms: 5,
                aging_ms: 6,
                retain_ended: 7,
                settle_ms: 0,
                max_per_service: 8,
                services: Default::default(),
            }
        );
    }

    #[test]
    fn file_overrides_defaults() {
        let config = load_str(
            r#"
            [nats]
            url = "nats://nats:4222"
            [lease]
            default_ms = 5000
            [http.tokens]
            secret-1 = "chat"
            [[gpus]]
            id = "0"
            vram_mb = 24576
            [[gpus]]
            id = "1"
            vram_mb = 12288
            "#,
            "file",
        )
        .expect("valid");
        assert_eq!(config.nats.url, "nats://nats:4222");
        assert_eq!(
            config.nats.prefix, "gpu",
            "keys not in the file keep their default"
        );
        assert_eq!(config.lease.default_ms, 5000);
        assert_eq!(config.lease.max_ms, 3_600_000);
        assert_eq!(
            config.http.tokens.get("secret-1").map(String::as_str),
            Some("chat")
        );
        assert_eq!(
            config.gpus,
            vec![
                GpuConfig {
                    id: "0".into(),
                    vram_mb: 24576
                },
                GpuConfig {
                    id: "1".into(),
                    vram_mb: 12288
                },
            ]
        );
    }

    #[test]
    fn env_overrides_file_with_nesting() {
        let p = prefix("env");
        std::env::set_var(format!("{p}NATS__URL"), "nats://elsewhere:4222");
        std::env::set_var(format!("{p}LEASE__DEFAULT_MS"), "45000");
        std::env::set_var(format!("{p}PREEMPTION__ACK_DEADLINE_MS"), "2500");
        std::env::set_var(format!("{p}HTTP__LISTEN"), "0.0.0.0:9090");
        let file = toml_file(
            "[nats]\nurl = \"nats://file:4222\"\nprefix = \"edge\"\n[lease]\ndefault_ms = 1000\n",
        );
        let config = Config::load_with_env(Some(file.path()), &p).expect("valid");
        assert_eq!(config.nats.url, "nats://elsewhere:4222");
        assert_eq!(config.nats.prefix, "edge");
        assert_eq!(config.lease.default_ms, 45_000);
        assert_eq!(config.preemption.ack_deadline_ms, 2500);
        assert_eq!(config.http.listen, "0.0.0.0:9090");
    }

    #[test]
    fn env_unknown_key_names_the_variable() {
        let p = prefix("envbad");
        std::env::set_var(format!("{p}LEASE__DEFAULT"), "1");
        let err = Config::load_with_env(None, &p).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("`lease.default`: unknown key"), "{msg}");
        assert!(
            msg.contains(&format!(
                "environment variable {p}LEASE__DEFAULT: `lease.default`: unknown key"
            )),
            "{msg}"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            Config::load_with_env(Some(Path::new("/nonexistent/gpu.toml")), &prefix("missing"))
                .expect_err("missing file");
        assert!(matches!(err, ConfigError::File { .. }));
        assert!(err.to_string().contains("/nonexistent/gpu.toml"), "{err}");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let file = toml_file("[lease]\ndefault_ms = 1000\nmax = 5\n");
        let err =
            Config::load_with_env(Some(file.path()), &prefix("unknown")).expect_err("unknown key");
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse(_)));
        let file = file.path().display();
        assert!(
            msg.contains(&format!("{file}: `lease.max`: unknown key")),
            "{msg}"
        );
        assert!(msg.contains("default_ms, max_ms"), "{msg}");
    }

    #[test]
    fn wrong_type_names_key_and_file() {
        let file = toml_file("[lease]\ndefault_ms = \"soon\"\n");
        let err =
            Config::load_with_env(Some(file.path()), &prefix("wrongtype")).expect_err("wrong type");
        let msg = err.to_string();
        let file = file.path().display();
        assert!(
            msg.contains(&format!("{file}: `lease.default_ms`: invalid type")),
            "{msg}"
        );
    }

    #[test]
    fn bad_toml_names_the_file() {
        let msg = parse_error("[lease\n", "badtoml");
        assert!(msg.contains(".toml"), "{msg}");
    }

    #[test]
    fn write_behind_needs_postgres_and_nats() {
        let msg = invalid(
            "[database]\nwrite_behind = true\n\n[backends]\nbus = \"embedded\"\n",
            "writebehind",
        );
        assert!(
            msg.contains("database.write_behind needs backends.journal = \"postgres\""),
            "{msg}"
        );
    }

    #[test]
    fn sqlite_beside_a_server_needs_one_box() {
        let msg = invalid(
            "[backends]\njournal = \"sqlite\"\nleases = \"memory\"\nbus = \"nats\"\n",
            "onebox",
        );
        assert!(
            msg.contains("backends.journal = \"sqlite\" with backends.bus = \"nats\" (the same nats.prefix) is for one box only"),
            "{msg}"
        );
        assert!(msg.contains("grant the same GPUs twice"), "{msg}");
        assert!(msg.contains("backends.one_box = true"), "{msg}");
        let msg = invalid("[backends]\njournal = \"sqlite\"\n", "oneboxredis");
        assert!(
            msg.contains(
                "backends.bus = \"nats\" (the same nats.prefix) and backends.leases = \"redis\""
            ),
            "{msg}"
        );
        load_str(
            "[backends]\njournal = \"sqlite\"\nbus = \"nats\"\none_box = true\n",
            "oneboxset",
        )
        .expect("confirmed as one box");
        load_str(
            "[backends]\njournal = \"sqlite\"\nleases = \"memory\"\nbus = \"embedded\"\n",
            "oneboxembedded",
        )
        .expect("nothing shared");
    }

    #[test]
    fn max_below_default_lease() {
        let msg = invalid("[lease]\nmax_ms = 1000\n", "maxlease");
        assert!(
            msg.contains("lease.max_ms (1000) must be >= lease.default_ms (30000)"),
            "{msg}"
        );
    }

    #[test]
    fn zero_durations_are_rejected() {
        let msg = invalid(
            "[lease]\ndefault_ms = 0\n[preemption]\nack_deadline_ms = 0\n[request]\ndefault_timeout_ms = 0\n\
             [nats]\nmax_age_ms = 0\n[nvml]\nsample_ms = 0\n",
            "zeros",
        );
        for key in [
            "lease.default_ms",
            "preemption.ack_deadline_ms",
            "request.default_timeout_ms",
            "nats.max_age_ms",
            "nvml.sample_ms",
        ] {
            assert!(msg.contains(&format!("{key} must be > 0")), "{key}: {msg}");
        }
    }

    #[test]
    fn duplicate_gpu_id() {
        let msg = invalid(
            "[[gpus]]\nid = \"0\"\nvram_mb = 1000\n[[gpus]]\nid = \"0\"\nvram_mb = 1000\n",
            "dupgpu",
        );
        assert!(msg.contains("gpus[1].id \"0\" is used twice"), "{msg}");
    }

    #[test]
    fn gpu_without_vram() {
        let msg = invalid("[[gpus]]\nid = \"0\"\nvram_mb = 0\n", "gpuvram");
        assert!(msg.contains("gpus[0].vram_mb must be > 0"), "{msg}");
        let msg = invalid("[[gpus]]\nid = \"\"\nvram_mb = 10\n", "gpuid");
        assert!(msg.contains("gpus[0].id must not be empty"), "{msg}");
    }

    #[test]
    fn gpu_missing_field_names_it() {
        let msg = parse_error("[[gpus]]\nid = \"0\"\n", "gpumissing");
        assert!(msg.contains("`gpus[0].vram_mb`: missing key"), "{msg}");
    }

    #[test]
    fn bad_nats_prefix() {
        for bad in ["a b", "", "gpu.", "a..b", "gpu>", "gpu.*"] {
            let msg = invalid(&format!("[nats]\nprefix = {bad:?}\n"), "prefix");
            assert!(msg.contains(&format!("nats.prefix {bad:?}")), "{msg}");
        }
    }

    #[test]
    fn multi_token_prefix_is_valid() {
        let config = load_str("[nats]\nprefix = \"site-a.gpu\"\n", "prefixok").expect("valid");
        assert_eq!(config.nats.prefix, "site-a.gpu");
    }

    #[test]
    fn bad_listen_address() {
        let msg = invalid("[http]\nlisten = \"x\"\n", "listen");
        assert!(
            msg.contains("http.listen \"x\" is not a socket address"),
            "{msg}"
        );
    }

    #[test]
    fn zero_connection_limits_are_refused() {
        let msg = invalid(
            "[http]\nheader_read_timeout_ms = 0\nmax_connections = 0\n",
            "connlimits",
        );
        assert!(msg.contains("http.header_read_timeout_ms"), "{msg}");
        assert!(msg.contains("http.max_connections"), "{msg}");
    }

    #[test]
    fn bad_token_service_id() {
        let msg = invalid("[http.tokens]\nt1 = \"chat bot\"\n", "tokens");
        assert!(msg.contains("http.tokens"), "{msg}");
        assert!(msg.contains("\"chat bot\""), "{msg}");
        let long = "a".repeat(65);
        let msg = invalid(&format!("[http.tokens]\nt1 = {long:?}\n"), "tokens");
        assert!(msg.contains("1-64 characters"), "{msg}");
    }

    #[test]
    fn empty_urls_are_rejected() {
        let msg = invalid(
            "[nats]\nurl = \"\"\n[redis]\nurl = \"\"\n[database]\nurl = \" \"\n",
            "urls",
        );
        for key in ["nats.url", "redis.url", "database.url"] {
            assert!(msg.contains(&format!("{key} must not be empty")), "{msg}");
        }
    }

    #[test]
    fn a_nats_url_may_list_several_servers() {
        let config = load_str(
            "[nats]\nurl = \"nats://n1:4222, nats://u:pw@n2:4223,n3\"\nreplicas = 3\n",
            "natslist",
        )
        .expect("valid");
        assert_eq!(config.nats.replicas, 3);
        assert_eq!(Config::default().nats.replicas, 1);
    }

    #[test]
    fn a_nats_url_that_cannot_be_parsed_is_refused_naming_the_key() {
        for bad in [
            "nats://n1:4222,nats://n2:42x2",
            "nats://n1:4222 nats://n2:4222",
            "nats://n1:4222,,nats://n2:4222",
            "http://n1:4222",
        ] {
            let msg = invalid(&format!("[nats]\nurl = {bad:?}\n"), "natsbad");
            assert!(msg.contains("nats.url: `"), "{bad}: {msg}");
            assert!(msg.contains("separated by commas"), "{bad}: {msg}");
        }
        let msg = invalid("[nats]\nurl = \"nats://u:secretpw@n1:42x2\"\n", "natsbadpw");
        assert!(!msg.contains("secretpw"), "{msg}");
    }

    #[test]
    fn a_database_url_may_name_a_primary_and_its_standbys() {
        let config = load_str(
            "[database]\nurl = \"postgres://u:pw@pg1:5432,pg2:5433,[::1]/gpu?sslmode=disable\"\n",
            "pglist",
        )
        .expect("valid");
        assert!(config.database.url.contains("pg1:5432,pg2:5433"));
    }

    #[test]
    fn a_database_url_whose_hosts_cannot_be_parsed_is_refused_naming_the_key() {
        for (bad, says) in [
            (
                "postgres://u:secretpw@pg1:5432,pg2:54x2/gpu",
                "not a number",
            ),
            ("postgres://u:secretpw@pg1:5432,,pg2/gpu", "empty host"),
            ("postgres://u:secretpw@/gpu?host=pg1,pg2", "several values"),
            ("pg1:5432,pg2:5432", "not a URL"),
        ] {
            let msg = invalid(&format!("[database]\nurl = {bad:?}\n"), "pgbad");
            assert!(msg.contains("database.url: "), "{bad}: {msg}");
            assert!(msg.contains(says), "{bad}: {msg}");
            assert!(msg.contains("separated by commas"), "{bad}: {msg}");
            assert!(!msg.contains("secretpw"), "{bad}: {msg}");
        }
    }

    #[test]
    fn nats_replicas_are_one_to_five() {
        for bad in [0, 6] {
            let msg = invalid(&format!("[nats]\nreplicas = {bad}\n"), "replicas");
            assert!(
                msg.contains(&format!("nats.replicas ({bad}) must be 1 to 5")),
                "{msg}"
            );
        }
        load_str("[nats]\nreplicas = 5\n", "replicas5").expect("valid");
    }

    #[test]
    fn redis_sentinels_name_a_master_in_place_of_redis_url() {
        let config = load_str(
            "[redis]\nsentinels = [\"s1:26379\", \"redis://:pw@s2:26380\"]\nmaster = \"leases\"\n",
            "sentinels",
        )
        .expect("valid");
        assert_eq!(config.redis.sentinels.len(), 2);
        assert_eq!(config.redis.master, "leases");
        assert!(!format!("{config:?}").contains(":pw@"), "{config:?}");
        // From the environment too, as a list.
        let p = prefix("sentinelsenv");
        std::env::set_var(
            format!("{p}REDIS__SENTINELS"),
            "[\"s1:26379\",\"s2:26379\"]",
        );
        std::env::set_var(format!("{p}REDIS__MASTER"), "m");
        let config = Config::load_with_env(None, &p).expect("valid");
        assert_eq!(config.redis.sentinels, ["s1:26379", "s2:26379"]);

        let msg = invalid(
            "[redis]\nurl = \"redis://r:6379\"\nsentinels = [\"s1:26379\"]\nmaster = \"m\"\n",
            "sentinelsboth",
        );
        assert!(
            msg.contains("redis.url and redis.sentinels are both set"),
            "{msg}"
        );
        let msg = invalid("[redis]\nsentinels = [\"s1:26379\"]\n", "sentinelsnomaster");
        assert!(msg.contains("redis.master must name the master"), "{msg}");
        let msg = invalid("[redis]\nmaster = \"m\"\n", "masteralone");
        assert!(
            msg.contains("redis.master (\"m\") is set without redis.sentinels"),
            "{msg}"
        );
        let msg = invalid(
            "[redis]\nsentinels = [\"s1:26379\", \"s2\", \"s3:2x\"]\nmaster = \"m\"\n",
            "sentinelsbad",
        );
        assert!(
            msg.contains("redis.sentinels[1]: \"s2\" names no port"),
            "{msg}"
        );
        assert!(msg.contains("redis.sentinels[2]: \"s3:2x\""), "{msg}");
        assert!(!msg.contains("redis.sentinels[0]"), "{msg}");
    }

    #[test]
    fn debug_hides_the_secrets() {
        let config = load_str(
            "[nats]\nurl = \"nats://svc:natspw@h:4222,nats://tok3n@h2:4222\"\n\
             [redis]\nurl = \"redis://:redispw@h:6379/0\"\n\
             [database]\nurl = \"postgres://u:pgpw@h/db?password=querypw\"\n\
             [http.tokens]\nhttptok = \"chat\"\n",
            "debugsecrets",
        )
        .expect("valid");
        let text = format!("{config:?} {config:#?}");
        for secret in ["natspw", "tok3n", "redispw", "pgpw", "querypw", "httptok"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for shown in [
            "svc:***@h:4222",
            "redis://h:6379/0",
            "postgres://u@h/db",
            "\"chat\"",
        ] {
            assert!(text.contains(shown), "{shown} not in {text}");
        }
    }

    #[test]
    fn services_sections_take_the_default_sections_keys() {
        let config = load_str(
            r#"
            [services]
            allow_unknown = false
            [services.default]
            max_priority = 2
            min_hold_ms = 500
            [services.chat]
            max_priority = 0
            default_priority = 0
            max_vram_mb = 20000
            guaranteed_vram_mb = 16000
            [services.batch]
            clamp_priority = true
            default_vram_mb = 4000
            default_lease_ms = 60000
            preemptible = false
            "#,
            "services",
        )
        .expect("valid");
        let policies = config.sched_config().services;
        let chat = policies.get("chat").expect("a section");
        assert_eq!(
            (chat.max_priority, chat.default_priority, chat.max_vram_mb),
            (Some(0), Some(0), Some(20_000))
        );
        assert_eq!(
            (chat.guaranteed_vram_mb, chat.min_hold_ms),
            (16_000, Some(500))
        );
        assert!(chat.preemptible && !chat.clamp_priority);
        let batch = policies.get("batch").expect("a section");
        assert_eq!(batch.max_priority, Some(2), "from [services.default]");
        assert!(batch.clamp_priority && !batch.preemptible);
        assert_eq!(
            (batch.default_vram_mb, batch.default_lease_ms),
            (Some(4_000), Some(60_000))
        );
        assert!(policies.get("stranger").is_none(), "allow_unknown is false");
        // Without [services], every service is served as today.
        let policies = Config::default().sched_config().services;
        assert_eq!(
            policies.get("anyone"),
            Some(&gpu_coordinator_core::ServicePolicy::default())
        );
    }

    #[test]
    fn services_keys_can_come_from_the_environment() {
        let p = prefix("servicesenv");
        std::env::set_var(format!("{p}SERVICES__CHAT__MAX_PRIORITY"), "1");
        std::env::set_var(format!("{p}SERVICES__ALLOW_UNKNOWN"), "false");
        let config = Config::load_with_env(None, &p).expect("valid");
        assert_eq!(config.services.named["chat"].max_priority, Some(1));
        assert!(!config.services.allow_unknown);
    }

    #[test]
    fn services_unknown_key_names_it() {
        let msg = parse_error("[services.chat]\nmax_prio = 1\n", "servicesunknown");
        assert!(
            msg.contains("`services.chat.max_prio`: unknown key"),
            "{msg}"
        );
        let msg = parse_error("[services.chat]\nmax_priority = 300\n", "servicesrange");
        assert!(msg.contains("`services.chat.max_priority`"), "{msg}");
    }

    #[test]
    fn services_problems_name_the_key() {
        let msg = invalid(
            r#"
            [lease]
            max_ms = 60000
            [[gpus]]
            id = "0"
            vram_mb = 24000
            [services.default]
            guaranteed_vram_mb = 1000
            [services.chat]
            max_priority = 1
            default_priority = 0
            max_vram_mb = 8000
            guaranteed_vram_mb = 9000
            default_vram_mb = 0
            [services.asr]
            guaranteed_vram_mb = 20000
            default_lease_ms = 90000
            clamp_priority = true
            [services."a b"]
            "#,
            "servicesbad",
        );
        for want in [
            "services.default.guaranteed_vram_mb: a guarantee is given per named service",
            "services.chat.default_priority (0) is more urgent than services.chat.max_priority (1)",
            "services.chat.guaranteed_vram_mb (9000) is above services.chat.max_vram_mb (8000)",
            "services.chat.default_vram_mb must be > 0",
            "services.asr.default_lease_ms (90000) is above lease.max_ms (60000)",
            "services.asr.clamp_priority is set but services.asr.max_priority is not",
            "the guarantees add up to 29000 MB, more than the [[gpus]] have (24000 MB)",
            "[services.a b]: \"a b\" is not a service id",
        ] {
            assert!(msg.contains(want), "{want}: {msg}");
        }
        let msg = invalid("[services]\nallow_unknown = false\n", "servicesnone");
        assert!(msg.contains("every request would be rejected"), "{msg}");
    }

    #[test]
    fn an_engine_must_pass_its_services_limits() {
        let engine =
            "[[engines]]\nservice = \"chat\"\nkind = \"vllm\"\nlisten = \"127.0.0.1:9001\"\n\
                      upstream = \"http://127.0.0.1:8001\"\npriority = 0\n";
        let msg = invalid(
            &format!("{engine}[services.chat]\nmax_priority = 1\n"),
            "enginelimits",
        );
        assert!(
            msg.contains(
                "engines[0].priority (0) is more urgent than services.chat.max_priority (1)"
            ),
            "{msg}"
        );
        let msg = invalid(
            &format!("{engine}[services]\nallow_unknown = false\n[services.asr]\n"),
            "engineunknown",
        );
        assert!(
            msg.contains("engines[0].service \"chat\" has no [services.chat] section"),
            "{msg}"
        );
        load_str(
            &format!("{engine}[services.chat]\nmax_priority = 1\nclamp_priority = true\n"),
            "engineclamp",
        )
        .expect("a clamped priority passes");
    }

    #[test]
    fn example_file_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let config =
            Config::load_with_env(Some(&path), &prefix("example")).expect("the example loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn example_file_gpus_parse_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(path).expect("the example is readable");
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with("[[gpus]]")
                        || rest.starts_with("id =")
                        || rest.starts_with("vram_mb =") =>
                {
                    rest
                }
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let config = load_str(&uncommented, "examplegpus").expect("the uncommented example loads");
        assert_eq!(config.gpus.len(), 2);
    }
}
