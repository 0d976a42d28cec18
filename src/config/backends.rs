//! `[leader]`, `[backends]` and `[embedded]`: leadership, which adapter fills each port, and where the
//! embedded backends keep their data.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::DEFAULT_STREAM_BYTES;

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
