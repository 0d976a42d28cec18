//! The lease store: Redis is the source of truth for who holds a GPU.
//!
//! This module owns the translation between the core's [`Lease`](gpu_coordinator_core::Lease)s and
//! [`LeaseOp`](gpu_coordinator_core::LeaseOp)s and Redis keys. Every write is a Lua script, so that
//! the checks (capacity, fence, owner) and the write are one atomic step on the server: two
//! coordinators, or a coordinator and its own stale retry, can never both hold a place that only
//! fits one. It decides nothing: when a lease is written, extended or dropped comes from the core
//! through the driver; a refusal goes back to the core (`Input::LeaseRefused`) as it is.
//!
//! ## Keys, under `<key_prefix>:`
//!
//! | key | type | TTL | holds |
//! |---|---|---|---|
//! | `lease:<request_id>` | hash | relative (`PEXPIRE`, `expires_at` less this coordinator's now) | `request_id`, `service_id`, `gpu`, `fence`, `vram_mb`, `capacity_mb`, `expires_at` |
//! | `gpu:<gpu>` | hash | none | `request_id -> vram_mb` of the leases on that GPU |
//! | `gpus` | set | none | the GPU ids that have a `gpu:` hash, so that [`RedisLeases::leases`] needs no `SCAN` |
//! | `fence` | string | none | the highest fence ever written; only raised |
//! | `epoch` | string | none | set once ([`RedisLeases::ensure_epoch`]); missing later means Redis lost its data |
//! | `writes` | string | none | counts the writes of the scripts; below the count a write was answered with, Redis lost writes it had acknowledged |
//!
//! A lease ends by itself when its key expires: Redis drops it at `expires_at`, whatever happens to the
//! coordinator. The TTL is written relative (`PEXPIRE`) from the coordinator's clock, which is the one
//! `expires_at` was counted on: an absolute `PEXPIREAT` would be read on Redis's clock, and a Redis
//! whose clock is behind would keep a lease past its end (ahead: drop it early). A `gpu:` member whose lease key is gone (or now names another GPU) counts for nothing and
//! is removed by the next script that looks at that GPU, so an expired lease frees its capacity at once.
//!
//! The scripts name keys they compute from the prefix, so the store needs a standalone Redis (or a
//! cluster-free setup); fences and milliseconds are compared as Lua numbers, exact below 2^53.
//!
//! ## Lost writes
//!
//! A Redis can come back without writes it acknowledged: Sentinel promotes a replica that had not yet
//! received the master's last writes (replication is asynchronous), or a Redis restarts from a snapshot
//! older than its last writes. The `epoch` marker catches only a Redis that lost everything. Every
//! script that writes counts its write in `writes`, and the store remembers the highest count it was
//! answered with; a replica holds a prefix of its master's writes, so a count below that one means
//! writes were lost. Every write checks it first: a store that is behind writes nothing and answers
//! [`LeaseOutcome::Behind`], until [`RedisLeases::recover`] raises the term, the fence and the count
//! again (the driver then writes the leases back, before anything new).
//!
//! ## Sentinel
//!
//! With [`RedisLeases::connect_sentinel`] the store asks the Sentinels which server is the master, and
//! asks them again after every lost connection or `READONLY` answer (a master that was turned into a
//! replica), so that after a failover its commands go to the promoted replica.

mod error;
mod link;
mod scripts;
mod store;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use crate::ports::{LeaseOutcome, Refused};
pub use error::RedisError;
use link::Link;

/// The leases of one deployment (one key prefix) in one Redis: the [`Leases`](crate::ports::Leases)
/// port.
#[derive(Clone)]
pub struct RedisLeases {
    conn: Link,
    prefix: String,
    /// The URL without password, or the master's name and its Sentinels, for messages.
    server: String,
    /// The leadership term this store writes under (0: unfenced, for tools and tests); every write is
    /// refused once a newer term was claimed.
    term: Arc<AtomicU64>,
    /// The highest write count an answer carried (see "Lost writes").
    seen: Arc<AtomicU64>,
}

impl std::fmt::Debug for RedisLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLeases")
            .field("server", &self.server)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}
