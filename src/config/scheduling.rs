//! The scheduler's sections: `[lease]`, `[preemption]`, `[request]` and `[queue]`.

use serde::{Deserialize, Serialize};

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
